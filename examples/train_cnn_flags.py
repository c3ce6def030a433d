"""The flags of ``examples/train_cnn.py``: a handful, with defaults that train on their own.

Here so the training script reads as data, model, optimizer, steps and loop;
``stability.py``, ``threshold_sweep.py`` and ``reproduce.py`` build their runs
from the same ``parse_args``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

if not __package__:  # run as a script: make the examples package importable
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from examples import cli, data  # noqa: E402

# The first seven are the documented contract; ema_ratio and quantile are the
# other adaptive policies clipx offers, all with their default settings.
CLIPS = ("none", "value", "global", "layer", "agc", "autoclip", "zclip", "ema_ratio", "quantile")
ADAPTIVE = ("autoclip", "zclip", "ema_ratio", "quantile")

# What --max-norm means for each --clip, and its default when not given.
# AGC's bound is a ratio of gradient to parameter norm (the paper uses 0.01 to 0.16).
DEFAULT_MAX_NORM = {"value": 0.1, "global": 1.0, "layer": 1.0, "agc": 0.05}

SPIKE_FACTOR = 100.0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
    description="Train a small Flax CNN with clipx gradient clipping.",
    formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  parser.add_argument("--clip", choices=CLIPS, default="global", help="clipping method")
  parser.add_argument(
    "--max-norm",
    type=cli.positive_float,
    help="the bound: a norm (global, layer), an element (value), a gradient/parameter ratio"
    f" (agc); defaults {DEFAULT_MAX_NORM}; the adaptive policies learn theirs",
  )
  parser.add_argument(
    "--lr", type=cli.positive_float, default=0.01, help="SGD learning rate (peak)"
  )
  parser.add_argument(
    "--schedule",
    choices=("late-decay", "constant"),
    default="late-decay",
    help="learning rate: constant, or late-decay: --lr for the first 60%% of the steps, then"
    " a cosine decay to 0",
  )
  parser.add_argument("--momentum", type=cli.fraction, default=0.9, help="SGD momentum")
  parser.add_argument("--epochs", type=cli.positive_int, default=10)
  parser.add_argument("--batch-size", type=cli.positive_int, default=8)
  parser.add_argument("--seed", type=cli.nonnegative_int, default=0)
  parser.add_argument("--dataset", choices=data.DATASETS, default="digits")
  parser.add_argument("--data-dir", default=None, help="folder of the mnist/cifar10 files")
  parser.add_argument("--out", default=None, help="write metrics.json, metrics.csv, training.png")
  parser.add_argument(
    "--inject-spikes",
    type=cli.nonnegative_int,
    default=0,
    metavar="N",
    help=f"multiply the inputs of every N-th training batch by {SPIKE_FACTOR:g} (0: never)",
  )
  parser.add_argument(
    "--tensorboard", action="store_true", help="also log to DIR/tensorboard (needs tensorboardX)"
  )
  parser.add_argument(
    "--max-steps",
    type=cli.nonnegative_int,
    default=0,
    help="stop after this many steps (0: no limit)",
  )
  parser.add_argument("--quiet", action="store_true", help="no progress bar")
  args = parser.parse_args(argv)
  if args.epochs < 1 or args.batch_size < 1 or args.inject_spikes < 0 or args.max_steps < 0:
    parser.error("--epochs and --batch-size must be >= 1, --inject-spikes and --max-steps >= 0")
  if args.max_norm is not None and args.clip in ("none", *ADAPTIVE):
    parser.error(f"--max-norm has no meaning with --clip {args.clip}")
  if args.max_norm is not None and not args.max_norm > 0:
    parser.error(f"--max-norm must be positive, got {args.max_norm}")
  if args.tensorboard and args.out is None:
    parser.error("--tensorboard writes to DIR/tensorboard: give --out DIR")
  if args.max_norm is None:
    args.max_norm = DEFAULT_MAX_NORM.get(args.clip)
  return args
