"""Large-model spike methods side by side under Adam: ``python examples/spike_methods.py``.

The digits CNN of ``train_cnn.py`` (same model, batches, spikes and
late-decay schedule) trained with ``optax.adam`` at ``--lr`` while every
``--inject-spikes``-th batch has its inputs multiplied by 100, once per
method, each at its authors' default settings and where its authors put it:

- before Adam, on the gradient: ``clip_by_global_norm(1.0)``,
  ``clip_by_global_norm(zclip())``, ``adagc()``, ``stable_spam_clip()``;
- after Adam's preconditioner, on the update:
  ``optax.chain(optax.scale_by_adam(), <clip>, optax.scale_by_learning_rate(lr))``
  with ``clip_by_global_norm(window_zscore())`` (levanter) or
  ``clip_by_block_rms(1.0)`` (Adafactor).

The default lr 0.01 is where the unclipped run is hurt by the spikes without
collapsing (seeds 0, 1, 2: 0.975 to 0.994 without spikes, 0.869 to 0.908 with
them; at 0.03 it collapses to chance with spikes).

The clip rate is the fraction of steps on which any clipping stage of the
chain clipped something: for ``adagc`` its warm-up global clip or a tensor's
bound, for ``stable_spam_clip`` AdaClip only. AdaGN (``clip/normalize``) is
not counted: it rescales every tensor on every step whose gradient is not
zero, by design. Every method sees the same initial parameters and batches.

``--task rnn``: the same methods on ``train_rnn.py``'s tanh RNN and adding
problem (length 50, 10000 steps of 32 sequences), with no injected spikes (the
RNN's own exploding gradients are the spikes) and Adam at a constant lr 0.003:
there the unclipped RNN fails (seed 0: test MSE 0.19, the trivial predictor's
0.16; at lr 0.001 it solves the task).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import clipx

if not __package__:  # run as a script: make the examples package importable
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from examples import cli, cnn, data, rnn, train_cnn, train_rnn  # noqa: E402
from examples.placement import Placement  # noqa: E402
from examples.reporting import json_safe  # noqa: E402

# Method -> (where it goes: "gradient" before adam, "update" after scale_by_adam, or None; its
# clipx transform at the authors' default settings).
METHODS: dict[str, tuple[str | None, Callable[[], optax.GradientTransformation] | None]] = {
  "none": (None, None),
  "global 1.0": ("gradient", lambda: clipx.clip_by_global_norm(1.0)),
  "zclip": ("gradient", lambda: clipx.clip_by_global_norm(clipx.zclip())),
  "adagc": ("gradient", lambda: clipx.adagc()),
  "stable_spam_clip": ("gradient", lambda: clipx.stable_spam_clip()),
  "window_zscore (update)": ("update", lambda: clipx.clip_by_global_norm(clipx.window_zscore())),
  "block_rms 1.0 (update)": ("update", lambda: clipx.clip_by_block_rms(1.0)),
}


def make_optimizer(method: str, lr: float | optax.Schedule) -> optax.GradientTransformation:
  """Adam with ``method``'s clipx transform before it or after its preconditioner."""
  where, make = METHODS[method]
  if where is None:
    return optax.adam(lr)
  if where == "gradient":
    return optax.chain(make(), optax.adam(lr))
  return optax.chain(optax.scale_by_adam(), make(), optax.scale_by_learning_rate(lr))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
    description="Spike methods under Adam on the digits CNN with injected spikes.",
    formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  parser.add_argument(
    "--methods", default=",".join(METHODS), help=f"comma-separated, of: {', '.join(METHODS)}"
  )
  parser.add_argument("--task", choices=("cnn", "rnn"), default="cnn")
  parser.add_argument(
    "--lr",
    type=cli.positive_float,
    default=None,
    help="Adam's learning rate (peak); cnn 0.01, rnn 0.003",
  )
  parser.add_argument("--epochs", type=cli.positive_int, default=10, help="cnn: epochs")
  parser.add_argument("--batch-size", type=cli.positive_int, default=8, help="cnn: batch size")
  parser.add_argument(
    "--inject-spikes",
    type=cli.nonnegative_int,
    default=50,
    metavar="N",
    help="cnn: inputs x100 every N-th batch",
  )
  parser.add_argument("--steps", type=cli.positive_int, default=10000, help="rnn: training steps")
  parser.add_argument("--seed", type=cli.nonnegative_int, default=0)
  parser.add_argument("--out", default=None, help="write spike_methods.json here")
  parser.add_argument("--quiet", action="store_true", help="only the result lines")
  args = parser.parse_args(argv)
  args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
  unknown = [m for m in args.methods if m not in METHODS]
  if unknown:
    parser.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
  if args.lr is None:
    args.lr = {"cnn": 1e-2, "rnn": 3e-3}[args.task]
  return args


def with_clip_flag(step_fn: Callable) -> Callable:
  """A jitted ``step_fn`` returning ``(params, opt_state, loss, clipped)``.

  ``clipped``: whether a clipping stage of the chain clipped anything this step.
  """

  @jax.jit
  def train_step(params, opt_state, *batch):
    params, opt_state, metrics, report = step_fn(params, opt_state, *batch)
    flags = [
      jnp.any(s.clipped)
      for name, s in report.items()
      if isinstance(s, clipx.ClipStats) and name != "normalize"  # AdaGN: every step
    ]
    clipped = jnp.any(jnp.stack(flags)) if flags else jnp.zeros((), bool)
    return params, opt_state, metrics["loss"], clipped

  return train_step


def train(args: argparse.Namespace, method: str, dataset) -> dict[str, Any]:
  """One run: ``{test_accuracy, clip_rate, diverged, steps}``."""
  x_train, y_train, x_test, y_test = dataset
  steps_per_epoch = len(x_train) // args.batch_size
  total_steps = steps_per_epoch * args.epochs
  num_classes = int(max(y_train.max(), y_test.max())) + 1
  apply_fn, params = cnn.init(num_classes, x_train.shape[1:], seed=args.seed)
  tx = make_optimizer(method, train_cnn.late_decay(args.lr, total_steps))
  opt_state = tx.init(params)
  train_step = with_clip_flag(train_cnn.make_train_step(apply_fn, tx))

  rng = np.random.default_rng(args.seed)  # the batches of train_cnn.py with this seed
  losses, clipped, step = [], [], 0
  for _ in range(args.epochs):
    order = rng.permutation(len(x_train))
    for i in range(steps_per_epoch):
      index = order[i * args.batch_size : (i + 1) * args.batch_size]
      images, labels = x_train[index], y_train[index]
      step += 1
      if args.inject_spikes and step % args.inject_spikes == 0:
        images = images * train_cnn.SPIKE_FACTOR
      params, opt_state, loss, was_clipped = train_step(params, opt_state, images, labels)
      losses.append(loss)
      clipped.append(was_clipped)
  losses, clipped = jax.device_get((losses, clipped))
  eval_step = jax.jit(train_cnn.make_eval_step(apply_fn))
  _, test_accuracy = train_cnn.evaluate(eval_step, params, x_test, y_test, Placement(), 512)
  return {
    "test_accuracy": test_accuracy,
    "clip_rate": float(np.mean(clipped)),
    "diverged": not all(math.isfinite(v) for v in losses),
    "steps": step,
  }


def train_adding(args: argparse.Namespace, method: str) -> dict[str, Any]:
  """One RNN run: ``{test_loss, baseline_loss, solved, clip_rate, diverged, steps}``."""
  defaults = train_rnn.parse_args(["--seed", str(args.seed)])
  rng = np.random.default_rng(args.seed)  # the batches of train_rnn.py with this seed
  test_inputs, test_targets = rnn.adding_problem(
    np.random.default_rng(train_rnn.TEST_SEED), train_rnn.TEST_SIZE, defaults.seq_len
  )
  baseline_loss = float(np.mean((test_targets - 1.0) ** 2))  # always predict 1
  apply_fn, params = rnn.init(defaults.cell, defaults.hidden_size, seed=args.seed)
  tx = make_optimizer(method, args.lr)
  opt_state = tx.init(params)
  train_step = with_clip_flag(train_rnn.make_train_step(apply_fn, tx))
  losses, clipped = [], []
  for _ in range(args.steps):
    inputs, targets = rnn.adding_problem(rng, defaults.batch_size, defaults.seq_len)
    params, opt_state, loss, was_clipped = train_step(params, opt_state, inputs, targets)
    losses.append(loss)
    clipped.append(was_clipped)
  losses, clipped = jax.device_get((losses, clipped))
  eval_step = jax.jit(train_rnn.make_eval_step(apply_fn))
  test_loss = float(eval_step(params, test_inputs, test_targets)[0])
  return {
    "test_loss": test_loss,
    "baseline_loss": baseline_loss,
    "solved": bool(test_loss < train_rnn.SOLVED_FRACTION * baseline_loss),  # NaN: False
    "clip_rate": float(np.mean(clipped)),
    "diverged": not (all(math.isfinite(v) for v in losses) and math.isfinite(test_loss)),
    "steps": args.steps,
  }


def run(args: argparse.Namespace, dataset=None) -> dict[str, dict[str, Any]]:
  """``{method: train(...)}`` (or ``train_adding``) for every method of ``--methods``."""
  results = {}
  for method in args.methods:
    start = time.perf_counter()
    if args.task == "cnn":
      results[method] = r = train(args, method, dataset)
      line = f"test accuracy {r['test_accuracy']:.4f}"
    else:
      results[method] = r = train_adding(args, method)
      line = f"test MSE {r['test_loss']:.4g}" + (" (solved)" if r["solved"] else "")
    print(
      f"{method:>24}: {line}, clip rate {r['clip_rate']:.2f}"
      + (" (diverged)" if r["diverged"] else "")
      + ("" if args.quiet else f", {time.perf_counter() - start:.0f} s"),
      flush=True,
    )
  if args.out is not None:
    write_results(Path(args.out), args, results)
  return results


def write_results(out: Path, args: argparse.Namespace, results: dict[str, Any]) -> None:
  """``spike_methods.json`` in ``out``: the settings and each method's result."""
  out.mkdir(parents=True, exist_ok=True)
  config = {k: v for k, v in vars(args).items() if k not in ("quiet", "out")}
  with open(out / "spike_methods.json", "w") as f:
    json.dump(json_safe({"config": config, "results": results}), f, indent=2)
  print(f"wrote {out / 'spike_methods.json'}", flush=True)


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
  args = parse_args(argv)
  if args.task == "rnn":
    if not args.quiet:
      print(f"tanh RNN, adding problem, adam lr {args.lr:g}, {args.steps} steps", flush=True)
    return run(args)
  if not args.quiet:
    print(
      f"digits CNN, adam lr {args.lr:g} (late decay), batch {args.batch_size}, {args.epochs}"
      f" epochs, inputs x{train_cnn.SPIKE_FACTOR:g} every {args.inject_spikes} batches",
      flush=True,
    )
  return run(args, data.load_or_exit("digits", None))


if __name__ == "__main__":
  main()
