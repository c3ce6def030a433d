"""How to choose the clipping threshold: train one model per threshold and compare.

``python examples/threshold_sweep.py`` trains the digits CNN once per global
norm threshold (12 log-spaced from 0.01 to 100, plus no clipping) at a high
learning rate, and plots final test accuracy and clip rate against the
threshold (``threshold_sweep.png`` and ``.json`` under ``--out``, default
``runs/threshold_sweep``).

Compile once: the threshold is a traced argument of the one jitted step, never
a Python constant, and no clipping is the same program with threshold ``inf``.
Two ways to run the models (``--mode``):

- ``loop``: the models take turns, step by step, calling the one compiled
  single-model step (shared batches, one compile, no retracing).
- ``vmap``: ``jax.vmap`` of the same step over (params, opt_state, threshold):
  one program trains every model at once. On an accelerator this fills the
  chip; on a CPU the batched convolutions (grouped convs over stacked kernels)
  buy nothing, so it is not faster there.
- ``both`` (what ``--mode`` falls back to for the README numbers) runs both,
  prints a side-by-side table of compile and run time and checks that the two
  modes agree.

The default is ``loop`` on CPU and ``vmap`` on GPU/TPU; see the README for the
measurement behind that choice.

Every model sees the same initial parameters and the same batches, so the
threshold is the only difference between them.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import clipx

if not __package__:  # run as a script: make the examples package importable
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from examples import cli, cnn, data, reporting, train_cnn  # noqa: E402

MODES = ("loop", "vmap")


def default_mode() -> str:
  """``loop`` on CPU, where it measured faster; ``vmap`` on accelerators."""
  return "loop" if jax.default_backend() == "cpu" else "vmap"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
    description="Sweep the global-norm clipping threshold: accuracy and clip rate vs threshold.",
    formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  parser.add_argument(
    "--thresholds", type=cli.positive_int, default=12, help="how many, log-spaced"
  )
  parser.add_argument("--min-threshold", type=cli.positive_float, default=0.01)
  parser.add_argument("--max-threshold", type=cli.positive_float, default=100.0)
  parser.add_argument("--no-unclipped", action="store_true", help="leave out the unclipped run")
  parser.add_argument(
    "--mode",
    choices=(*MODES, "both"),
    default=default_mode(),
    help="loop: models take turns on one compiled step; vmap: one vmapped program for all;"
    " both: measure the two side by side",
  )
  parser.add_argument("--lr", type=cli.positive_float, default=1.0, help="SGD learning rate (peak)")
  parser.add_argument("--momentum", type=cli.fraction, default=0.9)
  parser.add_argument("--schedule", choices=("late-decay", "constant"), default="late-decay")
  parser.add_argument("--epochs", type=cli.positive_int, default=3)
  parser.add_argument("--batch-size", type=cli.positive_int, default=32)
  parser.add_argument("--seed", type=cli.nonnegative_int, default=0)
  parser.add_argument("--dataset", choices=data.DATASETS, default="digits")
  parser.add_argument("--data-dir", default=None)
  parser.add_argument(
    "--max-steps", type=cli.nonnegative_int, default=0, help="stop after this many steps"
  )
  parser.add_argument("--out", default="runs/threshold_sweep", help="folder for the png and json")
  parser.add_argument("--quiet", action="store_true")
  args = parser.parse_args(argv)
  if args.thresholds < 1 or not 0 < args.min_threshold <= args.max_threshold:
    parser.error("need --thresholds >= 1 and 0 < --min-threshold <= --max-threshold")
  return args


def thresholds_of(args: argparse.Namespace) -> np.ndarray:
  """The swept thresholds, float32, with ``inf`` (no clipping) last unless left out."""
  values = np.geomspace(args.min_threshold, args.max_threshold, args.thresholds)
  if not args.no_unclipped:
    values = np.append(values, np.inf)
  return values.astype(np.float32)


def make_step(apply_fn, lr, momentum: float):
  """``(params, opt_state, images, labels, threshold) -> (params, opt_state, loss, norm, clipped)``.

  ``norm`` is the pre-clip global gradient norm, ``clipped`` whether it was clipped.

  The optimizer is built inside the traced function from the traced
  ``threshold``; a constant threshold keeps no state of its own, so the state
  has the same structure for every threshold and one compile serves them all.
  """

  def optimizer(threshold):
    return optax.chain(clipx.clip_by_global_norm(threshold), optax.sgd(lr, momentum=momentum))

  def step(params, opt_state, images, labels, threshold):
    def loss_fn(params):
      return cnn.cross_entropy(apply_fn(params, images), labels)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer(threshold).update(grads, opt_state, params)
    stats = clipx.stats(opt_state)["global"]
    return optax.apply_updates(params, updates), opt_state, loss, stats.norm, stats.clipped

  return step, optimizer(1.0).init


def make_eval(apply_fn):
  """``(params, images, labels, mask) -> number correct`` over a padded batch."""

  def eval_step(params, images, labels, mask):
    return jnp.sum((jnp.argmax(apply_fn(params, images), -1) == labels) & mask)

  return eval_step


def padded_batches(images: np.ndarray, labels: np.ndarray, batch_size: int):
  """Fixed-shape test batches (zero padding, masked out), so eval compiles once."""
  for start in range(0, len(images), batch_size):
    x, y = images[start : start + batch_size], labels[start : start + batch_size]
    mask = np.arange(batch_size) < len(x)
    pad = batch_size - len(x)
    yield (
      np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)]),
      np.concatenate([y, np.zeros(pad, y.dtype)]),
      mask,
    )


def sweep(
  thresholds: np.ndarray,
  dataset: tuple[np.ndarray, ...],
  *,
  mode: str,
  lr: float = 1.0,
  momentum: float = 0.9,
  schedule: str = "late-decay",
  epochs: int = 3,
  batch_size: int = 32,
  seed: int = 0,
  max_steps: int = 0,
  inject_spikes: int = 0,
) -> dict[str, Any]:
  """Trains one CNN per threshold; returns per-threshold results and timings.

  Returns:
    ``{"test_accuracy", "clip_rate", "train_loss" (per epoch), "step_loss"
    and "grad_norm" (per step), "diverged"}``, each one entry per threshold,
    and ``compile_seconds`` (train and eval steps, lowered and compiled ahead
    of time) and ``run_seconds`` (the training and evaluation loop after
    compiling).
  """
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
  x_train, y_train, x_test, y_test = dataset
  count = len(thresholds)
  steps_per_epoch = len(x_train) // batch_size
  total_steps = steps_per_epoch * epochs
  if max_steps:
    total_steps = min(total_steps, max_steps)
  rate = train_cnn.late_decay(lr, total_steps) if schedule == "late-decay" else lr
  num_classes = int(max(y_train.max(), y_test.max())) + 1
  apply_fn, params = cnn.init(num_classes, x_train.shape[1:], seed=seed)
  step, opt_init = make_step(apply_fn, rate, momentum)
  eval_step = make_eval(apply_fn)
  opt_state = opt_init(params)
  eval_batch = min(len(x_test), 1024)

  start = time.perf_counter()
  example_batch = (x_train[:batch_size], y_train[:batch_size])
  example_eval = next(padded_batches(x_test, y_test, eval_batch))
  if mode == "vmap":
    stack = lambda tree: jax.tree.map(lambda x: jnp.stack([x] * count), tree)  # noqa: E731
    models = [(stack(params), stack(opt_state))]
    step_fn = jax.vmap(step, in_axes=(0, 0, None, None, 0))
    eval_fn = jax.vmap(eval_step, in_axes=(0, None, None, None))
    threshold_args = [jnp.asarray(thresholds)]
  else:
    models = [(params, opt_state)] + [
      jax.tree.map(jnp.copy, (params, opt_state)) for _ in range(count - 1)
    ]
    step_fn, eval_fn = step, eval_step
    threshold_args = [jnp.asarray(t) for t in thresholds]
  # Ahead-of-time compile: the one executable every model and step reuses (a
  # new shape or a Python-constant threshold would be an error, not a retrace).
  train_exe = (
    jax.jit(step_fn, donate_argnums=(0, 1))
    .lower(*models[0], *example_batch, threshold_args[0])
    .compile()
  )
  eval_exe = jax.jit(eval_fn).lower(models[0][0], *example_eval).compile()
  compile_seconds = time.perf_counter() - start

  start = time.perf_counter()
  rng = np.random.default_rng(seed)
  losses = [[[] for _ in models] for _ in range(epochs)]
  clipped = [[] for _ in models]
  grad_norms = [[] for _ in models]
  step_count = 0
  for epoch in range(epochs):
    order = rng.permutation(len(x_train))
    for i in range(steps_per_epoch):
      index = order[i * batch_size : (i + 1) * batch_size]
      images = x_train[index]
      step_count += 1
      if inject_spikes and step_count % inject_spikes == 0:
        images = images * train_cnn.SPIKE_FACTOR  # as train_cnn.py --inject-spikes
      batch = jax.device_put((images, y_train[index]))
      for m, threshold in enumerate(threshold_args):
        params_m, state_m, loss, norm, was_clipped = train_exe(*models[m], *batch, threshold)
        models[m] = (params_m, state_m)
        losses[epoch][m].append(loss)
        grad_norms[m].append(norm)
        clipped[m].append(was_clipped)
      if max_steps and step_count >= max_steps:
        break
    if max_steps and step_count >= max_steps:
      epochs = epoch + 1
      break
  correct = np.zeros(count)
  for batch in padded_batches(x_test, y_test, eval_batch):
    device_batch = jax.device_put(batch)
    correct += np.concatenate([np.atleast_1d(eval_exe(p, *device_batch)) for p, _ in models])
  losses, clipped, grad_norms = jax.device_get((losses[:epochs], clipped, grad_norms))
  run_seconds = time.perf_counter() - start

  def per_model(values):  # lists of per-model scalars (loop) or (count,) arrays (vmap)
    return np.concatenate([np.reshape(v, (len(v), -1)) for v in values], axis=1)

  train_loss = np.stack([per_model(epoch_losses).mean(0) for epoch_losses in losses])
  all_losses = np.concatenate([per_model(epoch_losses) for epoch_losses in losses])
  return {
    "thresholds": [float(t) for t in thresholds],
    "test_accuracy": (correct / len(x_test)).tolist(),
    "clip_rate": per_model(clipped).mean(0).tolist(),
    "train_loss": train_loss.T.tolist(),
    "diverged": (~np.isfinite(all_losses).all(0)).tolist(),
    "step_loss": all_losses.T.tolist(),
    "grad_norm": per_model(grad_norms).T.tolist(),
    "steps": step_count,
    "compile_seconds": compile_seconds,
    "run_seconds": run_seconds,
  }


def label(threshold: float) -> str:
  return "none" if math.isinf(threshold) else f"{threshold:.3g}"


def print_table(results: dict[str, Any]) -> None:
  print(f"{'threshold':>10} {'test acc':>9} {'clip rate':>9} {'last loss':>10}")
  for t, acc, rate, loss in zip(
    results["thresholds"], results["test_accuracy"], results["clip_rate"], results["train_loss"]
  ):
    print(f"{label(t):>10} {acc:9.4f} {rate:9.2f} {loss[-1]:10.4g}")


def plot(results: dict[str, Any], path: Path, title: str) -> None:
  """Test accuracy and clip rate against the threshold; no clipping drawn at the right."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  thresholds = np.asarray(results["thresholds"])
  finite = np.isfinite(thresholds)
  accuracy = np.asarray(results["test_accuracy"])
  rate = np.asarray(results["clip_rate"])
  fig, ax = plt.subplots(figsize=(8, 4.8))
  ax.plot(thresholds[finite], accuracy[finite], "o-", color="C0", label="test accuracy")
  ax.set(xscale="log", xlabel="global-norm threshold", ylabel="test accuracy", ylim=(0, 1.02))
  twin = ax.twinx()
  twin.plot(thresholds[finite], rate[finite], "s--", color="C1", label="clip rate")
  twin.set(ylabel="fraction of steps clipped", ylim=(-0.02, 1.02))
  if (~finite).any():
    ax.axhline(accuracy[~finite][0], color="C3", ls=":", label="no clipping: test accuracy")
  best = int(np.argmax(accuracy))
  ax.annotate(
    f"best {label(thresholds[best])}: {accuracy[best]:.3f}",
    (thresholds[best] if finite[best] else thresholds[finite][-1], accuracy[best]),
    textcoords="offset points",
    xytext=(0, -22),
    ha="center",
  )
  lines = ax.get_legend_handles_labels()
  twin_lines = twin.get_legend_handles_labels()
  ax.legend(lines[0] + twin_lines[0], lines[1] + twin_lines[1], loc="center left", fontsize=8)
  ax.set_title(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  dataset = data.load_or_exit(args.dataset, args.data_dir)
  thresholds = thresholds_of(args)
  modes = MODES if args.mode == "both" else (args.mode,)
  config = dict(
    lr=args.lr,
    momentum=args.momentum,
    schedule=args.schedule,
    epochs=args.epochs,
    batch_size=args.batch_size,
    seed=args.seed,
    max_steps=args.max_steps,
  )
  runs = {}
  for mode in modes:
    if not args.quiet:
      print(f"{mode}: {len(thresholds)} models ...", flush=True)
    runs[mode] = sweep(thresholds, dataset, mode=mode, **config)
  results = runs[modes[0]]
  if not args.quiet:
    print_table(results)
    print(f"\n{'mode':>6} {'compile s':>10} {'run s':>8} {'total s':>8}")
    for mode, run in runs.items():
      total = run["compile_seconds"] + run["run_seconds"]
      print(f"{mode:>6} {run['compile_seconds']:10.1f} {run['run_seconds']:8.1f} {total:8.1f}")
  summary: dict[str, Any] = {
    "config": {**config, "dataset": args.dataset, "backend": jax.default_backend()},
    **results,
    "timing": {
      mode: {"compile_seconds": run["compile_seconds"], "run_seconds": run["run_seconds"]}
      for mode, run in runs.items()
    },
  }
  if len(runs) == 2:
    # Same initial params, batches and thresholds: the modes must agree (up to
    # float reassociation in the batched convolutions, and chaotic divergence).
    loop, vmapped = runs["loop"], runs["vmap"]
    summary["modes_agree_max_accuracy_difference"] = float(
      np.max(np.abs(np.subtract(loop["test_accuracy"], vmapped["test_accuracy"])))
    )
    ratio = (vmapped["compile_seconds"] + vmapped["run_seconds"]) / (
      loop["compile_seconds"] + loop["run_seconds"]
    )
    summary["vmap_over_loop_time"] = ratio
    if not args.quiet:
      print(
        f"vmap/loop total time {ratio:.2f}x on {jax.default_backend()};"
        f" largest accuracy difference between modes"
        f" {summary['modes_agree_max_accuracy_difference']:.4f}"
      )
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  with open(out / "threshold_sweep.json", "w") as f:
    json.dump(reporting.json_safe(summary), f, indent=1, allow_nan=False)
  plot(
    results,
    out / "threshold_sweep.png",
    f"{args.dataset} CNN, SGD-momentum lr {args.lr:g} ({args.schedule}), {args.epochs} epochs,"
    f" batch {args.batch_size}: one model per threshold",
  )
  if not args.quiet:
    print(f"wrote {out / 'threshold_sweep.png'} and threshold_sweep.json")
  return summary


if __name__ == "__main__":
  main()
