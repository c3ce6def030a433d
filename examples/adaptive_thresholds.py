"""Each adaptive threshold policy over a real gradient-norm trace.

``python examples/adaptive_thresholds.py`` trains the digits CNN of
``examples/train_cnn.py`` once (SGD-momentum, lr 0.05, every 50th batch's
inputs multiplied by 100, fixed global clipping at 1.0 so the run survives
the spikes), keeps the pre-clip global gradient norm of every step, and then
replays that trace through every policy: ``clipx.autoclip()``,
``clipx.zclip()`` (both modes), ``clipx.ema_ratio()``, ``clipx.quantile()``
and the fixed 1.0, all with default settings. It plots each threshold over
the trace and prints how often each clips and whether it catches the spikes.

A replay shows the thresholds each policy computes on the *same* norms; it
is not a training run with that policy (clipping changes the trajectory, so
later norms would differ). For trained accuracies use
``python examples/train_cnn.py --clip zclip`` (or ``autoclip``, ``none``).

Examples::

  python examples/adaptive_thresholds.py                      # train, replay, plot
  python examples/adaptive_thresholds.py --trace runs/adaptive_thresholds/trace.json
  python examples/adaptive_thresholds.py --trace runs/zclip/metrics.json  # train_cnn --out
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

# Run as a script (python examples/adaptive_thresholds.py) or imported.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import clipx  # noqa: E402
from examples import cli, reporting, train_cnn  # noqa: E402

# Name -> policy with its default settings (the fixed 1.0 is train_cnn's default).
POLICIES: dict[str, Callable[[], clipx.ThresholdPolicy]] = {
  "fixed 1.0": lambda: clipx.as_policy(1.0),
  "autoclip()": clipx.autoclip,
  "zclip()": clipx.zclip,
  'zclip(mode="clip_to_max")': lambda: clipx.zclip(mode="clip_to_max"),
  "ema_ratio()": clipx.ema_ratio,
  "quantile()": clipx.quantile,
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
    description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
  )
  parser.add_argument(
    "--trace", default=None, help="a train_cnn.py metrics.json to replay instead of training"
  )
  parser.add_argument("--lr", type=cli.positive_float, default=0.05)
  parser.add_argument("--inject-spikes", type=cli.nonnegative_int, default=50, metavar="N")
  parser.add_argument("--epochs", type=cli.positive_int, default=10)
  parser.add_argument("--seed", type=cli.nonnegative_int, default=0)
  parser.add_argument("--out", default="runs/adaptive_thresholds", help="folder for the outputs")
  return parser.parse_args(argv)


def record_trace(args: argparse.Namespace, out: Path) -> tuple[np.ndarray, int]:
  """Pre-clip global gradient norms per step, and the spike period, from train_cnn.

  A new trace is also written to ``out/trace.json``, which ``--trace`` reads back.
  """
  if args.trace is not None:
    results = json.loads(Path(args.trace).read_text())
  else:
    flags = ["--clip", "global", "--lr", str(args.lr), "--epochs", str(args.epochs), "--quiet"]
    flags += ["--inject-spikes", str(args.inject_spikes), "--seed", str(args.seed)]
    print(f"training: python examples/train_cnn.py {' '.join(flags)}", flush=True)
    results = train_cnn.train(train_cnn.parse_args(flags))
    print(f"  test accuracy {results['test_accuracy']:.4f}, {results['steps']} steps", flush=True)
    trace = {"grad_norm": results["grad_norm"], "config": results["config"]}
    (out / "trace.json").write_text(json.dumps(reporting.json_safe(trace)))
  norms = np.array([np.nan if g is None else g for g in results["grad_norm"]], np.float32)
  return norms, int(results["config"].get("inject_spikes") or 0)


def replay(policy: clipx.ThresholdPolicy, norms: np.ndarray) -> np.ndarray:
  """The threshold the policy sets at every step of the trace (one ``lax.scan``)."""

  def step(state, norm):
    threshold, state = policy.update(norm, state)
    return state, threshold

  state = policy.init(jnp.zeros((), jnp.float32))
  _, thresholds = jax.lax.scan(step, state, jnp.asarray(norms))
  return np.asarray(thresholds, np.float64)


def large_spikes(norms: np.ndarray, spikes: np.ndarray) -> np.ndarray:
  """The injected steps whose norm exceeds 10x the trace's median."""
  return spikes[norms[spikes] > 10 * np.nanmedian(norms)]


def summarise(norms: np.ndarray, thresholds: np.ndarray, spikes: np.ndarray) -> dict[str, float]:
  """Clip rate, spikes caught, and how tight the bound is on ordinary steps."""
  finite = np.isfinite(norms)
  clipped = finite & (norms > thresholds)
  # A spiked batch whose softmax saturates on the right class gives a tiny or
  # zero gradient: nothing to catch. Count those that are 10x the median.
  real_spikes = large_spikes(norms, spikes)
  ordinary = np.ones(len(norms), bool)
  ordinary[spikes] = False
  ordinary &= finite & np.isfinite(thresholds) & (norms > 0)
  return {
    "clip_rate": float(np.mean(clipped)),
    "spikes_caught": int(np.sum(clipped[real_spikes])),
    "spikes": int(len(real_spikes)),
    "ordinary_clip_rate": float(np.mean(clipped[ordinary])) if ordinary.any() else float("nan"),
    "median_threshold_over_norm": float(np.median(thresholds[ordinary] / norms[ordinary]))
    if ordinary.any()
    else float("nan"),
  }


def plot(norms, thresholds: dict[str, np.ndarray], spikes: np.ndarray, path: Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  steps = np.arange(1, len(norms) + 1)
  # Zero norms (saturated spiked batches) have no place on a log axis.
  shown = np.where(norms > 0, norms, np.nan)
  fig, axes = plt.subplots(2, 1, figsize=(11, 8))
  # The zoom covers the second large spike: well after every warm-up.
  large = large_spikes(norms, spikes)
  centre = int(large[min(1, len(large) - 1)]) if len(large) else len(norms) // 2
  windows = [(0, len(norms)), (max(0, centre - 60), min(len(norms), centre + 40))]
  for ax, (start, stop) in zip(axes, windows):
    view = slice(start, stop)
    ax.plot(steps[view], shown[view], color="0.6", lw=0.8, label="gradient norm (pre-clip)")
    for name, values in thresholds.items():
      ax.plot(steps[view], values[view], lw=1.2, label=name)
    in_view = spikes[(spikes >= start) & (spikes < stop)]
    ax.plot(steps[in_view], shown[in_view], "rv", ms=6, label="injected spike (inputs x100)")
    ax.set(xlabel="step", ylabel="norm", yscale="log")
    ax.set_ylim(bottom=0.5 * np.nanpercentile(shown[view], 1))
  axes[0].set_title("every policy's threshold over one real trace (replayed, default settings)")
  axes[1].set_title(f"zoom on the spike at step {centre + 1}")
  axes[0].legend(fontsize=8, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
  args = parse_args(argv)
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  norms, period = record_trace(args, out)
  spikes = np.arange(period - 1, len(norms), period) if period else np.zeros(0, int)
  thresholds = {name: replay(make(), norms) for name, make in POLICIES.items()}
  summary = {name: summarise(norms, values, spikes) for name, values in thresholds.items()}

  print(f"\n{len(norms)} steps, median norm {np.nanmedian(norms):.3g}")
  print(f"{'policy':28s} {'clip rate':>9s} {'ordinary':>9s} {'spikes':>7s} {'bound/norm':>10s}")
  for name, row in summary.items():
    print(
      f"{name:28s} {row['clip_rate']:9.2f} {row['ordinary_clip_rate']:9.2f}"
      f" {row['spikes_caught']:3d}/{row['spikes']:<3d} {row['median_threshold_over_norm']:10.2f}"
    )
  plot(norms, thresholds, spikes, out / "adaptive_thresholds.png")
  (out / "adaptive_thresholds.json").write_text(json.dumps(summary, indent=1))
  print(f"wrote {out}/adaptive_thresholds.png and adaptive_thresholds.json")
  return summary


if __name__ == "__main__":
  main()
