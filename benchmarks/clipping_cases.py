"""What ``run.py`` measures: clipping chains in JAX, their steps, and the timed cases.

Imports jax, so a process imports it only after ``threads.pin``. Cases (all
jitted with donated buffers and timed to ``block_until_ready``):

- optimizer step (``tx.update`` + ``optax.apply_updates``) on a
  ResNet-50-shaped tree (``trees.py``), in float32 and in bfloat16; PyTorch
  ``SGD(foreach=True)`` with and without ``clip_grad_norm_`` in a process of its
  own (``torch_optimizer_worker.py``) with the same thread setting;
- compile time (``jit(...).lower(...).compile()`` after
  ``jax.clear_caches()``) of the optimizer step on a 1000-leaf tree,
  500 x {w: 16x16, b: 16};
- the whole train step (gradient and update) of ``examples/cnn.py``;
- extra temporary memory of clipping: XLA's compiled ``memory_analysis()``
  temp size of each step against the unclipped one.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import clipx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # examples/ is not installed

import remote  # noqa: E402
import trees  # noqa: E402
from timing import Case, Timed, temp_bytes, time_cases  # noqa: E402

from examples import cnn  # noqa: E402

LR, MOMENTUM = 0.01, 0.9
TORCH_WORKER = ROOT / "benchmarks" / "torch_optimizer_worker.py"


def layer_tree(num_layers: int) -> dict[str, dict[str, jax.ShapeDtypeStruct]]:
  """The compile-time tree: ``num_layers`` x {w: 16x16, b: 16} (abstract, never allocated)."""
  return {
    f"layer{i:04d}": {
      "w": jax.ShapeDtypeStruct((16, 16), jnp.float32),
      "b": jax.ShapeDtypeStruct((16,), jnp.float32),
    }
    for i in range(num_layers)
  }


def jax_tree(shapes, dtype, seed: int, scale: float = 1.0):
  return {
    k: jnp.asarray(v.astype(dtype)) for k, v in trees.random_tree(shapes, seed, scale).items()
  }


def sgd() -> optax.GradientTransformation:
  return optax.sgd(LR, momentum=MOMENTUM)


def read_once(with_params: bool = False) -> optax.GradientTransformation:
  """A reference, not a clip: the sum of squares of the updates (and the params), kept in state.

  Chained before sgd it measures the memory floor of clipping: one more read of
  the gradients (of the gradients and the parameters for AGC), the least any
  norm-based clip must add to sgd's own pass. The updates are multiplied by 1.
  """

  def update_fn(updates, state, params=None):
    reads = [updates, params] if with_params else [updates]
    total = sum(jnp.sum(clipx.norms.leaf_sq_norms(jax.tree.leaves(tree))) for tree in reads)
    # Scaled by 1 computed from the sums, as a clip would be: the update then waits for
    # the reads (otherwise XLA may update the donated params first and copy them).
    updates = clipx.scaling.scale_tree(updates, jnp.where(total >= 0, 1.0, 0.5))
    return updates, total.astype(jnp.float32)

  return optax.GradientTransformation(lambda params: jnp.zeros((), jnp.float32), update_fn)


def chains() -> dict[str, optax.GradientTransformation]:
  """The optimizer rows: each clipping method chained before SGD with momentum."""
  return {
    "sgd-momentum alone": sgd(),
    "floor: sgd + one read of the gradients": optax.chain(read_once(), sgd()),
    "floor: sgd + one read of gradients and params": optax.chain(read_once(True), sgd()),
    "optax.clip_by_global_norm + sgd": optax.chain(optax.clip_by_global_norm(1.0), sgd()),
    "clipx.clip_by_global_norm + sgd": optax.chain(clipx.clip_by_global_norm(1.0), sgd()),
    "clipx global, autoclip + sgd": optax.chain(
      clipx.clip_by_global_norm(clipx.autoclip(percentile=10, initial=1.0)), sgd()
    ),
    "clipx global, zclip + sgd": optax.chain(
      clipx.clip_by_global_norm(clipx.zclip(initial=1.0)), sgd()
    ),
    "clipx.clip_by_layer_norm + sgd": optax.chain(clipx.clip_by_layer_norm(1.0), sgd()),
    "optax.adaptive_grad_clip + sgd": optax.chain(optax.adaptive_grad_clip(0.01), sgd()),
    "clipx.adaptive_grad_clip + sgd": optax.chain(clipx.adaptive_grad_clip(0.01), sgd()),
    "optax.clip (value) + sgd": optax.chain(optax.clip(0.01), sgd()),
    "clipx.clip_by_value + sgd": optax.chain(clipx.clip_by_value(0.01), sgd()),
  }


# The rows each row is compared with in the "vs" column.
BASELINE = {
  "floor: sgd + one read of the gradients": "sgd-momentum alone",
  "floor: sgd + one read of gradients and params": "sgd-momentum alone",
  "optax.clip_by_global_norm + sgd": "sgd-momentum alone",
  "clipx.clip_by_global_norm + sgd": "optax.clip_by_global_norm + sgd",
  "clipx global, autoclip + sgd": "clipx.clip_by_global_norm + sgd",
  "clipx global, zclip + sgd": "clipx.clip_by_global_norm + sgd",
  "clipx.clip_by_layer_norm + sgd": "clipx.clip_by_global_norm + sgd",
  "optax.adaptive_grad_clip + sgd": "sgd-momentum alone",
  "clipx.adaptive_grad_clip + sgd": "optax.adaptive_grad_clip + sgd",
  "optax.clip (value) + sgd": "sgd-momentum alone",
  "clipx.clip_by_value + sgd": "optax.clip (value) + sgd",
  "torch clip_grad_norm_ + SGD": "torch SGD(foreach) alone",
  "cnn step, clipx global clip": "cnn step, no clipping",
  "cnn step, optax global clip": "cnn step, no clipping",
}


def optimizer_step(tx: optax.GradientTransformation):
  def step(params, opt_state, grads):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return step


def optimizer_cases(shapes, dtype, label: str, torch_worker_args, setting, memory):
  """Compiled in-place optimizer steps for every chain, on one shared gradient; torch's rows
  from a worker process (``torch_worker_args`` None: none). Returns (cases, workers)."""
  grads = jax_tree(shapes, dtype, seed=1)
  cases: dict[str, Timed] = {}
  for name, tx in chains().items():
    params = jax_tree(shapes, dtype, seed=0, scale=0.05)
    opt_state = tx.init(params)
    jitted = jax.jit(optimizer_step(tx), donate_argnums=(0, 1))
    compiled = jitted.lower(params, opt_state, grads).compile()
    memory[name] = temp_bytes(compiled)
    cases[name] = Case(compiled, (params, opt_state), (grads,))
  workers = []
  if torch_worker_args is not None:
    worker = remote.Worker(TORCH_WORKER, [*torch_worker_args, "--dtype", label], setting)
    workers.append(worker)
    for name in worker.cases:
      cases[name] = worker.case(name)
  return cases, workers


def cnn_cases(batch_size: int, memory: dict[str, int | None]):
  apply_fn, params = cnn.init(10, (8, 8, 1), seed=0)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.random((batch_size, 8, 8, 1), np.float32))
  labels = jnp.asarray(rng.integers(0, 10, batch_size).astype(np.int32))
  txs = {
    "cnn step, no clipping": sgd(),
    "cnn step, clipx global clip": optax.chain(clipx.clip_by_global_norm(1.0), sgd()),
    "cnn step, optax global clip": optax.chain(optax.clip_by_global_norm(1.0), sgd()),
  }
  cases: dict[str, Timed] = {}
  for name, tx in txs.items():

    def step(params, opt_state, images, labels, tx=tx):
      loss_fn = lambda weights: cnn.cross_entropy(apply_fn(weights, images), labels)
      grads = jax.grad(loss_fn)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    p = jax.tree.map(jnp.array, params)
    opt_state = tx.init(p)
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(p, opt_state, images, labels).compile()
    memory[name] = temp_bytes(compiled)
    cases[name] = Case(compiled, (p, opt_state), (images, labels))
  return cases


def compile_times(num_layers: int, rounds: int) -> dict[str, list[float]]:
  tree = layer_tree(num_layers)
  txs = {
    name: tx
    for name, tx in chains().items()
    if name
    in (
      "sgd-momentum alone",
      "optax.clip_by_global_norm + sgd",
      "clipx.clip_by_global_norm + sgd",
      "optax.adaptive_grad_clip + sgd",
      "clipx.adaptive_grad_clip + sgd",
      "clipx.clip_by_layer_norm + sgd",
    )
  }
  states = {name: jax.eval_shape(tx.init, tree) for name, tx in txs.items()}
  times: dict[str, list[float]] = {name: [] for name in txs}
  for r in range(rounds):
    names = list(txs) if r % 2 == 0 else list(reversed(txs))
    for name in names:
      jax.clear_caches()  # a real compile, not a cache hit
      start = time.perf_counter()
      step = jax.jit(optimizer_step(txs[name]), donate_argnums=(0, 1))
      step.lower(tree, states[name], tree).compile()
      times[name].append(time.perf_counter() - start)
  return times


def versions(torch_info: str) -> str:
  parts = [f"jax {jax.__version__}", f"optax {optax.__version__}", torch_info]
  parts.append(f"{platform.machine()} {jax.devices()[0].platform}, {jax.device_count()} device(s)")
  return ", ".join(parts)


def measure(args, setting: int | None, label: str) -> str:
  """Every table of ``run.py`` at one thread setting (this process is pinned to it)."""
  import report

  load = os.getloadavg()[0]  # how busy the shared machine was: printed with the ratios
  quick = args.quick
  rounds = args.rounds or (1 if quick else 9)
  iters = args.iters or (1 if quick else 5)
  compile_rounds = args.compile_rounds or (1 if quick else 5)
  shapes = trees.benchmark_shapes(quick)
  num_params = sum(int(np.prod(s)) for s in shapes.values())
  results: dict = {"grad_bytes": 4 * num_params}
  torch_args = None if args.no_torch else ["--lr", str(LR), "--momentum", str(MOMENTUM)]
  if torch_args is not None and quick:
    torch_args.append("--quick")
  torch_info = "torch not measured (--no-torch)" if args.no_torch else ""

  sections = []
  dtypes = (
    ((jnp.float32, "float32"),) if quick else ((jnp.float32, "float32"), (jnp.bfloat16, "bfloat16"))
  )
  for dtype, dtype_label in dtypes:
    memory: dict[str, int | None] = {}
    try:
      cases, workers = optimizer_cases(shapes, dtype, dtype_label, torch_args, setting, memory)
      torch_info = torch_info or workers[0].info
    except remote.WorkerError as e:
      print(f"torch rows skipped: {e}", file=sys.stderr)
      torch_info, torch_args = f"torch {e}", None
      cases, workers = optimizer_cases(shapes, dtype, dtype_label, None, setting, memory)
    times = time_cases(cases, rounds, iters)
    for worker in workers:
      worker.close()
    del cases
    results[dtype_label] = times
    results[f"memory_{dtype_label}"] = memory
    title = (
      f"#### Optimizer step, {'truncated ' if quick else ''}ResNet-50-shaped tree, {dtype_label}"
      f" ({len(shapes)} leaves, {num_params / 1e6:.2f}M parameters), {label}"
    )
    sections.append(f"{title}\n\n{report.time_table(times, BASELINE, label, 'ms', 1e3, memory)}")
    print(sections[-1] + "\n", flush=True)

  memory = {}
  batch = 32 if quick else 128
  times = time_cases(cnn_cases(batch, memory), rounds, iters if quick else 4 * iters)
  results["cnn"] = times
  sections.append(
    f"#### Whole train step, `examples/cnn.py` CNN, batch {batch} of 8x8x1, {label}\n\n"
    + report.time_table(times, BASELINE, label, "ms", 1e3, memory)
  )
  print(sections[-1] + "\n", flush=True)

  num_layers = 3 if quick else 500
  times = compile_times(num_layers, compile_rounds)
  results["compile"] = times
  results["compile_leaves"] = 2 * num_layers
  sections.append(
    f"#### Compile time, {2 * num_layers} leaves ({num_layers} x {{w: 16x16, b: 16}}), {label}"
    "\n\n" + report.time_table(times, BASELINE, label, "s", 1.0)
  )
  print(sections[-1] + "\n", flush=True)

  targets = f"#### Targets (issue 6), {label}\n\n" + report.targets_table(results, label)
  print(targets + "\n", flush=True)
  return "\n\n".join(
    [
      f"### {label}",
      f"{versions(torch_info)}. {rounds} rounds of {iters} steps per case ({compile_rounds}"
      " compiles per case), interleaved. Load average (1 min) at start / end:"
      f" {load:.1f} / {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores.",
      targets,
      *sections,
    ]
  )
