"""Per-example clipping (DP-SGD) throughput and memory: ``python benchmarks/per_example.py``.

One DP-SGD step (per-example gradients, clip each to norm 1, average, add
Gaussian noise, SGD update) of the digits CNN (``examples/cnn.py``, 8x8x1
inputs, 79,626 parameters) at batch 256, timed for:

- ``clipx.clipped_grad`` in chunks of 32 and 1 examples (``lax.scan`` over
  vmapped chunks) and unchunked (``jax.vmap`` over the batch), with its
  default on CPU of convolutions computed as matrix products, and with XLA's
  convolutions (``conv_as_matmul=False``);
- naive vmap: ``jax.vmap(jax.grad)`` over the batch, then
  ``jax.vmap(clipx.global_norm)`` and a scaled mean (what one writes by hand);
- ``optax.contrib.dpsgd``: ``jax.vmap(jax.grad)`` per-example gradients into
  Optax's DP-SGD transformation;
- Opacus 1.x (PyTorch, the same net, ``GradSampleModule`` + ``DPOptimizer``)
  where installed;
- for reference, a non-private step (one batched gradient, XLA's convolutions).

Variants run interleaved, round after round, and each reports its best
round: load from other processes on a shared machine only ever adds time, so
the fastest round is the best estimate of the undisturbed cost, and
interleaving exposes every variant to the same load. Ratios measured in one
run are the numbers to trust, not the absolute rates.

Also measured: the per-example norms alone, batched with one ``lax.cond``
(clipx) against ``jax.vmap(clipx.global_norm)``, whose cond becomes a select
that runs its overflow fallback every time; and peak temporary memory (XLA's
compiled ``memory_analysis()``) against batch size, with and without chunking.

The markdown table is printed and written to this script's section of
``benchmarks/README.md`` (``--no-readme`` to skip).
"""

from __future__ import annotations

import argparse
import os
import platform
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
  sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from readme_section import write_section  # noqa: E402

from examples import cnn  # noqa: E402

README = ROOT / "benchmarks" / "README.md"
BEGIN, END = "<!-- per_example:begin -->", "<!-- per_example:end -->"
MAX_NORM, NOISE, LR = 1.0, 1.0, 0.1


def parse_args() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch-size", type=int, default=256)
  parser.add_argument("--rounds", type=int, default=10, help="interleaved timing rounds")
  parser.add_argument("--steps", type=int, default=3, help="steps per variant per round")
  parser.add_argument(
    "--memory-batches", default="64,256,1024,4096", help="batch sizes for the memory table"
  )
  parser.add_argument("--no-opacus", action="store_true", help="skip Opacus even if installed")
  parser.add_argument("--no-readme", action="store_true", help="do not update benchmarks/README.md")
  return parser.parse_args()


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


def opacus_step(batch_size: int, images: np.ndarray, labels: np.ndarray):
  """An Opacus DP-SGD step on the same net, or ``(None, reason)``."""
  try:
    import warnings

    import opacus
    import torch
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer
  except ImportError as e:
    return None, f"not installed ({e.name})"
  warnings.filterwarnings("ignore")
  torch.manual_seed(0)
  net = torch.nn.Sequential(
    torch.nn.Conv2d(1, 64, 3, padding=1),
    torch.nn.ReLU(),
    torch.nn.MaxPool2d(2),
    torch.nn.Conv2d(64, 128, 3, padding=1),
    torch.nn.ReLU(),
    torch.nn.MaxPool2d(2),
    torch.nn.Flatten(),
    torch.nn.Linear(512, 10),
  )
  model = GradSampleModule(net)
  optimizer = DPOptimizer(
    torch.optim.SGD(model.parameters(), lr=LR),
    noise_multiplier=NOISE,
    max_grad_norm=MAX_NORM,
    expected_batch_size=batch_size,
  )
  x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))  # NHWC -> NCHW
  y = torch.from_numpy(labels.astype(np.int64))
  loss_fn = torch.nn.CrossEntropyLoss()

  def step():
    optimizer.zero_grad()
    loss_fn(model(x), y).backward()
    optimizer.step()

  version = (
    f"Opacus {opacus.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads"
  )
  return step, version


def time_interleaved(runners: dict[str, Callable[[], None]], rounds: int) -> dict[str, float]:
  """Best seconds per call of each runner over ``rounds``, runners interleaved in each round."""
  times: dict[str, list[float]] = {name: [] for name in runners}
  for _ in range(rounds):
    for name, run in runners.items():
      start = time.perf_counter()
      run()
      times[name].append(time.perf_counter() - start)
  return {name: min(t) for name, t in times.items()}


def norms_only(apply_fn, params, batch) -> dict[str, float]:
  """Seconds for per-example norms of precomputed per-example grads, two ways."""
  grads = jax.jit(jax.vmap(jax.grad(example_loss(apply_fn)), in_axes=(None, 0)))(params, batch)
  leaves = jax.tree.leaves(grads)
  ids = np.zeros(len(leaves), np.int32)
  batched = jax.jit(lambda leaves: per_example.per_example_norms(leaves, ids, 1)[:, 0])
  vmapped = jax.jit(jax.vmap(clipx.global_norm))
  np.testing.assert_allclose(batched(leaves), vmapped(grads), rtol=1e-5)

  def repeat(fn, arg, n=20):
    def run():
      for _ in range(n):
        out = fn(arg)
      jax.block_until_ready(out)

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


def markdown(args, rates, versions, norm_times, memory, batch_sizes) -> str:
  lines = [
    f"Digits CNN (79,626 parameters), batch {args.batch_size}, clip to norm {MAX_NORM:g},"
    f" noise multiplier {NOISE:g}, SGD. {versions}. {platform.machine()} CPU,"
    f" {os.cpu_count()} cores shared with other jobs: absolute rates are noisy, the ratios were"
    f" measured side by side (best of {args.rounds} interleaved rounds of {args.steps} steps).",
    "",
    "Command: `python benchmarks/per_example.py`",
    "",
  ]
  reference = rates.get("Opacus (PyTorch)")
  header = "| DP-SGD step | clipped examples / s | vs Opacus |"
  lines += [header, "|---|---:|---:|"]
  for name, rate in sorted(rates.items(), key=lambda kv: -kv[1]):
    ratio = f"{rate / reference:.2f}x" if reference else "n/a"
    lines.append(f"| {name} | {rate:,.0f} | {ratio} |")
  lines += [
    "",
    "Per-example norms alone (batch of per-example gradients precomputed):",
    "",
    "| per-example global norms | ms | relative |",
    "|---|---:|---:|",
  ]
  fastest = min(norm_times.values())
  for name, seconds in norm_times.items():
    lines.append(f"| {name} | {seconds * 1e3:.2f} | {seconds / fastest:.2f}x |")
  lines += [
    "",
    "Peak temporary memory of the compiled clipped-gradient function"
    " (`memory_analysis().temp_size_in_bytes`, MiB):",
    "",
    "| batch size | " + " | ".join(str(b) for b in batch_sizes) + " |",
    "|---|" + "---:|" * len(batch_sizes),
  ]
  for name, row in memory.items():
    lines.append(f"| {name} | " + " | ".join(f"{b / 2**20:.1f}" for b in row) + " |")
  lines += ["", *targets(rates, memory, batch_sizes)]
  return "\n".join(lines)


def targets(rates: dict[str, float], memory: dict[str, list[int]], batch_sizes) -> list[str]:
  """The issue 8 targets, met or not, in words."""
  out = ["Targets (issue 8):", ""]
  opacus = rates.get("Opacus (PyTorch)")
  if opacus:
    best = max((r, n) for n, r in rates.items() if n.startswith("clipx"))
    verdict = "met" if best[0] >= 1.5 * opacus else "missed"
    out.append(
      f"- throughput >= 1.5x Opacus: {verdict}, {best[0] / opacus:.2f}x with {best[1]}"
      f" (unchunked vmap: {rates['clipx unchunked (vmap)'] / opacus:.2f}x). Under vmap"
      " XLA makes a convolution's per-example kernel gradient a grouped convolution, which"
      " its CPU backend runs slowly; clipx computes convolutions as matrix products on CPU"
      " (the XLA convs rows switch that off)."
    )
  else:
    out.append("- throughput >= 1.5x Opacus: not measured (Opacus not installed).")
  for name, row in memory.items():
    if name.startswith("clipx chunk"):
      growth = (row[-1] - row[0]) / 2**20
      out.append(
        f"- memory flat in batch size when chunked ({name}): {row[0] / 2**20:.1f} MiB at"
        f" {batch_sizes[0]}, {row[-1] / 2**20:.1f} MiB at {batch_sizes[-1]}; the"
        f" {growth:.1f} MiB of growth is the batch itself and its per-example norms,"
        " not gradients."
      )
  return out


def main() -> None:
  args = parse_args()
  apply_fn, params = cnn.init(10, (8, 8, 1), seed=0)
  rng = np.random.default_rng(0)
  images = rng.random((args.batch_size, 8, 8, 1), np.float32)
  labels = rng.integers(0, 10, args.batch_size).astype(np.int32)
  batch = (jnp.asarray(images), jnp.asarray(labels))

  runners: dict[str, Callable[[], None]] = {}
  for name, (step, opt_state) in jax_steps(apply_fn, params, args.batch_size).items():
    start = time.perf_counter()
    jax.block_until_ready(step(params, opt_state, batch))
    print(f"compiled {name} in {time.perf_counter() - start:.1f} s", flush=True)

    def run(step=step, opt_state=opt_state):
      p, s = params, opt_state
      for _ in range(args.steps):
        p, s = step(p, s, batch)
      jax.block_until_ready(p)

    runners[name] = run
  versions = f"jax {jax.__version__}, optax {optax.__version__}"
  if not args.no_opacus:
    step, info = opacus_step(args.batch_size, images, labels)
    if step is None:
      versions += f"; Opacus {info}"
    else:
      step()
      versions += f"; {info}"

      def run_opacus(step=step):
        for _ in range(args.steps):
          step()

      runners["Opacus (PyTorch)"] = run_opacus
  seconds = time_interleaved(runners, args.rounds)
  rates = {name: args.batch_size * args.steps / s for name, s in seconds.items()}
  print("timing done", flush=True)
  norm_times = norms_only(apply_fn, params, batch)
  batch_sizes = [int(b) for b in args.memory_batches.split(",")]
  memory = memory_table(apply_fn, params, batch_sizes)
  table = markdown(args, rates, versions, norm_times, memory, batch_sizes)
  print(table)
  if not args.no_readme:
    write_section(BEGIN, END, f"## Per-example clipping (DP-SGD)\n\n{table}", README)
    print(f"updated {README.relative_to(ROOT)}")


if __name__ == "__main__":
  main()
