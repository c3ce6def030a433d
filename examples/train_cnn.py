"""Train the small Flax CNN with gradient clipping: ``python examples/train_cnn.py``.

Reads top to bottom: flags, data, model, the optimizer with its clipx
transform, one jitted ``train_step`` (buffers donated) and one jitted
``eval_step``, the loop, the report. The defaults train on scikit-learn's
digits (no download) with global-norm clipping at 1.0 and SGD-momentum, to
about 0.98 test accuracy in well under a minute on a 2-core CPU.

What clipping did comes from ``clipx.stats(opt_state)`` every step, returned
by the jitted step. Reporting it (progress bar, ``metrics.json``,
``metrics.csv``, TensorBoard, ``training.png``) lives in ``reporting.py``;
placing arrays on one device or a data-parallel mesh in ``placement.py``.

Examples::

  python examples/train_cnn.py
  python examples/train_cnn.py --clip zclip --lr 0.05 --inject-spikes 50 --out runs/zclip
  python examples/train_cnn.py --dataset mnist --data-dir ~/data/mnist --epochs 2
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
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import clipx

if not __package__:  # run as a script: make the examples package importable
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from examples import cnn, data, reporting  # noqa: E402
from examples.placement import Placement  # noqa: E402

# Re-exported: train_rnn.py and rnn_report.py import them from here.
from examples.reporting import json_safe, step_summary  # noqa: E402, F401
from examples.train_cnn_flags import (  # noqa: E402, F401 (re-exported)
  ADAPTIVE,
  CLIPS,
  DEFAULT_MAX_NORM,
  SPIKE_FACTOR,
  parse_args,
)


def late_decay(lr: float, total_steps: int, constant_fraction: float = 0.6) -> optax.Schedule:
  """``lr`` for the first steps, then a cosine decay to 0 by ``total_steps``.

  The last epochs settle instead of bouncing around the minimum (the final
  accuracy is the one reported); a plain cosine under-trained at lr 0.01.
  """
  boundary = int(total_steps * constant_fraction)
  return optax.join_schedules(
    [optax.constant_schedule(lr), optax.cosine_decay_schedule(lr, max(1, total_steps - boundary))],
    [boundary],
  )


def make_optimizer(
  clip: str,
  max_norm: float | None,
  lr: float | optax.Schedule,
  momentum: float,
) -> optax.GradientTransformation:
  """``optax.chain(<clipx transform>, optax.sgd(lr, momentum))`` for a ``--clip`` choice."""
  sgd = optax.sgd(lr, momentum=momentum)
  if clip == "none":
    return sgd
  if clip == "value":
    scope = clipx.clip_by_value(max_norm)
  elif clip == "global":
    scope = clipx.clip_by_global_norm(max_norm)
  elif clip == "layer":
    # group="module": a layer's kernel and bias share one norm.
    scope = clipx.clip_by_layer_norm(max_norm, group="module")
  elif clip == "agc":
    scope = clipx.adaptive_grad_clip(max_norm)
  elif clip in ADAPTIVE:
    if not hasattr(clipx, clip):
      raise SystemExit(f"--clip {clip}: this clipx ({clipx.__file__}) has no clipx.{clip}().")
    scope = clipx.clip_by_global_norm(getattr(clipx, clip)())  # default settings
  else:
    raise ValueError(f"unknown --clip {clip!r}; choose one of {', '.join(CLIPS)}")
  return optax.chain(scope, sgd)


def make_train_step(apply_fn: Callable, tx: optax.GradientTransformation) -> Callable:
  """One SGD step: ``(params, opt_state, images, labels) -> (params, opt_state, metrics, stats)``.

  ``stats`` is ``dict(clipx.stats(opt_state))``: every field of every clipx
  transform, returned as device arrays so the loop reads them without a sync.
  """

  def train_step(params, opt_state, images, labels):
    def loss_fn(params):
      logits = apply_fn(params, images)
      return cnn.cross_entropy(logits, labels), logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    report = clipx.stats(opt_state)
    metrics = {
      "loss": loss,
      "accuracy": cnn.accuracy(logits, labels),
      "grad_norm": clipx.global_norm(grads),  # pre-clip, the same for every --clip
      **reporting.step_summary(report),
    }
    # A plain dict (StatsReport is a dict subclass, which jit does not flatten).
    return params, opt_state, metrics, dict(report)

  return train_step


def make_eval_step(apply_fn: Callable) -> Callable:
  """``(params, images, labels, mask) -> (sum of losses, number correct)`` over a padded batch."""

  def eval_step(params, images, labels, mask):
    logits = apply_fn(params, images)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = jnp.argmax(logits, axis=-1) == labels
    return jnp.sum(jnp.where(mask, losses, 0.0)), jnp.sum(correct & mask)

  return eval_step


def evaluate(eval_step, params, images, labels, placement: Placement, batch_size: int):
  """Mean loss and accuracy over a dataset, in fixed-shape padded batches (one compile)."""
  batch_size = -(-batch_size // placement.count) * placement.count
  total_loss, total_correct = 0.0, 0
  for start in range(0, len(images), batch_size):
    x, y = images[start : start + batch_size], labels[start : start + batch_size]
    mask = np.zeros(batch_size, bool)
    mask[: len(x)] = True
    pad = batch_size - len(x)
    if pad:
      x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
      y = np.concatenate([y, np.zeros(pad, y.dtype)])
    loss, correct = eval_step(params, *jax.device_put((x, y, mask), placement.batch))
    total_loss += float(loss)
    total_correct += int(correct)
  return total_loss / len(images), total_correct / len(images)


def train(
  args: argparse.Namespace, dataset: tuple[np.ndarray, ...] | None = None
) -> dict[str, Any]:
  """Trains as the flags say and returns the metrics (the ``metrics.json`` content).

  ``dataset`` (``x_train, y_train, x_test, y_test``) skips loading, so other
  examples can run many trainings on one copy of the data.
  """
  start = time.perf_counter()
  placement = Placement()

  # Data.
  x_train, y_train, x_test, y_test = (
    data.load_or_exit(args.dataset, args.data_dir) if dataset is None else dataset
  )
  batch_size = args.batch_size
  if batch_size % placement.count:
    raise SystemExit(
      f"--batch-size {batch_size} must be a multiple of the {placement.count} devices."
    )
  steps_per_epoch = len(x_train) // batch_size  # the last partial batch is dropped: one shape
  if steps_per_epoch == 0:
    raise SystemExit(f"--batch-size {batch_size} exceeds the {len(x_train)} training images.")
  total_steps = steps_per_epoch * args.epochs
  if args.max_steps:
    total_steps = min(total_steps, args.max_steps)

  # Model and optimizer: optax.chain(<clipx transform>, sgd).
  num_classes = int(max(y_train.max(), y_test.max())) + 1
  apply_fn, params = cnn.init(num_classes, x_train.shape[1:], seed=args.seed)
  lr = late_decay(args.lr, total_steps) if args.schedule == "late-decay" else args.lr
  tx = make_optimizer(args.clip, args.max_norm, lr, args.momentum)
  params = jax.device_put(params, placement.replicated)
  opt_state = jax.device_put(tx.init(params), placement.replicated)

  # Donating params and optimizer state lets XLA update them in place.
  train_step = jax.jit(make_train_step(apply_fn, tx), donate_argnums=(0, 1))
  eval_step = jax.jit(make_eval_step(apply_fn))

  # Loop.
  rng = np.random.default_rng(args.seed)
  recorder = reporting.Recorder(args)
  step, diverged, first_step_seconds = 0, False, None
  for epoch in range(args.epochs):
    order = rng.permutation(len(x_train))
    epoch_metrics, epoch_stats = [], []
    desc = f"epoch {epoch + 1}/{args.epochs}"
    bar = tqdm(range(steps_per_epoch), desc=desc, disable=args.quiet, dynamic_ncols=True)
    refresh = max(1, steps_per_epoch // 10)
    for i in bar:
      index = order[i * batch_size : (i + 1) * batch_size]
      images, labels = x_train[index], y_train[index]
      step += 1
      if args.inject_spikes and step % args.inject_spikes == 0:
        images = images * SPIKE_FACTOR  # a bad batch: a gradient spike
      batch = jax.device_put((images, labels), placement.batch)
      params, opt_state, metrics, report = train_step(params, opt_state, *batch)
      if first_step_seconds is None:
        jax.block_until_ready(params)
        first_step_seconds = time.perf_counter() - start
      epoch_metrics.append(metrics)
      epoch_stats.append(report)
      if i % refresh == refresh - 1 or i == steps_per_epoch - 1:
        if not math.isfinite(reporting.show_progress(bar, epoch_metrics, refresh)):
          diverged = True
          break
      if args.max_steps and step >= args.max_steps:
        break
    bar.close()

    host_metrics, host_stats = jax.device_get((epoch_metrics, epoch_stats))
    diverged = recorder.add_epoch(step, epoch + 1, host_metrics, host_stats) or diverged
    test_loss, test_accuracy = evaluate(
      eval_step, params, x_test, y_test, placement, batch_size=max(batch_size, 512)
    )
    line = recorder.add_test(step, test_loss, test_accuracy)
    if not args.quiet:
      print(line, flush=True)
    if diverged or (args.max_steps and step >= args.max_steps):
      break

  # Report.
  results = recorder.results(
    config={k: v for k, v in vars(args).items() if k not in ("quiet",)},
    devices=placement.describe(),
    steps=step,
    diverged=diverged,
    wall_seconds=time.perf_counter() - start,
    first_step_seconds=first_step_seconds,
  )
  if args.out is not None:
    reporting.write_outputs(Path(args.out), results, recorder.rows)
  return results


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  if not args.quiet:
    print(
      f"clipx {clipx.__version__}, jax {jax.__version__}: {Placement().describe()};"
      f" --clip {args.clip}"
      + (f" --max-norm {args.max_norm:g}" if args.max_norm is not None else "")
      + f", sgd lr {args.lr:g} momentum {args.momentum:g}",
      flush=True,
    )
  results = train(args)
  # --quiet hides the progress bar and the per-epoch lines, never the result.
  print(reporting.summary_line(results, args.out), flush=True)
  return results


if __name__ == "__main__":
  main()
