"""The exploding-gradient cliff: ``python examples/rnn_cliff.py --out docs/img``.

Trains ``train_rnn.py``'s default RNN twice from the same initialisation and
batches, without clipping and with global-norm clipping, and draws
``rnn_cliff.png`` (``rnn_report.plot_cliff``): the loss, the pre-clip
gradient norm per step (log scale) against the threshold, and the norm of the
gradient with respect to the hidden state at each time step, ``||d loss /
d h_t||``, at ten points of each run.

What it shows: without clipping the gradient norm jumps by orders of
magnitude (the cliff of Pascanu et al. 2013, figure 6) and the run is thrown
off; with clipping the same jumps are cut to the threshold and training goes
on. Clipping multiplies the whole gradient by one number, so the shape of
``||d loss / d h_t||`` over t, and how fast it vanishes back through time, is
the same before and after the clip: clipping bounds explosions and cannot
restore a vanished gradient.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

if not __package__:  # run as a script: make the examples package importable
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from examples import cli, rnn_report, train_rnn  # noqa: E402


def main(argv: Sequence[str] | None = None) -> Path:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="runs/rnn_cliff", help="folder for rnn_cliff.png")
  parser.add_argument("--seed", type=cli.nonnegative_int, default=0)
  parser.add_argument("--clip", default="global", help="the clipped run's --clip")
  parser.add_argument(
    "--steps", type=cli.positive_int, default=None, help="default: train_rnn.py's"
  )
  args = parser.parse_args(argv)
  settings = {} if args.steps is None else {"steps": args.steps}
  runs = train_rnn.run_seeds([args.seed], ("none", args.clip), **settings)
  for row in runs["rows"]:
    print(
      f"--clip {row['clip']}: test MSE {row['test_loss']:.4g} (trivial {row['baseline_loss']:.4g}),"
      f" solved {row['solved']}, diverged {row['diverged']}"
    )
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  path = out / "rnn_cliff.png"
  rnn_report.plot_cliff(runs["runs"]["none", args.seed], runs["runs"][args.clip, args.seed], path)
  print(f"wrote {path}")
  return path


if __name__ == "__main__":
  main()
