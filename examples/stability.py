"""Why clipping matters: two failures of plain SGD-momentum that clipping prevents.

``python examples/stability.py`` runs two experiments on the digits CNN and
writes ``stability.png``, ``spikes.png`` and ``stability.json`` under
``--out`` (default ``runs/stability``, never the repository's own files):

1. ``high-lr``: a learning rate (0.3) at which plain SGD-momentum collapses to
   chance, while global-norm clipping trains. Fixed thresholds (0.1 .. 3, one
   compiled step for all, as in ``threshold_sweep.py``) are reported next to
   every adaptive policy with its default settings, honestly: a policy that
   follows the norm (ZClip, ema_ratio are spike guards) keeps clipping
   relative to a norm that is itself too large, so it cannot rescue a
   learning rate that is simply too high; a bound that does not rise with the
   norm can.
2. ``spikes``: a sane learning rate (0.05) but every 50th batch has its
   inputs multiplied by 100 (a bad batch in a long run, ``--inject-spikes``
   of ``train_cnn.py``). Without clipping one spike wrecks the model; the
   adaptive policies, with no hand-set threshold, absorb the spikes. The
   plot shows the gradient norm trace with each policy's threshold over it.

Every run uses the same initial parameters and the same batches.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

import clipx

if not __package__:  # run as a script: make the examples package importable
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from examples import cli, data, reporting, threshold_sweep, train_cnn  # noqa: E402

EXPERIMENTS = ("high-lr", "spikes")


def available_policies() -> list[str]:
  """The adaptive policies this clipx has (all four once the thresholds issue landed)."""
  return [name for name in train_cnn.ADAPTIVE if hasattr(clipx, name)]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
    description="Plain SGD-momentum vs clipping at a too-high learning rate and under spikes.",
    formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  parser.add_argument("--experiment", choices=(*EXPERIMENTS, "all"), default="all")
  parser.add_argument(
    "--policies",
    default=",".join(available_policies()),
    help="comma-separated adaptive policies to compare",
  )
  parser.add_argument(
    "--lr", type=cli.positive_float, default=0.3, help="high-lr: the too-high rate"
  )
  parser.add_argument("--epochs", type=cli.positive_int, default=4, help="high-lr: epochs")
  parser.add_argument(
    "--thresholds",
    default="0.1,0.3,1,3",
    help="high-lr: the fixed global-norm thresholds to compare",
  )
  parser.add_argument("--spike-lr", type=cli.positive_float, default=0.05)
  parser.add_argument("--spike-every", type=cli.positive_int, default=50, help="--inject-spikes N")
  parser.add_argument("--spike-epochs", type=cli.positive_int, default=10)
  parser.add_argument("--batch-size", type=cli.positive_int, default=8)
  parser.add_argument("--seed", type=cli.nonnegative_int, default=0)
  parser.add_argument("--dataset", choices=data.DATASETS, default="digits")
  parser.add_argument("--data-dir", default=None)
  parser.add_argument(
    "--max-steps", type=cli.nonnegative_int, default=0, help="stop every run after N steps"
  )
  parser.add_argument("--out", default="runs/stability", help="folder for the plots and the json")
  parser.add_argument("--quiet", action="store_true")
  args = parser.parse_args(argv)
  args.policies = [p for p in args.policies.split(",") if p]
  unknown = [p for p in args.policies if p not in train_cnn.ADAPTIVE]
  if unknown:
    parser.error(f"unknown policies {unknown}; choose from {', '.join(train_cnn.ADAPTIVE)}")
  try:
    args.thresholds = [float(t) for t in args.thresholds.split(",") if t]
  except ValueError:
    parser.error(f"--thresholds must be comma-separated numbers, got {args.thresholds!r}")
  if not all(t > 0 for t in args.thresholds):
    parser.error("--thresholds must be positive")
  return args


def run_cnn(args: argparse.Namespace, dataset, clip: str, *extra: str) -> dict[str, Any]:
  """One ``train_cnn`` run (in this process, on the loaded data)."""
  argv = [
    "--clip",
    clip,
    "--batch-size",
    str(args.batch_size),
    "--seed",
    str(args.seed),
    "--max-steps",
    str(args.max_steps),
    "--quiet",
    *extra,
  ]
  return train_cnn.train(train_cnn.parse_args(argv), dataset)


_SUMMARY = ("test_accuracy", "clip_rate", "diverged", "step_loss")


def _fixed_rows(thresholds: np.ndarray, fixed: dict, *, traces: bool) -> list[dict[str, Any]]:
  """One row per threshold of a sweep (``inf`` is no clipping); with per-step traces."""
  rows = []
  for i, threshold in enumerate(thresholds):
    row = {
      "name": "none" if math.isinf(threshold) else f"global {threshold:g}",
      "kind": "none" if math.isinf(threshold) else "fixed",
      **{key: fixed[key][i] for key in _SUMMARY},
    }
    if traces:
      row["grad_norm"] = fixed["grad_norm"][i]
      row["threshold"] = [None if math.isinf(threshold) else float(threshold)] * fixed["steps"]
    rows.append(row)
  return rows


def _policy_row(policy: str, result: dict, traces: tuple[str, ...]) -> dict[str, Any]:
  """The row of one ``train_cnn`` run with an adaptive policy."""
  keys = (*_SUMMARY, *traces)
  return {"name": policy, "kind": "adaptive", **{key: result[key] for key in keys}}


def high_lr(args: argparse.Namespace, dataset) -> list[dict[str, Any]]:
  """Rows ``{name, kind, test_accuracy, clip_rate, diverged, step_loss}`` at ``--lr``."""
  thresholds = np.array([*args.thresholds, np.inf], np.float32)
  fixed = threshold_sweep.sweep(
    thresholds,
    dataset,
    mode="loop",
    lr=args.lr,
    epochs=args.epochs,
    batch_size=args.batch_size,
    seed=args.seed,
    max_steps=args.max_steps,
  )
  rows = _fixed_rows(thresholds, fixed, traces=False)
  for policy in args.policies:
    if not args.quiet:
      print(f"high-lr: {policy} ...", flush=True)
    result = run_cnn(args, dataset, policy, "--lr", str(args.lr), "--epochs", str(args.epochs))
    rows.append(_policy_row(policy, result, ("threshold",)))
  return rows


def spikes(args: argparse.Namespace, dataset) -> list[dict[str, Any]]:
  """Rows with the norm and threshold traces, at ``--spike-lr`` with injected spikes.

  No clipping and the fixed threshold 1.0 (``train_cnn.py``'s default) share
  one compiled step (a threshold sweep); each adaptive policy is a
  ``train_cnn`` run.
  """
  thresholds = np.array([np.inf, 1.0], np.float32)
  fixed = threshold_sweep.sweep(
    thresholds,
    dataset,
    mode="loop",
    lr=args.spike_lr,
    epochs=args.spike_epochs,
    batch_size=args.batch_size,
    seed=args.seed,
    max_steps=args.max_steps,
    inject_spikes=args.spike_every,
  )
  rows = _fixed_rows(thresholds, fixed, traces=True)
  for policy in args.policies:
    if not args.quiet:
      print(f"spikes: {policy} ...", flush=True)
    result = run_cnn(
      args,
      dataset,
      policy,
      "--lr",
      str(args.spike_lr),
      "--epochs",
      str(args.spike_epochs),
      "--inject-spikes",
      str(args.spike_every),
    )
    rows.append(_policy_row(policy, result, ("grad_norm", "threshold")))
  return rows


def print_rows(title: str, rows: list[dict[str, Any]]) -> None:
  print(f"\n{title}")
  print(f"{'method':>12} {'test acc':>9} {'clip rate':>9}  note")
  fixed_count = sum(row["kind"] == "fixed" for row in rows)
  best_fixed = best_fixed_row(rows) if fixed_count > 1 else None
  for row in rows:
    notes = []
    if row["diverged"]:
      notes.append("diverged (non-finite loss)")
    if best_fixed is not None and row is best_fixed:
      notes.append("best fixed threshold")
    print(
      f"{row['name']:>12} {row['test_accuracy']:9.4f} {row['clip_rate']:9.2f}  {', '.join(notes)}"
    )


def best_fixed_row(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
  fixed = [row for row in rows if row["kind"] == "fixed"]
  return max(fixed, key=lambda row: row["test_accuracy"]) if fixed else None


def smooth(values: Sequence[float], window: int = 25) -> np.ndarray:
  """Running mean (non-finite values kept visible as gaps, not averaged in)."""
  values = np.asarray(values, float)
  if len(values) < window:
    return values
  kernel = np.ones(window) / window
  out = np.convolve(np.nan_to_num(values, nan=np.nan, posinf=np.nan), kernel, mode="valid")
  return np.concatenate([np.full(window - 1, np.nan), out])


def plot_high_lr(rows: list[dict[str, Any]], path: Path, title: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  best = best_fixed_row(rows)
  shown = [r for r in rows if r["kind"] != "fixed" or r is best or r["name"] == "global 1"]
  fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8), width_ratios=(3, 2))
  for row in shown:
    loss = smooth(row["step_loss"])
    style = {"none": "k-", "fixed": "-", "adaptive": "--"}[row["kind"]]
    label = row["name"] + (" (best fixed)" if row is best else "")
    left.plot(np.arange(1, len(loss) + 1), loss, style, lw=1.2, label=label)
  left.set(xlabel="step", ylabel="training loss (running mean of 25 steps)", yscale="log")
  left.set_title("loss curves side by side")
  left.legend(fontsize=8)
  names = [r["name"] for r in rows]
  colors = [{"none": "0.3", "fixed": "C0", "adaptive": "C1"}[r["kind"]] for r in rows]
  right.barh(names, [r["test_accuracy"] for r in rows], color=colors)
  for i, row in enumerate(rows):
    right.text(row["test_accuracy"] + 0.01, i, f"{row['test_accuracy']:.3f}", va="center")
  right.set(xlim=(0, 1.15), xlabel="test accuracy")
  right.invert_yaxis()
  right.set_title("grey: no clipping, blue: fixed, orange: adaptive", fontsize=9)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_spikes(rows: list[dict[str, Any]], path: Path, title: str, every: int) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(len(rows), 1, figsize=(11, 2.1 * len(rows)), sharex=True)
  axes = np.atleast_1d(axes)
  for ax, row in zip(axes, rows):
    norm = np.asarray(row["grad_norm"], float)
    steps = np.arange(1, len(norm) + 1)
    ax.plot(steps, norm, lw=0.6, color="C0", label="gradient norm (pre-clip)")
    spike_steps = steps[steps % every == 0]
    ax.plot(spike_steps, norm[spike_steps - 1], "rv", ms=3, label=f"spiked batch (every {every})")
    threshold = np.array([np.nan if t is None else t for t in row["threshold"]], float)
    if np.isfinite(threshold).any():
      ax.plot(steps, threshold, "k-", lw=1, label="threshold")
    # A spiked batch the trained net classifies confidently has a near-zero
    # gradient (down to 1e-19): keep those dips from squashing the trace.
    positive = norm[np.isfinite(norm) & (norm > 0)]
    bottom = np.percentile(positive, 2) / 10 if positive.size else None
    ax.set(yscale="log", ylabel="norm", ylim=(bottom, None))
    ax.set_title(
      f"{row['name']}: test accuracy {row['test_accuracy']:.3f},"
      f" clip rate {row['clip_rate']:.2f}" + (" (diverged)" if row["diverged"] else ""),
      fontsize=9,
      loc="left",
    )
  axes[0].legend(fontsize=7, loc="upper right", ncol=3)
  axes[-1].set_xlabel("step")
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  dataset = data.load_or_exit(args.dataset, args.data_dir)
  experiments = EXPERIMENTS if args.experiment == "all" else (args.experiment,)
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  summary: dict[str, Any] = {"config": {k: v for k, v in vars(args).items() if k != "quiet"}}
  if "high-lr" in experiments:
    rows = high_lr(args, dataset)
    summary["high-lr"] = rows
    title = (
      f"{args.dataset} CNN, SGD-momentum lr {args.lr:g}, batch {args.batch_size},"
      f" {args.epochs} epochs"
    )
    plot_high_lr(rows, out / "stability.png", title)
    if not args.quiet:
      print_rows(f"high-lr: {title}", rows)
  if "spikes" in experiments:
    rows = spikes(args, dataset)
    summary["spikes"] = rows
    title = (
      f"{args.dataset} CNN, lr {args.spike_lr:g}, inputs x{train_cnn.SPIKE_FACTOR:g}"
      f" every {args.spike_every} batches, default policy settings"
    )
    plot_spikes(rows, out / "spikes.png", title, args.spike_every)
    if not args.quiet:
      print_rows(f"spikes: {title}", rows)
  with open(out / "stability.json", "w") as f:
    json.dump(reporting.json_safe(summary), f, indent=1, allow_nan=False)
  if not args.quiet:
    print(f"\nwrote {out}/stability.json and the plots")
  return summary


if __name__ == "__main__":
  main()
