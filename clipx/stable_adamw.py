"""StableAdamW's update clipping: a wrapper that reads Adam's second moment.

Per tensor, ``RMS = sqrt(mean(g**2 / max(v_hat, eps**2)))`` compares this
step's squared gradient with Adam's estimate of it; above 1, the second
moment lags a sudden rise of the gradient, and Adam's update ``m / sqrt(v)``
is larger than its scale-free unit. StableAdamW then divides the tensor's
learning rate (and with it the decoupled weight decay) by ``max(1, RMS)``.

Why a wrapper and not a transform in the chain: the factor needs the raw
gradient ``g`` and Adam's ``v_hat`` together, and neither reaches a transform
placed after ``optax.scale_by_adam`` (it sees only ``m_hat / (sqrt(v_hat) +
eps)``). So :func:`stable_adamw_clip` runs the inner optimizer, reads ``nu``
and ``count`` from its ``optax.ScaleByAdamState`` (no second copy of ``v``),
and scales the inner optimizer's whole output update, learning rate and weight
decay included, per tensor. The per-tensor sums are clipx's float32,
overflow-safe group norms (:mod:`clipx.norms`), applied as exact factors
(:mod:`clipx.scaling`), with ``stacked=`` for scanned layers.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from clipx import norms, scaling, stacking, transforms, validation
from clipx.stats import ClipStats, init_clip_stats


class StableAdamWClipState(NamedTuple):
  """State of :func:`stable_adamw_clip`.

  Attributes:
    stats: one entry per group (tensor, or layer of a stack): ``norm`` is the
      RMS ratio, ``threshold`` ``max_rms``, ``scale`` the factor the update
      was multiplied by, ``clipped_norm`` the RMS after (``min(RMS, max_rms)``).
    inner_state: the wrapped optimizer's state.
    names: the groups' names (static), for :func:`clipx.stats`.
  """

  stats: ClipStats
  inner_state: Any
  names: stacking.GroupNames = stacking.GroupNames()


StableAdamWClipState.clipx_kind = "update_rms"  # type: ignore[attr-defined]


def _adam_state(owner: str, inner_state: Any) -> optax.ScaleByAdamState:
  """The one ``optax.ScaleByAdamState`` in ``inner_state``; ValueError for none or several."""
  found = [
    node
    for node in jax.tree_util.tree_leaves(
      inner_state, is_leaf=lambda n: isinstance(n, optax.ScaleByAdamState)
    )
    if isinstance(node, optax.ScaleByAdamState)
  ]
  if len(found) != 1:
    raise ValueError(
      f"clipx.{owner}: inner must hold exactly one Adam second moment"
      " (optax.ScaleByAdamState, as optax.adam, optax.adamw, optax.scale_by_adam have);"
      f" its state holds {len(found)}."
    )
  return found[0]


def stable_adamw_clip(
  inner: optax.GradientTransformation,
  *,
  b2: chex.Numeric,
  eps: chex.Numeric = 1e-6,
  max_rms: chex.Numeric = 1.0,
  stacked: stacking.Stacked = None,
  axis_name: Any = None,
) -> optax.GradientTransformation:
  """StableAdamW's update clipping: each tensor's step divided by ``max(1, RMS / max_rms)``.

  Wraps an Adam-type optimizer (``optax.adamw``, ``optax.adam``, or a chain
  holding ``optax.scale_by_adam``). Each step the inner optimizer runs on the
  gradients ``g``; then, per tensor, with ``v_hat = nu / (1 - b2**t)`` its
  bias-corrected second moment *after* this step,
  ``RMS = sqrt(mean(g**2 / max(v_hat, eps**2)))``, and the inner update is
  multiplied by ``1 / max(1, RMS / max_rms)``. With ``optax.adamw`` that is
  StableAdamW: the learning rate of the Adam step and of the decoupled weight
  decay, divided by ``max(1, RMS)``::

    clipx.stable_adamw_clip(optax.adamw(lr, b1=0.9, b2=0.99, eps=1e-6, weight_decay=wd), b2=0.99)

  ``RMS`` is about 1 in steady state (``v_hat`` estimates ``E[g**2]``) and
  rises above it when the gradient jumps before ``v`` has caught up: the
  case in which Adam's update is too large (the "stuck-in-the-past"
  second moment Wortsman et al. trace loss spikes to). Because
  ``v_t >= (1 - b2) g_t**2``, ``RMS`` is at most ``1 / sqrt(1 - b2)`` (10 for
  ``b2 = 0.99``), so the factor is never below ``sqrt(1 - b2)`` times
  ``max_rms``.

  Why a wrapper: see the module doc; the inner state is kept whole, so
  ``clipx.stats`` also finds clipx transforms inside ``inner``.

  Args:
    inner: the wrapped optimizer; its state must hold exactly one
      ``optax.ScaleByAdamState`` whose ``nu`` matches the gradients (checked
      at ``init``).
    b2: the inner Adam's ``b2`` (the state does not record it; the bias
      correction needs it). Required: a mismatch would skew early steps.
    eps: the floor of ``v_hat`` is ``eps**2``, >= 0 (StableAdamW's ``eps``,
      which it also adds to Adam's denominator: pass the same to ``inner``).
    max_rms: the ratio tolerated before the step is cut, > 0 (StableAdamW: 1).
      May be changed at run time inside ``optax.inject_hyperparams``.
    stacked: for scanned models, which axes of a leaf index layers (as for
      :func:`clipx.clip_by_layer_norm`); each layer then gets its own factor.
    axis_name: inside ``shard_map``/``pmap``, the mapped axis the leaves are
      split over: each tensor's mean is then over all shards (one ``psum``
      of the vector of sums and one of the sizes).

  Returns:
    An ``optax.GradientTransformation`` whose state is
    :class:`StableAdamWClipState`; ``clipx.stats`` reports it under
    ``clip/update_rms/...``, per tensor.

  References:
    Wortsman et al., `Stable and low-precision training for large-scale
    vision-language models <https://arxiv.org/abs/2304.13013>`_, NeurIPS 2023
    (section 3.5, algorithm 2: StableAdamW). Reference implementation it
    matches: ``optimi`` (torch-optimi 0.3.3 on PyPI, `warner-benjamin/optimi
    <https://github.com/warner-benjamin/optimi>`_), ``optimi/stableadamw.py``,
    ``_single_param_stableadamw`` (``rms = grad.pow(2).div_(exp_avg_sq.maximum(eps_sq))
    .mean().sqrt()``; ``lr = lr / max(1, rms.item())``), which ``tests/test_stable_adamw.py``
    runs.
    Its defaults are StableAdamW's ``betas=(0.9, 0.99)``, ``eps=1e-6``,
    ``weight_decay=1e-2``; optax.adamw's are ``b2=0.999``, ``eps=1e-8``,
    ``weight_decay=1e-4``: pass StableAdamW's to ``inner`` to get it. The
    paper's algorithm 2 bias-corrects ``v`` as optax does; optimi's debiased
    betas give the same ``v_hat`` to rounding.

  Example:
    >>> import jax.numpy as jnp, optax, clipx
    >>> tx = clipx.stable_adamw_clip(optax.adam(0.1, b2=0.99), b2=0.99)
    >>> params = {"w": jnp.zeros(4)}
    >>> state = tx.init(params)
    >>> for g in [0.01, 0.01, 1.0]:  # a 100x jump: v lags, RMS = 1 / sqrt(v_hat / g**2)
    ...   updates, state = tx.update({"w": jnp.full(4, g)}, state, params)
    >>> round(float(state.stats.norm[0]), 3), bool(state.stats.clipped[0])
    (1.723, True)
  """
  owner = "stable_adamw_clip"
  validation.transformation(owner, "inner", inner)
  validation.number(owner, "b2", b2, low=0.0, low_open=False, high=1.0, high_open=True)
  validation.nonnegative(owner, "eps", eps, finite=True)
  validation.positive(owner, "max_rms", max_rms)
  stacked_fn = stacking.as_stacked_fn(owner, stacked)

  def groups_of(tree):
    return stacking.layer_groups(owner, tree, lambda path: path, stacked_fn)

  def init_fn(params):
    inner_state = inner.init(params)
    adam = _adam_state(owner, inner_state)
    transforms.check_same_structure(params, adam.nu, owner)
    groups = groups_of(params)
    dtype = transforms._norm_dtype(params)
    return StableAdamWClipState(
      init_clip_stats((groups.num_groups,), dtype),
      inner_state,
      stacking.GroupNames(tuple(groups.names)),
    )

  def update_fn(updates, state, params=None):
    grads = norms.check_float_leaves(updates)
    groups = transforms._checked_groups(owner, groups_of(updates), state.stats.norm.shape[0])
    new_updates, inner_state = inner.update(updates, state.inner_state, params)
    adam = _adam_state(owner, inner_state)
    dtype = state.stats.norm.dtype
    beta = jnp.asarray(b2, dtype)
    correction = 1 - beta ** adam.count.astype(dtype)
    floor = jnp.square(jnp.asarray(eps, dtype))
    # g / sqrt(max(v_hat, eps**2)): its group norms are sqrt(n) * RMS.
    ratios = [
      norms.widen(g, dtype).astype(dtype)
      * jax.lax.rsqrt(jnp.maximum(jnp.asarray(v).astype(dtype) / correction, floor))
      for g, v in zip(grads, jax.tree_util.tree_leaves(adam.nu))
    ]
    if grads:
      divisor, root = transforms._group_norms(ratios, groups, axis_name)
    else:
      divisor, root = jnp.ones((0,), dtype), jnp.zeros((0,), dtype)
    sizes = np.zeros(groups.num_groups, np.float64)
    for g, base, shape in zip(grads, groups.bases, groups.layer_shapes):
      layers = math.prod(shape)
      if layers:
        sizes[base : base + layers] += math.prod(g.shape) // layers
    count = jnp.asarray(sizes, dtype)
    if axis_name is not None:
      count = jax.lax.psum(count, axis_name)
    root_n = jnp.sqrt(jnp.maximum(count, 1))
    # RMS > max_rms is ||r|| > max_rms * sqrt(n); the factor is then max_rms / RMS.
    threshold = jnp.asarray(max_rms, dtype) * root_n
    decision = scaling.decide(divisor, root, threshold)
    out_leaves = jax.tree_util.tree_leaves(new_updates)
    scaled = transforms._scale_groups(
      out_leaves, groups, jnp.any(decision.clipped), decision.hi, decision.lo
    )
    stats = transforms._decision_stats(decision, threshold, state.stats)
    stats = stats._replace(
      norm=stats.norm / root_n,
      clipped_norm=stats.clipped_norm / root_n,
      threshold=stats.threshold / root_n,
    )
    treedef = jax.tree_util.tree_structure(new_updates)
    out = jax.tree_util.tree_unflatten(treedef, scaled)
    return out, StableAdamWClipState(stats, inner_state, state.names)

  return optax.GradientTransformation(init_fn, update_fn)
