"""QK-Clip (MuonClip, Kimi K2): rescales the query and key weights of heads whose logits grew.

After each update, every attention head ``h`` whose largest pre-softmax logit
in the batch, ``S_h``, exceeds ``tau`` has its query and key weights multiplied
by ``sqrt(gamma_h)``, ``gamma_h = tau / S_h``: logits are bilinear in the two,
so that head's logits shrink by ``gamma_h`` and its largest lands on ``tau``.
The weights, not the gradient, are clipped: this is a response to the forward
pass, acting on parameters after the optimizer's step.

How it fits Optax: the transform goes last in the chain (after the learning
rate) and receives the logits as a keyword argument of ``update``
(``optax.GradientTransformationExtraArgs``, Optax's way of feeding a step's
extra information): ``tx.update(grads, state, params, attention_logits=s)``.
It sees ``params`` and the update ``u`` and returns ``u' = u * f + p * (f - 1)``
on the query and key leaves, so that ``optax.apply_updates`` gives ``p + u' =
(p + u) * f``: the new weights times the factor, to float32 rounding (``p * (f
- 1)`` and two additions, a few ulp of ``max(|p|, |p + u|)``; where ``f = 1``
the update is returned unchanged, bit for bit).

Which leaves are queries and keys is a function of the path (as ``group=``
takes for per-layer clipping); where the heads sit in a leaf is ``head_axis``
(heads x head_dim, head-major, as ``y.reshape(..., heads, head_dim)`` splits a
projection's output). Stacked (scanned) layers are read with ``stacked=``, as
every clipx scope reads them, so the logits carry one value per layer and head.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from clipx import norms, stacking, validation
from clipx.stats import ClipStats, init_clip_stats
from clipx.transforms import _stats

PathPredicate = Callable[[tuple], bool]


class QKClipState(NamedTuple):
  """State of :func:`qk_clip`: one statistic per layer and query head.

  ``stats.norm`` is the largest logit ``S`` of the latest step, ``threshold``
  ``tau``, ``scale`` the head's ``gamma`` (1 where not clipped),
  ``clipped_norm`` the largest logit the rescaled weights would give (``gamma
  * S``), ``clipped`` whether the head was rescaled, ``clip_count`` the steps
  it was, per head.
  """

  stats: ClipStats


QKClipState.clipx_kind = "qk_clip"  # type: ignore[attr-defined]


class _Role(NamedTuple):
  """A query or key leaf: its layer axes, head axis and head count."""

  query: bool
  layer_axes: tuple[int, ...]
  head_axis: int
  heads: int


def _roles(owner: str, tree: Any, query, key, head_axis, heads, kv_heads, stacked_fn) -> list:
  """Each leaf's :class:`_Role`, or None for leaves that are neither query nor key."""
  roles: list[_Role | None] = []
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    path = stacking.strip_variable_suffix(path)
    is_query, is_key = bool(query(path)), bool(key(path))
    if not (is_query or is_key):
      roles.append(None)
      continue
    where = stacking.path_name(path)
    if is_query and is_key:
      raise ValueError(f"clipx.{owner}: the leaf at {where} is both a query and a key.")
    axes = stacking.leaf_layer_axes(owner, stacked_fn, path, leaf)
    ndim = np.ndim(leaf)
    (axis,) = validation.axes_of(owner, "head_axis", (head_axis,), ndim, where)
    if axis in axes:
      raise ValueError(f"clipx.{owner}: head_axis {head_axis} is a layer axis of {where}.")
    count = heads if is_query else kv_heads
    if np.shape(leaf)[axis] % count:
      raise ValueError(
        f"clipx.{owner}: axis {axis} of the leaf at {where}, of size {np.shape(leaf)[axis]},"
        f" does not split into {count} heads."
      )
    roles.append(_Role(is_query, axes, axis, count))
  return roles


def _layer_shape(owner: str, tree: Any, roles: list) -> tuple[int, ...]:
  """The layer shape shared by every query and key leaf."""
  shapes = {
    tuple(np.shape(leaf)[a] for a in role.layer_axes)
    for leaf, role in zip(jax.tree_util.tree_leaves(tree), roles)
    if role is not None
  }
  kinds = {role.query for role in roles if role is not None}
  if kinds != {True, False}:
    missing = "query" if True not in kinds else "key"
    raise ValueError(f"clipx.{owner}: no leaf is a {missing}: check the {missing}= function.")
  if len(shapes) != 1:
    raise ValueError(
      f"clipx.{owner}: the query and key leaves have different layer shapes {shapes}."
    )
  return shapes.pop()


def _scale_leaf(update: jax.Array, param: jax.Array, factor: jax.Array, role: _Role) -> jax.Array:
  """``u * f + p * (f - 1)`` with ``f`` (layers..., heads) broadcast over each head's slice."""
  shape = np.shape(update)
  size = shape[role.head_axis]
  split = (*shape[: role.head_axis], role.heads, size // role.heads, *shape[role.head_axis + 1 :])
  # Positions in the split leaf: layer axes after the head axis move one on.
  layer_positions = [a if a < role.head_axis else a + 1 for a in role.layer_axes]
  positions = [*layer_positions, role.head_axis]
  order = [int(i) for i in np.argsort(positions)]
  broadcast = [1] * len(split)
  for position in positions:
    broadcast[position] = split[position]
  dtype = jnp.promote_types(update.dtype, jnp.float32)
  f = jnp.transpose(factor, order).reshape(broadcast).astype(dtype)
  u = update.reshape(split).astype(dtype)
  p = param.reshape(split).astype(dtype)
  return (u * f + p * (f - 1)).astype(update.dtype).reshape(shape)


def _static_int(owner: str, name: str, value: Any, minimum: int) -> int:
  """A count or axis that fixes shapes: a Python int, never a traced value."""
  if isinstance(value, jax.core.Tracer):
    raise TypeError(
      f"clipx.{owner}: {name} is traced (a {value.dtype} array under jit): it fixes shapes, so"
      " it cannot be a run-time value. optax.inject_hyperparams makes every number one: pass"
      f' it static_args=("{name}",).'
    )
  validation.integer(owner, name, value, minimum)
  return int(value)


def qk_clip(
  threshold: chex.Numeric = 100.0,
  *,
  query: PathPredicate,
  key: PathPredicate,
  heads: int,
  kv_heads: int | None = None,
  head_axis: int = -1,
  stacked: stacking.Stacked = None,
  logits_name: str = "attention_logits",
  axis_name: Any = None,
) -> optax.GradientTransformationExtraArgs:
  """QK-Clip: query and key weights of each head whose logits exceed ``threshold``, rescaled.

  ``gamma_h = min(1, tau / S_h)``, ``S_h`` the largest pre-softmax logit of
  head ``h`` in the batch (passed to ``update`` as ``attention_logits``, of
  shape ``(*layers, heads)``); the new query and key weights of head ``h`` are
  multiplied by ``sqrt(gamma_h)`` each. Put it last in the chain, after the
  learning rate: ``optax.chain(optax.adamw(lr), clipx.qk_clip(...))``.

  Grouped-query attention (``kv_heads < heads``): a key head is shared by
  ``heads // kv_heads`` consecutive query heads, so it is left alone and each
  query head takes its whole ``gamma_h``, as the report treats MLA's shared
  rotary key ``k_R`` (only the query side ``q_R`` is scaled, by ``gamma_h``):
  each head's logits still shrink by exactly ``gamma_h``, and no head's logits
  change because another head spiked.

  Args:
    threshold: ``tau``, > 0 (the report's 100 for Kimi K2). May be changed at
      run time inside ``optax.inject_hyperparams``, whose ``static_args`` must
      then name ``query``, ``key`` (it calls functions as schedules), ``heads``
      and ``head_axis`` (and ``kv_heads`` where given: they fix shapes).
    query: ``path -> bool``, whether a leaf (by its key path, as
      :func:`clipx.clip_by_layer_norm`'s ``group=`` takes it) is a query weight.
    key: ``path -> bool``, whether it is a key weight.
    heads: the number of query heads (the logits' last axis).
    kv_heads: the number of key heads (None: ``heads``); must divide ``heads``.
    head_axis: the axis of a query or key leaf that holds its heads, head-major
      (``heads * head_dim`` entries, or ``heads`` with the head dimension on
      another axis). -1 for a Dense kernel ``[in, heads * head_dim]``; -2 for
      a DenseGeneral kernel ``[in, heads, head_dim]``.
    stacked: for scanned models, which axes of a leaf index layers (an int, a
      tuple of positions, or a function ``(path, leaf) -> int | tuple``, as for
      :func:`clipx.clip_by_layer_norm`); the logits then have these layer
      sizes first, in the order of the axes.
    logits_name: the keyword ``update`` takes the logits by; a second
      ``qk_clip`` in one chain (a decoder's cross-attention) takes its own.
    axis_name: inside ``shard_map``/``pmap`` over the batch, the axis it is
      split over: ``S`` is then the largest over all shards (one ``pmax``).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is
    :class:`QKClipState`; ``clipx.stats`` reports it under ``clip/qk_clip/...``.

  References:
    Kimi Team, `Kimi K2: Open Agentic Intelligence
    <https://arxiv.org/abs/2507.20534>`_, 2025, Section 2.1 (QK-Clip) and
    Algorithm 1 (MuonClip). Optax's draft ``optax/contrib/_muon.py`` (PR 1383)
    was not available to compare against; the tests check the report's
    formula against numpy.

  Deviations from the report: a head whose ``S`` is NaN or Inf is left alone
  (``tau / inf`` would zero its weights; a NaN or Inf forward pass is for
  :func:`clipx.skip_nonfinite`); the report clips only heads of the ``Muon``-
  updated weights, here it is independent of the optimizer.

  Example:
    >>> import jax, jax.numpy as jnp, optax, clipx
    >>> tx = optax.chain(optax.sgd(0.0), clipx.qk_clip(
    ...   4.0, query=lambda path: path[-1].key == "q", key=lambda path: path[-1].key == "k",
    ...   heads=2))
    >>> params = {"q": jnp.ones((3, 4)), "k": jnp.ones((3, 4)), "v": jnp.ones((3, 4))}
    >>> state = tx.init(params)
    >>> grads = jax.tree.map(jnp.zeros_like, params)
    >>> updates, state = tx.update(grads, state, params, attention_logits=jnp.array([16.0, 1.0]))
    >>> new_q = optax.apply_updates(params, updates)["q"]
    >>> print(*new_q[0].tolist())  # head 0 scaled by sqrt(4 / 16)
    0.5 0.5 1.0 1.0
  """
  owner = "qk_clip"
  validation.positive(owner, "threshold", threshold, finite=True)
  for name, fn in (("query", query), ("key", key)):
    if not callable(fn):
      raise TypeError(f"clipx.{owner}: {name} must be a function of a leaf's path, got {fn!r}.")
  heads = _static_int(owner, "heads", heads, 1)
  kv = heads if kv_heads is None else _static_int(owner, "kv_heads", kv_heads, 1)
  if heads % kv:
    raise ValueError(f"clipx.{owner}: kv_heads ({kv}) must divide heads ({heads}).")
  head_axis = _static_int(owner, "head_axis", head_axis, -(2**31))
  if not isinstance(logits_name, str) or not logits_name.isidentifier():
    raise TypeError(f"clipx.{owner}: logits_name must be a keyword name, got {logits_name!r}.")
  stacked_fn = stacking.as_stacked_fn(owner, stacked)

  def roles_of(tree):
    return _roles(owner, tree, query, key, head_axis, heads, kv, stacked_fn)

  def init_fn(params):
    layers = _layer_shape(owner, params, roles_of(params))
    return QKClipState(init_clip_stats((*layers, heads), jnp.float32))

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError(f"clipx.{owner}: needs params in update(updates, state, params, ...).")
    if extra_args.get(logits_name) is None:
      raise ValueError(
        f"clipx.{owner}: needs the largest attention logits per layer and head:"
        f" update(updates, state, params, {logits_name}=...)."
      )
    norms.check_float_leaves(updates)
    roles = roles_of(updates)
    shape = state.stats.norm.shape
    logits = jnp.asarray(extra_args[logits_name], jnp.float32)
    if logits.shape != shape:
      raise ValueError(
        f"clipx.{owner}: {logits_name} has shape {logits.shape}; expected {shape}"
        " (the layer sizes of the query and key leaves, then the query heads)."
      )
    if axis_name is not None:
      logits = jax.lax.pmax(logits, axis_name)
    tau = jnp.asarray(threshold, jnp.float32)
    over = jnp.isfinite(logits) & (logits > tau)
    gamma = jnp.where(over, tau / jnp.where(over, logits, 1), 1)
    root = jnp.sqrt(gamma)
    group = heads // kv
    if group == 1:
      query_factor, key_factor = root, root
    else:
      query_factor, key_factor = gamma, jnp.ones((*shape[:-1], kv), jnp.float32)
    treedef = jax.tree.structure(updates)
    leaves, param_leaves = jax.tree.leaves(updates), jax.tree.leaves(params)
    out = [
      u if role is None else _scale_leaf(u, p, query_factor if role.query else key_factor, role)
      for u, p, role in zip(leaves, param_leaves, roles)
    ]
    stats = _stats(
      logits,
      jnp.where(over, tau, logits),
      jnp.broadcast_to(tau, shape),
      gamma,
      over,
      state.stats,
    )
    return jax.tree_util.tree_unflatten(treedef, out), QKClipState(stats)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
