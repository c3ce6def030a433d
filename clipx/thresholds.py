"""Threshold policies: the bound a norm is held to.

A policy is a pair of pure functions, so every scope can use every policy
(``clip_by_global_norm(clipx.zclip())``, ``clip_by_layer_norm(clipx.autoclip())``):

- ``init(norm)`` returns the policy's state for norms shaped like ``norm``
  (a scalar for a global norm, one entry per group for per-layer norms);
- ``update(norm, state)`` returns ``(threshold, new_state)``: the threshold for
  this step, shaped like ``norm``, computed from the norm and the history.

States are NamedTuples of arrays, kept inside the transform's state, so they
jit, shard and checkpoint with the optimizer.

A plain float (or array) and an Optax schedule are policies too:
:func:`as_policy` turns either into one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from clipx import validation


class ThresholdPolicy(NamedTuple):
  """A rule that turns the history of norms into a clipping threshold.

  Attributes:
    init: ``norm -> state``; ``norm`` is a zero array of the norm's shape.
    update: ``(norm, state) -> (threshold, state)``.
  """

  init: Callable[[jax.Array], Any]
  update: Callable[[jax.Array, Any], tuple[jax.Array, Any]]


class ScheduleState(NamedTuple):
  """State of a scheduled threshold: the number of updates so far."""

  count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as Optax states do


def concrete_float(value: Any) -> float | None:
  """``value`` as a Python float, or None when it is traced (unknown)."""
  if isinstance(value, jax.core.Tracer):
    return None
  return float(np.asarray(value))


def constant(
  value: chex.Numeric, name: str = "max_norm", owner: str = "constant"
) -> ThresholdPolicy:
  """A fixed threshold.

  Args:
    value: a positive number (``inf`` means never clip), or an array of them
      that broadcasts against the norm. It may be a traced array, as inside
      ``optax.inject_hyperparams``, so changing it between steps needs no
      recompilation.
    name: the argument name used in error messages.
    owner: the public function it was given to, for error messages.
  """
  validation.positive(owner, name, value, array=True)

  def init(norm):
    del norm
    return optax.EmptyState()

  def update(norm, state):
    threshold = jnp.broadcast_to(jnp.asarray(value, jnp.float32), jnp.shape(norm))
    return threshold.astype(jnp.result_type(norm, jnp.float32)), state

  return ThresholdPolicy(init, update)


def schedule(fn: Callable[[jax.Array], chex.Numeric]) -> ThresholdPolicy:
  """A threshold that follows an Optax schedule of the step count."""

  def init(norm):
    del norm
    return ScheduleState(count=jnp.zeros([], jnp.int32))

  def update(norm, state):
    threshold = jnp.broadcast_to(jnp.asarray(fn(state.count), jnp.float32), jnp.shape(norm))
    return threshold.astype(jnp.result_type(norm, jnp.float32)), ScheduleState(
      optax.safe_increment(state.count)
    )

  return ThresholdPolicy(init, update)


def as_policy(threshold: Any, name: str = "max_norm", owner: str = "as_policy") -> ThresholdPolicy:
  """Turns a float, an array, an Optax schedule or a policy into a policy.

  Raises ``TypeError`` for anything else, naming ``owner``'s argument ``name``:
  ``None``, strings, complex numbers, a type, and a clipx policy constructor
  that was not called (``clipx.zclip`` for ``clipx.zclip()``).
  """
  if isinstance(threshold, ThresholdPolicy):
    return threshold
  if getattr(threshold, "clipx_policy_factory", False):
    raise TypeError(
      f"clipx.{owner}: {name} is the policy constructor clipx.{threshold.__name__}, not a"
      f" policy; call it: clipx.{threshold.__name__}()."
    )
  if callable(threshold) and not isinstance(threshold, type | jax.Array | np.ndarray):
    return schedule(threshold)
  return constant(threshold, name, owner)


def policy_factory(factory: Callable[..., ThresholdPolicy]) -> Callable[..., ThresholdPolicy]:
  """Marks a policy constructor, so passing it uncalled is caught by :func:`as_policy`."""
  factory.clipx_policy_factory = True  # type: ignore[attr-defined]
  return factory


# Adaptive policies.
#
# Shared rules, so every policy behaves the same at the edges:
# - Statistics are elementwise: a scalar norm (global clipping) or one per
#   group (per-layer clipping) each get their own history.
# - A norm that is not finite, or is exactly zero, is not recorded. A
#   non-finite norm would poison the statistics for good; a zero norm means
#   the group received no gradient this step and says nothing about scale,
#   while recording it can drag an EMA to zero, after which every later
#   gradient of that group would be clipped to zero and recorded as zero.
# - Before ``warmup_steps`` norms have been recorded the threshold is
#   ``initial`` (by default ``inf``: no clipping until the scale is known),
#   so a statistic is never read before it is defined.
# - Statistics are kept in float32 (or wider, if the norms are).


def _check_ratio_above_one(owner: str, name: str, value: Any) -> None:
  validation.number(owner, name, value, low=1.0)
  # The statistic is updated with the clipped norm, so a bound at or below it
  # can only shrink, down to zero.


def _stat_dtype(norm: jax.Array) -> jnp.dtype:
  return jnp.promote_types(jnp.result_type(norm), jnp.float32)


def _recordable(norm: jax.Array) -> jax.Array:
  """Whether a norm enters the statistics: finite and non-zero (see above)."""
  return jnp.isfinite(norm) & (norm != 0)


def _increment(count: jax.Array, record: jax.Array) -> jax.Array:
  """``count + 1`` where ``record``, saturating instead of wrapping around."""
  return jnp.where(record, optax.safe_increment(count), count)


def _threshold(value: jax.Array, norm: jax.Array) -> jax.Array:
  return jnp.broadcast_to(value, jnp.shape(norm)).astype(_stat_dtype(norm))


def _capped(threshold: jax.Array, max_threshold: chex.Numeric) -> jax.Array:
  """``min(threshold, max_threshold)``: the cap holds at every step, warm-up included."""
  return jnp.minimum(threshold, jnp.asarray(max_threshold, threshold.dtype))


def _check_common(owner: str, warmup_steps: Any, initial: Any, max_threshold: Any) -> None:
  """The arguments every adaptive policy shares."""
  validation.integer(owner, "warmup_steps", warmup_steps, 1)
  validation.positive(owner, "initial", initial)
  validation.positive(owner, "max_threshold", max_threshold)


def _ring_buffer(owner: str, history: Any, norm: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(norms, count)`` of an empty window of ``history`` norms shaped like ``norm``."""
  size = concrete_float(history)
  if size is None:  # traced: only inside jit
    raise TypeError(
      f"clipx.{owner}: history sets the shape of the state and must be a Python int;"
      " inside optax.inject_hyperparams pass static_args=('history',)."
    )
  shape = jnp.shape(norm)
  return jnp.zeros((int(size),) + shape, _stat_dtype(norm)), jnp.zeros(shape, jnp.int32)


def _ring_record(
  norms: jax.Array, count: jax.Array, norm: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """The window with ``norm`` written over its oldest slot, where recordable."""
  size = norms.shape[0]
  record = _recordable(norm)
  slot = jnp.arange(size).reshape((size,) + (1,) * count.ndim)
  write = (slot == count % size) & record
  return jnp.where(write, jnp.asarray(norm, norms.dtype), norms), _increment(count, record)


class AutoClipState(NamedTuple):
  """State of :func:`autoclip`.

  Attributes:
    norms: ring buffer of the last ``history`` recorded norms, shape
      ``(history,) + norm.shape``; slot ``i`` of a group is valid once that
      group has recorded more than ``i`` norms.
    count: number of norms recorded so far, per group (int32).
  """

  norms: jax.Array
  count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as Optax states do


def _window_percentile(norms: jax.Array, count: jax.Array, percentile: jax.Array) -> jax.Array:
  """``np.percentile(window, percentile)`` (linear method) per group of a ring buffer."""
  history = norms.shape[0]
  valid = jnp.maximum(jnp.minimum(count, history), 1)
  slot = jnp.arange(history).reshape((history,) + (1,) * count.ndim)
  # Slots not yet written sort last, so the first ``valid`` sorted entries are the window.
  ordered = jnp.sort(jnp.where(slot < valid, norms, jnp.inf), axis=0)
  position = jnp.asarray(percentile, norms.dtype) / 100 * (valid - 1).astype(norms.dtype)
  below = jnp.floor(position)
  fraction = position - below
  low_index = jnp.clip(below.astype(jnp.int32), 0, valid - 1)
  high_index = jnp.minimum(low_index + 1, valid - 1)
  low = jnp.take_along_axis(ordered, low_index[None], axis=0)[0]
  high = jnp.take_along_axis(ordered, high_index[None], axis=0)[0]
  # NumPy's two-sided linear interpolation, so the result matches np.percentile
  # to rounding; where(low == high) avoids inf - inf when a slot is unwritten.
  step = jnp.where(low == high, 0, high - low)
  return jnp.where(fraction >= 0.5, high - step * (1 - fraction), low + step * fraction)


@policy_factory
def autoclip(
  percentile: chex.Numeric = 10.0,
  history: int = 1000,
  *,
  warmup_steps: int = 10,
  initial: chex.Numeric = float("inf"),
  max_threshold: chex.Numeric = float("inf"),
) -> ThresholdPolicy:
  """AutoClip: the threshold is a percentile of the recent gradient norms.

  Each step the threshold is ``np.percentile(window, percentile)`` of the last
  ``history`` recorded norms (NumPy's default linear interpolation); then the
  step's norm, unclipped, is recorded. With the default 10th percentile about
  nine steps in ten are clipped: AutoClip is a strong regulariser of the step
  size, not only a guard against rare spikes.

  Differences from the paper, both deliberate: the paper keeps *every* norm
  since the start of training, so its memory and the cost of the percentile
  grow without bound and the threshold reflects the whole run; here a ring
  buffer of fixed size ``history`` keeps memory constant (it lives in the
  optimizer state) and lets the threshold follow the norm's drift over
  training. And the paper appends the current norm before taking the
  percentile (the authors' code, ``pseeth/autoclip``, does the same); here
  the threshold uses past norms only, as the third-party ``autoclip`` package
  on PyPI does, so a step is judged against history it did not shape (for a
  long window the two agree to within one sample).

  Warm-up: until ``warmup_steps`` norms have been recorded the threshold is
  ``initial``. Non-finite and zero norms are not recorded.

  Args:
    percentile: in (0, 100]; may be changed at run time inside
      ``optax.inject_hyperparams`` without recompiling.
    history: the window length (a Python int; it sets the state's shape).
    warmup_steps: norms recorded before the percentile is used; >= 1.
    initial: the threshold during warm-up, > 0 (``inf``: no clipping).
    max_threshold: an upper cap on the threshold at every step, warm-up
      included, > 0 (``inf``: no cap).

  Returns:
    A :class:`ThresholdPolicy` whose state is :class:`AutoClipState`.

  References:
    Seetharaman et al., `AutoClip: Adaptive Gradient Clipping for Source
    Separation Networks <https://arxiv.org/abs/2007.14469>`_, MLSP 2020.

  Example:
    >>> import jax, jax.numpy as jnp, clipx
    >>> policy = clipx.autoclip(percentile=50, history=4, warmup_steps=2)
    >>> state, update = policy.init(jnp.zeros(())), jax.jit(policy.update)
    >>> for norm in [1.0, 2.0, 3.0, 10.0]:
    ...   threshold, state = update(jnp.float32(norm), state)
    >>> float(threshold)  # median of 1, 2, 3
    2.0
  """
  validation.number("autoclip", "percentile", percentile, low=0.0, high=100.0)
  validation.integer("autoclip", "history", history, 1)
  _check_common("autoclip", warmup_steps, initial, max_threshold)

  def init(norm):
    return AutoClipState(*_ring_buffer("autoclip", history, norm))

  def update(norm, state):
    # The window length comes from the state, not the argument, so a traced
    # ``history`` (inject_hyperparams without static_args) still works.
    past = _window_percentile(state.norms, state.count, percentile)
    threshold = jnp.where(state.count >= warmup_steps, past, jnp.asarray(initial, past.dtype))
    threshold = _capped(threshold, max_threshold)
    return _threshold(threshold, norm), AutoClipState(*_ring_record(state.norms, state.count, norm))

  return ThresholdPolicy(init, update)


class ZClipState(NamedTuple):
  """State of :func:`zclip`.

  Attributes:
    count: norms recorded so far, per group (int32).
    mean: during warm-up the running mean of the recorded norms; after it,
      their exponential moving average.
    var: likewise, the running (population) variance, then its EMA.
  """

  count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as Optax states do
  mean: jax.Array
  var: jax.Array


_ZCLIP_MODES = ("reciprocal", "clip_to_max")


@policy_factory
def zclip(
  z_threshold: chex.Numeric = 2.5,
  alpha: chex.Numeric = 0.97,
  warmup_steps: int = 25,
  mode: str = "reciprocal",
  *,
  initial: chex.Numeric = float("inf"),
  max_threshold: chex.Numeric = float("inf"),
) -> ThresholdPolicy:
  """ZClip: clip norms whose z-score against an EMA of past norms is too high.

  The mean ``mu`` and variance ``var`` of the norm are exponential moving
  averages. A norm is a spike when ``z = (norm - mu) / std > z_threshold``,
  i.e. ``norm > mu + z_threshold * std``; otherwise it is not clipped and the
  returned threshold is that bound. A spike is clipped to

  - ``mode="reciprocal"`` (the paper's default; the authors' ``mode="zscore",
    clip_option="adaptive_scaling"``): ``mu + z_threshold**2 * std / z``, so
    the larger the outlier, the closer to the mean it is pulled;
  - ``mode="clip_to_max"`` (the authors' ``mode="percentile"``):
    ``mu + z_threshold * std``, the largest norm that is not a spike.

  The statistics are then updated with the norm clipped by this adaptive
  threshold, not by ``max_threshold`` (``mu`` first, and ``var`` with the
  deviation from the new ``mu``, as in the authors' code), so a spike moves
  them no more than a norm at the bound would.

  ZClip follows the norm: a norm that grows steadily (a learning rate that is
  simply too high) is never a spike, so it is not held down. Use it as a
  spike guard; use a fixed threshold, :func:`autoclip` or :func:`quantile` to
  bound the step size.

  Warm-up: the first ``warmup_steps`` recorded norms set ``mu`` and ``var``
  to their mean and population variance (no buffer is kept: a running
  Welford update); meanwhile the threshold is ``initial``. Non-finite and
  zero norms are not recorded (the authors' code records every norm, so one
  NaN poisons its statistics for good).

  Against the authors' code: the defaults (``alpha``, ``z_threshold``,
  ``warmup_steps``, the reciprocal mode) are theirs, and with
  ``max_threshold=1.0`` (their ``max_grad_norm``) the clip and the statistics
  match theirs to float32 rounding (``tests/test_zclip_reference.py``). Not
  offered: their ``clip_option="mean"``, ``clip_factor`` (default 1.0, which
  is what runs here) and ``skip_update_on_spike`` (default off, as here). And
  there is no ``eps`` in the z-score: the spike test is written as
  ``norm > mu + z_threshold * std``, which needs no division, so tiny
  per-layer norms are not distorted by an absolute epsilon (theirs is 1e-6).

  Args:
    z_threshold: the z-score above which a norm is a spike, > 0; may be
      changed at run time inside ``optax.inject_hyperparams``.
    alpha: EMA decay of the mean and variance, in (0, 1).
    warmup_steps: norms recorded before clipping starts; >= 1.
    mode: ``"reciprocal"`` or ``"clip_to_max"`` (see above).
    initial: the threshold during warm-up, > 0 (``inf``: no clipping).
    max_threshold: an upper cap on the threshold at every step, warm-up
      included, > 0. The default ``inf`` sets no cap; the authors' code caps
      at ``max_grad_norm=1.0`` by default, so ``zclip(max_threshold=1.0)``
      matches it. As there, the cap bounds only the clip applied: the
      statistics never see it, so they keep following the norm while the cap
      binds.

  Returns:
    A :class:`ThresholdPolicy` whose state is :class:`ZClipState`.

  References:
    Kumar et al., `ZClip: Adaptive Spike Mitigation for LLM Pre-Training
    <https://arxiv.org/abs/2504.02507>`_, 2025; the authors' code is
    ``zclip/zclip.py`` of `bluorion-com/ZClip
    <https://github.com/bluorion-com/ZClip>`_ (last changed in commit
    ``e42cdd1ce92cd5da5148d184819f4b13c7fe5b1a``, the file PyPI ``zclip``
    1.0.0 ships).

  Example:
    >>> import jax, jax.numpy as jnp, clipx
    >>> policy = clipx.zclip(warmup_steps=4, mode="clip_to_max")
    >>> state, update = policy.init(jnp.zeros(())), jax.jit(policy.update)
    >>> for norm in [1.0, 3.0, 1.0, 3.0]:  # mean 2, std 1
    ...   _, state = update(jnp.float32(norm), state)
    >>> threshold, state = update(jnp.float32(100.0), state)
    >>> float(threshold)  # 2 + 2.5 * 1
    4.5
  """
  validation.positive("zclip", "z_threshold", z_threshold)
  validation.number("zclip", "alpha", alpha, low=0.0, high=1.0, high_open=True)
  _check_common("zclip", warmup_steps, initial, max_threshold)
  validation.choice("zclip", "mode", mode, _ZCLIP_MODES)

  def init(norm):
    shape, dtype = jnp.shape(norm), _stat_dtype(norm)
    # Distinct buffers: a state holding one array twice cannot be donated to jit.
    return ZClipState(
      count=jnp.zeros(shape, jnp.int32), mean=jnp.zeros(shape, dtype), var=jnp.zeros(shape, dtype)
    )

  def update(norm, state):
    dtype = state.mean.dtype
    x = jnp.asarray(norm, dtype)
    z = jnp.asarray(z_threshold, dtype)
    decay = jnp.asarray(alpha, dtype)
    warm = state.count >= warmup_steps
    std = jnp.sqrt(state.var)
    # z = inf means no norm is a spike, even where std = 0 (inf * 0 would be NaN).
    bound = jnp.where(jnp.isinf(z), jnp.inf, state.mean + z * std)
    spike = x > bound
    if mode == "reciprocal":
      # mu + z_t * std / (z / z_t) with z = (x - mu) / std, written without
      # dividing by std (which may be 0); x - mu > 0 wherever spike holds.
      excess = jnp.where(spike, x - state.mean, 1)
      spike_threshold = state.mean + z * z * state.var / excess
    else:
      spike_threshold = bound
    adaptive = jnp.where(
      warm, jnp.where(spike, spike_threshold, bound), jnp.asarray(initial, dtype)
    )
    threshold = _capped(adaptive, max_threshold)

    # After warm-up the statistics see the norm as clipped by the adaptive
    # threshold, so a spike cannot inflate the bound that is meant to catch the
    # next one; the cap is left out, as in the authors' code, so a cap that
    # binds on every step does not hold the statistics at the cap.
    effective = jnp.where(warm, jnp.minimum(x, adaptive), x)
    ema_mean = decay * state.mean + (1 - decay) * effective
    ema_var = decay * state.var + (1 - decay) * jnp.square(effective - ema_mean)
    seen = (state.count + 1).astype(dtype)
    delta = effective - state.mean
    welford_mean = state.mean + delta / seen
    welford_var = state.var + (delta * (effective - welford_mean) - state.var) / seen
    new_mean = jnp.where(warm, ema_mean, welford_mean)
    new_var = jnp.where(warm, ema_var, welford_var)
    # Nothing non-finite enters the state: it would poison every later bound.
    record = _recordable(x) & jnp.isfinite(new_mean) & jnp.isfinite(new_var)
    mean = jnp.where(record, new_mean, state.mean)
    var = jnp.where(record, new_var, state.var)
    new_state = ZClipState(_increment(state.count, record), mean, var)
    return _threshold(threshold, norm), new_state

  return ThresholdPolicy(init, update)


class EmaRatioState(NamedTuple):
  """State of :func:`ema_ratio`.

  Attributes:
    count: norms recorded so far, per group (int32).
    ema: during warm-up the running mean (``warmup="mean"``) or minimum
      (``warmup="min"``) of the recorded norms; after it, the exponential
      moving average of the clipped norms.
  """

  count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as Optax states do
  ema: jax.Array


_EMA_RATIO_WARMUPS = ("mean", "min")


@policy_factory
def ema_ratio(
  ratio: chex.Numeric = 2.0,
  decay: chex.Numeric = 0.95,
  *,
  warmup_steps: int = 10,
  initial: chex.Numeric = float("inf"),
  max_threshold: chex.Numeric = float("inf"),
  warmup: str = "mean",
) -> ThresholdPolicy:
  """Clip to ``ratio`` times an exponential moving average of the clipped norm.

  As OLMo's ``max_grad_norm_ratio`` (which applies it per parameter tensor:
  use ``clip_by_layer_norm(clipx.ema_ratio())`` for that): the threshold is
  ``ratio * ema``, and the EMA is then updated with the norm after clipping,
  ``ema <- decay * ema + (1 - decay) * min(norm, ratio * ema)``. So the
  threshold can rise by at most a factor ``decay + (1 - decay) * ratio`` per
  step (1.05 with the defaults): slow growth is followed, a spike is cut.

  Warm-up: the EMA starts as the mean of the first ``warmup_steps`` recorded
  norms (OLMo starts it at the first norm: ``warmup_steps=1``), or with
  ``warmup="min"`` as their minimum (AdaGC's seed: a low start, so clipping
  is tight until the EMA has grown); meanwhile the threshold is ``initial``.
  Non-finite and zero norms are not recorded.

  Args:
    ratio: the allowed multiple of the EMA, > 1 (at or below 1 the EMA of
      clipped norms could only shrink, to zero). May be changed at run time
      inside ``optax.inject_hyperparams``.
    decay: EMA decay, in (0, 1). OLMo uses the larger of Adam's betas (0.95).
    warmup_steps: norms recorded before clipping starts; >= 1.
    initial: the threshold during warm-up, > 0 (``inf``: no clipping).
    max_threshold: an upper cap on the threshold at every step, warm-up
      included, > 0 (``inf``: no cap); the EMA sees the norm clipped by it.
    warmup: how the warm-up norms seed the EMA: ``"mean"`` (their running
      mean) or ``"min"`` (their running minimum, as the AdaGC authors' code
      does: ``lishuai-97/AdaGC``, ``megatron-gpt2.patch``, commit
      ``32c249fa365e08169779d63d416bfa76c2be31fc``; see :func:`clipx.presets.adagc`).

  Returns:
    A :class:`ThresholdPolicy` whose state is :class:`EmaRatioState`.

  References:
    Groeneveld et al., `OLMo: Accelerating the Science of Language Models
    <https://arxiv.org/abs/2402.00838>`_, 2024; the rule is
    ``max_grad_norm_ratio`` in `allenai/OLMo <https://github.com/allenai/OLMo>`_
    (``olmo/optim.py``).

  Example:
    >>> import jax, jax.numpy as jnp, clipx
    >>> policy = clipx.ema_ratio(ratio=2.0, warmup_steps=2)
    >>> state, update = policy.init(jnp.zeros(())), jax.jit(policy.update)
    >>> for norm in [1.0, 3.0]:  # EMA starts at their mean, 2
    ...   _, state = update(jnp.float32(norm), state)
    >>> threshold, state = update(jnp.float32(50.0), state)
    >>> float(threshold), round(float(state.ema), 4)  # EMA moves with the clipped norm, 4
    (4.0, 2.1)
  """
  _check_ratio_above_one("ema_ratio", "ratio", ratio)
  validation.number("ema_ratio", "decay", decay, low=0.0, high=1.0, high_open=True)
  _check_common("ema_ratio", warmup_steps, initial, max_threshold)
  validation.choice("ema_ratio", "warmup", warmup, _EMA_RATIO_WARMUPS)

  def init(norm):
    dtype = _stat_dtype(norm)
    return EmaRatioState(
      count=jnp.zeros(jnp.shape(norm), jnp.int32), ema=jnp.zeros(jnp.shape(norm), dtype)
    )

  def update(norm, state):
    dtype = state.ema.dtype
    x = jnp.asarray(norm, dtype)
    beta = jnp.asarray(decay, dtype)
    warm = state.count >= warmup_steps
    threshold = jnp.where(warm, jnp.asarray(ratio, dtype) * state.ema, jnp.asarray(initial, dtype))
    threshold = _capped(threshold, max_threshold)
    ema_update = beta * state.ema + (1 - beta) * jnp.minimum(x, threshold)
    if warmup == "min":
      # The first recorded norm seeds the minimum (the state's 0 is not a norm).
      seed_update = jnp.where(state.count == 0, x, jnp.minimum(state.ema, x))
    else:
      seed_update = state.ema + (x - state.ema) / (state.count + 1).astype(dtype)
    new_ema = jnp.where(warm, ema_update, seed_update)
    record = _recordable(x) & jnp.isfinite(new_ema)
    ema = jnp.where(record, new_ema, state.ema)
    return _threshold(threshold, norm), EmaRatioState(_increment(state.count, record), ema)

  return ThresholdPolicy(init, update)


class QuantileState(NamedTuple):
  """State of :func:`quantile`: the current threshold, per group."""

  threshold: jax.Array


def quantile_step(
  current: jax.Array,
  fraction: jax.Array,
  target_quantile: chex.Numeric,
  learning_rate: chex.Numeric,
  max_threshold: chex.Numeric,
) -> jax.Array:
  """Andrew et al.'s geometric update: ``C * exp(-lr * (fraction - target))``.

  Kept in ``[tiny, min(max_threshold, dtype max)]`` of ``current``'s dtype.
  Shared by :func:`quantile` (the exact unclipped fraction) and
  :func:`clipx.private_quantile` (a noisy one).
  """
  dtype = current.dtype
  step = jnp.asarray(learning_rate, dtype) * (fraction - jnp.asarray(target_quantile, dtype))
  info = jnp.finfo(dtype)
  ceiling = jnp.minimum(info.max, jnp.asarray(max_threshold, dtype))
  return jnp.clip(current * jnp.exp(-step), info.tiny, ceiling)


@policy_factory
def quantile(
  target_quantile: chex.Numeric = 0.5,
  learning_rate: chex.Numeric = 0.2,
  initial: chex.Numeric = 1.0,
  *,
  max_threshold: chex.Numeric = float("inf"),
) -> ThresholdPolicy:
  """A threshold driven geometrically toward a target quantile of the norms.

  Each step the norm is clipped to the current threshold ``C``; then, with
  ``b`` the fraction of norms that were not clipped (``norm <= C``),
  ``C <- C * exp(-learning_rate * (b - target_quantile))``: the threshold
  falls while more than the target fraction passes unclipped and rises while
  fewer do, so it settles where ``target_quantile`` of the norms pass. This is
  online gradient descent on the quantile (pinball) loss in ``log C``.

  Batches of per-example norms (DP-SGD): ``update`` also accepts a norm with
  one extra leading axis, shape ``(B,) + state shape``. Then ``b`` is the
  fraction of the batch left unclipped, the returned threshold has the
  state's shape, and it is the threshold *before* this step's update (the one
  to clip this batch with), as in the paper. Non-finite and zero norms are
  left out of the fraction, as every policy leaves them out of its
  statistics (a frozen layer's zero norms would otherwise drive its threshold
  down to nothing); with none left the threshold does not move. Private
  training must add noise to the unclipped count itself (the paper's
  ``sigma_b``); this policy computes the exact fraction.

  There is no warm-up: the threshold starts at ``initial`` and moves from the
  first step (by at most a factor ``exp(learning_rate)`` per step). It is kept
  within the positive finite range of its dtype, so it can always recover.

  Args:
    target_quantile: the fraction of norms to leave unclipped, in (0, 1); at 0
      or 1 the threshold would drift to zero or infinity.
    learning_rate: step size of the geometric update, > 0 (the paper uses 0.2).
    initial: the starting threshold, positive and finite.
    max_threshold: an upper cap on the threshold, > 0 (``inf``: no cap); the
      threshold is kept at or below it.

  Returns:
    A :class:`ThresholdPolicy` whose state is :class:`QuantileState`.

  References:
    Andrew et al., `Differentially Private Learning with Adaptive Clipping
    <https://arxiv.org/abs/1905.03871>`_, NeurIPS 2021.

  Example:
    >>> import jax, jax.numpy as jnp, clipx
    >>> policy = clipx.quantile(target_quantile=0.5, learning_rate=0.2, initial=1.0)
    >>> state = policy.init(jnp.zeros(()))
    >>> norms = jnp.array([0.5, 0.7, 2.0, 3.0])  # per-example: half unclipped
    >>> threshold, state = jax.jit(policy.update)(norms, state)
    >>> float(threshold), float(state.threshold)  # b = 0.5 = target: no change
    (1.0, 1.0)
  """
  validation.number(
    "quantile", "target_quantile", target_quantile, low=0.0, high=1.0, high_open=True
  )
  validation.positive("quantile", "learning_rate", learning_rate, finite=True)
  validation.positive("quantile", "initial", initial, finite=True)
  validation.positive("quantile", "max_threshold", max_threshold)

  def init(norm):
    start = _capped(jnp.asarray(initial, _stat_dtype(norm)), max_threshold)
    return QuantileState(jnp.full(jnp.shape(norm), start, _stat_dtype(norm)))

  def update(norm, state):
    current = state.threshold
    norm = jnp.asarray(norm)
    if norm.ndim == current.ndim:
      batch = norm[None]
    elif norm.ndim == current.ndim + 1:
      batch = norm
    else:
      raise ValueError(
        f"clipx.quantile: norm has shape {norm.shape}; expected the state's shape"
        f" {current.shape} or one leading batch axis in front of it."
      )
    batch = batch.astype(current.dtype)
    recorded = _recordable(batch)
    counted = jnp.sum(recorded, axis=0)
    unclipped = jnp.sum(recorded & (batch <= current), axis=0)
    fraction = unclipped.astype(current.dtype) / jnp.maximum(counted, 1).astype(current.dtype)
    moved = quantile_step(current, fraction, target_quantile, learning_rate, max_threshold)
    new_threshold = jnp.where(counted > 0, moved, current)
    return current, QuantileState(new_threshold)

  return ThresholdPolicy(init, update)


class WindowZScoreState(NamedTuple):
  """State of :func:`window_zscore`.

  Attributes:
    norms: ring buffer of the last ``history`` recorded raw (unclipped) norms,
      shape ``(history,) + norm.shape``; slot ``i`` of a group is valid once
      that group has recorded more than ``i`` norms.
    count: number of norms recorded so far, per group (int32, saturating).
  """

  norms: jax.Array
  count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as Optax states do


@policy_factory
def window_zscore(
  sigma: chex.Numeric = 3.0,
  history: int = 128,
  *,
  warmup_steps: int | None = None,
  std_floor: chex.Numeric = 1e-6,
  initial: chex.Numeric = float("inf"),
  max_threshold: chex.Numeric = float("inf"),
) -> ThresholdPolicy:
  """Clip norms more than ``sigma`` standard deviations above the recent mean.

  Each step the threshold is ``mean + sigma * max(std, std_floor)`` of the
  last ``history`` recorded norms (``std`` the population standard deviation,
  ``ddof=0``); then the step's norm, *unclipped*, is recorded. As levanter's
  ``clip_update_by_historical_norm``, which places it after the optimizer
  (``optax.chain(optax.scale_by_adam(), clipx.clip_by_global_norm(
  window_zscore()), optax.scale(-lr))``) to clip the update rather than the
  gradient. Recording the raw norm keeps the window honest: a run of clipped
  norms cannot pull the bound down after itself ("to prevent collapse").

  Unlike :func:`zclip` the statistics are those of a fixed window (a ring
  buffer, as :func:`autoclip` keeps), not EMAs, there is no reciprocal mode,
  and spikes are recorded as they were; unlike :func:`autoclip` the statistic
  is mean plus a multiple of the standard deviation, not a percentile.

  Warm-up: until ``warmup_steps`` norms have been recorded the threshold is
  ``initial`` (by default ``inf``: no clipping). Deviations from levanter,
  deliberate: non-finite and zero norms are not recorded (clipx's shared rule
  for every policy; levanter records every norm, so one NaN makes its bound
  NaN, and nothing is clipped, until the NaN leaves the window); and the
  record count does not saturate at ``history``, so ``warmup_steps`` larger
  than ``history`` delays clipping instead of disabling it for good. On a
  stream of finite non-zero norms the two agree to float32 rounding.

  Args:
    sigma: how many standard deviations above the mean a norm may lie, > 0
      (``inf``: never clip); may be changed at run time inside
      ``optax.inject_hyperparams`` without recompiling.
    history: the window length (a Python int; it sets the state's shape).
    warmup_steps: norms recorded before clipping starts, >= 1; ``None``
      (default) means ``max(2, history // 2)``, levanter's rule (64 for the
      default window).
    std_floor: an absolute lower bound on the standard deviation, >= 0 and
      finite, so a window of equal norms does not clip at its mean
      (levanter's ``1e-6``). It is absolute: for tiny norms (per-layer norms
      of small layers) lower it, or the bound is loose.
    initial: the threshold during warm-up, > 0 (``inf``: no clipping).
    max_threshold: an upper cap on the threshold at every step, warm-up
      included, > 0 (``inf``: no cap). The window still records raw norms.

  Returns:
    A :class:`ThresholdPolicy` whose state is :class:`WindowZScoreState`.

  References:
    levanter, `stanford-crfm/levanter <https://github.com/stanford-crfm/levanter>`_
    at commit ``9263f81e8b453241332c2c0b2d2001bfb2d2241c``,
    ``src/levanter/optim/clip_update_norm.py`` (``clip_update_by_historical_norm``,
    L36-115; chained after ``scale_by_adam`` in ``src/levanter/optim/config.py``
    L479-482). The rule is the three-sigma rule of statistical process
    control over a sliding window.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from clipx.thresholds import window_zscore
    >>> policy = window_zscore(sigma=2.0, history=4, warmup_steps=4)
    >>> state, update = policy.init(jnp.zeros(())), jax.jit(policy.update)
    >>> for norm in [1.0, 3.0, 1.0, 3.0]:  # mean 2, std 1
    ...   _, state = update(jnp.float32(norm), state)
    >>> threshold, state = update(jnp.float32(100.0), state)
    >>> float(threshold)  # 2 + 2 * 1
    4.0
    >>> sorted(state.norms.tolist())  # the spike is recorded unclipped
    [1.0, 3.0, 3.0, 100.0]
  """
  owner = "window_zscore"
  validation.positive(owner, "sigma", sigma)
  validation.integer(owner, "history", history, 1)
  if warmup_steps is not None:
    validation.integer(owner, "warmup_steps", warmup_steps, 1)
  validation.nonnegative(owner, "std_floor", std_floor, finite=True)
  validation.positive(owner, "initial", initial)
  validation.positive(owner, "max_threshold", max_threshold)

  def init(norm):
    return WindowZScoreState(*_ring_buffer("window_zscore", history, norm))

  def update(norm, state):
    # The window length comes from the state, not the argument, so a traced
    # ``history`` (inject_hyperparams without static_args) still works.
    size = state.norms.shape[0]
    warmup = max(2, size // 2) if warmup_steps is None else warmup_steps
    dtype = state.norms.dtype
    slot = jnp.arange(size).reshape((size,) + (1,) * state.count.ndim)
    valid = slot < jnp.minimum(state.count, size)
    seen = jnp.maximum(jnp.minimum(state.count, size), 1).astype(dtype)
    mean = jnp.sum(jnp.where(valid, state.norms, 0), axis=0) / seen
    deviation = jnp.where(valid, state.norms - mean, 0)
    std = jnp.sqrt(jnp.sum(jnp.square(deviation), axis=0) / seen)
    spread = jnp.maximum(std, jnp.asarray(std_floor, dtype))
    k = jnp.asarray(sigma, dtype)
    # sigma = inf never clips, even where the spread is 0 (inf * 0 would be NaN).
    bound = jnp.where(jnp.isinf(k), jnp.inf, mean + k * spread)
    threshold = jnp.where(state.count >= warmup, bound, jnp.asarray(initial, dtype))
    threshold = _capped(threshold, max_threshold)
    window = _ring_record(state.norms, state.count, norm)
    return _threshold(threshold, norm), WindowZScoreState(*window)

  return ThresholdPolicy(init, update)
