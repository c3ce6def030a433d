"""SPAM: Adam with element-wise spike clipping and periodic momentum resets.

SPAM (Huang et al., ICLR 2025) clips an entry of the gradient whose square
exceeds ``threshold`` times Adam's second moment of that entry, to
``sign(g) * sqrt(threshold * v)``, and zeroes both moments every ``interval``
steps, then scales the update up from 1% over ``warmup`` steps (a cosine).

Why an optimizer of its own, not a clip before ``optax.adam``: the bound of
each entry is Adam's own second moment ``v``, read before this step's update,
and the reset zeroes Adam's moments; a transform before Adam sees neither.
Why not a wrapper of ``optax.scale_by_adam``'s state: the authors' Adam is
not Optax's. Their ``eps`` is added to ``sqrt(v)`` before bias correction
(``m_hat / (sqrt(v_hat) + eps / sqrt(1 - b2**t))``; Optax adds it to
``sqrt(v_hat)``), and their bias-correction count is not reset with the
moments; matching them step by step at their defaults needs both, so
:func:`scale_by_spam` is Adam written out (thirty lines) with SPAM's
clip, reset and warm-up in it.

Numerics: an entry is a spike when ``|g| > sqrt(threshold) * sqrt(v)``,
the reference's ``g**2 > threshold * v`` without its overflow (for
``|g| > 1.8e19`` or ``v > 6.8e34``); entries whose ``v`` is 0 are never
clipped (see the deviation in :func:`scale_by_spam`). The moments are kept in
float32 or wider, the update in the gradient's dtype. Bias corrections are
formed as ``-expm1(t * log1p(-(1 - b)))``, a few ulp off the reference's
double-precision ``1 - b**t``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from clipx import norms, validation
from clipx.rescaling import _bias_correction, _ema_coefficients
from clipx.stats import ClipStats, init_clip_stats
from clipx.transforms import _stats

# The reference's warm-up: CosineDecay(0.99, warmup) subtracted from 1 (SPAM.py L138, L194).
WARMUP_START = 0.99


class SpamState(NamedTuple):
  """State of :func:`scale_by_spam`.

  Attributes:
    count: steps taken (int32); not reset with the moments, as in the reference.
    mu: Adam's first moment (float32 or wider), zeroed every ``interval`` steps.
    nu: Adam's second moment, zeroed with ``mu``.
    stats: the latest step's clipping: ``norm`` and ``clipped_norm`` the global
      L2 norm of the gradient before and after, ``threshold`` the ratio
      ``threshold`` (``g**2 / v`` above it is a spike), ``scale`` their ratio,
      ``clipped`` whether any entry was clipped, ``clip_count`` steps with a spike.
    spikes: entries clipped in the latest step (int32).
    warmup: the factor the latest update was multiplied by (1 outside a warm-up).
  """

  count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as Optax states do
  mu: optax.Updates
  nu: optax.Updates
  stats: ClipStats
  spikes: jax.Array
  warmup: jax.Array


SpamState.clipx_kind = "spam"  # type: ignore[attr-defined]


def warmup_factor(step: jax.Array, interval: Any, warmup: Any) -> jax.Array:
  """The factor of update ``step`` (1-based): ``1 - 0.99 (1 + cos(pi t / (warmup + 1))) / 2``.

  ``t = step mod interval`` counts the steps since the latest reset (0 at the
  reset step itself); the factor is 1 for ``t >= warmup`` and before the first
  reset, as the reference's ``current_step`` starts at ``warmup + 1``
  (SPAM.py L135, L194, L286-295; torch's closed-form ``CosineAnnealingLR``
  with ``T_max = warmup + 1``, cut to 0 from ``warmup`` on, L55-58).
  """
  step = jnp.asarray(step, jnp.int32)
  if interval is None:
    return jnp.ones((), jnp.float32)
  since = jnp.mod(step, interval)
  active = (step >= interval) & (since < warmup)
  phase = jnp.pi * since.astype(jnp.float32) / (jnp.asarray(warmup, jnp.float32) + 1)
  decay = WARMUP_START * (1 + jnp.cos(phase)) / 2
  return jnp.where(active, 1 - decay, 1).astype(jnp.float32)


def _moment_dtype(leaf: jax.Array) -> jnp.dtype:
  return jnp.promote_types(leaf.dtype, jnp.float32)


def _clip_leaf(g, v, root_threshold, active):
  """``(clipped, spikes)``: entries with ``|g| > sqrt(threshold v)`` set to that, with g's sign."""
  g = jnp.asarray(g).astype(v.dtype)
  limit = root_threshold * jnp.sqrt(v)
  # v == 0: no history for that entry; the reference would zero it (see scale_by_spam).
  spike = active & (jnp.abs(g) > limit) & (v > 0)
  return jnp.where(spike, jnp.sign(g) * limit, g), jnp.sum(spike, dtype=jnp.int32)


def scale_by_spam(
  b1: chex.Numeric = 0.9,
  b2: chex.Numeric = 0.999,
  eps: chex.Numeric = 1e-6,
  *,
  threshold: chex.Numeric = 5000.0,
  interval: int | None = 500,
  warmup: int = 150,
  delay: int = 20,
  axis_name: Any = None,
) -> optax.GradientTransformation:
  """SPAM's Adam scaling: spike clipping against ``v``, moment resets, warm-up after each.

  Per step ``t`` (1-based), in this order (SPAM.py L226-272):

  1. where ``t`` is a multiple of ``interval``, ``m`` and ``v`` are zeroed;
  2. where ``t >= delay`` and ``t mod interval >= delay``, every entry with
     ``g**2 > threshold * v`` becomes ``sign(g) * sqrt(threshold * v)``
     (``v`` before this step's update);
  3. ``m <- b1 m + (1 - b1) g``, ``v <- b2 v + (1 - b2) g**2``;
  4. the update is ``w * sqrt(1 - b2**t) / (1 - b1**t) * m / (sqrt(v) + eps)``,
     ``w`` the warm-up factor (:func:`warmup_factor`), which rises from 0.01
     to 1 over the ``warmup`` steps after each reset.

  Args:
    b1: decay of the first moment, in [0, 1).
    b2: decay of the second moment, in [0, 1).
    eps: added to ``sqrt(v)`` (not bias-corrected, as the reference), >= 0.
    threshold: the spike ratio ``theta`` (``g**2 / v`` above it is clipped), > 0.
      May be changed at run time inside ``optax.inject_hyperparams``.
    interval: the reset period ``DeltaT`` in steps (>= 1), or None: never reset
      (and no warm-up).
    warmup: steps of warm-up after each reset (>= 0).
    delay: steps after the start and after each reset before clipping starts
      (the reference's ``grad_accu_steps``), >= 0.
    axis_name: inside ``shard_map``/``pmap``, the axis the leaves are split
      over: the statistics' norms and spike count are then global (the clip
      itself is element-wise and needs no communication).

  Returns:
    An ``optax.GradientTransformation`` whose state is :class:`SpamState`;
    ``clipx.stats`` reports it under ``clip/spam/...``.

  References:
    Huang et al., `SPAM: Spike-Aware Adam with Momentum Reset for Stable LLM
    Training <https://arxiv.org/abs/2501.06842>`_, ICLR 2025; repository
    ``TianjinYellow/SPAM-Optimizer``, ``galore_torch/SPAM.py`` L61-297 (class
    ``AdamW``, exported as ``SPAM``), commit
    ``e8185fbe695fdc449953b4a1f96121df5bf0d268``.

  Defaults are the authors' (``SPAM.py`` L90-103 and their README:
  ``warmup_steps=150, threshold=5000, DeltaT=500``, ``eps=1e-6``);
  ``pytorch_optimizer.SPAM`` defaults to ``warmup_epoch=50`` and its warm-up
  runs one step ahead of the authors' (its ``CosineDecay.step`` advances the
  scheduler past ``current_step``). Deviations from the reference: an entry
  whose ``v`` is 0 is not clipped (the reference sets it to 0, so a parameter
  first reached after ``delay`` steps, such as the embedding of a token not
  seen yet, is zeroed and, its ``v`` staying 0, never learns); the random
  sparse masks (``density``) are left out; clipping is never switched off
  by ``threshold=0`` (use ``optax.adam``); ``interval=None`` replaces the
  reference's ``DeltaT=0``, which divides by zero.

  Example:
    >>> import jax.numpy as jnp, clipx
    >>> tx = clipx.scale_by_spam(delay=1)
    >>> params = {"w": jnp.zeros(3)}
    >>> state = tx.init(params)
    >>> _, state = tx.update({"w": jnp.ones(3)}, state)
    >>> out, state = tx.update({"w": jnp.array([1.0, 1.0, 1e3])}, state)
    >>> int(state.spikes)  # 1e3**2 > 5000 * 0.001 * 1**2
    1
  """
  owner = "scale_by_spam"
  validation.number(owner, "b1", b1, low=0.0, low_open=False, high=1.0, high_open=True)
  validation.number(owner, "b2", b2, low=0.0, low_open=False, high=1.0, high_open=True)
  validation.nonnegative(owner, "eps", eps, finite=True)
  validation.positive(owner, "threshold", threshold, finite=True)
  if interval is not None:
    validation.integer(owner, "interval", interval, 1)
  validation.integer(owner, "warmup", warmup, 0)
  validation.integer(owner, "delay", delay, 0)

  def init_fn(params):
    zeros = lambda p: jnp.zeros(jnp.shape(p), _moment_dtype(jnp.asarray(p)))  # noqa: E731
    return SpamState(
      count=jnp.zeros((), jnp.int32),
      mu=jax.tree.map(zeros, params),
      nu=jax.tree.map(zeros, params),
      stats=init_clip_stats(),
      spikes=jnp.zeros((), jnp.int32),
      warmup=jnp.ones((), jnp.float32),
    )

  def update_fn(updates, state, params=None):
    del params
    norms.check_float_leaves(updates)
    step = optax.safe_increment(state.count)
    if interval is None:
      reset = jnp.zeros((), bool)
      active = step >= delay
    else:
      reset = jnp.mod(step, interval) == 0
      active = (step >= delay) & (jnp.mod(step, interval) >= delay)
    mu = jax.tree.map(lambda m: jnp.where(reset, jnp.zeros_like(m), m), state.mu)
    nu = jax.tree.map(lambda v: jnp.where(reset, jnp.zeros_like(v), v), state.nu)
    treedef = jax.tree.structure(updates)
    root_threshold = jnp.sqrt(jnp.asarray(threshold, jnp.float32))
    pairs = [
      _clip_leaf(g, v, root_threshold.astype(v.dtype), active)
      for g, v in zip(jax.tree.leaves(updates), jax.tree.leaves(nu))
    ]
    clipped = jax.tree_util.tree_unflatten(treedef, [c for c, _ in pairs])
    spikes = sum((s for _, s in pairs), jnp.zeros((), jnp.int32))
    if axis_name is not None:
      spikes = jax.lax.psum(spikes, axis_name)

    beta1, rest1 = _ema_coefficients(b1, jnp.float32)
    beta2, rest2 = _ema_coefficients(b2, jnp.float32)
    mu = jax.tree.map(
      lambda m, g: beta1.astype(m.dtype) * m + rest1.astype(m.dtype) * g, mu, clipped
    )
    nu = jax.tree.map(
      lambda v, g: beta2.astype(v.dtype) * v + rest2.astype(v.dtype) * g * g, nu, clipped
    )
    # The reference's step_size * scale_factor (SPAM.py L254-272), one scalar.
    factor = warmup_factor(step, interval, warmup) * (
      jnp.sqrt(_bias_correction(step, rest2)) / _bias_correction(step, rest1)
    )
    out = jax.tree.map(
      lambda m, v, g: (factor.astype(m.dtype) * (m / (jnp.sqrt(v) + eps))).astype(
        jnp.asarray(g).dtype
      ),
      mu,
      nu,
      updates,
    )

    norm = norms.global_norm(updates, axis_name=axis_name)
    clipped_norm = norms.global_norm(clipped, axis_name=axis_name)
    hit = spikes > 0
    scale = jnp.where(hit, clipped_norm / jnp.where(hit, norm, 1), 1)
    stats = _stats(
      norm,
      clipped_norm,
      jnp.asarray(threshold, norm.dtype),
      scale.astype(norm.dtype),
      hit,
      state.stats,
    )
    warm = warmup_factor(step, interval, warmup)
    return out, SpamState(step, mu, nu, stats, spikes, warm)

  return optax.GradientTransformation(init_fn, update_fn)


class DecayAfterStepState(NamedTuple):
  """State of SPAM's weight decay: the step count, for a learning-rate schedule."""

  count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as Optax states do


def _decay_after_step(
  learning_rate: optax.ScalarOrSchedule, weight_decay: chex.Numeric
) -> optax.GradientTransformation:
  """``u <- u - lr * wd * (p + u)``: decay of the *new* weights, as the reference (L274-282)."""

  def init_fn(params):
    del params
    return DecayAfterStepState(jnp.zeros((), jnp.int32))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("clipx.spam: weight_decay needs params in update(updates, state, params).")
    rate = learning_rate(state.count) if callable(learning_rate) else learning_rate
    decay = jnp.asarray(rate, jnp.float32) * jnp.asarray(weight_decay, jnp.float32)
    out = jax.tree.map(
      lambda u, p: (u - decay.astype(jnp.asarray(u).dtype) * (p + u)).astype(jnp.asarray(u).dtype),
      updates,
      params,
    )
    return out, DecayAfterStepState(optax.safe_increment(state.count))

  return optax.GradientTransformation(init_fn, update_fn)


def spam(
  learning_rate: optax.ScalarOrSchedule = 1e-3,
  b1: chex.Numeric = 0.9,
  b2: chex.Numeric = 0.999,
  eps: chex.Numeric = 1e-6,
  weight_decay: chex.Numeric = 0.0,
  *,
  threshold: chex.Numeric = 5000.0,
  interval: int | None = 500,
  warmup: int = 150,
  delay: int = 20,
  axis_name: Any = None,
) -> optax.GradientTransformation:
  """The SPAM optimizer: :func:`scale_by_spam`, the learning rate, then weight decay.

  ``optax.chain(scale_by_spam(...), optax.scale_by_learning_rate(learning_rate))``,
  followed where ``weight_decay > 0`` by the reference's decoupled decay of the
  *updated* weights, ``p <- (p - lr * u) * (1 - lr * weight_decay)`` (SPAM.py
  L274-282; ``optax.adamw`` decays the old weights instead).

  Args:
    learning_rate: a float or an Optax schedule.
    b1: as in :func:`scale_by_spam`.
    b2: as in :func:`scale_by_spam`.
    eps: as in :func:`scale_by_spam`.
    threshold: as in :func:`scale_by_spam`.
    interval: as in :func:`scale_by_spam`.
    warmup: as in :func:`scale_by_spam`.
    delay: as in :func:`scale_by_spam`.
    axis_name: as in :func:`scale_by_spam`.
    weight_decay: decoupled weight decay, >= 0 (the reference's default 0).

  Returns:
    An ``optax.GradientTransformation``; the SPAM part of its state is
    :class:`SpamState` (``clipx.stats`` finds it).

  References:
    Huang et al., `SPAM: Spike-Aware Adam with Momentum Reset for Stable LLM
    Training <https://arxiv.org/abs/2501.06842>`_, ICLR 2025.

  Example:
    >>> import jax.numpy as jnp, optax, clipx
    >>> tx = clipx.spam(1e-3)
    >>> params = {"w": jnp.ones(2)}
    >>> updates, state = tx.update({"w": jnp.ones(2)}, tx.init(params), params)
    >>> new_w = optax.apply_updates(params, updates)["w"]
    >>> print(*(round(float(u), 6) for u in new_w))
    0.999 0.999
  """
  validation.nonnegative("spam", "weight_decay", weight_decay, finite=True)
  if not callable(learning_rate):
    validation.nonnegative("spam", "learning_rate", learning_rate, finite=True)
  parts = [
    scale_by_spam(
      b1,
      b2,
      eps,
      threshold=threshold,
      interval=interval,
      warmup=warmup,
      delay=delay,
      axis_name=axis_name,
    ),
    optax.scale_by_learning_rate(learning_rate),
  ]
  # An array (as inside optax.inject_hyperparams, at init and under jit alike) may be
  # non-zero later: the chain's structure must not depend on its value.
  if isinstance(weight_decay, jax.Array) or float(weight_decay) > 0:
    parts.append(_decay_after_step(learning_rate, weight_decay))
  return optax.chain(*parts)
