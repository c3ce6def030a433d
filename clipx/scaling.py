"""Applying clip scales to every leaf for the price of one multiply each.

Every scope ends the same way: each leaf is multiplied by its scale (one
scalar for the global norm, its group's or its units' scales otherwise), and
that multiply fuses into the optimizer's own elementwise pass over the leaf.
What else XLA fuses into that pass decides the compile time of large trees
(XLA CPU, jax 0.10; ``benchmarks/README.md`` has the measurements):

- XLA compiles identical kernels once. A kernel that reads its leaf's scale
  with a static slice ``scale[i]`` differs from every other leaf's, so a
  200-leaf AGC step compiled in 3.1 s against 0.7 s when every leaf read the
  same row. Here each leaf reads its scales from one table at a *runtime*
  offset, so the kernels of same-shape leaves stay identical.
- The clip decision (compare, divide, select) is cheap, so XLA copies it into
  every consumer: into each leaf's kernel of a 1000-leaf global clip, about
  +50% compile time. The scales and offsets are therefore the outputs of one
  small ``lax.cond``, which XLA cannot fuse into its consumers. Its predicate
  is "anything clipped?": when nothing is, every leaf reads ones.

A scale is applied as two factors, ``leaf * hi * lo`` (:func:`decide`): ``lo``
is 1 unless the scale is below float32's smallest normal number, which XLA CPU
flushes to zero (``clip_tree({"a": jnp.full(1000, 3e36)}, 1.0)`` gave zeros).
Multiplying by exactly 1 is exact, so an ordinary clip is bit for bit the
single multiply it was; the second multiply fuses into the same pass.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


class Decision(NamedTuple):
  """What a norm scope does with each norm.

  Attributes:
    clipped: where the norm exceeds the threshold (or the threshold is invalid).
    norm: the norm; inf where it exceeds float32's range.
    scale: ``threshold / norm`` where clipped, 1 elsewhere, NaN where the
      threshold is NaN or negative; may be flushed to 0 where subnormal.
    hi, lo: factors with ``hi * lo == scale`` that are each normal numbers,
      applied one after the other; ``lo`` is 1 unless ``scale`` is subnormal.
  """

  clipped: jax.Array
  norm: jax.Array
  scale: jax.Array
  hi: jax.Array
  lo: jax.Array


def decide(divisor: jax.Array, root: jax.Array, threshold: jax.Array) -> Decision:
  """Clips where a finite norm ``divisor * root`` exceeds ``threshold``.

  The norm comes as ``(divisor, root)`` (:func:`clipx.norms.group_norms_split`):
  ``divisor`` is a power of two, so ``threshold / root / divisor`` is exact
  even where the norm itself is beyond float32's range, and a finite gradient
  is always scaled to the threshold, never left unclipped or zeroed.

  Run-time thresholds (schedules, ``inject_hyperparams``) are not checked at
  construction, so every value has one answer here: ``inf`` never clips, 0
  scales the update to zero (a schedule decayed to 0), and a NaN or negative
  threshold makes the update NaN (never a flipped sign, never silently
  unclipped), which :func:`clipx.skip_nonfinite` catches.
  """
  norm = divisor * root
  invalid = ~(threshold >= 0)  # NaN or negative
  over = jnp.isfinite(root) & (norm > threshold)
  clipped = over | invalid
  # threshold / norm as (hi, lo): with E the exponent of the scale, lo = 2**floor(E / 2)
  # and hi the rest, both normal for any finite norm and threshold >= 2**-60.
  quotient = jnp.where(over, threshold, 1) / jnp.where(over, root, 1)  # <= 1 where over
  _, exponent = jnp.frexp(quotient)
  _, divisor_exponent = jnp.frexp(divisor)  # divisor = 2**(divisor_exponent - 1)
  total = exponent - (divisor_exponent - 1)  # the scale is in [2**(total - 1), 2**total)
  tiny = total < jnp.finfo(root.dtype).minexp + 2
  half = jnp.where(tiny, total // 2, 0)
  # quotient / divisor / 2**half, exact; a plain division (differentiable) unless tiny.
  hi = jnp.where(tiny, jnp.ldexp(quotient, total - exponent - half), quotient / divisor)
  nan = jnp.full_like(root, jnp.nan)
  hi = jnp.where(invalid, nan, jnp.where(over, hi, 1))
  lo = jnp.where(over & ~invalid, jnp.ldexp(jnp.ones_like(root), half), 1)
  return Decision(clipped, norm, hi * lo, hi, lo)


def multiply_factors(*factors: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The product of scale factors, as ``(hi, lo)`` like :class:`Decision`'s.

  Two clips applied as one multiply (:func:`clipx.clip_by_global_then_layer_norm`)
  need the product of their factors; multiplied directly, two scales of 1e-20
  give 1e-40, which XLA CPU flushes to zero, zeroing a finite gradient. Here
  the mantissas are multiplied (one rounding) and the exponents added, and the
  product is split in two normal factors where it is subnormal, as
  :func:`decide` does. Where it is normal, ``lo`` is exactly 1.
  """
  mantissa = jnp.ones_like(factors[0])
  exponent = jnp.zeros(jnp.shape(factors[0]), jnp.int32)
  for factor in factors:
    m, e = jnp.frexp(factor)
    mantissa, exponent = mantissa * m, exponent + e
  mantissa, e = jnp.frexp(mantissa)  # in [0.5, 1) again
  exponent = exponent + e
  tiny = exponent < jnp.finfo(mantissa.dtype).minexp + 2
  half = jnp.where(tiny, exponent // 2, 0)
  return jnp.ldexp(mantissa, exponent - half), jnp.ldexp(jnp.ones_like(mantissa), half)


def scale_leaf(leaf: jax.Array, scale: jax.Array, lo: jax.Array | None = None) -> jax.Array:
  """``leaf * scale * lo`` in float32 (or wider), cast back to the leaf's dtype.

  ``lo`` (shaped like ``scale``; 1 when None) is the second factor of a scale
  below float32's normal range (:class:`Decision`). ``scale`` broadcasts
  against ``leaf`` (trailing dimensions aligned, as in numpy) and is at
  most 1 (a clip scale). Where it is exactly 1 the product is the leaf bit
  for bit, NaN, Inf and -0.0 included, with one exception:
  subnormal numbers on a backend that flushes them in all arithmetic (XLA CPU
  treats them as zero). The optimizer's own arithmetic flushes them there too,
  so a training step is the same; tests/test_scaling.py checks both.

  Why no ``select(scale < 1, leaf * scale, leaf)`` to keep those subnormals
  in the clip's own output: on a 1000-leaf tree the select alone added ~0.35x
  of the unclipped step's compile time (measured here), for no change in any
  update an optimizer makes.
  """
  # lax primitives, not jnp: each jnp function is a jitted call that tracing
  # inlines, and this runs once per leaf; the jnp version traced a 1000-leaf
  # tree in 1.3 s of the step's ~3 s of tracing.
  leaf, scale = jnp.asarray(leaf), jnp.asarray(scale)
  wide = jnp.promote_types(leaf.dtype, scale.dtype)
  dims = tuple(range(leaf.ndim - scale.ndim, leaf.ndim))

  def broadcast(factor):
    return lax.broadcast_in_dim(lax.convert_element_type(factor, wide), leaf.shape, dims)

  return _times(leaf, broadcast(scale), None if lo is None else broadcast(jnp.asarray(lo)))


def _times(leaf: jax.Array, wide_scale: jax.Array, wide_lo: jax.Array | None) -> jax.Array:
  """``leaf * wide_scale * wide_lo`` (broadcast, in the wide dtype), cast to the leaf's dtype."""
  scaled = lax.mul(lax.convert_element_type(leaf, wide_scale.dtype), wide_scale)
  if wide_lo is not None:
    scaled = lax.mul(scaled, wide_lo)
  return lax.convert_element_type(scaled, leaf.dtype)


def scale_tree(tree, scale: jax.Array, lo: jax.Array | None = None):
  """Every leaf of ``tree`` times the scalars ``scale`` and ``lo``, as :func:`scale_leaf` does it.

  The scale is broadcast once per leaf shape and dtype, not once per leaf:
  fewer operations for XLA to compile on large trees of repeated shapes.
  """
  factors = [jnp.asarray(scale)] + ([] if lo is None else [jnp.asarray(lo)])
  broadcasts: dict[tuple, list[jax.Array]] = {}

  def scale_one(leaf):
    leaf = jnp.asarray(leaf)
    wide = jnp.promote_types(leaf.dtype, factors[0].dtype)
    key = (leaf.shape, wide)
    if key not in broadcasts:
      broadcasts[key] = [
        lax.broadcast_in_dim(lax.convert_element_type(f, wide), leaf.shape, ()) for f in factors
      ]
    wide_factors = broadcasts[key]
    return _times(leaf, wide_factors[0], wide_factors[1] if lo is not None else None)

  return jax.tree.map(scale_one, tree)


def gated_scale(clipped: jax.Array, *factors: jax.Array) -> tuple[jax.Array, ...]:
  """``factors`` where ``clipped``, else ones, as the outputs of a ``lax.cond`` (see module doc)."""
  return lax.cond(clipped, lambda: factors, lambda: tuple(jnp.ones_like(f) for f in factors))


def gated_slices(
  any_clipped: jax.Array,
  hi: jax.Array,
  lo: jax.Array,
  spans: Sequence[tuple[int, tuple[int, ...]]],
) -> list[tuple[jax.Array, jax.Array]]:
  """Each leaf's slice of the factor vectors ``hi`` and ``lo``, for its ``(offset, shape)``.

  Args:
    any_clipped: whether any group or unit is clipped.
    hi: a vector of first factors (one per group or unit, as
      :class:`Decision`'s), 1 where not clipped.
    lo: the second factors, shaped like ``hi``.
    spans: static ``(offset, shape)`` of every leaf's factors in the vectors;
      ``shape`` broadcasts against the leaf (``()`` for one factor per leaf).

  Returns:
    Per leaf, ``(hi, lo)``: arrays of shape ``shape``, read at a runtime
    offset, so leaves of one shape compile to one kernel. ``hi`` and ``lo``
    sit in one table, ``lo`` at a fixed distance after ``hi``.
  """
  sizes = [math.prod(shape) for _, shape in spans]
  longest = max(sizes, default=1)
  count = hi.shape[0]

  def pick(clipped: bool):
    # Ones after each half: the slices every leaf reads when nothing is clipped.
    ones = jnp.ones((longest,), hi.dtype)
    table = jnp.concatenate([hi, ones, lo, ones])
    # numpy constants: jnp.int32(...) per leaf made a device array each (tracing time).
    offsets = [np.int32(offset if clipped else count) for offset, _ in spans]
    return table, offsets

  table, offsets = lax.cond(any_clipped, lambda: pick(True), lambda: pick(False))
  half = count + longest

  def read(offset, size, shape):
    # Offsets are in range by construction: no negative-index wrapping in every kernel.
    return lax.reshape(
      lax.dynamic_slice(table, [offset], (size,), allow_negative_indices=False), shape
    )

  return [
    (read(offset, size, shape), read(offset + np.int32(half), size, shape))
    for offset, size, (_, shape) in zip(offsets, sizes, spans)
  ]
