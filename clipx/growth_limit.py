"""Fira's norm-growth limiter as a threshold policy: a norm may grow by ``gamma`` per step.

A threshold policy (:mod:`clipx.thresholds`), so every scope takes it:
``clip_by_layer_norm(growth_limit())`` limits each tensor as Fira does,
``clip_by_global_norm(growth_limit())`` the whole tree. The bound is relative
to the previous step's *limited* norm, so a spike is cut to ``gamma`` times
the last accepted norm and the bound then climbs back by ``gamma`` per step:
a sudden rise is spread over many steps while slow growth passes untouched.
"""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

from clipx import thresholds, validation
from clipx.thresholds import ThresholdPolicy, policy_factory


class GrowthLimitState(NamedTuple):
  """State of :func:`growth_limit`.

  Attributes:
    count: norms recorded so far, per group (int32, saturating).
    previous: the latest recorded norm after limiting, per group (0 before any).
  """

  count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as Optax states do
  previous: jax.Array


@policy_factory
def growth_limit(
  gamma: chex.Numeric = 1.01,
  *,
  initial: chex.Numeric = float("inf"),
  max_threshold: chex.Numeric = float("inf"),
) -> ThresholdPolicy:
  """Fira's norm-growth limiter: the threshold is ``gamma`` times the previous limited norm.

  Each step the threshold is ``gamma * previous``, where ``previous`` is the
  last recorded norm after limiting, ``min(norm, threshold)``; a norm above it
  is scaled down to it (by the scope: per tensor with
  :func:`clipx.clip_by_layer_norm`, as Fira), and ``previous`` becomes the
  limited norm. The first recorded norm is not limited (threshold
  ``initial``); it seeds ``previous``. Zero and non-finite norms are not
  recorded (clipx's rule for every policy).

  This is :func:`clipx.ema_ratio` with ``decay=0`` and ``warmup_steps=1``
  (the EMA of the clipped norm is then the last clipped norm), a decay that
  ``ema_ratio`` refuses because its EMA would be no average.

  Deviations from the authors' code: Fira limits with
  ``limiter = max(norm / (previous + 1e-8), gamma) / gamma``, i.e. the
  threshold ``gamma * (previous + 1e-8)``; here it is ``gamma * previous``
  (the ``1e-8`` is absolute, so it loosens the bound of tensors whose norm is
  near 1e-8 and is below float32 rounding for norms near 1). The reference
  records every norm, so a zero norm makes its next threshold ``gamma *
  1e-8`` and a NaN norm disables the limiter for good; here neither is
  recorded. Fira applies the limiter to the full-rank compensation term of
  its GaLore-projected AdamW update, per weight matrix; clipx applies it to
  whatever reaches the scope (the gradient before an optimizer, or an update
  after one).

  Args:
    gamma: the largest growth factor per step, >= 1 (Fira's 1.01; at 1 the
      bound never rises above the first norm). May be changed at run time
      inside ``optax.inject_hyperparams`` without recompiling.
    initial: the threshold before a norm has been recorded, > 0 (``inf``:
      the first norm is not limited, as in Fira).
    max_threshold: an upper cap on the threshold at every step, > 0 (``inf``:
      no cap); ``previous`` records the norm clipped by it.

  Returns:
    A :class:`ThresholdPolicy` whose state is :class:`GrowthLimitState`.

  References:
    Chen et al., `Fira: Can We Achieve Full-rank Training of LLMs Under
    Low-rank Constraint? <https://arxiv.org/abs/2410.01623>`_, 2024
    (section 4.2, the norm-growth limiter). The authors' code:
    `xichen-fy/Fira <https://github.com/xichen-fy/Fira>`_, file
    ``optimizer_torch/fira_adamw.py`` L136-147, commit
    ``5c28b13408282b3ee65386b110318659412ddad9``; the same rule in
    ``pytorch_optimizer`` 4.1.0 (PyPI), ``pytorch_optimizer/optimizer/fira.py``
    L181-189, which ``tests/test_growth_limit.py`` runs.

  Example:
    >>> import jax, jax.numpy as jnp, clipx
    >>> policy = clipx.growth_limit(gamma=1.5)
    >>> state, update = policy.init(jnp.zeros(())), jax.jit(policy.update)
    >>> for norm in [2.0, 10.0, 10.0]:
    ...   threshold, state = update(jnp.float32(norm), state)
    >>> float(threshold), float(state.previous)  # 2 -> 3 -> 4.5
    (4.5, 4.5)
  """
  owner = "growth_limit"
  validation.number(owner, "gamma", gamma, low=1.0, low_open=False)
  validation.positive(owner, "initial", initial)
  validation.positive(owner, "max_threshold", max_threshold)

  def init(norm):
    dtype = thresholds._stat_dtype(norm)
    shape = jnp.shape(norm)
    return GrowthLimitState(jnp.zeros(shape, jnp.int32), jnp.zeros(shape, dtype))

  def update(norm, state):
    dtype = state.previous.dtype
    x = jnp.asarray(norm, dtype)
    seen = state.count > 0
    threshold = jnp.where(
      seen, jnp.asarray(gamma, dtype) * state.previous, jnp.asarray(initial, dtype)
    )
    threshold = thresholds._capped(threshold, max_threshold)
    record = thresholds._recordable(x)
    previous = jnp.where(record, jnp.minimum(x, threshold), state.previous)
    count = thresholds._increment(state.count, record)
    return thresholds._threshold(threshold, norm), GrowthLimitState(count, previous)

  return ThresholdPolicy(init, update)
