"""Train an RNN on the adding problem with gradient clipping: ``python examples/train_rnn.py``.

The experiment where gradient clipping was born (Pascanu, Mikolov & Bengio
2013, https://arxiv.org/abs/1211.5063): a vanilla tanh RNN (or an LSTM,
``--cell lstm``) on the adding problem, a synthetic long-range task that needs
no download (``examples/rnn.py``). Reads top to bottom: flags, data, model and
optimizer, one jitted ``train_step`` and one jitted ``eval_step``, the loop,
the report. The optimizer is ``optax.chain(<clipx transform>, optax.sgd(lr,
momentum))``, built by ``train_cnn.make_optimizer``, so ``--clip`` takes the
same choices as the CNN example.

Success criterion: test MSE (on 1024 held-out sequences) below a tenth of the
trivial predictor's (always 1, MSE 1/6). At the defaults (length 50, lr 0.01,
10000 steps of 32 sequences) global-norm clipping at 1.0 meets it on seeds 0,
1 and 2 (test MSE 0.0033 to 0.0062) and the unclipped RNN fails on all three
(0.165 to 0.233, no better than the trivial 0.164; with seed 0, drawn in
``docs/img/rnn_cliff.png``, two gradient spikes throw it into a state where
its gradient vanishes back through time). ``examples/rnn_sweep.py`` found the
setting. ``--out DIR`` writes ``metrics.json``, ``metrics.csv`` (one row per
step with every ``clipx.stats(...).as_dict()`` field) and ``training.png``;
``examples/rnn_cliff.py`` draws the clipped and unclipped runs side by side.

Examples::

  python examples/train_rnn.py                      # tanh RNN, global-norm clipping at 1.0
  python examples/train_rnn.py --clip none          # the same run without clipping
  python examples/train_rnn.py --cell lstm --out runs/rnn/lstm    # the LSTM, written to a folder
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax
from tqdm.auto import tqdm

import clipx

if not __package__:  # run as a script: make the examples package importable
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from examples import cli, rnn, rnn_report, train_cnn  # noqa: E402

SOLVED_FRACTION = 0.1  # solved: test MSE below this fraction of the trivial predictor's
TEST_SIZE = 1024  # held-out sequences, drawn with their own fixed seed
TEST_SEED = 2**31 - 1
EVALUATIONS = 10  # test loss and d loss / d h_t norms at this many evenly spaced steps
PROFILE_SIZE = 256  # test sequences the d loss / d h_t norms average over
EVALUATION_KEYS = ("step", "test_loss", "hidden_grad_norms", "grad_norm")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
    description="Train a Flax NNX RNN on the adding problem with clipx gradient clipping.",
    formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  parser.add_argument("--cell", choices=rnn.CELLS, default="rnn", help="tanh RNN or LSTM")
  parser.add_argument(
    "--seq-len", type=cli.positive_int, default=50, help="length of each sequence"
  )
  parser.add_argument("--hidden-size", type=cli.positive_int, default=64)
  parser.add_argument("--clip", choices=train_cnn.CLIPS, default="global", help="clipping method")
  parser.add_argument(
    "--max-norm",
    type=cli.positive_float,
    default=None,
    help="threshold (default: as in train_cnn.py)",
  )
  parser.add_argument("--lr", type=cli.positive_float, default=0.01, help="SGD learning rate")
  parser.add_argument("--momentum", type=cli.fraction, default=0.9, help="SGD momentum")
  parser.add_argument(
    "--steps", type=cli.positive_int, default=10000, help="training steps (fresh batches)"
  )
  parser.add_argument("--batch-size", type=cli.positive_int, default=32)
  parser.add_argument(
    "--seed", type=cli.nonnegative_int, default=0, help="initialisation and training data"
  )
  parser.add_argument("--out", default=None, help="write metrics.json, metrics.csv, training.png")
  parser.add_argument("--quiet", action="store_true", help="no progress bar")
  args = parser.parse_args(argv)
  if args.seq_len < 2 or args.steps < 1 or args.batch_size < 1 or args.hidden_size < 1:
    parser.error("--seq-len must be >= 2; --steps, --batch-size and --hidden-size >= 1")
  if args.max_norm is not None and args.clip in ("none", *train_cnn.ADAPTIVE):
    parser.error(f"--max-norm has no meaning with --clip {args.clip}")
  if args.max_norm is not None and not args.max_norm > 0:
    parser.error(f"--max-norm must be positive, got {args.max_norm}")
  if args.max_norm is None:
    args.max_norm = train_cnn.DEFAULT_MAX_NORM.get(args.clip)
  return args


def make_train_step(apply_fn: Callable, tx: optax.GradientTransformation) -> Callable:
  """``(params, opt_state, inputs, targets) -> (params, opt_state, metrics, stats)``."""

  def train_step(params, opt_state, inputs, targets):
    def loss_fn(params):
      return rnn.mse(apply_fn(params, inputs), targets)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    report = clipx.stats(opt_state)
    metrics = {
      "loss": loss,
      "grad_norm": clipx.global_norm(grads),  # pre-clip, the same for every --clip
      **train_cnn.step_summary(report),
    }
    return params, opt_state, metrics, dict(report)

  return train_step


def make_eval_step(apply_fn: Callable) -> Callable:
  """``(params, inputs, targets) -> (test MSE, d loss / d h_t norms, gradient norm)``.

  The last two on the first ``PROFILE_SIZE`` sequences: the norm per time step,
  and the global norm of the parameter gradient of their mean loss (a clip
  would scale that gradient, every time step's share alike, by threshold / norm).
  """

  def eval_step(params, inputs, targets):
    loss = rnn.mse(apply_fn(params, inputs), targets)
    inputs, targets = inputs[:PROFILE_SIZE], targets[:PROFILE_SIZE]
    profile = rnn.hidden_grad_norms(apply_fn, params, inputs, targets)
    grads = jax.grad(lambda p: rnn.mse(apply_fn(p, inputs), targets))(params)
    return loss, profile, clipx.global_norm(grads)

  return eval_step


def train(args: argparse.Namespace) -> dict[str, Any]:
  """Trains as the flags say and returns the metrics (the ``metrics.json`` content)."""
  start = time.perf_counter()
  rng = np.random.default_rng(args.seed)
  test_inputs, test_targets = rnn.adding_problem(
    np.random.default_rng(TEST_SEED), TEST_SIZE, args.seq_len
  )
  # The trivial predictor: always the mean of the sum (1), whatever the sequence.
  baseline_loss = float(np.mean((test_targets - 1.0) ** 2))
  apply_fn, params = rnn.init(args.cell, args.hidden_size, seed=args.seed)
  tx = train_cnn.make_optimizer(args.clip, args.max_norm, args.lr, args.momentum)
  opt_state = tx.init(params)
  train_step = jax.jit(make_train_step(apply_fn, tx), donate_argnums=(0, 1))
  eval_step = jax.jit(make_eval_step(apply_fn))

  eval_at = set(np.linspace(0, args.steps, EVALUATIONS + 1, dtype=int).tolist())
  evaluations: dict[str, list] = {key: [] for key in EVALUATION_KEYS}
  step_metrics, reports = [], []
  diverged, first_step_seconds = False, None
  refresh = max(1, args.steps // 50)
  bar = tqdm(range(1, args.steps + 1), disable=args.quiet, dynamic_ncols=True, desc=args.clip)
  for step in bar:
    if step - 1 in eval_at:
      evaluate(eval_step, params, test_inputs, test_targets, step - 1, evaluations)
    inputs, targets = rnn.adding_problem(rng, args.batch_size, args.seq_len)
    params, opt_state, metrics, report = train_step(params, opt_state, inputs, targets)
    if first_step_seconds is None:
      jax.block_until_ready(params)
      first_step_seconds = time.perf_counter() - start
    step_metrics.append(metrics)
    reports.append(report)
    if step % refresh == 0 or step == args.steps:
      recent = jax.device_get(step_metrics[-refresh:])  # waits for the step: every few only
      bar.set_postfix(
        loss=f"{np.mean([m['loss'] for m in recent]):.4f}",
        grad_norm=f"{recent[-1]['grad_norm']:.3g}",
        clip_rate=f"{np.mean([m['clipped'] for m in recent]):.2f}",
      )
      if not all(math.isfinite(float(m["loss"])) for m in recent):
        diverged = True
        break
  bar.close()
  evaluate(eval_step, params, test_inputs, test_targets, len(step_metrics), evaluations)

  step_metrics, reports = jax.device_get((step_metrics, reports))
  test_loss = evaluations["test_loss"][-1]
  diverged = diverged or not math.isfinite(test_loss)
  rows = [
    {"step": i + 1, "loss": float(m["loss"]), "grad_norm": float(m["grad_norm"])}
    | clipx.StatsReport(r).as_dict()
    for i, (m, r) in enumerate(zip(step_metrics, reports))
  ]
  thresholds = [float(m["threshold"]) for m in step_metrics]
  results = {
    "config": {k: v for k, v in vars(args).items() if k != "quiet"},
    "test_loss": test_loss,
    "baseline_loss": baseline_loss,
    "solved": bool(test_loss < SOLVED_FRACTION * baseline_loss),  # NaN compares False
    "success_criterion": f"test MSE < {SOLVED_FRACTION:g} x baseline MSE",
    "diverged": diverged,
    "steps": len(step_metrics),
    "step_loss": [float(m["loss"]) for m in step_metrics],
    "grad_norm": [float(m["grad_norm"]) for m in step_metrics],
    # None (JSON null) where there is no threshold: --clip none.
    "threshold": [None if math.isnan(t) else t for t in thresholds],
    "clipped": [bool(m["clipped"]) for m in step_metrics],
    "clip_rate": float(np.mean([m["clipped"] for m in step_metrics])),
    "evaluations": evaluations,
    "wall_seconds": time.perf_counter() - start,
    "first_step_seconds": first_step_seconds,
  }
  if args.out is not None:
    rnn_report.write_outputs(Path(args.out), results, rows)
  return results


def evaluate(eval_step, params, inputs, targets, step: int, evaluations: dict) -> None:
  """Appends ``eval_step``'s three results at ``step`` to ``evaluations``."""
  loss, profile, grad_norm = jax.device_get(eval_step(params, inputs, targets))
  evaluations["step"].append(step)
  evaluations["test_loss"].append(float(loss))
  evaluations["hidden_grad_norms"].append([float(v) for v in profile])
  evaluations["grad_norm"].append(float(grad_norm))


def run_seeds(
  seeds: Sequence[int] = (0, 1, 2), clips: Sequence[str] = ("none", "global"), **settings: Any
) -> dict[str, Any]:
  """Trains every ``clip`` for every seed; returns per-seed rows and each run's full results.

  ``settings`` override the flag defaults by their ``argparse`` names
  (``seq_len=50, lr=0.1, cell="rnn"``, ...). Returns ``{"settings": ..., "rows":
  [{"clip", "seed", "test_loss", "baseline_loss", "solved", "diverged", "steps",
  "wall_seconds"}, ...], "runs": {(clip, seed): results}}``.
  """
  rows, runs = [], {}
  for seed in seeds:
    for clip in clips:
      args = parse_args(["--clip", clip, "--seed", str(seed), "--quiet"])
      for name, value in settings.items():
        if not hasattr(args, name):
          raise TypeError(f"run_seeds: unknown setting {name!r}")
        setattr(args, name, value)
      results = train(args)
      runs[clip, seed] = results
      keys = ("test_loss", "baseline_loss", "solved", "diverged", "steps", "wall_seconds")
      rows.append({"clip": clip, "seed": seed, **{k: results[k] for k in keys}})
  return {"settings": dict(settings), "rows": rows, "runs": runs}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  if not args.quiet:
    print(
      f"clipx {clipx.__version__}, jax {jax.__version__} ({jax.default_backend()}):"
      f" {args.cell} cell, {args.hidden_size} units, adding problem of length {args.seq_len};"
      f" --clip {args.clip}"
      + (f" --max-norm {args.max_norm:g}" if args.max_norm is not None else "")
      + f", sgd lr {args.lr:g} momentum {args.momentum:g}",
      flush=True,
    )
  results = train(args)
  verdict = "SOLVED" if results["solved"] else "NOT solved"
  print(
    f"test MSE {results['test_loss']:.4g}, trivial predictor {results['baseline_loss']:.4g};"
    f" success criterion: {results['success_criterion']}"
    f" (< {SOLVED_FRACTION * results['baseline_loss']:.4g}): {verdict}"
    + (" (DIVERGED: non-finite loss)" if results["diverged"] else "")
    + f"; clip rate {results['clip_rate']:.2f}, {results['steps']} steps in"
    f" {results['wall_seconds']:.1f} s"
    + (f"; wrote {args.out}/metrics.json, metrics.csv, training.png" if args.out else "")
  )
  return results


if __name__ == "__main__":
  main()
