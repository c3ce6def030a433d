"""Responses that rescale rather than cap: Stable-SPAM's AdaClip and AdaGN.

Every other clipx scope holds a norm *down* to a bound: ``min(1, bound / norm)``.
The transforms here change a gradient in other ways, per leaf (or per layer
of a stacked leaf):

- :func:`rescale_outliers` multiplies only the entries above a bound, all by
  one factor, so the largest lands on the bound and the rest keep their
  order (AdaClip); its threshold is any policy, fed each group's largest
  magnitude, such as :func:`ema_peak`;
- :func:`normalize_by_layer_norm` *sets* each group's L2 norm to a target
  formed from the history of its norms, up or down (AdaGN): normalisation,
  not clipping;
- :func:`stable_spam_clip` applies the two in one pass over the gradients,
  as Stable-SPAM's optimizer applies them before its Adam moments.

Numerics as elsewhere in clipx (see ``DESIGN.md``): statistics in float32 or
wider whatever the gradient dtype, the output in the input's dtype; a group
holding NaN/Inf is passed through unchanged (never turned into zeros) and not
recorded in any history; a NaN or negative run-time bound makes its group NaN;
an empty (zero-size) leaf passes through; complex entries are measured by
modulus (their peaks, outliers and norms).

Compile time (``benchmarks/rescaling_compile.py``): the leaves are grouped into
buckets as :mod:`clipx.norms` groups them (small leaves of one shape stacked,
each large leaf alone), so the reductions and the rescaling are a few ops per
bucket, not per leaf, and each leaf reads its part of its bucket's stack at a
runtime offset (:func:`_unstack`). Leaf by leaf, with each leaf's factors read
by a static slice, ``stable_spam_clip`` compiled 100 leaves in 9x a global
clip's time and 1000 not within 6.5 minutes (XLA CPU, jax 0.10.2); bucketed,
1000 leaves compile in 1.1-1.6x its time. The stacks of small leaves are copies
(0.4 MiB for a ResNet-50's).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from clipx import norms, scaling, stacking, validation
from clipx.stats import ClipStats, init_clip_stats
from clipx.thresholds import ThresholdPolicy, as_policy, concrete_float, policy_factory
from clipx.transforms import (
  Threshold,
  _checked_groups,
  _group_norms,
  _norm_dtype,
  _stats,
)


class OutlierRescaleState(NamedTuple):
  """State of :func:`rescale_outliers`; stats have one entry per group (leaf or layer).

  ``stats.norm`` is each group's largest magnitude, ``stats.threshold`` its
  bound, ``stats.scale`` the factor its outliers were multiplied by (1 where
  none), ``stats.clipped_norm`` the largest magnitude after. ``names`` holds
  the groups' names (static) for :func:`clipx.stats`.
  """

  stats: ClipStats
  threshold_state: Any
  names: stacking.GroupNames = stacking.GroupNames()


OutlierRescaleState.clipx_kind = "outliers"  # type: ignore[attr-defined]


class LayerNormalizeState(NamedTuple):
  """State of :func:`normalize_by_layer_norm`; one entry per group (leaf or layer).

  Attributes:
    stats: ``norm`` the L2 norm before, ``threshold`` the target norm,
      ``clipped_norm`` the norm after, ``scale`` the factor applied (may
      exceed 1), ``clipped`` whether the group was rescaled this step.
    count: norms recorded so far, per group (int32).
    mean: EMA of the norm (not bias-corrected).
    second: EMA of the squared norm (not bias-corrected).
    names: the groups' names (static), for :func:`clipx.stats`.
  """

  stats: ClipStats
  count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as Optax states do
  mean: jax.Array
  second: jax.Array
  names: stacking.GroupNames = stacking.GroupNames()


LayerNormalizeState.clipx_kind = "normalize"  # type: ignore[attr-defined]


class EmaPeakState(NamedTuple):
  """State of :func:`ema_peak`.

  Attributes:
    count: statistics recorded so far, per group (int32).
    ema: their exponential moving average (not bias-corrected).
  """

  count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as Optax states do
  ema: jax.Array


def _ema_coefficients(decay: Any, dtype) -> tuple[jax.Array, jax.Array]:
  """``(decay, 1 - decay)`` in ``dtype``; ``1 - decay`` in double first where ``decay`` is known.

  ``1 - float32(0.999)`` is ``0.000999987``, 1.3e-5 off ``0.001``: an EMA with
  those weights converges to the reference's, which forms ``1 - theta`` in
  Python, only to that relative error.
  """
  known = concrete_float(decay)
  beta = jnp.asarray(decay, dtype)
  rest = jnp.asarray(1.0 - known, dtype) if known is not None else 1 - beta
  return beta, rest


def _bias_correction(count: jax.Array, rest: jax.Array) -> jax.Array:
  """``1 - decay**count`` from ``rest = 1 - decay``, without cancellation for decay near 1.

  ``-expm1(count * log1p(-rest))``: float32 ``1 - 0.999**2`` computed directly
  is off by up to 3e-5 relative; this is off by a few ulp.
  """
  return -jnp.expm1(count.astype(rest.dtype) * jnp.log1p(-rest))


@policy_factory
def ema_peak(decay: chex.Numeric = 0.999) -> ThresholdPolicy:
  """AdaClip's bound: the bias-corrected EMA of the statistic, this step's included.

  Each step the statistic ``x`` (for :func:`rescale_outliers`, a group's
  largest magnitude) is recorded first, ``m <- decay * m + (1 - decay) * x``,
  and the bound is then ``m / (1 - decay**k)``, ``k`` the number of steps
  recorded: Adam's bias correction, so the first bound is ``x`` itself and
  later ones are a weighted mean of the past peaks. A statistic above the
  running mean is thus over its bound by the share of it the mean has not
  absorbed: with the default ``decay`` nearly every step whose peak exceeds
  the mean of past peaks has its top entries rescaled, not only spikes.

  Why this and not :func:`clipx.ema_ratio`: AdaClip's bound includes the
  current step and is bias-corrected, and its ratio is 1; every other clipx
  policy reads its history before recording.

  Args:
    decay: EMA decay, in (0, 1) (the paper's ``theta``, default 0.999). May be
      changed at run time inside ``optax.inject_hyperparams``.

  Returns:
    A :class:`ThresholdPolicy` whose state is :class:`EmaPeakState`; its
    threshold is ``inf`` until a statistic has been recorded.

  References:
    Huang et al., `Stable-SPAM: How to Train in 4-Bit More Stably than 16-Bit
    Adam <https://arxiv.org/abs/2502.17055>`_, 2025; repository
    ``TianjinYellow/StableSPAM``, ``galore_torch/stablespam.py`` L110-129, commit
    ``6a66da1ea7005f7fe7bc570b7968144b42163bed``.

  Deviations from the reference: a non-finite or zero statistic is not
  recorded (clipx's rule for every policy; the reference records it, so one
  Inf gradient makes its bound Inf for good, and a zero gradient counts as a
  step); and the count is never reset (the reference resets it, not the EMA,
  at each of its momentum resets, which inflates the bound ~1/(1-decay)-fold
  for a while).

  Example:
    >>> import jax.numpy as jnp, clipx.rescaling as rescaling
    >>> policy = rescaling.ema_peak(decay=0.5)
    >>> state = policy.init(jnp.zeros(()))
    >>> bound, state = policy.update(jnp.float32(2.0), state)
    >>> float(bound)  # the first bound is the statistic itself
    2.0
    >>> bound, state = policy.update(jnp.float32(8.0), state)
    >>> float(bound)  # (0.5 * 0.5 * 2 + 0.5 * 8) / (1 - 0.25)
    6.0
  """
  validation.number("ema_peak", "decay", decay, low=0.0, high=1.0, high_open=True)

  def init(norm):
    dtype = jnp.promote_types(jnp.result_type(norm), jnp.float32)
    return EmaPeakState(
      count=jnp.zeros(jnp.shape(norm), jnp.int32), ema=jnp.zeros(jnp.shape(norm), dtype)
    )

  def update(norm, state):
    dtype = state.ema.dtype
    x = jnp.asarray(norm, dtype)
    beta, rest = _ema_coefficients(decay, dtype)
    new_ema = beta * state.ema + rest * x
    record = jnp.isfinite(x) & (x != 0) & jnp.isfinite(new_ema)
    ema = jnp.where(record, new_ema, state.ema)
    count = jnp.where(record, optax.safe_increment(state.count), state.count)
    correction = _bias_correction(count, rest)
    bound = jnp.where(count > 0, ema / jnp.where(count > 0, correction, 1), jnp.inf)
    return jnp.broadcast_to(bound, jnp.shape(norm)).astype(dtype), EmaPeakState(count, ema)

  return ThresholdPolicy(init, update)


def _leaf_groups(owner: str, tree: Any, stacked_fn: stacking.StackedFn) -> stacking.LayerGroups:
  return stacking.layer_groups(owner, tree, lambda path: path, stacked_fn)


class _Bucket(NamedTuple):
  """Leaves reduced and rescaled as one stacked array: small leaves of one shape,
  dtype and layer layout together, each large leaf alone (:func:`clipx.norms._buckets`).

  Attributes:
    leaves: the leaves' indices.
    groups: their groups (static), leaf after leaf, each leaf's layers in order.
    factor_shape: the shape that a bucket's entries of a per-group vector take to
      broadcast against the stack: ``(k, ...)``, the layer sizes at the layer axes.
    within: the stack's axes that one group reduces over.
  """

  leaves: tuple[int, ...]
  groups: np.ndarray
  factor_shape: tuple[int, ...]
  within: tuple[int, ...]


def _plan(leaves: list[jax.Array], groups: stacking.LayerGroups) -> list[_Bucket]:
  """The buckets of ``leaves``; every group belongs to one bucket."""
  plan = []
  for bucket in norms._buckets(leaves, groups.axes):
    first = bucket[0]
    ndim, axes, shape = leaves[first].ndim, groups.axes[first], groups.layer_shapes[first]
    size = math.prod(shape)
    ids = [groups.bases[i] + np.arange(size, dtype=np.int32) for i in bucket]
    plan.append(
      _Bucket(
        tuple(bucket),
        np.concatenate(ids),
        (len(bucket), *stacking.scale_shape(ndim, axes, shape)),
        tuple(1 + a for a in stacking.within_layer_axes(ndim, axes)),
      )
    )
  return plan


def _stack(leaves: list[jax.Array], bucket: _Bucket) -> jax.Array:
  return norms.stack_bucket(leaves, list(bucket.leaves))


def _per_bucket(vector: jax.Array, bucket: _Bucket) -> jax.Array:
  """A bucket's entries of a per-group vector, shaped to broadcast against its stack."""
  ids = bucket.groups
  if ids.size and np.array_equal(ids, np.arange(ids[0], ids[0] + ids.size)):
    picked = vector[int(ids[0]) : int(ids[0]) + ids.size]
  else:
    picked = vector[ids]
  return picked.reshape(bucket.factor_shape)


def _group_vector(rows: list[jax.Array], plan: list[_Bucket], dtype) -> jax.Array:
  """Per-bucket results (each in its bucket's group order) as one vector in group order."""
  if not rows:
    return jnp.zeros((0,), dtype)
  values = jnp.concatenate([row.reshape(-1) for row in rows])
  order = np.concatenate([bucket.groups for bucket in plan])
  if np.array_equal(order, np.arange(order.size)):
    return values
  return values[np.argsort(order)]


def _unstack(
  stacks: list[jax.Array], plan: list[_Bucket], leaves: list[jax.Array], active: jax.Array
) -> list[jax.Array]:
  """Each leaf's part of its bucket's stack, in leaf order, for the optimizer to read.

  A leaf is read from its stack at a runtime offset, so the kernels of
  same-shape leaves stay identical (``clipx/scaling.py``: a static slice per
  leaf made a distinct kernel of each). The offsets are the outputs of one
  ``lax.cond`` (on ``active``, whether anything is rescaled; both branches
  agree), which XLA does not fold into constants.
  """
  out: list[Any] = [None] * len(leaves)
  shared = [(stack, bucket) for stack, bucket in zip(stacks, plan) if len(bucket.leaves) > 1]
  for stack, bucket in zip(stacks, plan):
    if len(bucket.leaves) == 1:
      index = bucket.leaves[0]
      out[index] = jax.lax.reshape(stack, leaves[index].shape)
  if shared:
    constants = [np.int32(row) for _, bucket in shared for row in range(len(bucket.leaves))]
    offsets = iter(jax.lax.cond(active, lambda: constants, lambda: constants))
    zero = np.int32(0)
    for stack, bucket in shared:
      shape = leaves[bucket.leaves[0]].shape
      for index in bucket.leaves:
        part = jax.lax.dynamic_slice(
          stack,
          [next(offsets)] + [zero] * len(shape),
          (1, *shape),
          allow_negative_indices=False,
        )
        out[index] = jax.lax.reshape(part, shape)
  return out


def _magnitude(x: jax.Array, dtype) -> jax.Array:
  """``|x|`` in ``dtype`` (a complex entry's modulus), widened for a reduction."""
  return jnp.abs(norms.widen(x, dtype)).astype(dtype)


def _group_peaks(leaves: list[jax.Array], plan: list[_Bucket], dtype, axis_name: Any) -> jax.Array:
  """Each group's largest magnitude (a leaf, or a layer of a stacked leaf), over all shards."""
  rows = [
    jnp.max(_magnitude(_stack(leaves, bucket), dtype), axis=bucket.within, initial=0.0)
    for bucket in plan
  ]
  peak = _group_vector(rows, plan, dtype)
  if axis_name is not None:
    peak = jax.lax.pmax(peak, axis_name)
  return peak


class _Outliers(NamedTuple):
  """AdaClip's decision per group: which groups have outliers, and how they are rescaled.

  An entry ``x`` with ``|x| > cut`` becomes ``x * inverse / scaled_peak * target``:
  ``x / M * b`` with ``M`` and ``x`` divided first by the power of two
  ``1 / inverse`` (:func:`clipx.norms.safe_divisor`). XLA CPU computes
  ``x / M`` as ``x * (1 / M)``, and ``1 / M`` is subnormal, so flushed to
  zero, for ``M`` above ~8.5e37: ``[1e38, 0.5, -5e37]`` came back as
  ``[0, 0.5, -0]``. ``M * inverse`` is in [128, 256), whose reciprocal is
  normal; the scaling is exact, so ordinary inputs give the same bits as
  ``x / M * b``.
  """

  peak: jax.Array
  bound: jax.Array
  over: jax.Array  # a finite peak above the bound
  invalid: jax.Array  # a NaN or negative bound
  factor: jax.Array  # bound / peak where over, 1 elsewhere, NaN where invalid (for stats)
  clipped_peak: jax.Array  # the largest magnitude after
  cut: jax.Array  # the bound where over; inf elsewhere (nothing), -inf where invalid (all)
  inverse: jax.Array  # 1 / safe_divisor(peak) where over, else 1
  scaled_peak: jax.Array  # peak * inverse where over, else 1
  target: jax.Array  # the bound where over, NaN where invalid, else 1


def _outlier_decision(peak: jax.Array, bound: jax.Array) -> _Outliers:
  invalid = ~(bound >= 0)  # NaN or negative
  over = jnp.isfinite(peak) & (peak > bound)
  nan = jnp.full_like(peak, jnp.nan)
  inf = jnp.full_like(peak, jnp.inf)
  # Divide first: |g| / M <= 1, so g / M * b never overflows, and M lands on b.
  safe_peak = jnp.where(over, peak, 1)
  inverse = 1 / norms.safe_divisor(safe_peak)  # exact: a power of two, normal
  factor = jnp.where(invalid, nan, jnp.where(over, bound / safe_peak, 1))
  clipped_peak = jnp.where(invalid, nan, jnp.where(over, bound, peak))
  cut = jnp.where(invalid, -inf, jnp.where(over, bound, inf))
  target = jnp.where(invalid, nan, jnp.where(over, bound, 1))
  return _Outliers(
    peak, bound, over, invalid, factor, clipped_peak, cut, inverse, safe_peak * inverse, target
  )


def _find_outliers(
  owner: str,
  updates: Any,
  state: OutlierRescaleState,
  policy: ThresholdPolicy,
  stacked_fn: stacking.StackedFn,
  axis_name: Any,
) -> tuple[list[jax.Array], list[_Bucket], _Outliers, Any]:
  """AdaClip's first half: the leaves, their buckets, each group's peak and bound."""
  leaves = norms.check_float_leaves(updates)
  groups = _leaf_groups(owner, updates, stacked_fn)
  _checked_groups(owner, groups, state.stats.norm.shape[0])
  dtype = state.stats.norm.dtype
  plan = _plan(leaves, groups)
  peak = _group_peaks(leaves, plan, dtype, axis_name)
  bound, threshold_state = policy.update(peak, state.threshold_state)
  return leaves, plan, _outlier_decision(peak, bound.astype(dtype)), threshold_state


def _rescale_stack(xs: jax.Array, outliers: _Outliers, bucket: _Bucket, dtype) -> jax.Array:
  """A bucket's stack with each entry above its group's bound times ``bound / peak``.

  In the wider of the leaves' dtype and ``dtype``; the caller casts back.
  """
  wide = jnp.promote_types(xs.dtype, dtype)
  xw = xs.astype(wide)
  cut, inverse, scaled_peak, target = (
    _per_bucket(v, bucket).astype(jnp.finfo(wide).dtype)
    for v in (outliers.cut, outliers.inverse, outliers.scaled_peak, outliers.target)
  )
  if jnp.iscomplexobj(xw):
    hit = jnp.abs(xw) > cut  # by modulus, as the peak is taken
  else:
    # Two compares, not abs(x) > b: XLA merges that abs with the peak's, and a
    # shared abs(x) is materialized for its two readers (a gradient-sized temporary).
    hit = (xw > cut) | (xw < -cut)
  return jnp.where(hit, xw * inverse / scaled_peak * target, xw)


def _outlier_stats(outliers: _Outliers, previous: ClipStats) -> ClipStats:
  clipped = outliers.over | outliers.invalid
  return _stats(
    outliers.peak, outliers.clipped_peak, outliers.bound, outliers.factor, clipped, previous
  )


def _outlier_rescale_init(
  owner: str, params: Any, policy: ThresholdPolicy, stacked_fn: stacking.StackedFn
) -> OutlierRescaleState:
  """``rescale_outliers``' initial state; ``owner`` is the function errors name."""
  groups = _leaf_groups(owner, params, stacked_fn)
  dtype = _norm_dtype(params)
  shape = (groups.num_groups,)
  return OutlierRescaleState(
    init_clip_stats(shape, dtype),
    policy.init(jnp.zeros(shape, dtype)),
    stacking.GroupNames(tuple(groups.names)),
  )


def _layer_normalize_init(
  owner: str, params: Any, stacked_fn: stacking.StackedFn
) -> LayerNormalizeState:
  """``normalize_by_layer_norm``'s initial state; ``owner`` is the function errors name."""
  groups = _leaf_groups(owner, params, stacked_fn)
  dtype = _norm_dtype(params)
  shape = (groups.num_groups,)
  return LayerNormalizeState(
    init_clip_stats(shape, dtype),
    count=jnp.zeros(shape, jnp.int32),
    mean=jnp.zeros(shape, dtype),
    second=jnp.zeros(shape, dtype),
    names=stacking.GroupNames(tuple(groups.names)),
  )


def rescale_outliers(
  threshold: Threshold,
  *,
  stacked: stacking.Stacked = None,
  axis_name: Any = None,
) -> optax.GradientTransformation:
  """Rescales each leaf's outlying entries so the largest lands on the bound (AdaClip).

  Per leaf (or per layer of a stacked leaf), with ``M`` its largest magnitude
  and ``b`` its bound: every entry with ``|g| > b`` is multiplied by ``b / M``
  (its sign kept), the others are unchanged. Unlike value clipping
  (:func:`clipx.clip_by_value`), which flattens all outliers onto ``+-b``,
  the outliers keep their order and relative sizes; unlike norm clipping, the
  entries below the bound are left alone. Complex entries are compared and
  rescaled by modulus (their phase kept). Coordinate-wise spikes (a few
  entries of a tensor jumping by orders of magnitude) are damped without
  shrinking the rest of the gradient.

  Args:
    threshold: the bound on each group's largest magnitude: a positive float,
      an Optax schedule, or a policy (which sees one statistic per group, its
      largest magnitude, as the "norm"), such as :func:`ema_peak` (AdaClip).
    stacked: for scanned models, which axes of a leaf index layers (an int:
      that many leading axes; a tuple of positions such as ``(1,)``,
      MaxText's ``param_scan_axis=1``; or a function ``(path, leaf) -> int |
      tuple``, as for :func:`clipx.clip_by_layer_norm`); each layer is then
      its own group, as its unstacked twin would be. ``None`` or 0: none.
    axis_name: inside ``shard_map``/``pmap``, the mapped axis the leaves are
      split over: each group's largest magnitude is then the maximum over all
      shards (one ``pmax`` of the vector of groups).

  Returns:
    An ``optax.GradientTransformation`` whose state is
    :class:`OutlierRescaleState`: stats per group, named by path (and layer)
    in ``clipx.stats(state).as_dict()`` under ``clip/outliers/...``.

  References:
    Huang et al., `Stable-SPAM: How to Train in 4-Bit More Stably than 16-Bit
    Adam <https://arxiv.org/abs/2502.17055>`_, 2025 (AdaClip); repository
    ``TianjinYellow/StableSPAM``, ``galore_torch/stablespam.py`` L110-129, commit
    ``6a66da1ea7005f7fe7bc570b7968144b42163bed``.

  Deviations from the reference: a group holding NaN/Inf is passed through
  unchanged (the reference divides its outliers by ``M = inf``, zeroing finite
  entries); the outliers are computed as ``g / M * b`` in float32 or wider
  whatever the gradient dtype, with ``g`` and ``M`` first divided by a power of
  two, so that a peak near float32's maximum (whose reciprocal is subnormal,
  flushed to zero by XLA CPU) damps its entries rather than zeroing them.

  Example:
    >>> import jax.numpy as jnp, clipx.rescaling as rescaling
    >>> tx = rescaling.rescale_outliers(2.0)
    >>> g = {"w": jnp.array([1.0, -3.0, 8.0])}
    >>> out, _ = tx.update(g, tx.init(g))
    >>> out["w"]  # -3 and 8 scaled by 2 / 8; 1 unchanged
    Array([ 1.  , -0.75,  2.  ], dtype=float32)
  """
  owner = "rescale_outliers"
  policy = as_policy(threshold, "threshold", owner)
  stacked_fn = stacking.as_stacked_fn(owner, stacked)

  def init_fn(params):
    return _outlier_rescale_init(owner, params, policy, stacked_fn)

  def update_fn(updates, state, params=None):
    del params
    leaves, plan, outliers, threshold_state = _find_outliers(
      owner, updates, state, policy, stacked_fn, axis_name
    )
    dtype = state.stats.norm.dtype
    stacks = []
    for bucket in plan:
      xs = _stack(leaves, bucket)
      stacks.append(_rescale_stack(xs, outliers, bucket, dtype).astype(xs.dtype))
    out = _unstack(stacks, plan, leaves, jnp.any(outliers.over | outliers.invalid))
    stats = _outlier_stats(outliers, state.stats)
    treedef = jax.tree_util.tree_structure(updates)
    new_state = OutlierRescaleState(stats, threshold_state, state.names)
    return jax.tree_util.tree_unflatten(treedef, out), new_state

  return optax.GradientTransformation(init_fn, update_fn)


class _Normalized(NamedTuple):
  """AdaGN's step: each group's factors ``hi * lo`` and the new state."""

  hi: jax.Array
  lo: jax.Array
  state: LayerNormalizeState


def _normalize_step(
  divisor: jax.Array,
  root: jax.Array,
  state: LayerNormalizeState,
  gamma1: chex.Numeric,
  gamma2: chex.Numeric,
  eps: chex.Numeric,
) -> _Normalized:
  """Records the norms ``divisor * root`` and returns the factors that set them to the target."""
  dtype = state.mean.dtype
  divisor, root = divisor.astype(dtype), root.astype(dtype)
  n = divisor * root
  beta1, rest1 = _ema_coefficients(gamma1, dtype)
  beta2, rest2 = _ema_coefficients(gamma2, dtype)
  new_mean = beta1 * state.mean + rest1 * n
  new_second = beta2 * state.second + rest2 * jnp.square(n)
  # n**2 must be a positive finite float32: one that overflows would poison the
  # EMA, and one that underflows to 0 would make the target m / sqrt(0) = inf.
  square = jnp.square(n)
  record = jnp.isfinite(square) & (square > 0) & jnp.isfinite(new_mean) & jnp.isfinite(new_second)
  mean = jnp.where(record, new_mean, state.mean)
  second = jnp.where(record, new_second, state.second)
  count = jnp.where(record, optax.safe_increment(state.count), state.count)
  known = count > 0
  mean_hat = mean / jnp.where(known, _bias_correction(count, rest1), 1)
  second_hat = second / jnp.where(known, _bias_correction(count, rest2), 1)
  target = mean_hat / (jnp.sqrt(second_hat) + jnp.asarray(eps, dtype))
  target = jnp.where(known, target, n)  # no history: identity (never applied)
  # A finite non-zero gradient is normalised; NaN/Inf passes through unchanged, and
  # so does a norm whose square underflows (below ~1e-19): a float32 sum of squares
  # reads it as 0, and AdaGN would blow such a gradient up ~1e19-fold or more.
  apply = known & jnp.isfinite(root) & (square > 0)
  hi = jnp.where(apply, target / jnp.where(apply, root, 1), 1)
  lo = jnp.where(apply, 1 / divisor, 1)  # divisor is a power of two: exact
  stats = _stats(n, jnp.where(apply, target, n), target, hi * lo, apply, state.stats)
  return _Normalized(hi, lo, LayerNormalizeState(stats, count, mean, second, state.names))


def normalize_by_layer_norm(
  gamma1: chex.Numeric = 0.7,
  gamma2: chex.Numeric = 0.9,
  eps: chex.Numeric = 1e-8,
  *,
  stacked: stacking.Stacked = None,
  axis_name: Any = None,
) -> optax.GradientTransformation:
  """Sets each leaf's L2 norm to ``E[n] / sqrt(E[n^2])`` of its norm history (AdaGN).

  Per leaf (or per layer of a stacked leaf), with ``n = ||g||`` and ``k`` the
  steps recorded: ``m <- gamma1 m + (1 - gamma1) n``,
  ``v <- gamma2 v + (1 - gamma2) n**2``, ``target = (m / (1 - gamma1**k)) /
  (sqrt(v / (1 - gamma2**k)) + eps)``, and ``g <- g / n * target`` where
  ``n > 0``. The target is a ratio of norms, about 1 (at most about 1, by
  Jensen, when the two decays are equal): the gradient's absolute scale is
  discarded and each tensor arrives with a norm near 1, smaller after a spike
  (``v`` rises faster than ``m``). This is normalisation, not clipping: the
  scale may exceed 1. Suited to Adam-type optimizers, which are nearly
  invariant to a tensor's scale; before plain SGD it replaces the learning
  rate's meaning.

  Args:
    gamma1: decay of the EMA of the norm, in (0, 1).
    gamma2: decay of the EMA of the squared norm, in (0, 1).
    eps: added to ``sqrt(v_hat)``, >= 0 and finite.
    stacked: for scanned models, which axes of a leaf index layers (an int:
      that many leading axes; a tuple of positions such as ``(1,)``,
      MaxText's ``param_scan_axis=1``; or a function ``(path, leaf) -> int |
      tuple``, as for :func:`clipx.clip_by_layer_norm`); each layer is then
      its own group. ``None`` or 0: none.
    axis_name: inside ``shard_map``/``pmap``, the mapped axis the leaves are
      split over: group norms are then global over it (one ``psum``).

  Returns:
    An ``optax.GradientTransformation`` whose state is
    :class:`LayerNormalizeState`; ``clipx.stats`` reports it under
    ``clip/normalize/...`` (``threshold`` is the target norm, ``clipped``
    whether the group was rescaled).

  References:
    Huang et al., `Stable-SPAM: How to Train in 4-Bit More Stably than 16-Bit
    Adam <https://arxiv.org/abs/2502.17055>`_, 2025 (AdaGN); repository
    ``TianjinYellow/StableSPAM``, ``galore_torch/stablespam.py`` L132-150, commit
    ``6a66da1ea7005f7fe7bc570b7968144b42163bed``.

  Deviations from the reference: its cosine schedule on ``gamma1`` (``total_T``)
  is left out (pass a fixed ``gamma1``; it is shared with the optimizer's
  ``beta1`` there); a zero or non-finite norm, or one whose square overflows or underflows, is not
  recorded, and a group holding NaN/Inf is passed through unchanged (the
  reference records it, poisoning the EMAs); the count is never reset (the
  reference resets it at its momentum resets); the rescale is ``g * (target / n)``
  (one multiply, exact for norms beyond float32's range) rather than
  ``g / n * target``, which differs by float32 rounding.

  Example:
    >>> import jax.numpy as jnp, clipx.rescaling as rescaling
    >>> tx = rescaling.normalize_by_layer_norm()
    >>> g = {"w": jnp.array([3.0, 4.0])}
    >>> out, _ = tx.update(g, tx.init(g))
    >>> [round(float(x), 4) for x in out["w"]]  # first step: target = n / n = 1 (eps aside)
    [0.6, 0.8]
  """
  owner = "normalize_by_layer_norm"
  validation.number(owner, "gamma1", gamma1, low=0.0, high=1.0, high_open=True)
  validation.number(owner, "gamma2", gamma2, low=0.0, high=1.0, high_open=True)
  validation.nonnegative(owner, "eps", eps, finite=True)
  stacked_fn = stacking.as_stacked_fn(owner, stacked)

  def init_fn(params):
    return _layer_normalize_init(owner, params, stacked_fn)

  def update_fn(updates, state, params=None):
    del params
    leaves = norms.check_float_leaves(updates)
    groups = _leaf_groups(owner, updates, stacked_fn)
    _checked_groups(owner, groups, state.count.shape[0])
    dtype = state.mean.dtype
    if leaves:
      divisor, root = _group_norms(leaves, groups, axis_name)
    else:
      divisor, root = jnp.ones((0,), dtype), jnp.zeros((0,), dtype)
    step = _normalize_step(divisor, root, state, gamma1, gamma2, eps)
    plan = _plan(leaves, groups)
    scaled = []
    for bucket in plan:
      hi, lo = _per_bucket(step.hi, bucket), _per_bucket(step.lo, bucket)
      scaled.append(scaling.scale_leaf(_stack(leaves, bucket), hi, lo))
    out = _unstack(scaled, plan, leaves, jnp.any(step.state.stats.clipped))
    treedef = jax.tree_util.tree_structure(updates)
    new_state = step.state
    return jax.tree_util.tree_unflatten(treedef, out), new_state

  return optax.GradientTransformation(init_fn, update_fn)


def stable_spam_clip(
  theta: chex.Numeric = 0.999,
  gamma1: chex.Numeric = 0.7,
  gamma2: chex.Numeric = 0.9,
  eps: chex.Numeric = 1e-8,
  *,
  stacked: stacking.Stacked = None,
  axis_name: Any = None,
) -> optax.GradientTransformation:
  """Stable-SPAM's gradient treatment: AdaClip, then AdaGN, per leaf.

  ``optax.chain(rescale_outliers(ema_peak(theta)), normalize_by_layer_norm(gamma1,
  gamma2, eps))``: each tensor's outlying entries are rescaled to the
  bias-corrected EMA of its past peaks, then its norm is set to
  ``E[n] / sqrt(E[n^2])`` of its (post-AdaClip) norm history. Put it before
  ``optax.adam`` (or ``optax.adamw``, as the reference applies weight decay
  first and decoupled) to get Stable-SPAM's gradient path; AdaGN discards
  the gradient's scale, so it suits Adam-type optimizers, not plain SGD.

  One pass, not that chain: the chain's second step must measure the first
  one's output, which XLA CPU materialized (a gradient-sized temporary per
  step); here each tensor's norm after AdaClip is computed from the gradient
  itself, once its bound is known (``_rescaled_norms``), and both steps'
  factors are applied in the optimizer's own pass (small leaves in their
  bucket's stack first, see the module doc). Two reductions per tensor
  remain (the peak, then the norm, which depends on the bound the peak sets).
  The state, statistics and outputs are the chain's, to float32 rounding
  (``tests/test_stable_spam.py``), except that norms below ~1e-19, which the
  chain reads as 0, are reported as they are here (AdaGN leaves such a
  gradient alone in both).

  Args:
    theta: AdaClip's EMA decay of the peaks (the reference's ``gamma3``), in (0, 1).
    gamma1: AdaGN's decay of the EMA of the norm, in (0, 1).
    gamma2: AdaGN's decay of the EMA of the squared norm, in (0, 1).
    eps: AdaGN's ``eps``, >= 0.
    stacked: for scanned models, which axes of a leaf index layers (an int:
      that many leading axes; a tuple of positions such as ``(1,)``; or a
      function ``(path, leaf) -> int | tuple``, as for
      :func:`clipx.clip_by_layer_norm`); each layer is its own group in both
      steps.
    axis_name: inside ``shard_map``/``pmap``, the mapped axis the leaves are
      split over (peaks and norms are then taken over all shards).

  Returns:
    An ``optax.GradientTransformation`` whose state is the chain's,
    ``(OutlierRescaleState, LayerNormalizeState)``; ``clipx.stats``
    reports ``clip/outliers/...`` and ``clip/normalize/...``.

  References:
    Huang et al., `Stable-SPAM: How to Train in 4-Bit More Stably than 16-Bit
    Adam <https://arxiv.org/abs/2502.17055>`_, 2025; repository
    ``TianjinYellow/StableSPAM``, ``galore_torch/stablespam.py`` L110-150, commit
    ``6a66da1ea7005f7fe7bc570b7968144b42163bed``.

  Deviations from the reference (besides those of :func:`rescale_outliers`,
  :func:`ema_peak` and :func:`normalize_by_layer_norm`): the cosine schedule
  on ``gamma1`` (``total_T``, ``eta``) and the momentum reset every
  ``update_proj_gap`` steps are optimizer concerns (they also act on Adam's
  ``beta1`` and moments) and are left out; each step keeps its own step count
  (the reference shares one per tensor, equal unless a zero or non-finite
  gradient is skipped).

  Example:
    >>> import jax.numpy as jnp, optax, clipx.rescaling as rescaling
    >>> tx = optax.chain(rescaling.stable_spam_clip(), optax.adam(1e-3))
    >>> params = {"w": jnp.zeros(3)}
    >>> updates, state = tx.update({"w": jnp.array([1.0, -2.0, 2.0])}, tx.init(params), params)
    >>> updates["w"].shape
    (3,)
  """
  owner = "stable_spam_clip"
  for name, value in (("theta", theta), ("gamma1", gamma1), ("gamma2", gamma2)):
    validation.number(owner, name, value, low=0.0, high=1.0, high_open=True)
  validation.nonnegative(owner, "eps", eps, finite=True)
  stacked_fn = stacking.as_stacked_fn(owner, stacked)
  policy = ema_peak(theta)

  def init_fn(params):
    # The two halves' states, built under this function's name so errors name it.
    return (
      _outlier_rescale_init(owner, params, policy, stacked_fn),
      _layer_normalize_init(owner, params, stacked_fn),
    )

  def update_fn(updates, state, params=None):
    del params
    clip_state, normalize_state = state
    leaves, plan, outliers, threshold_state = _find_outliers(
      owner, updates, clip_state, policy, stacked_fn, axis_name
    )
    dtype = clip_state.stats.norm.dtype
    stacks = [_stack(leaves, bucket) for bucket in plan]
    divisor, root = _rescaled_norms(stacks, plan, outliers, dtype, axis_name)
    step = _normalize_step(divisor, root, normalize_state, gamma1, gamma2, eps)
    rescaled = []
    for xs, bucket in zip(stacks, plan):
      hi, lo = _per_bucket(step.hi, bucket), _per_bucket(step.lo, bucket)
      # AdaClip's output in the leaf's dtype first, as the chain has it (bfloat16 rounds twice).
      clipped = _rescale_stack(xs, outliers, bucket, dtype).astype(xs.dtype)
      rescaled.append(scaling.scale_leaf(clipped, hi, lo))
    active = jnp.any(outliers.over | outliers.invalid | step.state.stats.clipped)
    out = _unstack(rescaled, plan, leaves, active)
    clip_state = OutlierRescaleState(
      _outlier_stats(outliers, clip_state.stats), threshold_state, clip_state.names
    )
    treedef = jax.tree_util.tree_structure(updates)
    return jax.tree_util.tree_unflatten(treedef, out), (clip_state, step.state)

  return optax.GradientTransformation(init_fn, update_fn)


def _rescaled_norms(
  stacks: list[jax.Array],
  plan: list[_Bucket],
  outliers: _Outliers,
  dtype,
  axis_name: Any,
) -> tuple[jax.Array, jax.Array]:
  """Each group's norm after AdaClip, as ``(divisor, root)``, from the gradients themselves.

  One reduction per bucket (:class:`_Bucket`), with nothing the size of a gradient written:
  - No entry exceeds its group's largest magnitude after AdaClip (the bound
    where rescaled, the peak elsewhere), known before this reduction; dividing
    by its power of two :func:`clipx.norms.safe_divisor` keeps every square
    below 65536, so the norm cannot overflow and needs no fallback pass.
  - Each magnitude ``y`` is weighted by ``w = max(c, min(1, (b - y) * L + 1))``
    with ``L = 2**25 / b``: 1 where ``y <= b``, and the outlier factor
    ``c = b / M`` where ``y > b``, since ``y - b`` is then at least float32's
    spacing at ``b``, ``b / 2**24``, which ``L`` lifts to at least 2. A select
    would say the same, but XLA CPU's reduction kernels (YNNPACK) take min
    and max into the reduction and not a select, whose output was then
    materialized: a ResNet-50-sized temporary per step. The weight is ``c``
    or 1 exactly, so the norm is the rescaled entries' to rounding (``y * c``
    here, ``g / M * b`` in the output). ``L`` is capped at float32's largest
    number, which still lifts the spacing past 2 for every bound above
    ``2**-100`` (~8e-31); below that an outlier may count as unscaled here.
  - The stack is read from behind a no-op barrier, so this ``|g|`` is not merged
    with the peak's: one ``|g|`` for two readers was materialized too, and
    so are broadcast constants, hence the run-time ``1`` below.
  """
  divisor = norms.safe_divisor(outliers.clipped_peak)
  inverse = 1 / divisor  # exact (a power of two)
  fmax = jnp.finfo(dtype).max
  # Elsewhere the bound is float32's largest number, so nothing finite is an
  # outlier (an Inf is, with factor 1: the norm is inf, as it should be).
  bound = jnp.where(outliers.over, outliers.bound, fmax)
  factor = jnp.where(outliers.over | outliers.invalid, outliers.factor, 1)  # NaN where invalid
  lift = jnp.minimum(jnp.asarray(2.0**25, dtype) / bound, fmax)  # a bound of 0 gives inf: capped
  one = jax.lax.optimization_barrier(jnp.ones_like(factor))  # a run-time 1, not a constant
  rows = []
  for xs, bucket in zip(stacks, plan):
    # abs before the cast: a complex entry's modulus, not its real part.
    y = _magnitude(jax.lax.optimization_barrier(xs), dtype)
    b, c, up, keep, r = (_per_bucket(v, bucket) for v in (bound, factor, lift, one, inverse))
    weight = jnp.maximum(c, jnp.minimum(keep, (b - y) * up + keep))
    rows.append(norms.sum_sq(y * weight * r, bucket.within, dtype))
  sq = _group_vector(rows, plan, dtype)
  if axis_name is not None:
    sq = jax.lax.psum(sq, axis_name)
  return divisor, norms.safe_sqrt(sq)
