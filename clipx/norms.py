"""Overflow-safe L2 norms of pytrees, accumulated in float32.

The common path reads every gradient once: a sum of squares per leaf in
float32 (or wider), then a square root. Only when that sum is not finite
(overflow, or NaN/Inf in the input) does a single ``lax.cond`` branch recompute
each leaf's norm with its own largest magnitude factored out, so finite input
never yields an infinite or zero norm.

Compile time is part of the contract (users jit trees of hundreds of leaves):
- Small leaves of the same shape are stacked and reduced by one operation
  instead of one reduction each; the copy is small by construction.
- In the fallback, each leaf is scaled by *its own* maximum. Scaling every leaf
  by one global maximum makes every reduction depend on every leaf, and XLA
  then compiled a 400-leaf norm in 47 s instead of 1.6 s (measured here).
  Scaling every leaf by one constant power of two (``x * 2**-96``: one
  reduction per leaf instead of two) compiled faster, but XLA CPU then
  materialized the constant broadcast to each leaf's shape for its reductions:
  23 MiB of temporaries for a ResNet-50 step, against 0.6 MiB here.
- Per-leaf results are combined with one ``stack`` and one reduction, which
  compiles faster than a Python chain of ``+``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# Leaves with at most this many elements are stacked with others of the same
# shape and dtype before reducing (fewer ops to compile). Large leaves are
# reduced in place: stacking them would copy gradient-sized memory.
SMALL_LEAF_SIZE = 1 << 14

# Forensics reduces small leaves one shape at a time up to this many distinct
# shapes, and through their merged vector beyond (see global_norm_attributed).
MAX_SMALL_SHAPES = 32

# Concatenations of more leaves than this are built in two levels; see concatenate.
# Above the ~107 small leaves of a ResNet-50, so its steps keep one concatenation.
MAX_CONCAT = 128


def accumulation_dtype(dtype: jnp.dtype) -> jnp.dtype:
  """The dtype norms of ``dtype`` arrays accumulate in: float32 or wider."""
  if not jnp.issubdtype(dtype, jnp.inexact):
    return jnp.dtype(jnp.float32)  # integer leaves are rejected where they are clipped
  real = jnp.finfo(dtype).dtype  # complex64 -> float32
  return jnp.promote_types(real, jnp.float32)


def check_float_leaves(tree, what: str = "updates") -> list[jax.Array]:
  """Returns the leaves of ``tree``; raises TypeError naming a non-float leaf."""
  leaves_with_paths = jax.tree_util.tree_leaves_with_path(tree)
  for path, leaf in leaves_with_paths:
    dtype = leaf.dtype if isinstance(leaf, jax.Array | np.ndarray) else jnp.result_type(leaf)
    if not jnp.issubdtype(dtype, jnp.inexact):
      raise TypeError(
        f"clipx: {what} leaf at {jax.tree_util.keystr(path) or '<root>'} has"
        f" dtype {dtype}; gradients must be floating point (cast integer"
        " leaves to float, or exclude them with optax.masked)."
      )
  # Arrays and tracers as they are: jnp.asarray per leaf costs tracing time on big trees.
  return [
    leaf if isinstance(leaf, jax.Array) else jnp.asarray(leaf) for _, leaf in leaves_with_paths
  ]


def widen(x: jax.Array, dtype, *, reader: int = 0) -> jax.Array:
  """``x`` as ``promote_types(x.dtype, dtype)``, for one reduction to read.

  A no-op barrier comes first when the dtype changes: it keeps XLA from merging
  this widening with the optimizer's own (XLA CPU computes bfloat16 arithmetic in
  float32). Merged, the widened gradients were materialized as a float32
  temporary the size of the gradients (196 MiB for a bfloat16 ResNet-50 step)
  instead of being widened inside the reduction. Two reductions of one array
  pass different ``reader`` numbers: identical barriers would be merged, and
  with them the two widenings (96 MiB for the overflow fallback's max and sum).
  """
  wide = jnp.promote_types(x.dtype, dtype)
  if x.dtype == wide:
    return x
  if reader == 0:
    return lax.optimization_barrier(x).astype(wide)
  alone, _ = lax.optimization_barrier((x, np.int8(reader)))
  return alone.astype(wide)


def _abs_sq(x: jax.Array, dtype) -> jax.Array:
  x = widen(x, dtype)
  if jnp.iscomplexobj(x):
    return jnp.square(x.real).astype(dtype) + jnp.square(x.imag).astype(dtype)
  return jnp.square(x.astype(dtype))


def _buckets(leaves: Sequence[jax.Array], tags: Sequence[Any] | None = None) -> list[list[int]]:
  """Groups leaf indices: each large leaf alone, small leaves by (shape, dtype, tag)."""
  groups: dict[object, list[int]] = {}
  order: list[list[int]] = []
  for index, leaf in enumerate(leaves):
    if leaf.size > SMALL_LEAF_SIZE:
      order.append([index])
      continue
    key = (leaf.shape, leaf.dtype, None if tags is None else tags[index])
    if key not in groups:
      groups[key] = []
      order.append(groups[key])
    groups[key].append(index)
  return order


def concatenate(arrays: Sequence[jax.Array]) -> jax.Array:
  """``lax.concatenate(arrays, 0)``, in two levels for many arrays (compile time).

  XLA CPU's compile time of one concatenation grows faster than its number of
  operands: 500 leaves of 16x16 compiled in 0.4-0.6 s alone, and in 0.15-0.3 s
  as concatenations of at most 64 or 128 whose results are concatenated. The
  barrier keeps XLA from merging the two levels back into one. It costs a
  second copy of what is concatenated, which is only ever small leaves.
  """
  if len(arrays) <= MAX_CONCAT:
    return lax.concatenate(list(arrays), 0)
  parts = [
    lax.concatenate(list(arrays[i : i + MAX_CONCAT]), 0) for i in range(0, len(arrays), MAX_CONCAT)
  ]
  return lax.concatenate(lax.optimization_barrier(parts), 0)


def stack_bucket(leaves: Sequence[jax.Array], bucket: Sequence[int]) -> jax.Array:
  """The leaves of one bucket stacked on a new leading axis (a reshape for one leaf).

  Concatenated along their first axis, then reshaped once: ``jnp.stack`` would
  add a reshape per leaf, and each op per leaf costs compile time.
  """
  first = leaves[bucket[0]]
  shape = (len(bucket), *first.shape)
  if len(bucket) == 1 or first.ndim == 0:
    return jnp.stack([leaves[i] for i in bucket])
  return lax.reshape(concatenate([leaves[i] for i in bucket]), shape)


def stack_leaves(leaves: Sequence[jax.Array]) -> tuple[list[jax.Array], list[int]]:
  """The leaves as stacks (see :func:`stack_bucket`), and the leaf index of each row in order.

  Each large leaf is a stack of one; small leaves of one shape are one stack.
  """
  buckets = _buckets(leaves)
  return [stack_bucket(leaves, bucket) for bucket in buckets], [i for b in buckets for i in b]


def reduce_stacks(
  stacks: Sequence[jax.Array],
  order: Sequence[int],
  row_fn: Callable[[jax.Array], jax.Array],
) -> jax.Array:
  """``row_fn`` (array of shape (k, ...) -> (k, ...)) on every stack, rows put back in leaf order.

  ``order`` lists the leaf of each row (:func:`stack_leaves`); the result has
  one row per leaf, leaf ``i`` at ``sorted(order).index(i)``.
  """
  parts = [row_fn(stack) for stack in stacks]
  values = jnp.concatenate(parts) if len(parts) > 1 else parts[0]
  if list(order) == sorted(order):
    return values
  return values[np.argsort(np.asarray(order))]


def per_leaf_reduce(
  leaves: Sequence[jax.Array],
  row_fn: Callable[[jax.Array], jax.Array],
) -> jax.Array:
  """Applies ``row_fn`` (array of shape (k, ...) -> (k,)) to every leaf.

  Returns a vector with one entry per leaf, in leaf order. Small leaves of one
  shape go through ``row_fn`` together as one stacked array.
  """
  if not leaves:
    return jnp.zeros((0,), jnp.float32)
  return reduce_stacks(*stack_leaves(leaves), row_fn)


def _row_axes(x: jax.Array) -> tuple[int, ...]:
  return tuple(range(1, x.ndim))


def _common_dtype(leaves: Sequence[jax.Array]) -> jnp.dtype:
  if not leaves:
    return jnp.dtype(jnp.float32)
  return jnp.result_type(*[accumulation_dtype(dtype) for dtype in {x.dtype for x in leaves}])


def sum_sq(x: jax.Array, axes: tuple[int, ...], dtype, *, keepdims: bool = False) -> jax.Array:
  """Sum over ``axes`` of ``|x|**2`` in ``dtype``: one read of ``x``; may overflow to inf."""
  return jnp.sum(_abs_sq(x, dtype), axis=axes, keepdims=keepdims)


def leaf_sq_norms(leaves: Sequence[jax.Array]) -> jax.Array:
  """Per-leaf sums of squares in float32 or wider; one read of each leaf.

  May overflow to inf on large finite input; see :func:`group_norms`.
  """
  dtype = _common_dtype(leaves)
  return per_leaf_reduce(leaves, lambda x: sum_sq(x, _row_axes(x), dtype))


# Exponent range of the divisors: 2**MIN_DIVISOR_EXPONENT is a normal float32
# whose reciprocal is normal too, and m / 2**(e - 8) < 256 for m < 2**e.
MIN_DIVISOR_EXPONENT = -100


def safe_divisor(m: jax.Array) -> jax.Array:
  """A power of two ``d`` with ``m / d < 256``, to divide values by before squaring.

  ``2**(e - 8)`` for ``m`` in ``[2**(e - 1), 2**e)``, never below ``2**-100``.
  A power of two, so dividing by it (XLA CPU multiplies by the reciprocal) is
  exact, its reciprocal is never subnormal (``1 / m`` near the float32
  maximum is, and was flushed to zero: a norm of 0.0 for ``[3e38, 1, -1e38]``),
  and a norm kept as ``(d, r)`` with ``r = norm / d`` can be divided exactly by
  ``d`` even where ``d * r`` exceeds float32's range. The quotients are below
  256, so their squares cannot overflow. ``2**-8`` where ``m`` is 0 or not finite.
  """
  _, exponent = jnp.frexp(m)
  exponent = jnp.where(jnp.isfinite(m) & (m > 0), exponent, 0)
  return jnp.ldexp(jnp.ones_like(m), jnp.maximum(exponent - 8, MIN_DIVISOR_EXPONENT))


def safe_sqrt(x: jax.Array) -> jax.Array:
  """``sqrt(x)`` whose derivative at 0 is 0, not inf.

  The norm of a zero gradient then has derivative 0 (its subgradient), and a
  clip differentiated at a zero gradient is the identity instead of NaN
  (``0 * inf``). The inner ``where`` keeps the unused branch's inf out of the
  backward pass.
  """
  zero = x == 0  # not x > 0: NaN must stay NaN
  return jnp.where(zero, 0, jnp.sqrt(jnp.where(zero, 1, x)))


def max_and_scaled_norm(
  x: jax.Array, axes: tuple[int, ...], dtype, *, axis_name: Any = None
) -> tuple[jax.Array, jax.Array]:
  """``(d, r)`` over ``axes`` (kept): a divisor (:func:`safe_divisor`) and the norm of ``x / d``.

  The norm is ``d * r``, which may exceed float32's range (``[fmax, fmax]``);
  ``r`` never does on finite input: the quotients are below 256, so their
  squares cannot overflow. Used only on the rare overflow path (two reads of
  ``x``). With ``axis_name`` (inside ``shard_map``), ``x`` is one shard of
  arrays split over that axis: the maximum and the sum are taken over all
  shards. Zero-size reductions give ``r = 0``.
  """
  magnitude = jnp.abs(widen(x, dtype, reader=1)).astype(dtype)
  m = jnp.max(magnitude, axis=axes, keepdims=True, initial=0.0)
  if axis_name is not None:
    m = lax.pmax(m, axis_name)
  d = safe_divisor(m)
  sq = jnp.sum(_abs_sq(widen(x, dtype) / d, dtype), axis=axes, keepdims=True)
  root = safe_sqrt(sq if axis_name is None else lax.psum(sq, axis_name))
  # An infinite element has an infinite norm (inf * 0 would give NaN).
  return d, jnp.where(jnp.isinf(m), jnp.inf, root)


def _scaled_rows(x: jax.Array, dtype) -> jax.Array:
  """Per row of a stack, ``(d, r)`` (see :func:`max_and_scaled_norm`): shape ``(k, 2)``."""
  m, root = max_and_scaled_norm(x, _row_axes(x), dtype)
  return jnp.stack([m.reshape(-1), root.reshape(-1)], axis=1)


def _scaled_leaf_norms(leaves: Sequence[jax.Array], dtype) -> tuple[jax.Array, jax.Array]:
  """Per-leaf (divisor d, sqrt of sum of (x / d)^2): norm = d * that (see max_and_scaled_norm)."""
  if not leaves:
    return jnp.zeros((0,), dtype), jnp.zeros((0,), dtype)
  both = per_leaf_reduce(leaves, lambda x: _scaled_rows(x, dtype))
  return both[:, 0], both[:, 1]


def combine_norms(
  divisors: jax.Array,
  roots: jax.Array,
  segment_ids: np.ndarray | None = None,
  num_segments: int = 1,
  *,
  axis_name: Any = None,
) -> tuple[jax.Array, jax.Array]:
  """The L2 norms of groups of norms, each given as ``divisor * root``; as ``(D, R)`` again.

  Every divisor is a power of two (:func:`safe_divisor`), so ``D`` is the
  group's largest divisor and ``R = sqrt(sum((d / D * r)**2))`` is exact up to
  rounding and never overflows on finite input. A norm of 1 is ``(1, 1)``.
  Without ``segment_ids`` all values form one group (shape ``(1,)``). With
  ``axis_name`` each group spans every shard of that axis.
  """
  if segment_ids is None:
    segment_ids = np.zeros(divisors.shape[0], np.int32)
  if divisors.shape[0] == 0:
    return jnp.ones((num_segments,), roots.dtype), jnp.zeros((num_segments,), roots.dtype)
  if num_segments == 1:  # no scatters for one group (compile time)
    group_d = jnp.max(divisors, keepdims=True)
  else:
    group_d = jax.ops.segment_max(divisors, segment_ids, num_segments)
    group_d = jnp.where(group_d == -jnp.inf, 1, group_d)  # an empty segment
  if axis_name is not None:
    group_d = lax.pmax(group_d, axis_name)
  terms = jnp.square(divisors / group_d[segment_ids] * roots)
  if num_segments == 1:
    sq = jnp.sum(terms, keepdims=True)
  else:
    sq = jax.ops.segment_sum(terms, segment_ids, num_segments)
  return group_d, safe_sqrt(sq if axis_name is None else lax.psum(sq, axis_name))


def safe_vector_norm(values: jax.Array) -> jax.Array:
  """L2 norm of a vector of non-negative finite-or-inf ``values`` without overflow.

  The vector is small (one entry per leaf or unit), so factoring out its
  largest entry costs nothing and is always done. A norm beyond float32's
  range is inf.
  """
  m = jnp.max(values, initial=0.0)
  d = jnp.where(jnp.isfinite(m), safe_divisor(m), 1)
  return d * safe_sqrt(jnp.sum(jnp.square(values / d)))


def _merged_layout(leaves: Sequence[jax.Array]) -> tuple[list[int], list[int], np.ndarray]:
  """Where :func:`_merge_small_leaves` puts each leaf: large leaves' indices, small
  leaves' indices, and per element of the merged small-leaf vector, the index of
  the leaf it came from.

  ``small`` lists every small leaf, zero-size ones too: they own no element of
  the merged vector, but still have a (zero) term of their own, so the terms
  stay one per leaf and in leaf order. Nothing is merged (empty lists) for
  fewer than two small leaves. Static (numpy).
  """
  small = [i for i, x in enumerate(leaves) if x.size <= SMALL_LEAF_SIZE]
  if len(small) < 2:
    return [], [], np.zeros((0,), np.int32)
  large = [i for i, x in enumerate(leaves) if x.size > SMALL_LEAF_SIZE]
  groups: dict[tuple[int, ...], list[int]] = {}
  for i in small:
    shape = leaves[i].shape if leaves[i].ndim else (1,)
    groups.setdefault(tuple(shape[1:]), []).append(i)
  owners = [np.full(max(leaves[i].size, 0), i, np.int32) for g in groups.values() for i in g]
  return large, small, np.concatenate(owners) if owners else np.zeros((0,), np.int32)


def _merge_small_leaves(leaves: Sequence[jax.Array], dtype) -> list[jax.Array]:
  """Large leaves as they are, plus the small leaves concatenated into one array.

  For a single norm over the tree, a few concatenations (a copy of only the
  small leaves) replace a reduction per small leaf: the number of operations,
  and so the compile time, no longer grows with the number of small leaves of
  distinct shapes. Small leaves are grouped by their shape after the first axis,
  so they concatenate as they are, without a reshape each (each op per leaf
  costs compile time); the groups are then flattened into one vector, since
  each array costs its own kernels here and in the overflow fallback (a
  20-leaf clip step compiled 25 kernels instead of 33, 0.57 s instead of 0.69 s).
  Large leaves are never copied.
  """
  small = [x for x in leaves if x.size <= SMALL_LEAF_SIZE]
  if len(small) < 2:
    return list(leaves)
  large = [x for x in leaves if x.size > SMALL_LEAF_SIZE]
  groups: dict[tuple[int, ...], list[jax.Array]] = {}
  for x in small:
    # Magnitudes keep complex leaves' norms; real leaves need no abs. lax, not
    # jnp: this runs once per small leaf, and jnp calls are slower to trace.
    if jnp.iscomplexobj(x):
      x = lax.abs(x)
    x = lax.convert_element_type(x, dtype)
    if x.ndim == 0:
      x = lax.broadcast_in_dim(x, (1,), ())
    groups.setdefault(x.shape[1:], []).append(x)
  merged = [concatenate(group) for group in groups.values()]
  if len(merged) > 1:  # one vector: every array costs kernels here and in the fallback
    merged = [lax.concatenate([lax.reshape(m, (m.size,)) for m in merged], 0)]
  return large + merged


def group_norms_split(
  leaves: Sequence[jax.Array],
  segment_ids: np.ndarray,
  num_segments: int,
  *,
  axis_name=None,
) -> tuple[jax.Array, jax.Array]:
  """Overflow-safe L2 norms of groups of leaves, as ``(divisor, root)`` vectors.

  Each group's norm is ``divisor * root``: ``divisor`` is a power of two (1 on
  the common path), and ``root`` is finite for every finite input, so a norm
  beyond float32's range (``d * r`` is inf) can still be divided by exactly
  (see :func:`clipx.transforms.clip_decision`). ``root`` is NaN or inf only
  when the input holds NaN or Inf. Arguments as for :func:`group_norms`.
  """
  segment_ids = np.asarray(segment_ids, dtype=np.int32)
  dtype = _common_dtype(leaves)
  # Only on one device: concatenating leaves that are split over devices makes
  # XLA all-gather them (an FSDP step gathered whole conv and head kernels, a
  # tensor-parallel one both MLP kernels; tests/test_distributed.py), so with
  # several devices every leaf keeps its own reduction and only scalars move.
  if num_segments == 1 and jax.device_count() == 1:
    leaves = _merge_small_leaves(leaves, dtype)
    segment_ids = np.zeros(len(leaves), np.int32)
  # The overflow branch gets the stacks the common path reduces, not the leaves to
  # stack again inside the cond (see global_norm_attributed: compile time).
  stacks, order = stack_leaves(leaves) if leaves else ([], [])
  per_leaf = (
    reduce_stacks(stacks, order, lambda x: sum_sq(x, _row_axes(x), dtype))
    if leaves
    else jnp.zeros((0,), dtype)
  )
  if num_segments == 1:  # a plain sum: a scatter-add costs compile time for nothing
    sq = jnp.sum(per_leaf, keepdims=True)
  else:
    sq = jax.ops.segment_sum(per_leaf, segment_ids, num_segments)
  if axis_name is not None:
    sq = lax.psum(sq, axis_name)

  def common(_):
    return jnp.ones_like(sq), safe_sqrt(sq)

  def fallback(stacks):
    if stacks:
      both = reduce_stacks(stacks, order, lambda x: _scaled_rows(x, dtype))
      d, r = both[:, 0], both[:, 1]
    else:
      d, r = jnp.zeros((0,), dtype), jnp.zeros((0,), dtype)
    return combine_norms(d, r, segment_ids, num_segments, axis_name=axis_name)

  # One cond for the whole tree: a cond per leaf compiles tens of times slower.
  return lax.cond(jnp.all(jnp.isfinite(sq)), common, fallback, stacks)


def largest_share(terms: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(index, fraction)`` of the largest of non-negative ``terms`` in their sum (forensics).

  ``terms`` are the squared norms of leaves or groups, one each, in order; an
  empty vector gives ``(-1, 0)`` and a zero sum share 0. A non-finite term (a
  leaf or group holding NaN or Inf) outweighs every finite one, and all of them
  weigh alike: the index is the first non-finite term and the share ``1 / k``
  for ``k`` of them (1.0 for a single Inf leaf), never ``inf / inf`` = NaN.
  The same rule in every scope that reports a share.
  """
  if terms.shape[0] == 0:
    return jnp.int32(-1), jnp.zeros((), terms.dtype)
  bad = ~jnp.isfinite(terms)
  count = jnp.sum(bad, dtype=jnp.int32)
  finite = jnp.where(bad, 0, terms)
  whole = jnp.sum(finite)
  share = jnp.where(whole > 0, jnp.max(finite) / jnp.where(whole > 0, whole, 1), 0)
  share = jnp.where(count > 0, 1 / jnp.maximum(count, 1).astype(terms.dtype), share)
  index = jnp.where(count > 0, jnp.argmax(bad), jnp.argmax(finite))
  return index.astype(jnp.int32), share.astype(terms.dtype)


def _scaled_sq_rows(x: jax.Array, factor: jax.Array, dtype) -> jax.Array:
  """Per row of a stack, the sum of squares of ``x * factor``, ``factor`` a run-time scalar."""
  return sum_sq(widen(x, dtype) * factor, _row_axes(x), dtype)


def overflow_divisor(dtype) -> jax.Array:
  """A power of two to divide by where a sum of squares overflowed: ``2**(maxexp / 2 + 26)``.

  For float32, 2**90. Every finite element divided by it squares to at most
  ``2**(maxexp - 52)``, so the squares of 2**52 elements sum without overflow.
  Only a norm beyond ``sqrt(float max)`` overflows, and against it the elements
  whose scaled squares underflow (below 2**26 here, 6.7e7) weigh less than
  ``n * 2**-74`` of the squared norm for ``n`` elements: nothing in float32.
  """
  info = jnp.finfo(dtype)
  return jnp.asarray(2.0 ** (info.maxexp // 2 + 26), dtype)


def _finite_largest_share(terms: jax.Array, total: jax.Array) -> tuple[jax.Array, jax.Array]:
  """:func:`largest_share` where every term and their sum ``total`` are known finite.

  One ``argmax`` and the total the norm already has, instead of the three
  reductions that the NaN/Inf rules need (compile time on large trees).
  """
  index = jnp.argmax(terms).astype(jnp.int32)
  positive = total > 0
  share = jnp.where(positive, terms[index] / jnp.where(positive, total, 1), 0)
  return index, jnp.minimum(share, 1).astype(terms.dtype)


def global_norm_attributed(
  leaves: Sequence[jax.Array], *, axis_name=None
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """The global norm as ``(divisor, root)``, and where it came from: ``(source, share)``.

  ``source`` is the index (in ``leaves``' order) of the leaf with the largest
  share of the squared norm and ``share`` that fraction (see
  :func:`largest_share`: 0 for a zero norm, ``1 / k`` for ``k`` NaN/Inf leaves),
  so a clipped or skipped step says which leaf spiked. On the common path the
  per-leaf sums of squares are the ones the norm is made of: large leaves are
  reduced one by one anyway, and small leaves one shape at a time; a tree of
  more than ``MAX_SMALL_SHAPES`` small shapes merges them (see
  :func:`_merge_small_leaves`, compile time) and pays one segment sum more.
  With ``axis_name`` the per-leaf vector (not only its sum) is all-reduced.
  """
  dtype = _common_dtype(leaves)
  count = len(leaves)
  if not count:
    zero = jnp.zeros((), dtype)
    return jnp.ones((), dtype), zero, jnp.int32(-1), zero
  large, small, owners = _merged_layout(leaves) if jax.device_count() == 1 else ([], [], None)
  # The overflow branch gets the small leaves as the stacks the common path has
  # made anyway, not as leaves: handed the leaves, it stacked them again inside
  # the cond (XLA shares nothing across its boundary), and those concatenations,
  # XLA CPU kernels that are slow to compile, were half the compile time of a
  # 1000-leaf clip's norm (benchmarks/README.md).
  large_leaves, order = list(leaves), []
  # The overflow branch scales by 1 / overflow_divisor as a run-time value (behind a
  # barrier): with a constant, XLA rewrote sum((x / d)**2) as sum(x**2) / d**2, and
  # d**2 = 2**180 is inf in float32 (NaN norms). The stacks' common-path sums are
  # scaled by a run-time 1 the same way (exact), so that the two branches' reductions
  # are the same kernels.
  unit, inverse = lax.optimization_barrier((jnp.ones((), dtype), 1 / overflow_divisor(dtype)))
  stacks: list[jax.Array] = []
  if owners is not None and owners.size:
    # The total as group_norms_split sums it (merged small leaves): the same norm, bit
    # for bit, as clip_tree and the scopes without forensics.
    merged = _merge_small_leaves(leaves, dtype)
    sums = leaf_sq_norms(merged)
    total = jnp.sum(sums)
    small_ids = np.asarray(small, np.int32)  # not np.unique(owners): that skips empty leaves
    small_leaves = [leaves[i] for i in small_ids]
    small_shapes = {(x.shape, x.dtype) for x in small_leaves}
    if len(small_shapes) <= MAX_SMALL_SHAPES:
      # One reduction per shape of small leaf (a ResNet-50 has 10): 0.14 ms a step
      # there on XLA CPU, against 0.7 ms for the segment sum (a scatter) below.
      stacks, rows = stack_leaves(small_leaves)
      small_sums = reduce_stacks(stacks, rows, lambda x: _scaled_sq_rows(x, unit, dtype))
      large_leaves, order = [leaves[i] for i in large], [int(small_ids[i]) for i in rows]
    else:  # many shapes: a reduction each would cost compile time
      local = np.searchsorted(small_ids, owners).astype(np.int32)
      # One shape group stays (k, ...) unflattened (see _merge_small_leaves): flatten here.
      flat = jnp.reshape(merged[-1], (-1,))
      small_sums = jax.ops.segment_sum(jnp.square(flat), local, small_ids.size)
    values = jnp.concatenate([sums[: len(large)], small_sums])
    per_leaf = values[np.argsort(np.concatenate([np.asarray(large, np.int64), small_ids]))]
  else:
    per_leaf = leaf_sq_norms(leaves)
    total = jnp.sum(per_leaf)
  if axis_name is not None:
    per_leaf = lax.psum(per_leaf, axis_name)
    total = jnp.sum(per_leaf)
  # Where each (d, r) of the overflow branch goes: large (or all) leaves, then the stacks' rows.
  in_stacks = set(order)
  unstacked = [i for i in range(count) if i not in in_stacks]
  placement = np.argsort(np.asarray(unstacked + order, np.int64))

  def common(_):
    return (jnp.ones((), dtype), safe_sqrt(total), *_finite_largest_share(per_leaf, total))

  def fallback(operands):
    # Taken only where a sum of squares is not finite: NaN/Inf input, or a finite
    # norm beyond sqrt(float max) (1.8e19 in float32). One fixed power-of-two
    # divisor then serves every leaf (see overflow_divisor): one reduction per
    # array, no peaks to find first (compile time), and no pmax across shards.
    # Its reciprocal comes in as a run-time value (see above).
    loose, stacked, inverse = operands
    d = overflow_divisor(dtype)
    scaled = lambda x: _scaled_sq_rows(x, inverse, dtype)  # noqa: E731
    # Leaves that came unstacked (large ones; all of them on several devices or with
    # many small shapes) are stacked here as the common path would (a reshape each
    # for a large leaf), not reduced one by one into a concatenation of scalars.
    parts = [reduce_stacks(*stack_leaves(loose), scaled)] if loose else []
    parts += [scaled(x) for x in stacked]
    terms = (jnp.concatenate(parts) if len(parts) > 1 else parts[0])[placement]
    if axis_name is not None:
      terms = lax.psum(terms, axis_name)
    return (d, safe_sqrt(jnp.sum(terms)), *largest_share(terms))

  finite = jnp.isfinite(total) & jnp.all(jnp.isfinite(per_leaf))
  return lax.cond(finite, common, fallback, (large_leaves, stacks, inverse))


def layer_norms_split(
  leaves: Sequence[jax.Array],
  layer_axes: Sequence[int],
  row_ids: Sequence[np.ndarray],
  num_segments: int,
  *,
  axis_name=None,
) -> tuple[jax.Array, jax.Array]:
  """:func:`group_norms_split` for stacked leaves: each layer of a leaf in its own group.

  ``layer_axes[i]`` leading axes of leaf ``i`` index layers; ``row_ids[i]``
  (static, one id per layer, in row-major order) are their groups. Each leaf is
  one reduction over its non-layer axes, whatever its number of layers.
  """
  dtype = _common_dtype(leaves)
  if not leaves:
    return jnp.ones((num_segments,), dtype), jnp.zeros((num_segments,), dtype)
  ids = np.concatenate([np.asarray(r, np.int32).reshape(-1) for r in row_ids])
  axes = [tuple(range(k, x.ndim)) for x, k in zip(leaves, layer_axes)]
  rows = jnp.concatenate([sum_sq(x, a, dtype).reshape(-1) for x, a in zip(leaves, axes)])
  sq = jax.ops.segment_sum(rows, ids, num_segments)
  if axis_name is not None:
    sq = lax.psum(sq, axis_name)

  def common(_):
    return jnp.ones_like(sq), safe_sqrt(sq)

  def fallback(leaves):
    pairs = [max_and_scaled_norm(x, a, dtype) for x, a in zip(leaves, axes)]
    d = jnp.concatenate([p[0].reshape(-1) for p in pairs])
    r = jnp.concatenate([p[1].reshape(-1) for p in pairs])
    return combine_norms(d, r, ids, num_segments, axis_name=axis_name)

  return lax.cond(jnp.all(jnp.isfinite(sq)), common, fallback, list(leaves))


def group_norms(
  leaves: Sequence[jax.Array],
  segment_ids: np.ndarray,
  num_segments: int,
  *,
  axis_name=None,
) -> jax.Array:
  """Overflow-safe L2 norms of groups of leaves: one float per group.

  Args:
    leaves: floating point arrays.
    segment_ids: static int array, the group of each leaf.
    num_segments: number of groups.
    axis_name: inside ``shard_map``/``pmap``, the mapped axis (or axes) over
      which each leaf is sharded; norms are then global over that axis, with one
      ``psum`` of the vector of group sums of squares.

  Returns:
    A vector of ``num_segments`` norms in float32 (or wider for float64 input);
    inf only for NaN/Inf input or a norm beyond float32's range (about 3.4e38).
  """
  divisor, root = group_norms_split(leaves, segment_ids, num_segments, axis_name=axis_name)
  return divisor * root


def global_norm(tree: Any, *, axis_name: Any = None) -> jax.Array:
  """Overflow-safe global L2 norm of a pytree, accumulated in float32.

  Unlike ``optax.tree.norm``, the sum of squares never overflows on finite
  input: float16 gradients of 1000 elements equal to 30.0 have norm 948.7 here,
  and inf in Optax 0.2.8. The common path reads each leaf once.

  Args:
    tree: a pytree of floating point arrays.
    axis_name: inside ``shard_map`` or ``pmap``, the name of the axis the
      leaves are sharded over; the norm is then global over that axis (one
      ``psum`` of a scalar).

  Returns:
    A float32 scalar (float64 when the input is float64).

  Example:
    >>> import jax.numpy as jnp, clipx
    >>> float(clipx.global_norm({"a": jnp.full(1000, 30.0, jnp.float16)}))
    948.68...
  """
  leaves = check_float_leaves(tree, "tree")
  return group_norms(leaves, np.zeros(len(leaves), np.int32), 1, axis_name=axis_name)[0]
