"""Distributed checks of clipx on 8 simulated CPU devices, for ``test_distributed.py``.

Run as ``python tests/distributed_checks.py [check ...]``: it prints one JSON
object of measurements (errors against an unsharded run, collectives parsed
from the compiled HLO) that ``tests/test_distributed.py`` asserts. Every check
runs in this one process so JAX starts once (the test budget is 60 s); the
device count must be fixed before JAX's backend starts, which is why this is
a subprocess and not part of the pytest process. Importing this module
(pytest's doctest collection does) starts no backend and changes no setting.

Compiling dominates the run time, so: inputs are NumPy arrays (an eager JAX op
compiles a program of its own), each program is compiled once and the
compiled executable is the one run, and the unsharded references of several
transforms share one program.

"FSDP" here: each leaf is split over the mesh on its largest axis divisible by
the device count; a leaf with no such axis is replicated.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import clipx

DEVICES = 8

# ---------------------------------------------------------------------------
# Collectives in compiled HLO text.

COLLECTIVE_OPS = (
  "all-reduce",
  "all-gather",
  "all-to-all",
  "ragged-all-to-all",
  "reduce-scatter",
  "collective-permute",
  "collective-broadcast",
)
# `%name = SHAPE op(operands), attributes`; SHAPE may be a tuple with spaces.
_INSTRUCTION = re.compile(
  r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<shape>.*?)\s+(?P<op>[a-z][\w\-]*)\("
)
_ARRAY_SHAPE = re.compile(r"(?<![\w.])[a-z][a-z0-9]*\[(?P<dims>[^\]]*)\]")


def collectives(hlo_text: str) -> list[dict[str, Any]]:
  """Every collective in compiled HLO text: ``{"op", "sizes"}``, one per instruction.

  ``sizes`` are the element counts of the arrays in the instruction's result
  shape: one per operand of a combined (tuple-shaped) all-reduce; for an async
  ``-start`` the tuple holds operands and results, so its largest entry is
  what moves. The ``-done`` half of an async pair is not counted again. A
  collective whose shape cannot be read raises, so none is silently missed.

  Example:
    >>> collectives("  %ar = (f32[], f32[4]{0}) all-reduce(f32[] %a, f32[4]{0} %b), to_apply=%add")
    [{'op': 'all-reduce', 'sizes': [1, 4]}]
  """
  found = []
  for line in hlo_text.splitlines():
    match = _INSTRUCTION.match(line)
    if match is None:
      continue
    op = match["op"]
    base = op.removesuffix("-start").removesuffix("-done")
    if base not in COLLECTIVE_OPS or op.endswith("-done"):
      continue
    sizes = [
      math.prod(int(d) for d in re.findall(r"\d+", shape["dims"]))
      for shape in _ARRAY_SHAPE.finditer(match["shape"])
    ]
    if not sizes:
      raise ValueError(f"unreadable shape of a collective: {line.strip()[:200]}")
    found.append({"op": base, "sizes": sizes})
  return found


def compile_with_collectives(
  fn: Callable, *args, out_shardings: Any = None
) -> tuple[Callable, list[dict[str, Any]]]:
  """``jax.jit(fn)`` compiled for ``args``, and the collectives in its HLO.

  The compiled executable is returned to be run: calling the jitted function
  instead would compile it a second time.
  """
  jitted = jax.jit(fn) if out_shardings is None else jax.jit(fn, out_shardings=out_shardings)
  compiled = jitted.lower(*args).compile()
  return compiled, collectives(compiled.as_text())


# ---------------------------------------------------------------------------
# Trees, shardings and comparisons (NumPy, so that nothing here compiles).


def fsdp_spec(shape: tuple[int, ...], axis: str = "d", devices: int = DEVICES) -> P:
  """Splits the largest axis divisible by ``devices``; replicated if there is none."""
  best = None
  for index, size in enumerate(shape):
    if size % devices == 0 and (best is None or size > shape[best]):
      best = index
  spec: list[str | None] = [None] * len(shape)
  if best is not None:
    spec[best] = axis
  return P(*spec)


def _is_shape(x) -> bool:
  return isinstance(x, tuple) and all(isinstance(d, int) for d in x)


def random_tree(shapes, seed: int, scale: float = 1.0):
  """NumPy float32 normal(0, scale^2) arrays shaped like ``shapes`` (a tree of tuples)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
    lambda s: (scale * rng.standard_normal(s)).astype(np.float32), shapes, is_leaf=_is_shape
  )


def is_split(spec: P) -> bool:
  return any(axis is not None for axis in spec)


def leaves_of_specs(specs) -> list[P]:
  return jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))


def state_shardings(tx, params, param_shardings, mesh):
  """Shardings of ``tx``'s state: copies of the parameters split like them, the rest replicated."""
  shapes = jax.eval_shape(tx.init, params)
  return optax.tree_map_params(
    tx,
    lambda _, sharding: sharding,
    shapes,
    param_shardings,
    transform_non_params=lambda _: NamedSharding(mesh, P()),
    is_leaf=lambda x: isinstance(x, NamedSharding),
  )


def without_device(state):
  """``state`` with every ``NonfiniteStats.nonfinite_device`` set to 0."""
  return jax.tree.map(
    lambda n: n._replace(nonfinite_device=0) if isinstance(n, clipx.NonfiniteStats) else n,
    state,
    is_leaf=lambda n: isinstance(n, clipx.NonfiniteStats),
  )


def max_rel_err(actual, expected) -> float:
  """Largest ``|a - e| / (|e| + max|e|)`` over the leaves of two trees.

  ``max_rel_err(a, e) <= rtol`` is ``np.testing.assert_allclose(a, e, rtol,
  atol=rtol * max|e|)`` leaf by leaf: relative where entries are large, and
  measured against the leaf's scale where an entry is near zero (a sum with
  cancellation there differs in its last bits with the reduction order).
  Non-finite entries must match exactly (NaN where NaN, inf where inf); a
  shape mismatch is ``inf``.
  """
  worst = 0.0
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
    a = np.asarray(a, np.float64)
    e = np.asarray(e, np.float64)
    if a.shape != e.shape:
      return math.inf
    finite = np.isfinite(e)
    if not np.array_equal(a[~finite], e[~finite], equal_nan=True):
      return math.inf
    if not finite.any():
      continue
    a, e = a[finite], e[finite]
    if not np.all(np.isfinite(a)):
      return math.inf
    scale = np.abs(e) + np.max(np.abs(e))
    worst = max(worst, float(np.max(np.abs(a - e) / np.where(scale > 0, scale, 1))))
  return worst


def rows_identical(stacked) -> bool:
  """Whether every leaf's rows (one per shard) are equal bit for bit."""
  for leaf in jax.tree.leaves(stacked):
    rows = np.asarray(leaf)
    if not all(np.array_equal(rows[0], row, equal_nan=True) for row in rows[1:]):
      return False
  return True


def events(state) -> int:
  """Steps clipped or skipped so far per clipx's stats: evidence a comparison is not vacuous."""
  total = 0
  for stats in clipx.stats(state).values():
    count = stats.clip_count if hasattr(stats, "clip_count") else stats.skip_count
    total += int(np.sum(np.asarray(count)))
  return total


# ---------------------------------------------------------------------------
# The parser, on programs that move gradient-sized data.


def check_parser(mesh) -> dict[str, Any]:
  """Programs that move gradient-sized data, which the parser must see, and a good one."""
  x = jax.device_put(np.ones(DEVICES * 1024, np.float32), NamedSharding(mesh, P("d")))
  # psum of a gradient-sized vector, as a per-element reduction would do.
  psum_vector = jax.shard_map(
    lambda v: jax.lax.psum(v, "d"), mesh=mesh, in_specs=P("d"), out_specs=P()
  )
  # A split array returned replicated: an all-gather.
  replicate = jax.jit(lambda v: v * 2, out_shardings=NamedSharding(mesh, P()))
  return {
    "psum_vector": compile_with_collectives(psum_vector, x)[1],
    "replicate_output": collectives(replicate.lower(x).compile().as_text()),
    "global_norm": compile_with_collectives(clipx.global_norm, {"a": x, "b": x[:4096]})[1],
  }


# ---------------------------------------------------------------------------
# jit over a Mesh with NamedSharding (FSDP).

# A conv kernel split on its output axis, a dense kernel on its input axis,
# an embedding on its rows, and a head whose bias cannot be split (replicated).
FSDP_SHAPES = {
  "conv": {"kernel": (3, 3, 16, 32), "bias": (32,)},
  "dense": {"kernel": (512, 64), "bias": (64,)},
  "head": {"kernel": (128, 10), "bias": (10,)},
  "embed": (1000, 24),
}


def check_jit_fsdp(mesh) -> dict[str, Any]:
  """jit with FSDP-sharded leaves vs. the same two steps on one device.

  Each clipping transform is chained with SGD-momentum. Each sharded program
  is compiled alone, so its collectives are its own.
  """
  params = random_tree(FSDP_SHAPES, 0)
  grads = [random_tree(FSDP_SHAPES, 1 + step, scale=3.0) for step in range(2)]
  specs = jax.tree.map(lambda x: fsdp_spec(x.shape), params)
  shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
  transforms = {
    name: optax.chain(clip, optax.sgd(0.1, momentum=0.9))
    for name, clip in (
      ("global", clipx.clip_by_global_norm(1.0)),
      ("layer_module", clipx.clip_by_layer_norm(0.5, group="module")),
      ("agc", clipx.adaptive_grad_clip(0.01)),
    )
  }

  def step_all(current, grads):
    """One step of every transform in one program (one compile): ``{name: (params, state)}``."""
    out = {}
    for name, (p, state) in current.items():
      updates, state = transforms[name].update(grads, state, p)
      out[name] = (optax.apply_updates(p, updates), state)
    return out

  expected = jax.jit(lambda p: {name: (p, tx.init(p)) for name, tx in transforms.items()})(params)
  reference_step = jax.jit(step_all)
  for g in grads:
    expected = reference_step(expected, g)
  sharded_params = jax.device_put(params, shardings)
  sharded_grads = [jax.device_put(g, shardings) for g in grads]
  leaves = jax.tree.leaves(params)
  results = {}
  for name, tx in transforms.items():

    def step(params, grads, state, tx=tx):
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    init = jax.jit(tx.init, out_shardings=state_shardings(tx, params, shardings, mesh))
    p, state = sharded_params, init(sharded_params)
    compiled, found = compile_with_collectives(step, p, sharded_grads[0], state)
    for g in sharded_grads:
      p, state = compiled(p, g, state)
    p_expected, state_expected = expected[name]
    results[name] = {
      "collectives": found,
      "params_err": max_rel_err(p, p_expected),
      "state_err": max_rel_err(state, state_expected),
      "events": events(state_expected),
      "output_sharding_kept": all(
        leaf.sharding.is_equivalent_to(sharding, leaf.ndim)
        for leaf, sharding in zip(jax.tree.leaves(p), jax.tree.leaves(shardings))
      ),
      "leaves": len(leaves),
      "module_groups": len(clipx.layer_groups(params, "module")[1]),
      "largest_unit_count": max(x.shape[-1] for x in leaves),
      "unit_count": sum(x.shape[-1] if x.ndim > 1 else 1 for x in leaves),
    }
  return results


# ---------------------------------------------------------------------------
# shard_map with axis_name.

# Every leaf is split, on an axis its AGC unit norm reduces over (a conv's
# input channels, a dense's inputs): with axis_name each leaf's local sums of
# squares are psum-ed, which is right only for a leaf split over the axis.
SHARD_MAP_SHAPES = {
  "conv": {"kernel": (3, 3, 32, 8), "bias": (8,)},
  "dense": {"kernel": (256, 16), "bias": (16,)},
}
# Norm multipliers of the steps: a spike at step 3 exercises the adaptive
# thresholds and skip_spikes after their two-step warm-up; the last step has
# one NaN, on one shard only, for skip_nonfinite.
STEP_SCALES = (1.0, 2.0, 0.5, 20.0, 1.0, 1.0)


def shard_map_transforms(d: str | None) -> dict[str, optax.GradientTransformation]:
  """Every transform with ``axis_name=d`` (``None``: the unsharded reference)."""
  # A stateless inner optimizer for the skip wrappers: a momentum trace would
  # be split like the parameters, not held once per shard. A shard that
  # skipped alone would show in the updates.
  sgd = optax.sgd(0.1)
  # The adaptive policies' states are functions of the norms they see, so one
  # scope each suffices (a scalar state, and one per group); each transform
  # costs compile time, and the budget is 60 s.
  autoclip = clipx.autoclip(percentile=50, history=4, warmup_steps=2)
  zclip = clipx.zclip(warmup_steps=2)
  return {
    "global": clipx.clip_by_global_norm(1.0, axis_name=d),
    "layer_module": clipx.clip_by_layer_norm(0.5, group="module", axis_name=d),
    "agc": clipx.adaptive_grad_clip(0.01, axis_name=d),
    "value": clipx.clip_by_value(0.5, axis_name=d),
    "skip_spikes": clipx.skip_spikes(sgd, factor=2.0, warmup_steps=2, axis_name=d),
    "skip_nonfinite": clipx.skip_nonfinite(sgd, axis_name=d),
    "global_autoclip": clipx.clip_by_global_norm(autoclip, axis_name=d),
    "layer_zclip": clipx.clip_by_layer_norm(zclip, axis_name=d),
  }


def _update_all(transforms: dict[str, optax.GradientTransformation]) -> Callable:
  """``(grads, states, params) -> {name: (updates, state)}`` for every transform."""

  def update_all(grads, states, params):
    return {name: tx.update(grads, states[name], params) for name, tx in transforms.items()}

  return update_all


def check_shard_map(mesh) -> dict[str, Any]:
  """shard_map with axis_name vs. the unsharded transforms, over six steps.

  Each shard keeps its own copy of every transform's state (stacked on a
  leading axis across shards), so a divergence between shards would show.
  All transforms run in one program (one compile for the sharded run, one for
  the reference), so the collectives are those of all of them together.
  """
  params = random_tree(SHARD_MAP_SHAPES, 10)
  grads = [random_tree(SHARD_MAP_SHAPES, 11 + i, scale=s) for i, s in enumerate(STEP_SCALES)]
  grads[-1]["dense"]["kernel"][0, 0] = np.nan
  specs = jax.tree.map(lambda x: fsdp_spec(x.shape), params)
  if not all(is_split(s) for s in leaves_of_specs(specs)):
    raise AssertionError("with axis_name every leaf must be split over the axis")
  shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
  transforms = shard_map_transforms("d")
  update_all = _update_all(transforms)

  def local(grads, stacked_states, params):
    states = jax.tree.map(lambda x: x[0], stacked_states)  # this shard's copies
    out = update_all(grads, states, params)
    updates = {name: u for name, (u, _) in out.items()}
    return updates, jax.tree.map(lambda x: x[None], {name: s for name, (_, s) in out.items()})

  sharded = jax.shard_map(
    local,
    mesh=mesh,
    in_specs=(specs, P("d"), specs),
    out_specs=({name: specs for name in transforms}, P("d")),
  )
  reference_transforms = shard_map_transforms(None)
  states = jax.jit(lambda p: {n: tx.init(p) for n, tx in reference_transforms.items()})(params)
  reference = jax.jit(_update_all(reference_transforms))
  stacked = jax.device_put(
    jax.tree.map(lambda x: np.broadcast_to(x, (DEVICES,) + x.shape), jax.device_get(states)),
    NamedSharding(mesh, P("d")),
  )
  sharded_params = jax.device_put(params, shardings)
  compiled, found = compile_with_collectives(
    sharded, jax.device_put(grads[0], shardings), stacked, sharded_params
  )
  results: dict[str, Any] = {
    name: {"update_err": 0.0, "state_err": 0.0, "state_identical_on_shards": True}
    for name in transforms
  }
  for g in grads:
    updates, stacked = compiled(jax.device_put(g, shardings), stacked, sharded_params)
    out = reference(g, states, params)
    states = {name: s for name, (_, s) in out.items()}
    for name, result in results.items():
      row = jax.tree.map(lambda x: np.asarray(x)[0], stacked[name])
      result["update_err"] = max(result["update_err"], max_rel_err(updates[name], out[name][0]))
      # The device that held a NaN exists only under shard_map: not compared.
      result["state_err"] = max(
        result["state_err"], max_rel_err(without_device(row), without_device(states[name]))
      )
      result["state_identical_on_shards"] &= rows_identical(stacked[name])
  for name, result in results.items():
    result["events"] = events(states[name])
  leaves = jax.tree.leaves(params)
  results["program"] = {
    "collectives": found,
    "transforms": len(transforms),
    "largest_unit_count": max(x.shape[-1] for x in leaves),
    "unit_count": sum(x.shape[-1] if x.ndim > 1 else 1 for x in leaves),
    "smallest_leaf_shard_of_kernels": min(x.size // DEVICES for x in leaves if x.ndim > 1),
  }
  return results


def check_zero_data_parallel(mesh) -> dict[str, Any]:
  """A data-parallel training step in shard_map, ZeRO-style, vs. one device.

  Each shard holds a slice of every parameter and of the momentum; the step
  gathers the parameters, takes the gradient of its slice of the batch,
  reduce-scatters the gradient, clips it with ``axis_name`` and updates its
  slice. The same step without clipping is compiled too: the difference is
  what clipping adds.
  """
  shapes = {"hidden": {"kernel": (16, 64), "bias": (64,)}, "out": {"kernel": (64, 8), "bias": (8,)}}
  params = random_tree(shapes, 30, scale=0.5)
  specs = jax.tree.map(lambda x: fsdp_spec(x.shape), params)
  shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
  split_axis = [list(s).index("d") for s in leaves_of_specs(specs)]
  batches = [(random_tree((64, 16), 31 + i), random_tree((64, 8), 41 + i, 10.0)) for i in range(3)]

  def loss(params, x, y):
    h = jnp.tanh(x @ params["hidden"]["kernel"] + params["hidden"]["bias"])
    return jnp.mean(jnp.sum((h @ params["out"]["kernel"] + params["out"]["bias"] - y) ** 2, -1))

  def make_step(tx):
    def local(params, state, x, y):
      leaves, treedef = jax.tree.flatten(params)
      full = [jax.lax.all_gather(p, "d", axis=a, tiled=True) for p, a in zip(leaves, split_axis)]
      grads = jax.tree.leaves(jax.grad(loss)(jax.tree.unflatten(treedef, full), x, y))
      grads = [
        jax.lax.psum_scatter(g, "d", scatter_dimension=a, tiled=True) / DEVICES
        for g, a in zip(grads, split_axis)
      ]
      updates, state = tx.update(jax.tree.unflatten(treedef, grads), state, params)
      return optax.apply_updates(params, updates), state

    state_specs = optax.tree_map_params(
      tx,
      lambda _, spec: spec,
      jax.eval_shape(tx.init, params),
      specs,
      transform_non_params=lambda _: P(),
      is_leaf=lambda x: isinstance(x, P),
    )
    init = jax.jit(
      tx.init, out_shardings=jax.tree.map(lambda s: NamedSharding(mesh, s), state_specs)
    )
    step = jax.shard_map(
      local,
      mesh=mesh,
      in_specs=(specs, state_specs, P("d"), P("d")),
      out_specs=(specs, state_specs),
    )
    return init, step

  def single_step(params, state, x, y, tx):
    updates, state = tx.update(jax.grad(loss)(params, x, y), state, params)
    return optax.apply_updates(params, updates), state

  clipped_tx = optax.chain(clipx.clip_by_global_norm(1.0, axis_name="d"), optax.sgd(0.05, 0.9))
  reference_tx = optax.chain(clipx.clip_by_global_norm(1.0), optax.sgd(0.05, 0.9))

  p_ref, state_ref = params, jax.jit(reference_tx.init)(params)
  reference_step = jax.jit(lambda p, s, x, y: single_step(p, s, x, y, reference_tx))
  for x, y in batches:
    p_ref, state_ref = reference_step(p_ref, state_ref, x, y)
  init, step = make_step(clipped_tx)
  p = jax.device_put(params, shardings)
  state = init(p)
  put_batch = lambda a: jax.device_put(a, NamedSharding(mesh, P("d")))  # noqa: E731
  compiled, with_clip = compile_with_collectives(step, p, state, *map(put_batch, batches[0]))
  for x, y in batches:
    p, state = compiled(p, state, put_batch(x), put_batch(y))
  plain_tx = optax.sgd(0.05, 0.9)
  plain_init, plain_step = make_step(plain_tx)
  plain_state = jax.eval_shape(plain_init, p)
  _, without_clip = compile_with_collectives(
    plain_step, p, plain_state, *map(put_batch, batches[0])
  )
  return {
    "params_err": max_rel_err(p, p_ref),
    "state_err": max_rel_err(state, state_ref),
    "events": events(state_ref),
    "with_clip": with_clip,
    "without_clip": without_clip,
  }


def check_tensor_parallel_2d() -> dict[str, Any]:
  """2D mesh (data x model): a column- then row-parallel MLP, the batch split on data.

  jit with NamedSharding, clip_by_global_norm + SGD-momentum, vs. one device;
  and the collectives of the same step compiled with and without clipping.
  """
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
  shapes = {"w1": (16, 64), "b1": (64,), "w2": (64, 8), "b2": (8,)}
  specs = {"w1": P(None, "model"), "b1": P("model"), "w2": P("model", None), "b2": P()}
  shardings = {k: NamedSharding(mesh, s) for k, s in specs.items()}
  params = random_tree(shapes, 50, scale=0.5)
  batches = [(random_tree((32, 16), 51 + i), random_tree((32, 8), 61 + i, 10.0)) for i in range(3)]

  def loss(params, x, y):
    h = jax.nn.relu(x @ params["w1"] + params["b1"])
    return jnp.mean(jnp.sum((h @ params["w2"] + params["b2"] - y) ** 2, -1))

  def make_step(tx):
    def step(params, state, x, y):
      updates, state = tx.update(jax.grad(loss)(params, x, y), state, params)
      return optax.apply_updates(params, updates), state

    return step

  tx = optax.chain(clipx.clip_by_global_norm(1.0), optax.sgd(0.05, momentum=0.9))
  step = make_step(tx)

  p_ref, state_ref = params, jax.jit(tx.init)(params)
  reference_step = jax.jit(step)
  for x, y in batches:
    p_ref, state_ref = reference_step(p_ref, state_ref, x, y)
  put_batch = lambda a: jax.device_put(a, NamedSharding(mesh, P("data", None)))  # noqa: E731
  p = jax.device_put(params, shardings)
  state_sharding = state_shardings(tx, params, shardings, mesh)
  state = jax.jit(tx.init, out_shardings=state_sharding)(p)
  # The layout is pinned, as in real tensor-parallel training: left free, XLA
  # returned the replicated b2 split over "model" (seen in one run of two).
  compiled, with_clip = compile_with_collectives(
    step, p, state, *map(put_batch, batches[0]), out_shardings=(shardings, state_sharding)
  )
  for x, y in batches:
    p, state = compiled(p, state, put_batch(x), put_batch(y))
  plain = optax.sgd(0.05, momentum=0.9)
  plain_sharding = state_shardings(plain, params, shardings, mesh)
  plain_state = jax.eval_shape(jax.jit(plain.init, out_shardings=plain_sharding), p)
  _, without_clip = compile_with_collectives(
    make_step(plain),
    p,
    plain_state,
    *map(put_batch, batches[0]),
    out_shardings=(shardings, plain_sharding),
  )
  return {
    "params_err": max_rel_err(p, p_ref),
    "state_err": max_rel_err(state, state_ref),
    "events": events(state_ref),
    "with_clip": with_clip,
    "without_clip": without_clip,
  }


def check_pmap() -> dict[str, Any]:
  """pmap with axis_name: each device holds a slice of every leaf."""
  tree = random_tree({"a": (DEVICES, 128), "b": (DEVICES, 40)}, 70, scale=2.0)
  mapped = jax.pmap(lambda t: clipx.clip_tree(t, 1.0, axis_name="i"), axis_name="i")
  clipped, stats = mapped(tree)
  # The reference is the formula, in float64.
  norm = math.sqrt(sum(float(np.sum(np.square(x, dtype=np.float64))) for x in tree.values()))
  expected = {k: x * min(1.0, 1.0 / norm) for k, x in tree.items()}
  return {
    "update_err": max_rel_err(clipped, expected),
    "norm_err": max_rel_err(stats.norm, np.full(DEVICES, norm)),
    "norm": norm,
  }


def check_cnn_example(max_steps: int = 30) -> dict[str, Any]:
  """``examples/train_cnn.py`` on 8 devices (its data-parallel mesh) and on one.

  Same seed, same batches, ``max_steps`` steps of the example's defaults; the
  one-device run is the example's own single-device placement.
  """
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
  from examples import train_cnn

  args = train_cnn.parse_args(["--epochs", "1", "--max-steps", str(max_steps), "--quiet"])
  dataset = train_cnn.data.load_dataset(args.dataset, args.data_dir)
  all_devices = train_cnn.Placement

  class OneDevice(all_devices):
    def __init__(self, devices=None):
      super().__init__(jax.devices()[:1])

  runs = {}
  for name, placement in (("eight", all_devices), ("one", OneDevice)):
    train_cnn.Placement = placement
    try:
      result = train_cnn.train(args, dataset)
    finally:
      train_cnn.Placement = all_devices
    runs[name] = {
      key: result[key]
      for key in ("devices", "test_accuracy", "step_loss", "grad_norm", "steps", "clip_rate")
    }
  return runs


# Compile faster: LLVM optimises the CPU code less. The HLO passes, SPMD
# partitioning included, and so the collectives, are not affected.
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def main() -> None:
  # Both are read when the backend starts, which has not happened yet: this
  # process is started only for these checks.
  jax.config.update("jax_num_cpu_devices", DEVICES)
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE_FLAGS}".strip()
  start = time.perf_counter()
  if jax.device_count() != DEVICES:
    raise SystemExit(f"expected {DEVICES} devices, got {jax.device_count()}")
  mesh = jax.make_mesh((DEVICES,), ("d",), axis_types=(AxisType.Auto,))
  checks = {
    "parser": lambda: check_parser(mesh),
    "jit_fsdp": lambda: check_jit_fsdp(mesh),
    "shard_map": lambda: check_shard_map(mesh),
    "zero_data_parallel": lambda: check_zero_data_parallel(mesh),
    "tensor_parallel_2d": check_tensor_parallel_2d,
    "pmap": check_pmap,
    "cnn_example": check_cnn_example,
  }
  only = set(sys.argv[1:])
  # Wall and CPU seconds: on a shared machine the wall time says little.
  results: dict[str, Any] = {"seconds": {}, "cpu_seconds": {}}
  for name, check in checks.items():
    if only and name not in only:
      continue
    t, cpu = time.perf_counter(), time.process_time()
    results[name] = check()
    results["seconds"][name] = round(time.perf_counter() - t, 2)
    results["cpu_seconds"][name] = round(time.process_time() - cpu, 2)
    print(f"{name}: {results['seconds'][name]} s", file=sys.stderr, flush=True)
  results["seconds"]["total"] = round(time.perf_counter() - start, 2)
  results["cpu_seconds"]["total"] = round(time.process_time(), 2)  # with start-up
  print(json.dumps(results))


if __name__ == "__main__":
  main()
