"""Files and figures of the RNN example: ``metrics.json``, ``metrics.csv``, the plots.

``write_outputs`` writes one run of ``train_rnn.py`` (``training.png``:
loss, gradient norm against the threshold, and d loss / d h_t back through
time); ``plot_cliff`` draws a clipped and an unclipped run of the same seed
side by side (``examples/rnn_cliff.py`` makes ``docs/img/rnn_cliff.png``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

if not __package__:  # run as a script: make the examples package importable
  import sys

  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from examples.reporting import write_metrics  # noqa: E402


def write_outputs(out: Path, results: dict[str, Any], rows: list[dict[str, float]]) -> None:
  """``metrics.json``, ``metrics.csv`` (one row per step) and ``training.png`` in ``out``."""
  write_metrics(out, results, rows)
  plot_training(results, out / "training.png")


def _pyplot():
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def _floats(values) -> np.ndarray:
  return np.array([np.nan if v is None else v for v in values], float)


def _label(results: dict[str, Any]) -> str:
  config = results["config"]
  if config["clip"] == "none":
    return "no clipping"
  bound = f" {config['max_norm']:g}" if config.get("max_norm") is not None else ""
  return f"{config['clip']}{bound}"


def _verdict(results: dict[str, Any]) -> str:
  if results["diverged"]:
    return "diverged"
  return f"test MSE {results['test_loss']:.3g}" + (", solved" if results["solved"] else "")


def plot_loss(ax, runs: Mapping[str, dict[str, Any]]) -> None:
  """Training loss per step (smoothed) and test loss at each evaluation, log scale."""
  baseline = None
  for color, (label, results) in zip(("C3", "C0", "C2", "C1"), runs.items()):
    loss = _floats(results["step_loss"])
    window = max(1, len(loss) // 100)
    smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
    ax.plot(np.arange(window, len(loss) + 1), smooth, color=color, lw=0.8, alpha=0.6)
    evals = results["evaluations"]
    ax.plot(evals["step"], _floats(evals["test_loss"]), "o-", color=color, ms=3, label=label)
    baseline = results["baseline_loss"]
  ax.axhline(baseline, color="k", ls=":", lw=1, label="trivial predictor")
  ax.axhline(0.1 * baseline, color="k", ls="--", lw=1, label="solved below")
  ax.set(xlabel="step", ylabel="MSE", yscale="log", title="loss (train: line, test: dots)")
  ax.legend(fontsize=8)


def plot_grad_norms(ax, runs: Mapping[str, dict[str, Any]]) -> None:
  """Pre-clip global gradient norm per step against the threshold, log scale."""
  for index, (color, (label, results)) in enumerate(zip(("C3", "C0", "C2", "C1"), runs.items())):
    norms = _floats(results["grad_norm"])
    # The first run on top: the unclipped one, whose spikes are the point.
    ax.plot(
      np.arange(1, len(norms) + 1),
      norms,
      color=color,
      lw=0.5,
      alpha=0.8,
      label=label,
      zorder=len(runs) - index,
    )
    threshold = _floats(results["threshold"])
    if np.isfinite(threshold).any():
      ax.plot(np.arange(1, len(threshold) + 1), threshold, "k--", lw=1, label="threshold")
  ax.set(xlabel="step", ylabel="norm", yscale="log", title="gradient norm per step (pre-clip)")
  ax.legend(fontsize=8)


def plot_hidden_grads(ax, results: dict[str, Any], title: str) -> None:
  """||d loss / d h_t|| against t at each evaluation, coloured from first to last."""
  plt = _pyplot()
  evals = results["evaluations"]
  profiles = [_floats(p) for p in evals["hidden_grad_norms"]]
  colors = plt.cm.viridis(np.linspace(0, 1, len(profiles)))
  for color, step, profile in zip(colors, evals["step"], profiles):
    if np.isfinite(profile).any():
      ax.plot(np.arange(1, len(profile) + 1), profile, color=color, lw=1, label=f"step {step}")
  ax.set(xlabel="time step t", ylabel="mean ||d loss / d h_t||", yscale="log", title=title)
  ax.legend(fontsize=6, ncol=2)


def plot_after_clip(ax, results: dict[str, Any]) -> None:
  """The last profile times the clip's scale: lower, with the same slope back through time."""
  evals = results["evaluations"]
  threshold = results["config"].get("max_norm")
  profile, norm = _floats(evals["hidden_grad_norms"][-1]), evals["grad_norm"][-1]
  if threshold is None or norm is None or not np.isfinite(profile).all():
    return
  scale = min(1.0, threshold / norm)
  ax.plot(
    np.arange(1, len(profile) + 1),
    profile * scale,
    "k--",
    lw=1.2,
    label=f"step {evals['step'][-1]} after the clip (x{scale:.2g})",
  )
  ax.legend(fontsize=6, ncol=2)


def plot_training(results: dict[str, Any], path: Path) -> None:
  """One run: loss, gradient norm per step against the threshold, d loss / d h_t over time."""
  plt = _pyplot()
  config = results["config"]
  fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
  runs = {_label(results): results}
  plot_loss(axes[0], runs)
  plot_grad_norms(axes[1], runs)
  plot_hidden_grads(axes[2], results, "gradient back through time")
  fig.suptitle(
    f"{config['cell']} on the adding problem, length {config['seq_len']}, {_label(results)},"
    f" lr {config['lr']:g}: {_verdict(results)}"
  )
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_cliff(unclipped: dict[str, Any], clipped: dict[str, Any], path: Path) -> None:
  """The same seed without and with clipping: the exploding-gradient cliff and its limits.

  Top: loss, and the pre-clip gradient norm per step against the threshold.
  Bottom: ||d loss / d h_t|| back through time at each evaluation, per run.
  Clipping multiplies the whole gradient by one scalar, so it can lower the
  curve but never change its slope: it bounds an explosion and cannot restore
  a gradient that has vanished back through time.
  """
  plt = _pyplot()
  config = clipped["config"]
  runs = {
    f"{_label(unclipped)} ({_verdict(unclipped)})": unclipped,
    f"{_label(clipped)} ({_verdict(clipped)})": clipped,
  }
  fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
  plot_loss(axes[0, 0], runs)
  plot_grad_norms(axes[0, 1], runs)
  plot_hidden_grads(axes[1, 0], unclipped, f"d loss / d h_t, {_label(unclipped)}")
  plot_hidden_grads(axes[1, 1], clipped, f"d loss / d h_t, {_label(clipped)}")
  plot_after_clip(axes[1, 1], clipped)
  fig.suptitle(
    f"{config['cell']} on the adding problem, length {config['seq_len']}, lr {config['lr']:g},"
    f" momentum {config['momentum']:g}, seed {config['seed']}"
  )
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
