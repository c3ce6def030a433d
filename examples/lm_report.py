"""Reporting for ``train_lm.py`` and the learning-rate sweep: spikes, metrics.json, the figure.

A **spike** is a step whose training loss exceeds the median of the previous
``SPIKE_WINDOW`` steps' losses by more than ``SPIKE_MARGIN`` nats (a non-finite
loss is one too); a run of consecutive such steps counts once, at its first
step. The margin is several times the step-to-step noise of a healthy run's
loss (batches of 32 x 128 bytes: a standard deviation of about 0.05 nats once
past the first hundred steps), so an ordinary bad batch is not a spike.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import clipx

SPIKE_WINDOW = 50
SPIKE_MARGIN = 0.3  # nats
SPIKE_DEFINITION = (
  f"loss > median of the previous {SPIKE_WINDOW} steps + {SPIKE_MARGIN} nats (or non-finite);"
  " first step of each run of such steps"
)
SAMPLE_PROMPTS = (b"The ", b"    def ")


def any_clipped(report: clipx.StatsReport) -> jax.Array:
  """Whether any clipping stage clipped or skipped anything this step.

  AdaGN (``normalize``, in ``stable_spam_clip``) rescales every tensor on
  every step by design and is not counted.
  """
  flags = [jnp.zeros((), bool)]
  for name, stats in report.items():
    if isinstance(stats, clipx.ClipStats) and name != "normalize":
      flags.append(jnp.any(stats.clipped))
    elif isinstance(stats, clipx.SkipStats):
      flags.append(jnp.any(stats.skipped))
  return jnp.any(jnp.stack(flags))


def spike_steps(losses: Any, window: int = SPIKE_WINDOW, margin: float = SPIKE_MARGIN) -> list[int]:
  """0-based steps where a spike starts (see the module docstring)."""
  losses = np.asarray(losses, np.float64)
  flagged = np.zeros(len(losses), bool)
  for step in range(window, len(losses)):
    reference = np.median(losses[step - window : step])
    flagged[step] = not losses[step] <= reference + margin  # NaN counts
  return [int(s) for s in np.flatnonzero(flagged & ~np.roll(flagged, 1))]


def split_group_name(name: str) -> tuple[str, int | None]:
  """``"blocks/attn/query/kernel[2]"`` -> ``("blocks/attn/query/kernel", 2)``; no layer: None."""
  if name.endswith("]") and "[" in name:
    leaf, layer = name[:-1].rsplit("[", 1)
    if layer.isdigit():
      return leaf, int(layer)
  return name, None


def spikes(
  losses: Any, sources: Any, shares: Any, group_names: tuple[str, ...]
) -> list[dict[str, Any]]:
  """Each spike's step, loss, and the leaf and layer with the largest share of ``|g|^2``."""
  out = []
  for step in spike_steps(losses):
    leaf, layer = split_group_name(group_names[int(sources[step])])
    out.append(
      {
        "step": step,
        "loss": float(losses[step]),
        "source_leaf": leaf,
        "source_layer": layer,
        "share": float(shares[step]),
      }
    )
  return out


def _finite_or_none(value: float) -> float | None:
  return value if math.isfinite(value) else None


def results(
  *,
  args: Any,
  corpus: Any,
  unigram_bits_per_byte: float,
  evaluations: dict[str, list],
  step_metrics: list[dict],
  group_names: tuple[str, ...],
  wall_seconds: float,
) -> dict[str, Any]:
  """The ``metrics.json`` content of one run."""
  losses = [float(m["loss"]) for m in step_metrics]
  curve = evaluations["validation_bits_per_byte"]
  initial, final = curve[0], curve[-1]
  diverged = not all(math.isfinite(v) for v in losses) or not final < initial
  return {
    "config": {k: v for k, v in vars(args).items() if k != "quiet"},
    "corpus": {
      "sha256": corpus.sha256,
      "bytes": corpus.num_bytes,
      "documents": corpus.num_documents,
      "python": corpus.python,
    },
    "validation_bits_per_byte": _finite_or_none(final),
    "initial_bits_per_byte": initial,
    "unigram_bits_per_byte": unigram_bits_per_byte,
    "diverged": diverged,
    "evaluations": evaluations,
    "steps": len(losses),
    "step_loss": [_finite_or_none(v) for v in losses],
    "grad_norm": [_finite_or_none(float(m["grad_norm"])) for m in step_metrics],
    "clipped": [bool(m["clipped"]) for m in step_metrics],
    "clip_rate": float(np.mean([m["clipped"] for m in step_metrics])),
    "attention_logit_max": [
      [_finite_or_none(float(v)) for v in m["logit_max"]] for m in step_metrics
    ],
    "spike_definition": SPIKE_DEFINITION,
    "spikes": spikes(
      losses,
      [m["source"] for m in step_metrics],
      [m["share"] for m in step_metrics],
      group_names,
    ),
    "wall_seconds": wall_seconds,
  }


def summary(results: dict[str, Any], out: str | None) -> str:
  """The lines printed at the end of a run: validation, baselines, spikes, samples."""
  final = results["validation_bits_per_byte"]
  lines = [
    f"validation {final if final is None else f'{final:.3f}'} bits per byte"
    f" (initial {results['initial_bits_per_byte']:.3f}, unigram baseline"
    f" {results['unigram_bits_per_byte']:.3f})"
    + (" DIVERGED" if results["diverged"] else "")
    + f"; clip rate {results['clip_rate']:.2f}; {len(results['spikes'])} spike(s);"
    f" {results['steps']} steps in {results['wall_seconds']:.0f} s",
    f"corpus: {results['corpus']['bytes']} bytes of Python {results['corpus']['python']}'s"
    f" standard library, sha256 {results['corpus']['sha256'][:16]}...",
  ]
  for spike in results["spikes"][:5]:
    layer = "" if spike["source_layer"] is None else f" layer {spike['source_layer']}"
    lines.append(
      f"  spike at step {spike['step']}: loss {spike['loss']:.3f},"
      f" largest share {spike['share']:.2f} in {spike['source_leaf']}{layer}"
    )
  for sample in results.get("samples", []):
    lines.append("sample: " + repr(sample))
  if out:
    lines.append(f"wrote {out}/metrics.json and {out}/training.png")
  return "\n".join(lines)


def write_outputs(out: Path, results: dict[str, Any]) -> None:
  """``metrics.json`` and ``training.png`` (loss, gradient norm, attention logits)."""
  out.mkdir(parents=True, exist_ok=True)
  (out / "metrics.json").write_text(json.dumps(results, indent=1) + "\n")
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(3, 1, figsize=(7, 7), sharex=True)
  steps = np.arange(results["steps"])
  as_float = lambda values: np.array([np.nan if v is None else v for v in values], float)  # noqa: E731
  axes[0].plot(steps, as_float(results["step_loss"]), lw=0.8)
  axes[0].set_ylabel("training loss (nats)")
  axes[1].semilogy(steps, as_float(results["grad_norm"]), lw=0.8)
  axes[1].set_ylabel("global gradient norm")
  logits = np.array(
    [[np.nan if v is None else v for v in row] for row in results["attention_logit_max"]]
  )
  for layer in range(logits.shape[1]):
    axes[2].plot(steps, logits[:, layer], lw=0.8, label=f"layer {layer}")
  axes[2].set_ylabel("largest attention logit")
  axes[2].set_xlabel("step")
  axes[2].legend(fontsize=7)
  for spike in results["spikes"]:
    for ax in axes:
      ax.axvline(spike["step"], color="red", lw=0.5, alpha=0.5)
  fig.suptitle(f"--clip {results['config']['clip']}, lr {results['config']['lr']:g}")
  fig.tight_layout()
  fig.savefig(out / "training.png", dpi=110)
  plt.close(fig)


def plot_sweep(results: dict[str, Any], path: Path) -> None:
  """Final validation bits per byte vs learning rate: one line per method, the seed range shaded."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  lrs = results["learning_rates"]
  fig, ax = plt.subplots(figsize=(7, 4.5))
  colors = plt.get_cmap("tab10").colors  # ten colours, then the same ones dashed
  for index, (method, runs) in enumerate(results["grid"].items()):
    capped = {}  # lr -> per-seed min(final, initial): a diverged run counts as its initial loss
    for run in runs:
      final = run["validation_bits_per_byte"]
      initial = run["initial_bits_per_byte"]
      capped.setdefault(run["lr"], []).append(initial if final is None else min(final, initial))
    values = np.array([capped[lr] for lr in lrs])
    style = {"color": colors[index % 10], "ls": "-" if index // 10 % 2 == 0 else "--"}
    (line,) = ax.plot(lrs, np.median(values, axis=1), marker="o", ms=3, label=method, **style)
    ax.fill_between(lrs, values.min(axis=1), values.max(axis=1), color=line.get_color(), alpha=0.15)
  ax.axhline(results["unigram_bits_per_byte"], color="gray", ls="--", lw=0.8, label="unigram")
  ax.set_xscale("log")
  ax.set_xlabel("AdamW peak learning rate")
  ax.set_ylabel("final validation bits per byte\n(min with the initial loss)")
  ax.set_title("Learning-rate sensitivity (median and range over seeds)")
  ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
