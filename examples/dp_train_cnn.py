"""DP-SGD (differentially private training) of the small Flax CNN: examples/dp_train_cnn.py.

Reads top to bottom: flags, data, model, the per-example clipped gradient
(:func:`clipx.clipped_grad`) and the noise (:func:`clipx.add_noise`) in front
of SGD-momentum, one jitted ``train_step`` and ``eval_step``, the loop, and
the report: test accuracy, and the privacy budget epsilon at ``--delta``
computed with Google's ``dp-accounting`` (``pip install -e ".[dp]"`` in the
clone; without it the run trains and says how to get epsilon).

DP-SGD (Abadi et al. 2016, https://arxiv.org/abs/1607.00133), as analysed:

- Batches are Poisson samples: every training example joins a step's batch
  independently with probability ``q = batch_size / n``. Array shapes must be
  static under ``jit``, so a sample is laid out in a fixed physical batch of
  ``max_batch`` rows (``batch_size`` plus four standard deviations): unused
  rows carry weight 0, hence a zero gradient, and the rare sample larger than
  ``max_batch`` is cut to a random subset of that size. The accountant is
  told exactly that (``TruncatedSubsampledGaussianDpEvent``), so the epsilon
  is for the algorithm that ran.
- Each example's gradient is clipped to L2 norm ``--max-norm``; the clipped
  gradients are summed and divided by the *expected* batch size (a public
  constant), and Gaussian noise of std ``noise_multiplier * max_norm /
  batch_size`` is added. Momentum and the learning rate act on the noisy
  mean afterwards (post-processing: no privacy cost).
- With ``--adaptive`` the bound is learned privately
  (:func:`clipx.private_quantile`, Andrew et al. 2021,
  https://arxiv.org/abs/1905.03871): ``--max-norm`` is its start, and it
  moves toward the ``--target-quantile`` of the norms by a count of unclipped
  examples with Gaussian noise of std ``--count-noise``. That count is a
  second release; :func:`clipx.gradient_noise_multiplier` raises the
  gradient's noise so that the pair is exactly as private as one Gaussian
  mechanism with ``--noise-multiplier`` (their Theorem 1), and the accountant
  is told ``--noise-multiplier``.

The sampling uses NumPy's generator seeded by ``--seed``: fine for a demo,
not for a deployment, where the sampling and the noise need a
cryptographically secure source. The test set is never used for training.

Per-example gradients are computed 32 examples at a time (``--chunk-size``),
which bounds memory and, on CPU, ran 3x faster than the whole batch at once;
there clipx also computes the convolutions as matrix products, because XLA's
CPU backend runs their vmapped kernel gradients as slow grouped convolutions
(see ``benchmarks/per_example.py``).

Examples::

  python examples/dp_train_cnn.py
  python examples/dp_train_cnn.py --noise-multiplier 2.0 --epochs 40
  python examples/dp_train_cnn.py --adaptive --target-quantile 0.5
  python examples/dp_train_cnn.py --dataset mnist --data-dir ~/data/mnist --batch-size 256
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
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
from examples import cli, cnn, data  # noqa: E402

# Rows of the physical batch: the expected batch size plus this many standard
# deviations of the Poisson sample size, so truncation is rare (and accounted).
MARGIN_STDS = 4.0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
    description="DP-SGD on a small Flax CNN with clipx per-example clipping.",
    formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  parser.add_argument("--dataset", choices=data.DATASETS, default="digits")
  parser.add_argument("--data-dir", default=None, help="folder of the mnist/cifar10 files")
  parser.add_argument(
    "--batch-size", type=cli.positive_int, default=64, help="expected (Poisson) batch size"
  )
  parser.add_argument(
    "--epochs", type=cli.positive_float, default=20, help="passes over the data, in expectation"
  )
  parser.add_argument(
    "--max-norm", type=cli.positive_float, default=1.0, help="per-example clipping bound"
  )
  parser.add_argument("--noise-multiplier", type=float, default=1.0, help="noise std / max-norm")
  parser.add_argument("--delta", type=float, default=1e-5, help="the delta epsilon is reported at")
  parser.add_argument(
    "--adaptive",
    action="store_true",
    help="learn the bound privately (clipx.private_quantile), starting at --max-norm",
  )
  parser.add_argument(
    "--target-quantile", type=cli.fraction, default=0.5, help="fraction of examples left unclipped"
  )
  parser.add_argument(
    "--clip-lr",
    type=cli.positive_float,
    default=0.2,
    help="learning rate of the bound's geometric update",
  )
  parser.add_argument(
    "--count-noise",
    type=cli.positive_float,
    default=None,
    help="std of the noise on the unclipped count (default: batch size / 20, as Andrew et al.)",
  )
  parser.add_argument("--lr", type=cli.positive_float, default=0.03, help="SGD learning rate")
  parser.add_argument("--momentum", type=cli.fraction, default=0.9, help="SGD momentum")
  parser.add_argument(
    "--chunk-size",
    type=int,
    default=32,
    help="examples per vmapped chunk of per-example gradients (0: the whole batch at once)",
  )
  parser.add_argument("--seed", type=cli.nonnegative_int, default=0)
  parser.add_argument("--quiet", action="store_true", help="no progress bar")
  args = parser.parse_args(argv)
  if args.batch_size < 1 or not args.epochs > 0:
    parser.error("--batch-size must be >= 1 and --epochs > 0")
  if not args.max_norm > 0 or not args.noise_multiplier >= 0 or not 0 < args.delta < 1:
    parser.error("--max-norm must be > 0, --noise-multiplier >= 0 and --delta in (0, 1)")
  if args.chunk_size < 0:
    parser.error("--chunk-size must be >= 0")
  if args.count_noise is None:
    args.count_noise = args.batch_size / 20
  if args.adaptive:
    if not 0 < args.target_quantile < 1 or not args.clip_lr > 0:
      parser.error("--target-quantile must be in (0, 1) and --clip-lr > 0")
    if not 2 * args.count_noise > args.noise_multiplier:
      parser.error(
        "--count-noise must be > --noise-multiplier / 2: the count's noise alone would"
        " spend the whole privacy budget"
      )
  return args


def privacy_epsilon(
  *,
  dataset_size: int,
  batch_size: int,
  max_batch: int,
  noise_multiplier: float,
  steps: int,
  delta: float,
) -> float | None:
  """Epsilon at ``delta`` of the run, or None (with a message) without ``dp-accounting``.

  Privacy loss distributions (Koskela et al. 2020, Doroshenko et al. 2022)
  give a tight epsilon for the truncated Poisson-subsampled Gaussian mechanism
  composed ``steps`` times.
  """
  try:
    import dp_accounting
    from dp_accounting import pld
  except ImportError:
    print(
      "epsilon: not computed, dp-accounting is not installed."
      ' From the clone, install the dp extra: pip install -e ".[dp]" (or pip install'
      " dp-accounting)."
    )
    return None
  if noise_multiplier == 0:
    return math.inf
  event = dp_accounting.TruncatedSubsampledGaussianDpEvent(
    dataset_size=dataset_size,
    sampling_probability=batch_size / dataset_size,
    truncated_batch_size=max_batch,
    noise_multiplier=noise_multiplier,
  )
  accountant = pld.PLDAccountant()
  accountant.compose(event, steps)
  return float(accountant.get_epsilon(delta))


def poisson_batches(
  rng: np.random.Generator, dataset_size: int, rate: float, max_batch: int, steps: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """``(indices, weights)`` of ``max_batch`` rows per step; weight 0 marks an unused row."""
  for _ in range(steps):
    chosen = np.flatnonzero(rng.random(dataset_size) < rate)
    if len(chosen) > max_batch:  # truncation: a uniformly random subset (as accounted)
      chosen = rng.choice(chosen, max_batch, replace=False)
    indices = np.zeros(max_batch, np.int64)  # unused rows point at example 0, weight 0
    indices[: len(chosen)] = chosen
    weights = (np.arange(max_batch) < len(chosen)).astype(np.float32)
    yield indices, weights


def make_train_step(
  apply_fn: Callable,
  grad_fn: clipx.PerExampleGrad,
  tx: optax.GradientTransformation,
  rescale: float,
) -> Callable:
  """One DP-SGD step: ``(params, clip_state, opt_state, images, labels, weights)`` in,
  the three states and the metrics out."""

  def train_step(params, clip_state, opt_state, images, labels, weights):
    grads, stats, clip_state = grad_fn(params, (images, labels, weights), clip_state)
    # grad_fn averages over the max_batch rows; DP-SGD divides the clipped sum
    # by the expected batch size, the constant add_noise was told.
    grads = jax.tree.map(lambda g: g * rescale, grads)
    # The noise follows the bound this batch was clipped to (it moves with --adaptive).
    updates, opt_state = tx.update(grads, opt_state, params, max_norm=stats.threshold)
    used = jnp.maximum(jnp.sum(weights), 1)
    metrics = {
      "examples": jnp.sum(weights),
      "clipped": jnp.sum(stats.clipped * weights) / used,
      "norm": jnp.sum(stats.norm * weights) / used,
      "threshold": stats.threshold,
    }
    return optax.apply_updates(params, updates), clip_state, opt_state, metrics

  return jax.jit(train_step, donate_argnums=(0, 1, 2))


def make_eval_step(apply_fn: Callable) -> Callable:
  def eval_step(params, images, labels):
    logits = apply_fn(params, images)
    return cnn.cross_entropy(logits, labels), cnn.accuracy(logits, labels)

  return jax.jit(eval_step)


def evaluate(
  eval_step: Callable, params, images: np.ndarray, labels: np.ndarray
) -> tuple[float, float]:
  loss, accuracy = eval_step(params, jnp.asarray(images), jnp.asarray(labels))
  return float(loss), float(accuracy)


def main(argv: Sequence[str] | None = None) -> dict[str, float | None]:
  args = parse_args(argv)

  # Data.
  x_train, y_train, x_test, y_test = data.load_or_exit(args.dataset, args.data_dir)
  n = len(x_train)
  rate = args.batch_size / n
  if rate > 1:
    raise SystemExit(f"--batch-size {args.batch_size} is larger than the {n} training examples")
  max_batch = min(n, math.ceil(args.batch_size + MARGIN_STDS * math.sqrt(args.batch_size)))
  steps = max(1, round(args.epochs / rate))

  # Model: each example's loss, weighted so unused rows of the physical batch
  # contribute a gradient of exactly zero (their norm is 0: never clipped).
  apply_fn, params = cnn.init(10, data.input_shape(args.dataset), args.seed)

  def example_loss(params, example):
    image, label, weight = example
    return weight * cnn.cross_entropy(apply_fn(params, image[None]), label[None])

  bound: Any = args.max_norm
  gradient_noise = args.noise_multiplier
  if args.adaptive:
    # The count's noise comes from its own key, in the clipping state.
    bound = clipx.private_quantile(
      args.target_quantile,
      args.clip_lr,
      args.max_norm,
      count_noise=args.count_noise,
      batch_size=args.batch_size,
      key=jax.random.fold_in(jax.random.key(args.seed), 1),
    )
    gradient_noise = clipx.gradient_noise_multiplier(args.noise_multiplier, args.count_noise)
  grad_fn = clipx.clipped_grad(example_loss, bound, chunk_size=args.chunk_size or None)
  tx = optax.chain(
    clipx.add_noise(gradient_noise, args.max_norm, args.batch_size, key=args.seed),
    optax.sgd(args.lr, momentum=args.momentum),
  )
  clip_state, opt_state = grad_fn.init(params), tx.init(params)
  train_step = make_train_step(apply_fn, grad_fn, tx, max_batch / args.batch_size)
  eval_step = make_eval_step(apply_fn)

  print(
    f"DP-SGD on {args.dataset}: {n} training examples, {steps} steps of Poisson batches"
    f" (expected {args.batch_size}, at most {max_batch}), max norm {args.max_norm:g},"
    f" noise multiplier {args.noise_multiplier:g}, chunk size {args.chunk_size or 'whole batch'}"
    f" on {jax.default_backend()}"
  )
  if args.adaptive:
    print(
      f"adaptive bound: target quantile {args.target_quantile:g}, count noise"
      f" {args.count_noise:g}; gradient noise multiplier {gradient_noise:.4f}"
    )

  # Loop.
  rng = np.random.default_rng(args.seed)
  start = time.perf_counter()
  clipped_sum, seen = 0.0, 0.0
  bar = tqdm(
    poisson_batches(rng, n, rate, max_batch, steps), total=steps, disable=args.quiet, unit="step"
  )
  for step, (indices, weights) in enumerate(bar):
    params, clip_state, opt_state, metrics = train_step(
      params, clip_state, opt_state, x_train[indices], y_train[indices], weights
    )
    if step % 20 == 0 or step == steps - 1:
      metrics = jax.device_get(metrics)
      clipped_sum += float(metrics["clipped"]) * float(metrics["examples"])
      seen += float(metrics["examples"])
      bar.set_postfix(
        norm=f"{float(metrics['norm']):.2f}",
        bound=f"{float(metrics['threshold']):.2f}",
        clipped=f"{clipped_sum / max(seen, 1):.0%}",
      )
  jax.block_until_ready(params)
  seconds = time.perf_counter() - start

  # Report.
  test_loss, test_accuracy = evaluate(eval_step, params, x_test, y_test)
  epsilon = privacy_epsilon(
    dataset_size=n,
    batch_size=args.batch_size,
    max_batch=max_batch,
    noise_multiplier=args.noise_multiplier,
    steps=steps,
    delta=args.delta,
  )
  print(f"trained {steps} steps in {seconds:.1f} s (compilation included)")
  print(f"test accuracy {test_accuracy:.4f}, test loss {test_loss:.4f}")
  if epsilon is not None:
    print(f"privacy: ({epsilon:.2f}, {args.delta:g})-DP")
  return {
    "test_accuracy": test_accuracy,
    "test_loss": test_loss,
    "epsilon": epsilon,
    "gradient_noise_multiplier": gradient_noise,
    "final_bound": float(jax.device_get(metrics["threshold"])),
    "steps": steps,
  }


if __name__ == "__main__":
  main()
