"""The sweep that chose ``train_rnn.py``'s defaults: learning rate x sequence length.

``python examples/rnn_sweep.py`` trains the tanh RNN on the adding problem for
every (sequence length, learning rate, seed), once without clipping and once
with global-norm clipping at the default threshold, with the same
initialisation and batches, and prints one row per setting: how many seeds
each run solved (test MSE below a tenth of the trivial predictor's), how many
diverged, and the median test MSE. A setting where no unclipped seed solves
the task and every clipped seed does is a clear contrast; the example's
defaults are one of those (``--steps`` as in the example).

Writes ``rnn_sweep.json`` (every run's row) under ``--out``. The result
(10000 steps, seeds 0-2; solved/seeds and median test MSE, unclipped | clipped):

  length 20: lr 0.003 3/3 0.0023 | 3/3 0.0020; 0.01 3/3 0.0012 | 3/3 0.0013;
             0.03 3/3 0.0008 | 3/3 0.0008 (short enough that both solve it)
  length 50: lr 0.003 3/3 0.0040 | 1/3 0.036 (clipping at 1.0 slows it down);
             0.01 0/3 0.206 | 3/3 0.0058 (the defaults);
             0.03 0/3, one diverged | 1/3 0.020
  length 100 (``--seq-lens 100 --lrs 0.01``): 0/3 0.23 | 0/3 0.094
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

if not __package__:  # run as a script: make the examples package importable
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from examples import cli, train_rnn  # noqa: E402
from examples.train_cnn import json_safe  # noqa: E402


def floats(text: str) -> list[float]:
  return [float(v) for v in text.split(",") if v]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  defaults = train_rnn.parse_args([])
  parser = argparse.ArgumentParser(
    description="Sweep learning rate and sequence length: unclipped vs clipped RNN.",
    formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  parser.add_argument("--lrs", type=floats, default=[0.003, 0.01, 0.03])
  parser.add_argument("--seq-lens", type=floats, default=[20, 50])
  parser.add_argument("--seeds", type=floats, default=[0, 1, 2])
  parser.add_argument("--cell", default=defaults.cell)
  parser.add_argument("--steps", type=cli.positive_int, default=defaults.steps)
  parser.add_argument("--clip", default="global", help="the clipped run's --clip")
  parser.add_argument("--out", default="runs/rnn_sweep")
  return parser.parse_args(argv)


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
  """Solved and diverged counts and the median test MSE over seeds."""
  losses = [r["test_loss"] for r in rows]
  return {
    "solved": sum(r["solved"] for r in rows),
    "diverged": sum(r["diverged"] for r in rows),
    "median_test_loss": float(np.median(losses)) if all(np.isfinite(losses)) else float("nan"),
    "seeds": len(rows),
  }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  start = time.perf_counter()
  clips = ("none", args.clip)
  table, rows = [], []
  print(
    f"{args.cell}, {args.steps} steps; solved = test MSE < 0.1 x trivial; per setting:"
    " solved/seeds (diverged), median test MSE",
    flush=True,
  )
  print("| seq len | lr | no clipping | " + args.clip + " | clear contrast |")
  print("|---|---|---|---|---|")
  for seq_len in [int(t) for t in args.seq_lens]:
    for lr in args.lrs:
      runs = train_rnn.run_seeds(
        [int(s) for s in args.seeds],
        clips,
        cell=args.cell,
        seq_len=seq_len,
        lr=lr,
        steps=args.steps,
      )
      for row in runs["rows"]:
        rows.append({"seq_len": seq_len, "lr": lr, **row})
      summary = {clip: summarize([r for r in runs["rows"] if r["clip"] == clip]) for clip in clips}
      contrast = summary[clips[0]]["solved"] == 0 and summary[clips[1]]["solved"] == len(args.seeds)
      table.append({"seq_len": seq_len, "lr": lr, **summary, "contrast": contrast})
      cells = [
        f"{s['solved']}/{s['seeds']} ({s['diverged']} div.), {s['median_test_loss']:.3g}"
        for s in summary.values()
      ]
      print(f"| {seq_len} | {lr:g} | {cells[0]} | {cells[1]} | {'yes' if contrast else ''} |")
      sys.stdout.flush()
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  result = {
    "config": vars(args),
    "table": table,
    "rows": rows,
    "wall_seconds": time.perf_counter() - start,
  }
  with open(out / "rnn_sweep.json", "w") as f:
    json.dump(json_safe(result), f, indent=1, allow_nan=False)
  print(f"{len(rows)} runs in {result['wall_seconds']:.0f} s; wrote {out}/rnn_sweep.json")
  return result


if __name__ == "__main__":
  main()
