"""Clippy: each tensor's update bounded entry by entry relative to its weights.

Placed at the end of an optimizer chain (after the learning rate), so it sees
the step ``delta`` that will be added to the weights ``w``. Each tensor (or
each layer of a stacked tensor) gets one factor
``s = min(1, min_i (relative * |w_i| + absolute) / |delta_i|)``: the largest
scale that keeps every entry's move within its bound. One factor per tensor,
not per entry, so the update's direction within the tensor is kept.

Numerics: the statistic is ``r = max_i |delta_i| / b_i`` (``s = 1 / r`` where
``r > 1``), computed as ``d * max_i ((|delta_i| / d) / b_i)`` with ``d`` the
power of two :func:`clipx.norms.safe_divisor` of the tensor's largest
``|delta|``, so it never overflows where ``|delta| / b`` exceeds float32's
range (``delta = 1e38`` with ``b = 1e-7``), and the factor is applied as two
normal factors (:func:`clipx.scaling.decide`), so a finite update is never
zeroed. A tensor holding NaN/Inf passes through unchanged.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from clipx import norms, scaling, stacking, transforms, validation
from clipx.stats import ClipStats, init_clip_stats


class ClippyState(NamedTuple):
  """State of :func:`clippy`; stats have one entry per group (tensor, or layer of a stack).

  ``stats.norm`` is ``max_i |delta_i| / b_i`` (above 1 where the update is
  cut), ``stats.threshold`` is 1, ``stats.scale`` the factor applied.
  ``names`` are the groups' names (static), for :func:`clipx.stats`.
  """

  stats: ClipStats
  names: stacking.GroupNames = stacking.GroupNames()


ClippyState.clipx_kind = "clippy"  # type: ignore[attr-defined]


def _leaf_groups(owner: str, tree: Any, stacked_fn: stacking.StackedFn) -> stacking.LayerGroups:
  return stacking.layer_groups(owner, tree, lambda path: path, stacked_fn)


def _per_group(
  values: list[jax.Array], groups: stacking.LayerGroups, reduce: Any, dtype
) -> jax.Array:
  """One value per group from per-leaf arrays, reduced over each layer's entries."""
  rows = [
    reduce(x, axis=stacking.within_layer_axes(x.ndim, axes), initial=0.0).reshape(-1)
    for x, axes in zip(values, groups.axes)
  ]
  return jnp.concatenate(rows) if rows else jnp.zeros((0,), dtype)


def _expand(vector: jax.Array, groups: stacking.LayerGroups, leaves: list[jax.Array]):
  """Each leaf's entries of a per-group vector, shaped to broadcast against the leaf."""
  out = []
  for x, base, shape, axes in zip(leaves, groups.bases, groups.layer_shapes, groups.axes):
    size = 1
    for s in shape:
      size *= s
    out.append(vector[base : base + size].reshape(stacking.scale_shape(x.ndim, axes, shape)))
  return out


def clippy(
  relative: chex.Numeric = 0.1,
  absolute: chex.Numeric = 1e-7,
  *,
  stacked: stacking.Stacked = None,
  axis_name: Any = None,
) -> optax.GradientTransformation:
  """Clippy: each tensor's update scaled so no weight moves by more than its bound.

  Per tensor (or per layer of a stacked tensor) with update ``delta`` and
  weights ``w`` (the ``params`` passed to ``update``, before the step):
  ``delta <- delta * min(1, min_i (relative * |w_i| + absolute) / |delta_i|)``.
  It bounds the update, so it goes last, after the learning rate::

    optax.chain(optax.adagrad(lr), clipx.clippy(0.1, 1e-7))

  Why one factor per tensor and not per entry: a per-entry clip changes the
  update's direction; Clippy keeps it, and the smallest per-entry bound sets
  the whole tensor's step, so a weight near zero with a large update holds
  the tensor back (``absolute`` sets how far such a weight may move).

  Defaults are keras-rs ``ClippyAdagrad``'s (``variable_relative_threshold=0.1``,
  ``absolute_threshold=1e-7``). Differences from it: its optional third term
  ``accumulator_relative_threshold / sqrt(accumulator)`` (default 0) needs
  Adagrad's accumulator and is left out; ``absolute`` must be > 0 here (at 0
  the reference zeroes a tensor's whole update when one of its weights is 0);
  a tensor holding NaN/Inf passes through unchanged (the reference scales it
  by 0 or NaN); ``ClippyAdagrad``'s delayed accumulator update (its default
  ``use_standard_accumulator_update=False``: the preconditioner uses the
  accumulator before this step's gradient) is an optimizer choice, not the
  clip's; ``optax.adagrad`` is the standard update (``True``), which the
  parity test uses (``tests/test_clippy.py``).

  Args:
    relative: the bound's factor on ``|w|``, >= 0 and finite (the paper's
      ``lambda_rel``). May be changed at run time inside ``optax.inject_hyperparams``.
    absolute: the bound's constant, > 0 and finite (the paper's ``lambda_abs``).
    stacked: for scanned models, which axes of a leaf index layers (an int:
      that many leading axes; a tuple of positions; or a function ``(path,
      leaf) -> int | tuple``, as for :func:`clipx.clip_by_layer_norm`); each
      layer then gets its own factor, as its unstacked twin would.
    axis_name: inside ``shard_map``/``pmap``, the mapped axis the leaves are
      split over: each tensor's factor is then over all shards (``pmax`` of
      two small vectors).

  Returns:
    An ``optax.GradientTransformation`` whose ``update`` needs ``params``; its
    state is :class:`ClippyState`, reported by ``clipx.stats`` under
    ``clip/clippy/...`` per tensor.

  References:
    Tang et al., `Improving Training Stability for Multitask Ranking Models in
    Recommender Systems <https://arxiv.org/abs/2302.09178>`_, KDD 2023
    (section 4, Clippy). The authors' code, as ported to Keras 3:
    `keras-team/keras-rs <https://github.com/keras-team/keras-rs>`_, pull
    request 25, file ``keras_rs/src/optimizers/clippy_adagrad.py``
    (``shrink_by_references`` L9-59, ``ClippyAdagrad.update_step`` L184-239),
    commit ``ffd76464f90907a4641abe83ed87572fe9d68c7d``; originally
    TensorFlow Recommenders' ``experimental/optimizers/clippy_adagrad.py``.

  Example:
    >>> import jax.numpy as jnp, clipx
    >>> tx = clipx.clippy(relative=0.1, absolute=0.01)
    >>> params = {"w": jnp.array([1.0, 10.0])}
    >>> delta = {"w": jnp.array([0.22, 0.5])}  # bounds 0.11 and 1.01: entry 0 is 2x over
    >>> out, state = tx.update(delta, tx.init(params), params)
    >>> out["w"].round(4), float(state.stats.scale[0])
    (Array([0.11, 0.25], dtype=float32), 0.5)
  """
  owner = "clippy"
  validation.nonnegative(owner, "relative", relative, finite=True)
  validation.positive(owner, "absolute", absolute, finite=True)
  stacked_fn = stacking.as_stacked_fn(owner, stacked)

  def init_fn(params):
    groups = _leaf_groups(owner, params, stacked_fn)
    dtype = transforms._norm_dtype(params)
    return ClippyState(
      init_clip_stats((groups.num_groups,), dtype), stacking.GroupNames(tuple(groups.names))
    )

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError(
        f"clipx.{owner} bounds the update relative to the weights: call"
        " tx.update(updates, state, params) with params."
      )
    transforms.check_same_structure(updates, params, owner)
    leaves = norms.check_float_leaves(updates)
    weights = jax.tree_util.tree_leaves(params)
    groups = transforms._checked_groups(
      owner, _leaf_groups(owner, updates, stacked_fn), state.stats.norm.shape[0]
    )
    dtype = state.stats.norm.dtype
    magnitude = [jnp.abs(norms.widen(x, dtype)).astype(dtype) for x in leaves]
    # d: a power of two near each group's largest |delta|, so (|delta| / d) / b cannot overflow.
    peak = _per_group(magnitude, groups, jnp.max, dtype)
    if axis_name is not None:
      peak = jax.lax.pmax(peak, axis_name)
    divisor = norms.safe_divisor(peak)
    rel, ab = jnp.asarray(relative, dtype), jnp.asarray(absolute, dtype)
    ratios = [
      m / d / (rel * jnp.abs(jnp.asarray(w).astype(dtype)) + ab)
      for m, d, w in zip(magnitude, _expand(divisor, groups, leaves), weights)
    ]
    root = _per_group(ratios, groups, jnp.max, dtype)
    if axis_name is not None:
      root = jax.lax.pmax(root, axis_name)
    one = jnp.ones_like(root)
    # A group with NaN/Inf: root is not finite, so decide leaves it unclipped.
    decision = scaling.decide(divisor, root, one)
    out = transforms._scale_groups(
      leaves, groups, jnp.any(decision.clipped), decision.hi, decision.lo
    )
    stats = transforms._decision_stats(decision, one, state.stats)
    treedef = jax.tree_util.tree_structure(updates)
    return jax.tree_util.tree_unflatten(treedef, out), ClippyState(stats, state.names)

  return optax.GradientTransformation(init_fn, update_fn)
