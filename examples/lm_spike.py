"""A natural loss spike of the language model, clipped and not: ``python examples/lm_spike.py``.

Trains ``train_lm.py``'s model at the learning-rate sweep's settings
(``lm_sweep.py``: 4 layers of width 64, 500 steps of 16 x 64 bytes, no
warm-up) at a learning rate where the unclipped model spikes (default 0.3),
once without clipping and once per ``--clips`` method, on the same
initialisation and batches. It draws loss, global gradient norm and the
largest attention logit per layer over the steps around the unclipped run's
first spike, and prints each spike with the leaf and layer that held the
largest share of the gradient's squared norm (clipx's forensics).

To refresh the committed figure::

  python examples/lm_spike.py --figure docs/img/lm_spike.png
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

if not __package__:  # run as a script: make the examples package importable
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from examples import cli, lm_report, train_lm  # noqa: E402

SWEEP_FLAGS = ["--layers", "4", "--width", "64", "--seq-len", "64", "--batch-size", "16"]
SWEEP_FLAGS += ["--steps", "500", "--no-warmup", "--sample-bytes", "1", "--quiet"]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--lr", type=cli.positive_float, default=0.3)
  parser.add_argument("--seed", type=cli.nonnegative_int, default=0)
  parser.add_argument(
    "--clips",
    default="global,adagc,growth_limit,stable_adamw,spam,clippy,qk_clip",
    help="train_lm --clip methods beside --clip none",
  )
  parser.add_argument(
    "--span", type=cli.positive_int, default=60, help="steps drawn each side of the spike"
  )
  parser.add_argument("--figure", default="runs/lm-spike/lm_spike.png")
  return parser.parse_args(argv)


def plot(runs: dict[str, dict[str, Any]], center: int, span: int, path: Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  lo = max(0, center - span)
  fig, axes = plt.subplots(3, len(runs), figsize=(3 * len(runs), 7), sharex=True, sharey="row")
  for column, (clip, results) in enumerate(runs.items()):
    hi = min(results["steps"], center + span)
    steps = np.arange(lo, hi)
    loss, norm = (
      np.array([np.nan if x is None else x for x in results[key][lo:hi]], float)
      for key in ("step_loss", "grad_norm")
    )
    axes[0, column].plot(steps, loss, lw=0.9)
    axes[1, column].semilogy(steps, norm, lw=0.9)
    logits = np.array(results["attention_logit_max"][lo:hi], float)
    for layer in range(logits.shape[1]):
      axes[2, column].semilogy(steps, logits[:, layer], lw=0.9, label=f"layer {layer}")
    for spike in results["spikes"]:
      if lo <= spike["step"] < hi:
        for ax in axes[:, column]:
          ax.axvline(spike["step"], color="red", lw=0.6, alpha=0.6)
    axes[0, column].set_title(f"--clip {clip}")
    axes[2, column].set_xlabel("step")
  axes[0, 0].set_ylabel("training loss (nats)")
  axes[1, 0].set_ylabel("global gradient norm")
  axes[2, 0].set_ylabel("largest attention logit")
  axes[2, 0].legend(fontsize=7)
  fig.suptitle("A natural spike (red: spike steps)")
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
  args = parse_args(argv)
  clips = ["none", *[c.strip() for c in args.clips.split(",") if c.strip()]]
  runs = {}
  for clip in clips:
    flags = [*SWEEP_FLAGS, "--clip", clip, "--lr", str(args.lr), "--seed", str(args.seed)]
    runs[clip] = train_lm.train(train_lm.parse_args(flags))
    print(f"--clip {clip}: {len(runs[clip]['spikes'])} spike(s)", flush=True)
    for spike in runs[clip]["spikes"][:6]:
      layer = "" if spike["source_layer"] is None else f" layer {spike['source_layer']}"
      print(
        f"  step {spike['step']}: loss {spike['loss']:.2f}, largest share"
        f" {spike['share']:.2f} in {spike['source_leaf']}{layer}"
      )
  first = runs["none"]["spikes"]
  center = first[0]["step"] if first else runs["none"]["steps"] // 2
  plot(runs, center, args.span, Path(args.figure))
  print(f"wrote {args.figure}; spike definition: {lm_report.SPIKE_DEFINITION}")
  return runs


if __name__ == "__main__":
  main()
