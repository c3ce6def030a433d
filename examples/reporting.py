"""What ``train_cnn.py`` reports: progress bar, per-step records, files and the figure.

The training script hands each epoch's device metrics and ``clipx.stats``
reports to a ``Recorder``; the recorder turns them into the per-epoch history,
one ``metrics.csv`` row per step (every ``clipx.stats(...).as_dict()`` field),
TensorBoard scalars (with ``--tensorboard``), ``metrics.json`` and
``training.png``. Keeping this here leaves the script to the model, the
optimizer with its clipx transform, the jitted steps and the loop.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import clipx

# Per-step scalars of the train step kept in metrics.json.
STEP_KEYS = ("loss", "accuracy", "grad_norm", "threshold", "scope_norm", "clipped")


def open_tensorboard(args: Any):
  """A tensorboardX ``SummaryWriter`` under ``--out``, or None with a message why not."""
  if not args.tensorboard:
    return None
  try:
    from tensorboardX import SummaryWriter
  except ImportError:
    print(
      "--tensorboard: tensorboardX is not installed (pip install tensorboardX);"
      " writing metrics.csv only.",
      file=sys.stderr,
    )
    return None
  return SummaryWriter(str(Path(args.out) / "tensorboard"))


def step_summary(report: clipx.StatsReport) -> dict[str, jax.Array]:
  """Threshold and clip flag of the first clipx transform, as scalars.

  Per-layer clipping has one threshold per group (all equal for a float
  bound) and counts a step as clipped when any group was; ``scope_norm`` is
  then the largest group norm, the one to compare with the threshold.
  """
  clip_stats = next((s for s in report.values() if isinstance(s, clipx.ClipStats)), None)
  if clip_stats is None:
    nan = jnp.full((), jnp.nan, jnp.float32)
    return {"threshold": nan, "scope_norm": nan, "clipped": jnp.zeros((), jnp.bool_)}
  return {
    "threshold": jnp.max(clip_stats.threshold).astype(jnp.float32),
    "scope_norm": jnp.max(clip_stats.norm).astype(jnp.float32),
    "clipped": jnp.any(clip_stats.clipped),
  }


def show_progress(bar, epoch_metrics: list[dict], recent_count: int) -> float:
  """Sets the bar's loss, accuracy, gradient norm and clip rate; returns the latest loss.

  Reading the metrics waits for the step, so the loop calls this every few steps only.
  """
  recent = jax.device_get(epoch_metrics[-recent_count:])
  clipped_so_far = jax.device_get([m["clipped"] for m in epoch_metrics])
  bar.set_postfix(
    loss=f"{recent[-1]['loss']:.4f}",
    acc=f"{np.mean([m['accuracy'] for m in recent]):.3f}",
    grad_norm=f"{recent[-1]['grad_norm']:.3g}",
    clip_rate=f"{np.mean(clipped_so_far):.2f}",
  )
  return float(recent[-1]["loss"])


class Recorder:
  """Collects a run's per-step and per-epoch records; writes them to TensorBoard as they come."""

  def __init__(self, args: Any):
    self.history: dict[str, list] = {
      "train_loss": [],
      "train_accuracy": [],
      "test_loss": [],
      "test_accuracy_per_epoch": [],
      "clip_rate_per_epoch": [],
    }
    self.steps: dict[str, list] = {key: [] for key in STEP_KEYS}
    self.rows: list[dict[str, float]] = []
    self.tensorboard = open_tensorboard(args)

  def add_epoch(self, last_step: int, epoch: int, metrics: list, reports: list) -> bool:
    """Records one epoch's steps (host values); returns whether a loss was non-finite."""
    for offset, (step_metrics, report) in enumerate(zip(metrics, reports)):
      for key in STEP_KEYS:
        self.steps[key].append(step_metrics[key].item())
      row = {
        "step": last_step - len(metrics) + offset + 1,
        "epoch": epoch,
        "loss": float(step_metrics["loss"]),
        "accuracy": float(step_metrics["accuracy"]),
        "grad_norm": float(step_metrics["grad_norm"]),
        **clipx.StatsReport(report).as_dict(),
      }
      self.rows.append(row)
      if self.tensorboard is not None:
        for key, value in row.items():
          if key not in ("step", "epoch"):
            self.tensorboard.add_scalar(key if "/" in key else f"train/{key}", value, row["step"])
    losses = [float(m["loss"]) for m in metrics]
    self.history["train_loss"].append(float(np.mean(losses)))
    self.history["train_accuracy"].append(float(np.mean([m["accuracy"] for m in metrics])))
    self.history["clip_rate_per_epoch"].append(
      float(np.mean([m["clipped"] for m in metrics])) if metrics else 0.0
    )
    return not all(math.isfinite(v) for v in losses)

  def add_test(self, step: int, test_loss: float, test_accuracy: float) -> str:
    """Records the end-of-epoch evaluation; returns the epoch's one-line summary."""
    self.history["test_loss"].append(test_loss)
    self.history["test_accuracy_per_epoch"].append(test_accuracy)
    if self.tensorboard is not None:
      self.tensorboard.add_scalar("test/accuracy", test_accuracy, step)
      self.tensorboard.add_scalar("test/loss", test_loss, step)
    epoch = len(self.history["test_loss"])
    return (
      f"epoch {epoch}: train loss {self.history['train_loss'][-1]:.4f},"
      f" test loss {test_loss:.4f}, test accuracy {test_accuracy:.4f},"
      f" clip rate {self.history['clip_rate_per_epoch'][-1]:.2f}"
    )

  def results(self, **run: Any) -> dict[str, Any]:
    """The ``metrics.json`` content; ``run`` holds config, devices, steps, timings, diverged."""
    if self.tensorboard is not None:
      self.tensorboard.close()
    steps = self.steps
    nullable = lambda values: [None if math.isnan(v) else v for v in values]  # noqa: E731
    return {
      "config": run.pop("config"),
      "devices": run.pop("devices"),
      "test_accuracy": self.history["test_accuracy_per_epoch"][-1],
      **self.history,
      "clip_rate": float(np.mean(steps["clipped"])) if steps["clipped"] else 0.0,
      "grad_norm": steps["grad_norm"],
      # None (JSON null) where there is no threshold: --clip none.
      "threshold": nullable(steps["threshold"]),
      "scope_norm": nullable(steps["scope_norm"]),
      "clipped": [bool(c) for c in steps["clipped"]],
      "step_loss": steps["loss"],
      **run,
    }


def summary_line(results: dict[str, Any], out: str | None) -> str:
  """The final line: test accuracy, clip rate, steps and time (printed even with --quiet)."""
  return (
    f"test accuracy {results['test_accuracy']:.4f}, clip rate {results['clip_rate']:.2f},"
    f" {results['steps']} steps in {results['wall_seconds']:.1f} s"
    f" (first step, compile included, after {results['first_step_seconds']:.1f} s)"
    + (", DIVERGED (non-finite loss)" if results["diverged"] else "")
    + (f"; wrote {out}/metrics.json, metrics.csv, training.png" if out else "")
  )


def write_metrics(out: Path, results: dict[str, Any], rows: list[dict[str, float]]) -> None:
  """``metrics.json`` and ``metrics.csv`` (one row per step) in ``out``; shared by the examples."""
  out.mkdir(parents=True, exist_ok=True)
  # allow_nan=False: a diverged run writes null, never the non-JSON NaN.
  with open(out / "metrics.json", "w") as f:
    json.dump(json_safe(results), f, indent=1, allow_nan=False)
  if rows:
    with open(out / "metrics.csv", "w", newline="") as f:
      writer = csv.DictWriter(f, fieldnames=list(rows[0]))
      writer.writeheader()
      writer.writerows(rows)


def write_outputs(out: Path, results: dict[str, Any], rows: list[dict[str, float]]) -> None:
  """``metrics.json``, ``metrics.csv`` (one row per step) and ``training.png`` in ``out``."""
  write_metrics(out, results, rows)
  plot_training(results, out / "training.png")


def json_safe(value: Any) -> Any:
  """Non-finite floats become None, so the file is strict JSON."""
  if isinstance(value, float):
    return value if math.isfinite(value) else None
  if isinstance(value, dict):
    return {k: json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [json_safe(v) for v in value]
  return value


def plot_training(results: dict[str, Any], path: Path) -> None:
  """Loss and accuracy per epoch, grad norm per step against the threshold, clip rate."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  config = results["config"]
  epochs = np.arange(1, len(results["train_loss"]) + 1)
  steps = np.arange(1, len(results["grad_norm"]) + 1)
  fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
  ax = axes[0, 0]
  ax.plot(epochs, results["train_loss"], "o-", label="train")
  ax.plot(epochs, results["test_loss"], "s-", label="test")
  ax.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
  ax.legend()
  ax = axes[0, 1]
  ax.plot(epochs, results["train_accuracy"], "o-", label="train (running)")
  ax.plot(epochs, results["test_accuracy_per_epoch"], "s-", label="test")
  ax.set(xlabel="epoch", ylabel="accuracy", title="accuracy", ylim=(0, 1.02))
  ax.legend()
  ax = axes[1, 0]
  ax.plot(steps, results["grad_norm"], lw=0.8, label="global gradient norm (pre-clip)")
  clip = config["clip"]
  # global and the adaptive policies bound the global norm: one threshold line.
  global_bound = clip not in ("none", "value", "agc", "layer")
  threshold = np.array([np.nan if t is None else t for t in results["threshold"]], float)
  if clip == "layer":
    scope = np.array([np.nan if t is None else t for t in results["scope_norm"]], float)
    ax.plot(steps, scope, lw=0.8, label="largest layer norm (pre-clip)")
    ax.plot(steps, threshold, "k--", lw=1, label="per-layer threshold")
  elif global_bound:
    ax.plot(steps, threshold, "k--", lw=1, label=f"threshold ({clip})")
  elif clip in ("value", "agc"):
    what = "element bound" if clip == "value" else "gradient/parameter ratio"
    ax.set_title(f"({clip}: threshold {config['max_norm']:g} is a {what}, not a norm)")
  clipped = np.array(results["clipped"], bool)
  if clipped.any() and global_bound:
    norms = np.asarray(results["grad_norm"], float)
    ax.plot(steps[clipped], norms[clipped], "r.", ms=3, label="clipped steps")
  ax.set(xlabel="step", ylabel="norm", yscale="log")
  if not ax.get_title():
    ax.set_title("gradient norm per step")
  ax.legend(fontsize=8)
  ax = axes[1, 1]
  ax.plot(epochs, results["clip_rate_per_epoch"], "o-")
  ax.set(xlabel="epoch", ylabel="fraction of steps clipped", title="clip rate", ylim=(-0.02, 1.02))
  fig.suptitle(
    f"{config['dataset']}, --clip {clip}"
    + (f" --max-norm {config['max_norm']:g}" if config["max_norm"] is not None else "")
    + f", lr {config['lr']:g}: test accuracy {results['test_accuracy']:.4f}"
    + (" (diverged)" if results["diverged"] else "")
  )
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
