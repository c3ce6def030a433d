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

from clipx import norms, stacking, validation
from clipx.stats import NonfiniteStats, SkipStats


class SkipNonfiniteState(NamedTuple):
  """State of :func:`skip_nonfinite`; ``names`` are the leaves' paths (static)."""

  inner_state: Any
  stats: NonfiniteStats
  names: stacking.GroupNames = stacking.GroupNames()


SkipNonfiniteState.clipx_kind = "skip_nonfinite"  # type: ignore[attr-defined]


class SkipSpikesState(NamedTuple):
  """State of :func:`skip_spikes`: the inner state and the norm's EMA."""

  inner_state: Any
  stats: SkipStats
  ema: jax.Array
  count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as Optax states do
  names: stacking.GroupNames = stacking.GroupNames()


SkipSpikesState.clipx_kind = "skip_spikes"  # type: ignore[attr-defined]


def all_finite(tree: Any) -> jax.Array:
  """Whether every element of every leaf is finite (one reduction per shape)."""
  return jnp.all(_finite_leaves(tree))


def _finite_leaves(tree: Any) -> jax.Array:
  """One bool per leaf of ``tree``: whether all its elements are finite."""
  leaves = norms.check_float_leaves(tree)
  if not leaves:
    return jnp.ones((0,), jnp.bool_)
  return norms.per_leaf_reduce(
    leaves, lambda x: jnp.all(jnp.isfinite(x), axis=tuple(range(1, x.ndim)))
  )


def _first_over(index: jax.Array, axis_name: Any) -> jax.Array:
  """The smallest non-negative ``index`` over the devices of ``axis_name``; -1 if none is."""
  big = jnp.iinfo(jnp.int32).max
  first = jax.lax.pmin(jnp.where(index < 0, big, index), axis_name)
  return jnp.where(first == big, -1, first)


def _first_false(flags: jax.Array) -> jax.Array:
  """The index of the first False in ``flags`` (int32), -1 when all are True."""
  if flags.shape[0] == 0:
    return jnp.int32(-1)
  return jnp.where(jnp.all(flags), -1, jnp.argmin(flags)).astype(jnp.int32)


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
  applied anyway: a non-finite gradient never reaches the parameters. The
  inner optimizer's output is checked too, so a step that ``inner`` itself
  makes non-finite (a NaN run-time threshold, an overflow in its arithmetic)
  is skipped as well. Skipped steps are counted in
  ``clipx.stats(state)["skip_nonfinite"]`` (:class:`clipx.NonfiniteStats`),
  which also names the first leaf of the gradients that held NaN/Inf.

  With gradient accumulation, wrap the accumulator, not the other way round:
  ``clipx.skip_nonfinite(optax.MultiSteps(inner, k).gradient_transformation())``
  skips a bad mini-batch before it is accumulated. Inside ``MultiSteps``
  (``optax.MultiSteps(clipx.skip_nonfinite(inner), k)``) the NaN is already
  in MultiSteps' accumulator, which keeps it (it resets by multiplying with
  0), so every later step would be skipped; :func:`clipx.stats` warns when it
  finds that nesting.

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
  validation.transformation("skip_nonfinite", "inner", inner)
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    stats = NonfiniteStats(
      skipped=jnp.bool_(False),
      skip_count=jnp.zeros([], jnp.int32),
      nonfinite_leaf=jnp.full([], -1, jnp.int32),
      nonfinite_device=jnp.full([], -1, jnp.int32),
    )
    return SkipNonfiniteState(inner.init(params), stats, stacking.leaf_names(params))

  def update_fn(updates, state, params=None, **extra_args):
    finite_leaves = _finite_leaves(updates)
    new_updates, new_inner = inner.update(updates, state.inner_state, params, **extra_args)
    finite = jnp.all(finite_leaves) & all_finite(new_updates)
    bad_leaf = _first_false(finite_leaves)
    bad_device = jnp.int32(-1)
    if axis_name is not None:
      # The first device (along axis_name) whose gradients held NaN/Inf.
      here = jnp.where(jnp.all(finite_leaves), -1, jax.lax.axis_index(axis_name))
      bad_device = _first_over(here.astype(jnp.int32), axis_name)
      finite = jax.lax.psum(jnp.logical_not(finite).astype(jnp.int32), axis_name) == 0
      # Every shard reports the same leaf: the first one bad on any shard.
      bad_leaf = _first_over(bad_leaf, axis_name)
    new_updates, inner_state = _select_step(finite, new_updates, new_inner, state.inner_state)
    skipped = jnp.logical_not(finite)
    stats = NonfiniteStats(
      skipped=skipped,
      skip_count=state.stats.skip_count + skipped.astype(jnp.int32),
      nonfinite_leaf=bad_leaf,
      nonfinite_device=bad_device,
    )
    return new_updates, SkipNonfiniteState(inner_state, stats, state.names)

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
  ``warmup_steps`` applied steps, and always before the first (an EMA of
  nothing has no scale), nothing is skipped for spikes; non-finite steps are
  always skipped.

  With gradient accumulation, wrap the accumulator:
  ``clipx.skip_spikes(optax.MultiSteps(inner, k).gradient_transformation())``
  (see :func:`skip_nonfinite`).

  Args:
    inner: the optimizer to protect.
    factor: a step is skipped when ``norm > factor * ema``; must be > 1.
    decay: EMA decay of the norm, in (0, 1).
    warmup_steps: number of applied steps before spikes can be skipped, >= 0.
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
  validation.transformation("skip_spikes", "inner", inner)
  validation.number("skip_spikes", "factor", factor, low=1.0)
  validation.number("skip_spikes", "decay", decay, low=0.0, high=1.0, high_open=True)
  validation.integer("skip_spikes", "warmup_steps", warmup_steps, 0)
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    stats = SkipStats(
      skipped=jnp.bool_(False),
      skip_count=jnp.zeros([], jnp.int32),
      norm=jnp.zeros([], jnp.float32),
      threshold=jnp.full([], jnp.inf, jnp.float32),
      source=jnp.full([], -1, jnp.int32),
      share=jnp.zeros([], jnp.float32),
    )
    zero = jnp.zeros([], jnp.float32)
    return SkipSpikesState(
      inner.init(params), stats, zero, jnp.zeros([], jnp.int32), stacking.leaf_names(params)
    )

  def update_fn(updates, state, params=None, **extra_args):
    divisor, root, source, share = norms.global_norm_attributed(
      norms.check_float_leaves(updates), axis_name=axis_name
    )
    norm = (divisor * root).astype(jnp.float32)
    debiased = state.ema / (1 - decay ** state.count.astype(jnp.float32))
    warm = (state.count >= warmup_steps) & (state.count > 0)  # count 0: debiased is 0 / 0
    threshold = jnp.where(warm, factor * debiased, jnp.inf)
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
      source=source,
      share=share.astype(jnp.float32),
    )
    return new_updates, SkipSpikesState(inner_state, stats, ema, count, state.names)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
