"""The clipping scopes as Optax ``GradientTransformation``s.

Scope is the transform, threshold is its argument (a float, an Optax schedule
or a policy from :mod:`clipx.thresholds`), and each transform records what it
did as :class:`clipx.ClipStats` in its state.

Numerics shared by every scope (see ``DESIGN.md``):
- norms come from :mod:`clipx.norms`: float32 accumulation, no overflow on
  finite input;
- ``scale = threshold / norm`` only where ``norm > threshold``, applied as two
  factors when it is below float32's normal range (:func:`clipx.scaling.decide`),
  and exact even for a norm beyond float32's range; elsewhere the
  scale is exactly 1 (the output of a ``lax.cond``, so no gradient reaches the
  threshold), and the leaf comes back bit for bit, except that a backend which
  flushes subnormals in arithmetic (XLA CPU) flushes them in this multiply as
  it does in the optimizer's (see :func:`clipx.scaling.scale_leaf`);
- the scaled leaf is computed in float32 and cast back to its own dtype;
- a non-finite norm (NaN/Inf in the input) is never clipped: the bad values
  reach the optimizer unchanged, as they would without clipping, rather than
  being turned into zeros. Use :func:`clipx.skip_nonfinite` to skip such steps.
  A norm beyond float32's range from finite input is reported as ``inf`` in
  the statistics and clipped all the same;
- a run-time threshold (schedule, ``inject_hyperparams``) of 0 scales to zero,
  and a NaN or negative one makes the update NaN in every scope (see
  :func:`clipx.scaling.decide`);
- an empty (zero-size) leaf has norm 0 and passes through.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable
from typing import Any, NamedTuple, TypeAlias

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from clipx import norms, scaling, stacking, validation
from clipx.stats import ClipStats, init_clip_stats
from clipx.thresholds import ThresholdPolicy, as_policy

Threshold: TypeAlias = float | jax.Array | optax.Schedule | ThresholdPolicy


class GlobalNormClipState(NamedTuple):
  """State of :func:`clip_by_global_norm`; ``names`` are the leaves' paths (static)."""

  stats: ClipStats
  threshold_state: Any
  names: stacking.GroupNames = stacking.GroupNames()


GlobalNormClipState.clipx_kind = "global"  # type: ignore[attr-defined]


class LayerNormClipState(NamedTuple):
  """State of :func:`clip_by_layer_norm`; stats have one entry per group.

  ``names`` holds the groups' names (static, no arrays), for :func:`clipx.stats`.
  """

  stats: ClipStats
  threshold_state: Any
  names: stacking.GroupNames = stacking.GroupNames()


LayerNormClipState.clipx_kind = "layer"  # type: ignore[attr-defined]


class AdaptiveGradClipState(NamedTuple):
  """State of :func:`adaptive_grad_clip`; ``names`` are the leaves' paths (static)."""

  stats: ClipStats
  threshold_state: Any
  names: stacking.GroupNames = stacking.GroupNames()


AdaptiveGradClipState.clipx_kind = "agc"  # type: ignore[attr-defined]


class ValueClipState(NamedTuple):
  """State of :func:`clip_by_value`; ``names`` are the leaves' paths (static)."""

  stats: ClipStats
  threshold_state: Any
  names: stacking.GroupNames = stacking.GroupNames()


ValueClipState.clipx_kind = "value"  # type: ignore[attr-defined]


def _stats(
  norm, clipped_norm, threshold, scale, clipped, previous: ClipStats, source=None, share=None
) -> ClipStats:
  return ClipStats(
    norm=norm,
    clipped_norm=clipped_norm,
    threshold=threshold,
    scale=scale,
    clipped=clipped,
    clip_count=previous.clip_count + clipped.astype(jnp.int32),
    source=source,
    share=share,
  )


def _largest_share(divisor: jax.Array, root: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(index, fraction)`` of the largest of norms ``divisor * root`` in their squared sum.

  The squares are taken relative to the largest divisor, so a norm beyond
  float32's range still has a finite term; NaN/Inf groups follow
  :func:`clipx.norms.largest_share` (the first of ``k`` has share ``1 / k``).
  """
  if divisor.shape[0] == 0:
    return jnp.int32(-1), jnp.zeros((), root.dtype)
  return norms.largest_share(jnp.square(divisor / jnp.max(divisor) * root))


def _norm_dtype(tree) -> jnp.dtype:
  leaves = jax.tree_util.tree_leaves(tree)
  if not leaves:
    return jnp.dtype(jnp.float32)
  return jnp.result_type(*[norms.accumulation_dtype(jnp.result_type(x)) for x in leaves])


def clip_tree(
  tree: chex.ArrayTree, max_norm: chex.Numeric, *, axis_name: Any = None
) -> tuple[chex.ArrayTree, ClipStats]:
  """Clips a pytree to global L2 norm ``max_norm``: the functional form.

  For research code that holds gradients outside an optimizer. Same numerics
  as :func:`clip_by_global_norm`.

  Args:
    tree: a pytree of floating point arrays.
    max_norm: a positive float or scalar array (may be traced).
    axis_name: inside ``shard_map``/``pmap``, the axis the tree is sharded over.

  Returns:
    ``(clipped_tree, stats)``; ``stats.clip_count`` is 1 if clipped, else 0.

  Example:
    >>> import jax.numpy as jnp, clipx
    >>> clipped, stats = clipx.clip_tree({"w": jnp.array([3.0, 4.0])}, 1.0)
    >>> clipped["w"], float(stats.norm)
    (Array([0.6, 0.8], dtype=float32), 5.0)
  """
  if isinstance(max_norm, ThresholdPolicy) or callable(max_norm):
    raise TypeError(
      "clipx.clip_tree takes a number; for schedules and adaptive policies,"
      " which keep state, use clipx.clip_by_global_norm(...) as a transform."
    )
  validation.positive("clip_tree", "max_norm", max_norm)
  norm = _global_norm_split(tree, axis_name)
  zero = init_clip_stats((), norm[1].dtype, forensics=True)
  return _scale_globally(tree, norm, jnp.asarray(max_norm), zero)


def _global_norm_split(updates: chex.ArrayTree, axis_name: Any) -> tuple[jax.Array, ...]:
  """The global norm as ``(divisor, root)``, with its ``(source, share)`` (forensics)."""
  leaves = norms.check_float_leaves(updates)
  return norms.global_norm_attributed(leaves, axis_name=axis_name)


def _scale_globally(
  updates: chex.ArrayTree, norm: tuple[jax.Array, ...], threshold, previous: ClipStats
) -> tuple[chex.ArrayTree, ClipStats]:
  """The global scope: every leaf scaled by one factor; shared by the transform and clip_tree."""
  divisor, root, source, share = norm
  threshold = jnp.asarray(threshold).astype(root.dtype)
  decision = scaling.decide(divisor, root, threshold)
  hi, lo = scaling.gated_scale(decision.clipped, decision.hi, decision.lo)
  updates = scaling.scale_tree(updates, hi, lo)
  return updates, _decision_stats(decision, threshold, previous, source, share)


def _decision_stats(
  decision: scaling.Decision, threshold, previous: ClipStats, source=None, share=None
) -> ClipStats:
  """Stats of a norm scope; the clipped norm is the threshold where clipped (exact, no overflow)."""
  valid = threshold >= 0
  clipped_norm = jnp.where(valid, jnp.where(decision.clipped, threshold, decision.norm), jnp.nan)
  return _stats(
    decision.norm,
    clipped_norm,
    threshold,
    decision.scale,
    decision.clipped,
    previous,
    source,
    share,
  )


def clip_by_global_norm(
  max_norm: Threshold, *, axis_name: Any = None
) -> optax.GradientTransformation:
  """Clips updates to a maximum global L2 norm: drop-in for Optax's.

  ``updates * min(1, max_norm / global_norm(updates))``, with the norm
  accumulated in float32 and safe from overflow, so float16 and huge float32
  gradients are scaled correctly instead of zeroed.

  Args:
    max_norm: the threshold: a positive float, an Optax schedule of the step
      count, or a policy such as ``clipx.autoclip()``.
    axis_name: inside ``shard_map``/``pmap``, the mapped axis (or axes) over
      which the updates are sharded; the norm is then global over it.

  Returns:
    An ``optax.GradientTransformation`` whose state holds :class:`ClipStats`.

  References:
    Pascanu et al., `On the difficulty of training recurrent neural networks
    <https://arxiv.org/abs/1211.5063>`_, 2013.

  Example:
    >>> import jax.numpy as jnp, optax, clipx
    >>> tx = optax.chain(clipx.clip_by_global_norm(1.0), optax.sgd(0.1))
    >>> params = {"w": jnp.zeros(2)}
    >>> updates, state = tx.update({"w": jnp.array([3.0, 4.0])}, tx.init(params), params)
    >>> updates["w"].round(4)  # (3, 4) / 5 * 0.1; float32 rounding shows in the last digit
    Array([-0.06, -0.08], dtype=float32)
  """
  policy = as_policy(max_norm, "max_norm", "clip_by_global_norm")

  def init_fn(params):
    dtype = _norm_dtype(params)
    return GlobalNormClipState(
      init_clip_stats((), dtype, forensics=True),
      policy.init(jnp.zeros((), dtype)),
      stacking.leaf_names(params),
    )

  def update_fn(updates, state, params=None):
    del params
    norm = _global_norm_split(updates, axis_name)
    threshold, threshold_state = policy.update(norm[0] * norm[1], state.threshold_state)
    updates, stats = _scale_globally(updates, norm, threshold, state.stats)
    return updates, GlobalNormClipState(stats, threshold_state, state.names)

  return optax.GradientTransformation(init_fn, update_fn)


GroupFn = Callable[[tuple], Hashable]


GROUP_MODES = ("leaf", "module")


def _group_key_fn(group: str | GroupFn) -> GroupFn:
  validation.choice("layer_groups", "group", group, GROUP_MODES, function=True)
  if not isinstance(group, str):
    return group
  if group == "leaf":
    return lambda path: path
  return lambda path: path[:-1]


def layer_groups(
  tree: chex.ArrayTree, group: str | GroupFn = "leaf"
) -> tuple[np.ndarray, list[str]]:
  """The group id of every leaf of ``tree`` and a readable name per group.

  Groups are numbered in order of first appearance in ``tree``'s leaf order.
  """
  key_fn = _group_key_fn(group)
  ids: dict[Hashable, int] = {}
  names: list[str] = []
  leaf_ids = []
  for path, _ in jax.tree_util.tree_leaves_with_path(tree):
    key = key_fn(stacking.strip_variable_suffix(path))
    if key not in ids:
      ids[key] = len(ids)
      names.append(jax.tree_util.keystr(key) if isinstance(key, tuple) else str(key))
    leaf_ids.append(ids[key])
  return np.asarray(leaf_ids, np.int32), names


def clip_by_layer_norm(
  max_norm: Threshold,
  *,
  group: str | GroupFn = "leaf",
  stacked: stacking.Stacked = None,
  axis_name: Any = None,
) -> optax.GradientTransformation:
  """Clips each layer's updates to its own L2 norm bound.

  Args:
    max_norm: the threshold for every group: a positive float, an Optax
      schedule, or a policy (which then keeps separate statistics per group).
    group: ``"leaf"`` (every array is a layer), ``"module"`` (arrays under one
      parent path, e.g. a kernel and its bias, share a norm), or a function
      from a leaf's key path to a hashable group key.
    stacked: for scanned models, which axes of a leaf index layers: an int
      ``k`` (the ``k`` leading axes of every leaf), a tuple of ints (their
      positions in every leaf, negative ones from its end: ``(1,)`` for
      MaxText's ``param_scan_axis=1``, ``(-1,)`` the last axis), or a function
      ``(path, leaf) -> int | tuple[int, ...]`` for trees that mix layouts
      (e.g. ``(1,)`` under ``decoder/layers``, 0 elsewhere; or
      :func:`clipx.layer_axes_from_metadata`, which reads Flax's metadata).
      Each layer of a stack is then its own group, as if the layers were
      separate leaves, named ``path[layer]`` wherever the axis sits;
      ``None`` or 0: none.
    axis_name: inside ``shard_map``/``pmap``, the mapped axis; all group norms
      are reduced with one ``psum`` of a small vector.

  Returns:
    An ``optax.GradientTransformation``; its stats have one entry per group,
    in order of first appearance in the tree (a stack's layers in order), and
    ``clipx.stats(state).as_dict()`` names them by path:
    ``clip/layer/norm/blocks/attn/kernel[3]``.

  References:
    You et al., `Large Batch Training of Convolutional Networks
    <https://arxiv.org/abs/1708.03888>`_, 2017 (layer-wise norms);
    McMahan et al., `A General Approach to Adding Differential Privacy to
    Iterative Training Procedures <https://arxiv.org/abs/1812.06210>`_, 2018.
  """
  return _clip_by_layer_norm("clip_by_layer_norm", max_norm, group, stacked, axis_name)


def _clip_by_layer_norm(
  owner: str, max_norm: Threshold, group: str | GroupFn, stacked: stacking.Stacked, axis_name: Any
) -> optax.GradientTransformation:
  """:func:`clip_by_layer_norm`, its errors naming ``owner``: the function the user called."""
  policy = as_policy(max_norm, "max_norm", owner)
  validation.choice(owner, "group", group, GROUP_MODES, function=True)
  stacked_fn = stacking.as_stacked_fn(owner, stacked)
  key_fn = _group_key_fn(group)

  def groups_of(tree) -> stacking.LayerGroups:
    return stacking.layer_groups(owner, tree, key_fn, stacked_fn)

  def init_fn(params):
    groups = groups_of(params)
    dtype = _norm_dtype(params)
    shape = (groups.num_groups,)
    return LayerNormClipState(
      init_clip_stats(shape, dtype, forensics=True),
      policy.init(jnp.zeros(shape, dtype)),
      stacking.GroupNames(tuple(groups.names)),
    )

  def update_fn(updates, state, params=None):
    del params
    leaves = norms.check_float_leaves(updates)
    groups = _checked_groups(owner, groups_of(updates), state.stats.norm.shape[0])
    divisor, root = _group_norms(leaves, groups, axis_name)
    threshold, threshold_state = policy.update(divisor * root, state.threshold_state)
    threshold = threshold.astype(root.dtype)
    decision = scaling.decide(divisor, root, threshold)
    out = _scale_groups(leaves, groups, jnp.any(decision.clipped), decision.hi, decision.lo)
    stats = _decision_stats(decision, threshold, state.stats, *_largest_share(divisor, root))
    new_state = LayerNormClipState(stats, threshold_state, state.names)
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(updates), out), new_state

  return optax.GradientTransformation(init_fn, update_fn)


def _checked_groups(owner: str, groups: stacking.LayerGroups, count: int) -> stacking.LayerGroups:
  """``groups``, after checking that the state was initialised with as many groups."""
  if groups.num_groups != count:
    raise ValueError(
      f"clipx.{owner}: updates have {groups.num_groups} groups but the"
      f" state was initialised with {count}; init with params shaped like the updates."
    )
  return groups


def _group_norms(
  leaves: list[jax.Array], groups: stacking.LayerGroups, axis_name: Any
) -> tuple[jax.Array, jax.Array]:
  """Every group's norm as ``(divisor, root)`` vectors; a stack's layers are groups of their own."""
  if any(groups.layer_shapes):
    rows = [
      base + np.arange(math.prod(shape), dtype=np.int32)
      for base, shape in zip(groups.bases, groups.layer_shapes)
    ]
    if all(axes == tuple(range(len(axes))) for axes in groups.axes):
      layer_axes = [len(shape) for shape in groups.layer_shapes]
      return norms.layer_norms_split(
        leaves, layer_axes, rows, groups.num_groups, axis_name=axis_name
      )
    return _layer_norms_anywhere(leaves, groups.axes, rows, groups.num_groups, axis_name)
  ids = np.asarray(groups.bases, np.int32)
  return norms.group_norms_split(leaves, ids, groups.num_groups, axis_name=axis_name)


def _layer_norms_anywhere(
  leaves: list[jax.Array],
  layer_axes: list[tuple[int, ...]],
  row_ids: list[np.ndarray],
  num_segments: int,
  axis_name: Any,
) -> tuple[jax.Array, jax.Array]:
  """:func:`clipx.norms.layer_norms_split` for layer axes at any positions, not only leading.

  The same reductions over each leaf's other axes, in place: moving the layer
  axes to the front instead made XLA CPU write a transposed copy of the leaf
  (see :mod:`clipx.stacking`). A copy of ``layer_norms_split``'s body with
  reduction axes for leading counts, kept here while that function takes counts.
  """
  dtype = norms._common_dtype(leaves)
  ids = np.concatenate([np.asarray(r, np.int32).reshape(-1) for r in row_ids])
  axes = [stacking.within_layer_axes(x.ndim, a) for x, a in zip(leaves, layer_axes)]
  rows = jnp.concatenate([norms.sum_sq(x, a, dtype).reshape(-1) for x, a in zip(leaves, axes)])
  sq = jax.ops.segment_sum(rows, ids, num_segments)
  if axis_name is not None:
    sq = lax.psum(sq, axis_name)

  def common(_):
    return jnp.ones_like(sq), norms.safe_sqrt(sq)

  def fallback(leaves):
    pairs = [norms.max_and_scaled_norm(x, a, dtype) for x, a in zip(leaves, axes)]
    d = jnp.concatenate([p[0].reshape(-1) for p in pairs])
    r = jnp.concatenate([p[1].reshape(-1) for p in pairs])
    return norms.combine_norms(d, r, ids, num_segments, axis_name=axis_name)

  return lax.cond(jnp.all(jnp.isfinite(sq)), common, fallback, list(leaves))


def _scale_groups(
  leaves: list[jax.Array],
  groups: stacking.LayerGroups,
  any_clipped: jax.Array,
  hi: jax.Array,
  lo: jax.Array,
) -> list[jax.Array]:
  """Each leaf times its group's factors ``hi * lo`` (vectors, one entry per group)."""
  # A stack's scales have its layer sizes at its layer axes, and ones: they broadcast
  # over each layer.
  spans = [
    (base, stacking.scale_shape(x.ndim, axes, shape) if shape else ())
    for base, shape, axes, x in zip(groups.bases, groups.layer_shapes, groups.axes, leaves)
  ]
  leaf_scales = scaling.gated_slices(any_clipped, hi, lo, spans)
  return [scaling.scale_leaf(x, h, low) for x, (h, low) in zip(leaves, leaf_scales)]


def clip_by_global_then_layer_norm(
  global_max_norm: Threshold,
  layer_max_norm: Threshold,
  *,
  group: str | GroupFn = "leaf",
  stacked: stacking.Stacked = None,
  axis_name: Any = None,
) -> optax.GradientTransformation:
  """``optax.chain(clip_by_global_norm(g), clip_by_layer_norm(l))`` in one pass over the updates.

  The global norm is the norm of the group norms, and after a global scale
  ``s`` every group's norm is ``s`` times its own, so both clips need only
  one reduction of the updates and one multiply per leaf. Chained, the
  layer clip must first materialize the globally clipped tree to measure
  it: on XLA CPU a ResNet-50-sized temporary, page-faulted in afresh every
  step (``benchmarks/README.md``, "Spike methods"). The state, statistics and
  decisions are the chain's; the outputs agree with it to float32 rounding
  (the chain measures the rounded clipped tree, this the exact product).
  ``clipx.stats`` reports ``clip/global/...`` and ``clip/layer/...`` as for
  the chain; the global clip's forensics ``source`` names a group.

  Where both clip on one step the two scales are applied as one product of
  normal factors (:func:`clipx.scaling.multiply_factors`): two scales of 1e-20
  still scale, rather than zero, the gradient.

  Args:
    global_max_norm: the global threshold: a float, a schedule or a policy.
    layer_max_norm: every group's threshold, on its norm after the global clip.
    group: what one group is, as for :func:`clip_by_layer_norm`: ``"leaf"``,
      ``"module"`` or a function of the leaf's path.
    stacked: which axes of a leaf index layers (an int, a tuple of
      positions or a function of ``(path, leaf)``), as for
      :func:`clip_by_layer_norm`.
    axis_name: inside ``shard_map``/``pmap``, the mapped axis: the group
      norms, and with them the global norm, are over all shards.

  Returns:
    An ``optax.GradientTransformation`` whose state is the chain's,
    ``(GlobalNormClipState, LayerNormClipState)``.
  """
  return _clip_by_global_then_layer_norm(
    "clip_by_global_then_layer_norm", global_max_norm, layer_max_norm, group, stacked, axis_name
  )


def _clip_by_global_then_layer_norm(
  owner: str,
  global_max_norm: Threshold,
  layer_max_norm: Threshold,
  group: str | GroupFn,
  stacked: stacking.Stacked,
  axis_name: Any,
) -> optax.GradientTransformation:
  """:func:`clip_by_global_then_layer_norm`, its errors naming ``owner`` (a preset's name)."""
  global_policy = as_policy(global_max_norm, "global_max_norm", owner)
  layer_policy = as_policy(layer_max_norm, "layer_max_norm", owner)
  validation.choice(owner, "group", group, GROUP_MODES, function=True)
  stacked_fn = stacking.as_stacked_fn(owner, stacked)
  layer = _clip_by_layer_norm(owner, layer_policy, group, stacked, axis_name)
  key_fn = _group_key_fn(group)

  def init_fn(params):
    layer_state = layer.init(params)
    dtype = _norm_dtype(params)
    global_state = GlobalNormClipState(
      init_clip_stats((), dtype, forensics=True),
      global_policy.init(jnp.zeros((), dtype)),
      layer_state.names,  # the global source is a group
    )
    return global_state, layer_state

  def update_fn(updates, state, params=None):
    del params
    global_state, layer_state = state
    leaves = norms.check_float_leaves(updates)
    groups = stacking.layer_groups(owner, updates, key_fn, stacked_fn)
    groups = _checked_groups(owner, groups, layer_state.stats.norm.shape[0])
    divisor, root = _group_norms(leaves, groups, axis_name)
    # The global norm from the group norms (already over every shard with axis_name).
    global_divisor, global_root = norms.combine_norms(divisor, root)
    global_norm = global_divisor[0] * global_root[0]
    threshold, global_tstate = global_policy.update(global_norm, global_state.threshold_state)
    threshold = threshold.astype(root.dtype)
    first = scaling.decide(global_divisor[0], global_root[0], threshold)
    shares = _largest_share(divisor, root)
    global_stats = _decision_stats(first, threshold, global_state.stats, *shares)
    # Each group's norm after the global clip, as the chain's second stage measures it.
    seen_root = root * first.hi * first.lo
    layer_threshold, layer_tstate = layer_policy.update(
      divisor * seen_root, layer_state.threshold_state
    )
    layer_threshold = layer_threshold.astype(root.dtype)
    second = scaling.decide(divisor, seen_root, layer_threshold)
    layer_stats = _decision_stats(second, layer_threshold, layer_state.stats, *shares)
    any_clipped = first.clipped | jnp.any(second.clipped)
    hi, lo = scaling.multiply_factors(first.hi, first.lo, second.hi, second.lo)
    out = _scale_groups(leaves, groups, any_clipped, hi, lo)
    new_state = (
      GlobalNormClipState(global_stats, global_tstate, global_state.names),
      LayerNormClipState(layer_stats, layer_tstate, layer_state.names),
    )
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(updates), out), new_state

  return optax.GradientTransformation(init_fn, update_fn)


def unit_axes(
  shape: tuple[int, ...], axis: int | tuple[int, ...] | None = None, *, path: str = "<leaf>"
) -> tuple[int, ...]:
  """The axes a unit-wise norm reduces over, following Optax's conventions.

  Vectors (and arrays with one non-trivial axis) are one unit; rank-2 and 3
  (dense ``(in, out)``, multi-head) reduce axis 0; rank-4 conv kernels (HWIO)
  reduce (0, 1, 2); rank-5 (DHWIO) reduce (0, 1, 2, 3). Pass ``axis`` for
  other layouts; an axis out of range for ``shape`` (or named twice) is a
  ``ValueError`` naming ``path``, not wrapped around.
  """
  rank = len(shape)
  if axis is not None:
    axes = validation.axes("adaptive_grad_clip", "axis", axis)
    assert axes is not None
    return validation.axes_of("adaptive_grad_clip", "axis", axes, rank, path)
  if sum(d != 1 for d in shape) <= 1:
    return tuple(range(rank))
  if rank in (2, 3):
    return (0,)
  if rank in (4, 5):
    return tuple(range(rank - 1))
  raise ValueError(
    f"clipx.adaptive_grad_clip: no default unit axes for shape {shape};"
    " pass axis= to say which axes form a unit."
  )


def _stacked_unit_axes(
  stacked_fn: stacking.StackedFn, path: tuple, leaf: jax.Array, axis: Any
) -> tuple[int, ...]:
  """A leaf's unit axes: :func:`unit_axes` of one layer, as axes of the leaf.

  One layer is the leaf without its layer axes, its other axes in order. A
  leaf that is all layer axes (a per-layer scale of shape ``(L,)``) has a
  scalar per layer: one unit each, as ``L`` unstacked scalar leaves would.
  """
  layer_axes = stacking.leaf_layer_axes("adaptive_grad_clip", stacked_fn, path, leaf)
  shape = leaf.shape
  where = stacking.path_name(path)
  others = stacking.within_layer_axes(len(shape), layer_axes)
  layer_shape = tuple(shape[i] for i in others)
  return tuple(others[a] for a in unit_axes(layer_shape, axis, path=where))


def check_same_structure(updates: chex.ArrayTree, params: chex.ArrayTree, what: str) -> None:
  """Raises ValueError naming the first path where ``params`` differs from ``updates``."""
  u = jax.tree_util.tree_leaves_with_path(updates)
  p = jax.tree_util.tree_leaves_with_path(params)
  for (u_path, u_leaf), (p_path, p_leaf) in zip(u, p):
    if stacking.strip_variable_suffix(u_path) != stacking.strip_variable_suffix(p_path):
      raise ValueError(
        f"clipx.{what}: params do not match updates: updates have"
        f" {jax.tree_util.keystr(u_path)} where params have {jax.tree_util.keystr(p_path)}."
      )
    if jnp.shape(u_leaf) != jnp.shape(p_leaf):
      raise ValueError(
        f"clipx.{what}: params do not match updates at {jax.tree_util.keystr(u_path)}:"
        f" update shape {jnp.shape(u_leaf)}, param shape {jnp.shape(p_leaf)}."
      )
  if len(u) != len(p):
    longer, name = (u, "updates") if len(u) > len(p) else (p, "params")
    extra = jax.tree_util.keystr(longer[min(len(u), len(p))][0])
    raise ValueError(f"clipx.{what}: params do not match updates: only {name} have {extra}.")


def adaptive_grad_clip(
  clipping: float | jax.Array | optax.Schedule,
  *,
  eps: float = 1e-3,
  axis: int | tuple[int, ...] | None = None,
  stacked: stacking.Stacked = None,
  axis_name: Any = None,
) -> optax.GradientTransformation:
  """Unit-wise adaptive gradient clipping (AGC).

  Each unit (an output neuron: a column of a dense kernel, an output channel
  of a conv kernel) has its gradient norm held to
  ``clipping * max(||param unit||, eps)``. Needs ``params`` in ``update``.

  A unit whose parameter norm is not finite (NaN or Inf in its parameters)
  has no bound and is left unclipped: its gradient passes unchanged, as a
  non-finite gradient does in every scope, never turned into NaN (or, by
  falling back to ``eps``, into a near-zero step that hides the broken
  parameter). A finite parameter norm beyond float32's range likewise never
  clips. ``clipx.all_finite(params)`` tells a training loop to stop such a run.

  Args:
    clipping: the largest allowed ratio of gradient norm to parameter norm
      (the paper uses 0.01 to 0.16); a positive float or an Optax schedule.
    eps: the floor of the parameter norm, so zero-initialised parameters
      (biases) can still move.
    axis: the axes a unit reduces over; ``None`` follows Optax's defaults
      (see :func:`unit_axes`). With ``stacked``, axes of one layer: of the
      leaf's shape without its layer axes (``(in, out)`` for a stacked
      ``(L, in, out)`` or ``(in, L, out)`` kernel).
    stacked: for scanned models, which axes of a leaf index layers: an int
      (that many leading axes), a tuple of positions (``(1,)`` for MaxText's
      ``param_scan_axis=1``) or a function ``(path, leaf) -> int | tuple``,
      as for :func:`clip_by_layer_norm`. Units are then found inside each
      layer, so a stacked ``(L, in, out)`` kernel has ``L * out`` units,
      exactly as its ``L`` unstacked kernels. ``None`` or 0: none.
    axis_name: inside ``shard_map``/``pmap``, the mapped axis the units are
      sharded over: unit norms are then reduced over it with ``psum``.

  Returns:
    An ``optax.GradientTransformation``. Its stats are of the whole tree:
    ``norm`` and ``clipped_norm`` are global norms before and after,
    ``clipped`` says whether any unit was clipped.

  References:
    Brock et al., `High-Performance Large-Scale Image Recognition Without
    Normalization <https://arxiv.org/abs/2102.06171>`_, 2021.
  """
  if isinstance(clipping, ThresholdPolicy):
    raise TypeError(
      "clipx.adaptive_grad_clip: clipping is a ratio of norms; pass a float or a"
      " schedule, not an adaptive threshold policy."
    )
  policy = as_policy(clipping, "clipping", "adaptive_grad_clip")
  validation.positive("adaptive_grad_clip", "eps", eps, finite=True)
  validation.axes("adaptive_grad_clip", "axis", axis)
  stacked_fn = stacking.as_stacked_fn("adaptive_grad_clip", stacked)

  def init_fn(params):
    stacking.check_stacked_alike("adaptive_grad_clip", stacked_fn, params)
    dtype = _norm_dtype(params)
    return AdaptiveGradClipState(
      init_clip_stats((), dtype, forensics=True),
      policy.init(jnp.zeros((), dtype)),
      stacking.leaf_names(params),
    )

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError(
        "clipx.adaptive_grad_clip needs params: call tx.update(updates, state, params)."
      )
    check_same_structure(updates, params, "adaptive_grad_clip")
    leaves = norms.check_float_leaves(updates)
    param_leaves = norms.check_float_leaves(params, "params")
    dtype = jnp.result_type(norms._common_dtype(leaves), norms._common_dtype(param_leaves))
    ratio, threshold_state = policy.update(jnp.zeros((), dtype), state.threshold_state)
    ratio = ratio.astype(dtype)

    # Same-shape small leaves are stacked so one reduction serves many leaves
    # (compile time); the leading axis of a stack indexes the leaf. Everything
    # after the reductions works on one vector of all units: a few kernels for
    # the whole tree instead of several per leaf (XLA CPU pays per kernel).
    stacking.check_stacked_alike("adaptive_grad_clip", stacked_fn, updates)
    paths = [path for path, _ in jax.tree_util.tree_leaves_with_path(updates)]
    leaf_axes = [
      _stacked_unit_axes(stacked_fn, stacking.strip_variable_suffix(path), leaf, axis)
      for path, leaf in zip(paths, leaves)  # arrays: a Python float leaf has no shape
    ]
    buckets = norms._buckets(leaves, leaf_axes)
    g_stacks = [norms.stack_bucket(leaves, bucket) for bucket in buckets]
    p_stacks = [norms.stack_bucket(param_leaves, bucket) for bucket in buckets]
    stack_axes = [tuple(a + 1 for a in leaf_axes[b[0]]) for b in buckets]

    def flat(parts: list[jax.Array]) -> jax.Array:
      if not parts:
        return jnp.zeros((0,), dtype)
      return jnp.concatenate([x.reshape(-1) for x in parts])

    def unit_sums(stacks):
      return [norms.sum_sq(x, axes, dtype, keepdims=True) for x, axes in zip(stacks, stack_axes)]

    g_sq_parts = unit_sums(g_stacks)
    g_sq, p_sq = flat(g_sq_parts), flat(unit_sums(p_stacks))
    if axis_name is not None:
      g_sq, p_sq = lax.psum((g_sq, p_sq), axis_name)
    # One check for the whole tree. Not isfinite(sum(g_sq)): XLA folds that sum of
    # unit sums into a second full reduction of every leaf, and the squares of
    # every gradient are then materialized for the two (measured: +195 MiB, 4x slower).
    all_finite = jnp.all(jnp.isfinite(g_sq)) & jnp.all(jnp.isfinite(p_sq))

    def common(_):
      return jnp.ones_like(g_sq), norms.safe_sqrt(g_sq), norms.safe_sqrt(p_sq)

    def fallback(operands):
      # Under shard_map a unit may span shards: its max and sum are over all of them.
      def unit_norms(stacks):
        pairs = [
          norms.max_and_scaled_norm(x, a, dtype, axis_name=axis_name)
          for x, a in zip(stacks, stack_axes)
        ]
        return flat([d for d, _ in pairs]), flat([r for _, r in pairs])

      gs, ps = operands
      g_divisor, g_root = unit_norms(gs)
      p_divisor, p_root = unit_norms(ps)
      return g_divisor, g_root, p_divisor * p_root

    g_divisor, g_root, p_norm = lax.cond(all_finite, common, fallback, (g_stacks, p_stacks))
    # A unit whose param norm is not finite (NaN/Inf params, or beyond float32's range)
    # has no bound: its gradient passes. Not ratio * NaN (a NaN update) nor ratio * inf
    # (NaN for a run-time ratio of 0, which scales every unit to zero, as in every scope).
    unbounded = jnp.where(ratio > 0, jnp.inf, ratio).astype(dtype)
    unit_threshold = jnp.where(jnp.isfinite(p_norm), ratio * jnp.maximum(p_norm, eps), unbounded)
    decision = scaling.decide(g_divisor, g_root, unit_threshold)
    total_divisor, total_root = norms.combine_norms(g_divisor, g_root)
    norm = (total_divisor * total_root)[0]
    unit_clipped_norm = jnp.where(decision.clipped, unit_threshold, decision.norm)
    clipped_norm = norms.safe_vector_norm(unit_clipped_norm)
    clipped = jnp.any(decision.clipped)

    # Where each leaf's units sit in the vector: stacks in bucket order, leaves in stack order.
    spans: list[Any] = [None] * len(leaves)
    offset = 0
    for bucket, part in zip(buckets, g_sq_parts):
      shape = part.shape[1:]  # a leaf's unit norms, kept dims: broadcasts against the leaf
      for i in bucket:
        spans[i] = (offset, shape)
        offset += math.prod(shape)
    leaf_scales = scaling.gated_slices(clipped, decision.hi, decision.lo, spans)
    out = [scaling.scale_leaf(x, hi, lo) for x, (hi, lo) in zip(leaves, leaf_scales)]
    scale = jnp.where(norm > 0, clipped_norm / jnp.where(norm > 0, norm, 1), 1).astype(dtype)
    scale = jnp.where(ratio >= 0, scale, jnp.nan)
    # Forensics: each leaf's share of the squared norm, from its units (a unit-sized sum).
    # The unit vector is in bucket order (spans), not leaf order: owners follow the spans.
    owner = np.zeros(offset, np.int32)
    for i, (start, shape) in enumerate(spans):
      owner[start : start + math.prod(shape)] = i
    if owner.size:
      terms = jnp.square(g_divisor / jnp.max(g_divisor) * g_root)
      source, share = norms.largest_share(jax.ops.segment_sum(terms, owner, len(leaves)))
    else:
      source, share = jnp.int32(-1), jnp.zeros((), dtype)
    stats = _stats(norm, clipped_norm, ratio, scale, clipped, state.stats, source, share)
    treedef = jax.tree_util.tree_structure(updates)
    new_state = AdaptiveGradClipState(stats, threshold_state, state.names)
    return jax.tree_util.tree_unflatten(treedef, out), new_state

  return optax.GradientTransformation(init_fn, update_fn)


def clip_by_value(max_abs: Threshold, *, axis_name: Any = None) -> optax.GradientTransformation:
  """Clips every element of the updates to ``[-max_abs, max_abs]``.

  Value clipping changes the direction of the update; prefer a norm scope
  unless single huge elements are the problem.

  Args:
    max_abs: the bound: a positive float, an Optax schedule, or a policy (which
      then sees the largest magnitude of each step as its "norm").
    axis_name: inside ``shard_map``/``pmap``, the mapped axis the updates are
      sharded over. Clipping is element-wise and needs no communication, but
      the largest magnitude (the stats, and what a policy sees) is then the
      maximum over all shards (one ``pmax``), so every shard keeps the same state.

  Returns:
    An ``optax.GradientTransformation``; its stats' ``norm`` is the largest
    magnitude before clipping and ``clipped_norm`` after.

  References:
    Mikolov, `Statistical Language Models Based on Neural Networks
    <https://www.fit.vut.cz/study/phd-thesis-file/283/283.pdf>`_, 2012.
  """
  policy = as_policy(max_abs, "max_abs", "clip_by_value")

  def init_fn(params):
    dtype = _norm_dtype(params)
    return ValueClipState(
      init_clip_stats((), dtype, forensics=True),
      policy.init(jnp.zeros((), dtype)),
      stacking.leaf_names(params),
    )

  def update_fn(updates, state, params=None):
    del params
    leaves = norms.check_float_leaves(updates)
    dtype = _norm_dtype(updates)
    per_leaf = norms.per_leaf_reduce(
      leaves,
      lambda x: jnp.max(jnp.abs(norms.widen(x, dtype)), axis=tuple(range(1, x.ndim)), initial=0.0),
    ).astype(dtype)
    if axis_name is not None:
      per_leaf = lax.pmax(per_leaf, axis_name)
    largest = jnp.max(per_leaf, initial=0.0)
    # Forensics: the leaf holding the largest magnitude.
    source = jnp.argmax(per_leaf).astype(jnp.int32) if leaves else jnp.int32(-1)
    share = (largest > 0).astype(dtype)
    threshold, threshold_state = policy.update(largest, state.threshold_state)
    # A NaN or negative run-time bound makes the update NaN, as in every scope.
    threshold = jnp.where(threshold >= 0, threshold, jnp.nan).astype(dtype)
    # An Inf element is clipped to the bound by jnp.clip: the stats say so.
    clipped = (largest > threshold) | jnp.isnan(threshold)

    def clip_leaf(x):
      bound = threshold.astype(jnp.promote_types(x.dtype, dtype))
      return jnp.clip(x.astype(bound.dtype), -bound, bound).astype(x.dtype)

    # The checked leaves, not the tree's: a Python float leaf has no dtype.
    treedef = jax.tree_util.tree_structure(updates)
    updates = jax.tree_util.tree_unflatten(treedef, [clip_leaf(x) for x in leaves])
    clipped_norm = jnp.where(clipped, threshold, largest)
    scale = jnp.where(largest > 0, clipped_norm / jnp.where(largest > 0, largest, 1), 1)
    stats = _stats(
      largest, clipped_norm, threshold, scale.astype(dtype), clipped, state.stats, source, share
    )
    return updates, ValueClipState(stats, threshold_state, state.names)

  return optax.GradientTransformation(init_fn, update_fn)
