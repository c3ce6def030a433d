"""What ``per_example.py`` measures: DP-SGD steps in JAX (and Opacus's in a worker process).

Imports jax, so a process imports it only after ``threads.pin``. Variants run
interleaved, round after round, and each reports its best round: load from
other processes on a shared machine only ever adds time, so the fastest round
is the best estimate of the undisturbed cost, and interleaving exposes every
variant to the same load. Opacus runs in a process of its own with the same
thread setting (``opacus_worker.py``); it times its own steps.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.contrib

import clipx
from clipx import per_example

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))  # examples/ is not installed

import remote  # noqa: E402

from examples import cnn  # noqa: E402

MAX_NORM, NOISE, LR = 1.0, 1.0, 0.1
OPACUS_WORKER = ROOT / "benchmarks" / "opacus_worker.py"


def example_loss(apply_fn: Callable) -> Callable:
  """Cross-entropy of one example; the CNN wants a batch, so give it one of size 1."""

  def loss(params, example):
    image, label = example
    return cnn.cross_entropy(apply_fn(params, image[None]), label[None])

  return loss


def jax_steps(apply_fn, params, batch_size: int) -> dict[str, Callable]:
  """Jitted DP-SGD steps ``(params, opt_state, batch) -> (params, opt_state)`` by variant."""
  loss = example_loss(apply_fn)
  tx = optax.chain(clipx.add_noise(NOISE, MAX_NORM, batch_size, key=0), optax.sgd(LR))

  def from_grads(grad_fn):
    def step(params, opt_state, batch):
      grads = grad_fn(params, batch)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    return step

  def clipx_grads(chunk_size, conv_as_matmul=None):
    grad_fn = clipx.clipped_grad(
      loss, MAX_NORM, chunk_size=chunk_size, conv_as_matmul=conv_as_matmul
    )
    return lambda params, batch: grad_fn(params, batch)[0]

  def naive_grads(params, batch):
    grads = jax.vmap(jax.grad(loss), in_axes=(None, 0))(params, batch)
    norms = jax.vmap(clipx.global_norm)(grads)
    scale = jnp.minimum(1.0, MAX_NORM / norms)
    return jax.tree.map(lambda g: jnp.tensordot(scale, g, axes=1) / batch_size, grads)

  def nonprivate_grads(params, batch):
    images, labels = batch
    return jax.grad(lambda p: cnn.cross_entropy(apply_fn(p, images), labels))(params)

  dpsgd = optax.contrib.dpsgd(LR, MAX_NORM, NOISE, seed=0)

  def dpsgd_step(params, opt_state, batch):
    grads = jax.vmap(jax.grad(loss), in_axes=(None, 0))(params, batch)
    updates, opt_state = dpsgd.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  plain_sgd = optax.sgd(LR)

  def nonprivate_step(params, opt_state, batch):
    updates, opt_state = plain_sgd.update(nonprivate_grads(params, batch), opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return {
    "clipx chunk_size=32": (jax.jit(from_grads(clipx_grads(32))), tx.init(params)),
    "clipx chunk_size=1": (jax.jit(from_grads(clipx_grads(1))), tx.init(params)),
    "clipx unchunked (vmap)": (jax.jit(from_grads(clipx_grads(None))), tx.init(params)),
    "clipx chunk_size=32, XLA convs": (
      jax.jit(from_grads(clipx_grads(32, conv_as_matmul=False))),
      tx.init(params),
    ),
    "clipx chunk_size=1, XLA convs": (
      jax.jit(from_grads(clipx_grads(1, conv_as_matmul=False))),
      tx.init(params),
    ),
    "naive vmap + vmap(global_norm)": (jax.jit(from_grads(naive_grads)), tx.init(params)),
    "optax.contrib.dpsgd (vmap)": (jax.jit(dpsgd_step), dpsgd.init(params)),
    "non-private step, XLA convs (reference)": (jax.jit(nonprivate_step), plain_sgd.init(params)),
  }


def time_interleaved(runners: dict[str, Callable[[], float]], rounds: int) -> dict[str, float]:
  """Best seconds per call of each runner over ``rounds``, runners interleaved in each round.

  Each runner returns the seconds it took (a worker process times itself).
  """
  times: dict[str, list[float]] = {name: [] for name in runners}
  for _ in range(rounds):
    for name, run in runners.items():
      times[name].append(run())
  return {name: min(t) for name, t in times.items()}


def norms_only(apply_fn, params, batch) -> dict[str, float]:
  """Seconds for per-example norms of precomputed per-example grads, two ways."""
  grads = jax.jit(jax.vmap(jax.grad(example_loss(apply_fn)), in_axes=(None, 0)))(params, batch)
  leaves = jax.tree.leaves(grads)
  ids = np.zeros(len(leaves), np.int32)

  def batched_norms(leaves):
    divisor, root = per_example.per_example_norms(leaves, ids, 1)  # norm = divisor * root
    return (divisor * root)[:, 0]

  batched = jax.jit(batched_norms)
  vmapped = jax.jit(jax.vmap(clipx.global_norm))
  np.testing.assert_allclose(batched(leaves), vmapped(grads), rtol=1e-5)

  def repeat(fn, arg, n=20):
    def run():
      start = time.perf_counter()
      for _ in range(n):
        out = fn(arg)
      jax.block_until_ready(out)
      return time.perf_counter() - start

    return run

  runners = {
    "batched, one lax.cond": repeat(batched, leaves),
    "vmap(global_norm)": repeat(vmapped, grads),
  }
  for run in runners.values():
    run()
  return {k: v / 20 for k, v in time_interleaved(runners, 7).items()}


def temp_bytes(fn, *args) -> int:
  analysis = jax.jit(fn).lower(*args).compile().memory_analysis()
  return int(analysis.temp_size_in_bytes)


def memory_table(apply_fn, params, batch_sizes: list[int]) -> dict[str, list[int]]:
  loss = example_loss(apply_fn)
  variants = {
    "clipx unchunked (vmap)": None,
    "clipx chunk_size=32": 32,
    "clipx chunk_size=1": 1,
  }
  rows = {}
  for name, chunk_size in variants.items():
    grad_fn = clipx.clipped_grad(loss, MAX_NORM, chunk_size=chunk_size)
    row = []
    for size in batch_sizes:
      batch = (jnp.zeros((size, 8, 8, 1)), jnp.zeros((size,), jnp.int32))
      row.append(temp_bytes(lambda p, b, g=grad_fn: g(p, b)[0], params, batch))
    rows[name] = row
  return rows


def opacus_runner(batch_size: int, steps: int, setting: int | None):
  """(runner, worker, versions) of Opacus in its own process, or (None, None, reason)."""
  args = ["--batch-size", str(batch_size), "--lr", str(LR), "--noise", str(NOISE)]
  try:
    worker = remote.Worker(OPACUS_WORKER, [*args, "--max-norm", str(MAX_NORM)], setting)
  except remote.WorkerError as e:
    return None, None, f"Opacus {e}"
  (name,) = worker.cases
  return (lambda: steps * worker.seconds(name, steps)), worker, worker.info


def measure(args, setting: int | None, memory: bool) -> dict:
  """Rates (clipped examples / s) of every variant, per-example norm times and, if ``memory``,
  the memory table, at this process's thread setting."""
  load = [os.getloadavg()[0]]  # how busy the shared machine was: printed with the ratios
  apply_fn, params = cnn.init(10, (8, 8, 1), seed=0)
  rng = np.random.default_rng(0)  # the batch of opacus_worker.batch
  images = rng.random((args.batch_size, 8, 8, 1), np.float32)
  labels = rng.integers(0, 10, args.batch_size).astype(np.int32)
  batch = (jnp.asarray(images), jnp.asarray(labels))

  runners: dict[str, Callable[[], float]] = {}
  for name, (step, opt_state) in jax_steps(apply_fn, params, args.batch_size).items():
    start = time.perf_counter()
    jax.block_until_ready(step(params, opt_state, batch))
    print(f"compiled {name} in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)

    def run(step=step, opt_state=opt_state):
      start = time.perf_counter()
      p, s = params, opt_state
      for _ in range(args.steps):
        p, s = step(p, s, batch)
      jax.block_until_ready(p)
      return time.perf_counter() - start

    runners[name] = run
  versions = f"jax {jax.__version__}, optax {optax.__version__}"
  worker = None
  if not args.no_opacus:
    runner, worker, info = opacus_runner(args.batch_size, args.steps, setting)
    versions += f"; {info}"
    if runner is not None:
      runners["Opacus (PyTorch)"] = runner
  seconds = time_interleaved(runners, args.rounds)
  if worker is not None:
    worker.close()
  result = {
    "rates": {name: args.batch_size * args.steps / s for name, s in seconds.items()},
    "versions": versions,
    "norm_times": norms_only(apply_fn, params, batch),
    "load": [*load, os.getloadavg()[0]],
  }
  if memory:
    batch_sizes = [int(b) for b in args.memory_batches.split(",")]
    result["memory"] = memory_table(apply_fn, params, batch_sizes)
    result["batch_sizes"] = batch_sizes
  return result
