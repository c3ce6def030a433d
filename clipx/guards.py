"""Response wrappers: skip the whole optimizer step instead of scaling it.

The inner optimizer's update is replaced by zeros and its state is kept as it
was, so a bad batch leaves no trace in momentum or Adam's moments. Skipped
steps are counted in :class:`clipx.SkipStats`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from clipx import norms
from clipx.stats import SkipStats
from clipx.thresholds import check_positive, concrete_float


class SkipNonfiniteState(NamedTuple):
  """State of :func:`skip_nonfinite`."""

  inner_state: Any
  stats: SkipStats


SkipNonfiniteState.clipx_kind = "skip_nonfinite"  # type: ignore[attr-defined]


class SkipSpikesState(NamedTuple):
  """State of :func:`skip_spikes`: the inner state and the norm's EMA."""

  inner_state: Any
  stats: SkipStats
  ema: jax.Array
  count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as Optax states do


SkipSpikesState.clipx_kind = "skip_spikes"  # type: ignore[attr-defined]


def all_finite(tree: Any) -> jax.Array:
  """Whether every element of every leaf is finite (one reduction per shape)."""
  leaves = norms.check_float_leaves(tree)
  if not leaves:
    return jnp.bool_(True)
  per_leaf = norms.per_leaf_reduce(
    leaves, lambda x: jnp.all(jnp.isfinite(x), axis=tuple(range(1, x.ndim)))
  )
  return jnp.all(per_leaf)


def _select_step(keep, new_updates, new_state, old_state):
  """New updates and state where ``keep``; zero updates and the old state otherwise."""
  updates = jax.tree.map(lambda u: jnp.where(keep, u, jnp.zeros_like(u)), new_updates)
  state = jax.tree.map(lambda new, old: jnp.where(keep, new, old), new_state, old_state)
  return updates, state


def skip_nonfinite(
  inner: optax.GradientTransformation, *, axis_name: Any = None
) -> optax.GradientTransformationExtraArgs:
  """Skips the step (zero update, inner state unchanged) when updates hold NaN/Inf.

  Unlike ``optax.apply_if_finite`` this has no limit after which bad steps are
  applied anyway: a non-finite gradient never reaches the parameters. Skipped
  steps are counted in ``clipx.stats(state)["skip_nonfinite"].skip_count``.

  Args:
    inner: the optimizer to protect, e.g. ``optax.chain(clipx..., optax.sgd(...))``.
    axis_name: inside ``shard_map``/``pmap``, the mapped axis the updates are
      sharded over: a NaN on one shard then skips the step on every shard (one
      all-reduce of a flag). Without it each shard would decide alone, and the
      shards' parameters and optimizer states would drift apart.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` wrapping ``inner``.

  Example:
    >>> import jax.numpy as jnp, optax, clipx
    >>> tx = clipx.skip_nonfinite(optax.sgd(0.1, momentum=0.9))
    >>> params = {"w": jnp.ones(2)}
    >>> updates, state = tx.update({"w": jnp.array([1.0, jnp.nan])}, tx.init(params), params)
    >>> updates["w"], int(clipx.stats(state)["skip_nonfinite"].skip_count)
    (Array([0., 0.], dtype=float32), 1)
  """
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    stats = SkipStats(
      skipped=jnp.bool_(False),
      skip_count=jnp.zeros([], jnp.int32),
      norm=jnp.full([], jnp.nan, jnp.float32),
      threshold=jnp.full([], jnp.inf, jnp.float32),
    )
    return SkipNonfiniteState(inner.init(params), stats)

  def update_fn(updates, state, params=None, **extra_args):
    finite = all_finite(updates)
    if axis_name is not None:
      finite = jax.lax.psum(jnp.logical_not(finite).astype(jnp.int32), axis_name) == 0
    new_updates, new_inner = inner.update(updates, state.inner_state, params, **extra_args)
    new_updates, inner_state = _select_step(finite, new_updates, new_inner, state.inner_state)
    skipped = jnp.logical_not(finite)
    stats = state.stats._replace(
      skipped=skipped, skip_count=state.stats.skip_count + skipped.astype(jnp.int32)
    )
    return new_updates, SkipNonfiniteState(inner_state, stats)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def skip_spikes(
  inner: optax.GradientTransformation,
  *,
  factor: float = 5.0,
  decay: float = 0.99,
  warmup_steps: int = 10,
  axis_name: Any = None,
) -> optax.GradientTransformationExtraArgs:
  """Skips the step when the gradient norm exceeds ``factor`` x its running EMA.

  For rare, catastrophic batches in long runs (loss spikes): instead of
  scaling the gradient down, the step is dropped and the inner optimizer's
  state (momentum, Adam moments) left untouched. Non-finite norms are skipped
  too. The EMA (bias-corrected) is updated only with the norms of applied
  steps, so a spike does not raise the bar for the next one. During the first
  ``warmup_steps`` steps nothing is skipped for spikes (the EMA is not yet
  meaningful); non-finite steps are always skipped.

  Args:
    inner: the optimizer to protect.
    factor: a step is skipped when ``norm > factor * ema``; must be > 1.
    decay: EMA decay of the norm, in (0, 1).
    warmup_steps: number of applied steps before spikes can be skipped.
    axis_name: inside ``shard_map``/``pmap``, the axis the updates are sharded
      over (the norm is then global over it).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` wrapping ``inner``.

  References:
    Chowdhery et al., `PaLM: Scaling Language Modeling with Pathways
    <https://arxiv.org/abs/2204.02311>`_, 2022 (skipping batches around spikes);
    Molybog et al., `A Theory on Adam Instability in Large-Scale Machine
    Learning <https://arxiv.org/abs/2304.09871>`_, 2023.
  """
  check_positive("factor", factor)
  # Traced values (inside optax.inject_hyperparams under jit) cannot be checked.
  factor_value, decay_value = concrete_float(factor), concrete_float(decay)
  warmup_value = concrete_float(warmup_steps)
  if factor_value is not None and not factor_value > 1:
    raise ValueError(f"clipx.skip_spikes: factor must be > 1, got {factor!r}.")
  if decay_value is not None and not 0 < decay_value < 1:
    raise ValueError(f"clipx.skip_spikes: decay must be in (0, 1), got {decay!r}.")
  if warmup_value is not None and not warmup_value >= 0:
    raise ValueError(f"clipx.skip_spikes: warmup_steps must be >= 0, got {warmup_steps!r}.")
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    stats = SkipStats(
      skipped=jnp.bool_(False),
      skip_count=jnp.zeros([], jnp.int32),
      norm=jnp.zeros([], jnp.float32),
      threshold=jnp.full([], jnp.inf, jnp.float32),
    )
    zero = jnp.zeros([], jnp.float32)
    return SkipSpikesState(inner.init(params), stats, zero, jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None, **extra_args):
    norm = norms.global_norm(updates, axis_name=axis_name).astype(jnp.float32)
    debiased = state.ema / (1 - decay ** state.count.astype(jnp.float32))
    threshold = jnp.where(state.count >= warmup_steps, factor * debiased, jnp.inf)
    keep = jnp.isfinite(norm) & (norm <= threshold)
    new_updates, new_inner = inner.update(updates, state.inner_state, params, **extra_args)
    new_updates, inner_state = _select_step(keep, new_updates, new_inner, state.inner_state)
    ema = jnp.where(keep, decay * state.ema + (1 - decay) * norm, state.ema)
    count = state.count + keep.astype(jnp.int32)
    skipped = jnp.logical_not(keep)
    stats = SkipStats(
      skipped=skipped,
      skip_count=state.stats.skip_count + skipped.astype(jnp.int32),
      norm=norm,
      threshold=threshold.astype(jnp.float32),
    )
    return new_updates, SkipSpikesState(inner_state, stats, ema, count)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
