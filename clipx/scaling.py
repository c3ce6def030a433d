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
from jax import lax


def scale_leaf(leaf: jax.Array, scale: jax.Array) -> jax.Array:
  """``leaf * scale`` in float32 (or wider), cast back; ``leaf`` bit for bit where ``scale`` is 1.

  ``scale`` broadcasts against ``leaf`` and is at most 1 (a clip scale).
  """
  wide = jnp.promote_types(leaf.dtype, scale.dtype)
  scaled = (leaf.astype(wide) * scale.astype(wide)).astype(leaf.dtype)
  # A select and not only the multiply: XLA CPU flushes subnormals in arithmetic,
  # so x * 1.0 is not always x; an unclipped leaf must reach the optimizer unchanged.
  return jnp.where(scale < 1, scaled, leaf)


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
    offsets = [jnp.int32(offset if clipped else table.shape[0]) for offset, _ in spans]
    return padded, offsets

  padded, offsets = lax.cond(any_clipped, lambda: pick(True), lambda: pick(False))
  # Offsets are in range by construction: no negative-index wrapping in every kernel.
  return [
    lax.dynamic_slice(padded, [offset], (size,), allow_negative_indices=False).reshape(shape)
    for offset, size, (_, shape) in zip(offsets, sizes, spans)
  ]
