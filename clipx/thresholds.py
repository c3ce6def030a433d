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

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax


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

  count: jax.Array


def concrete_float(value: Any) -> float | None:
  """``value`` as a Python float, or None when it is traced (unknown)."""
  try:
    return float(np.asarray(value))
  except (TypeError, jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
    return None


def check_positive(name: str, value: Any) -> None:
  """Raises ValueError unless ``value`` is a positive number (traced values pass).

  Inside ``optax.inject_hyperparams`` under ``jit`` the value is traced and
  cannot be checked; it was checked when the state was initialised.
  """
  if isinstance(value, (bool, np.bool_)):
    raise ValueError(f"clipx: {name} must be a positive number, got {value!r}.")
  try:
    array = np.asarray(value)
  except (TypeError, jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
    return
  if not np.issubdtype(array.dtype, np.number):
    raise ValueError(f"clipx: {name} must be a positive number, got {value!r}.")
  if array.size and not (np.all(array > 0) and not np.any(np.isnan(array))):
    raise ValueError(
      f"clipx: {name} must be positive (> 0) and not NaN, got {value!r}."
      f" To disable clipping use {name}=float('inf') or leave the transform out."
    )


def constant(value: chex.Numeric, name: str = "max_norm") -> ThresholdPolicy:
  """A fixed threshold.

  Args:
    value: a positive number (``inf`` means never clip). It may be a traced
      array, as inside ``optax.inject_hyperparams``, so changing it between
      steps needs no recompilation.
    name: the argument name used in error messages.
  """
  check_positive(name, value)

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


def as_policy(threshold: Any, name: str = "max_norm") -> ThresholdPolicy:
  """Turns a float, an array, an Optax schedule or a policy into a policy."""
  if isinstance(threshold, ThresholdPolicy):
    return threshold
  if callable(threshold):
    return schedule(threshold)
  if isinstance(threshold, float) and math.isinf(threshold) and threshold < 0:
    raise ValueError(f"clipx: {name} must be positive, got {threshold!r}.")
  return constant(threshold, name)
