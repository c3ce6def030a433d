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
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def scale_leaf(leaf: jax.Array, scale: jax.Array) -> jax.Array:
  """``leaf * scale`` in float32 (or wider), cast back to the leaf's dtype.

  ``scale`` broadcasts against ``leaf`` (trailing dimensions aligned, as in
  numpy) and is at most 1 (a clip scale). Where it is exactly 1 the product is
  the leaf bit for bit, NaN, Inf and -0.0 included, with one exception:
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
  wide_scale = lax.broadcast_in_dim(lax.convert_element_type(scale, wide), leaf.shape, dims)
  return _times(leaf, wide_scale)


def _times(leaf: jax.Array, wide_scale: jax.Array) -> jax.Array:
  """``leaf * wide_scale`` (already broadcast, in the wide dtype), cast back to the leaf's dtype."""
  scaled = lax.mul(lax.convert_element_type(leaf, wide_scale.dtype), wide_scale)
  return lax.convert_element_type(scaled, leaf.dtype)


def scale_tree(tree, scale: jax.Array):
  """Every leaf of ``tree`` times the scalar ``scale``, as :func:`scale_leaf` does it.

  The scale is broadcast once per leaf shape and dtype, not once per leaf:
  fewer operations for XLA to compile on large trees of repeated shapes.
  """
  scale = jnp.asarray(scale)
  broadcasts: dict[tuple, jax.Array] = {}

  def scale_one(leaf):
    leaf = jnp.asarray(leaf)
    wide = jnp.promote_types(leaf.dtype, scale.dtype)
    key = (leaf.shape, wide)
    if key not in broadcasts:
      broadcasts[key] = lax.broadcast_in_dim(lax.convert_element_type(scale, wide), leaf.shape, ())
    return _times(leaf, broadcasts[key])

  return jax.tree.map(scale_one, tree)


def gated_scale(clipped: jax.Array, scale: jax.Array) -> jax.Array:
  """``scale`` where ``clipped``, else 1, as the output of a ``lax.cond`` (see module doc)."""
  return lax.cond(clipped, lambda: scale, lambda: jnp.ones_like(scale))


def gated_slices(
  any_clipped: jax.Array,
  table: jax.Array,
  spans: Sequence[tuple[int, tuple[int, ...]]],
) -> list[jax.Array]:
  """Each leaf's scales: ``table[offset : offset + size]`` reshaped, for its ``(offset, shape)``.

  Args:
    any_clipped: whether any entry of ``table`` is below 1.
    table: a vector of scales, 1 where not clipped (one per group or unit).
    spans: static ``(offset, shape)`` of every leaf's scales in ``table``;
      ``shape`` broadcasts against the leaf (``()`` for one scale per leaf).

  Returns:
    One array of shape ``shape`` per leaf, read at a runtime offset, so leaves
    of one shape compile to one kernel.
  """
  sizes = [math.prod(shape) for _, shape in spans]
  longest = max(sizes, default=1)

  def pick(clipped: bool):
    # Ones after the table: the slice every leaf reads when nothing is clipped.
    padded = jnp.concatenate([table, jnp.ones((longest,), table.dtype)])
    # numpy constants: jnp.int32(...) per leaf made a device array each (tracing time).
    offsets = [np.int32(offset if clipped else table.shape[0]) for offset, _ in spans]
    return padded, offsets

  padded, offsets = lax.cond(any_clipped, lambda: pick(True), lambda: pick(False))
  # Offsets are in range by construction: no negative-index wrapping in every kernel.
  return [
    lax.reshape(lax.dynamic_slice(padded, [offset], (size,), allow_negative_indices=False), shape)
    for offset, size, (_, shape) in zip(offsets, sizes, spans)
  ]
