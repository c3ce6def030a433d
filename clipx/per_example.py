"""Per-example clipping: the core of DP-SGD.

:func:`clipped_grad` turns a loss of one example into a function that returns
the mean over a batch of per-example gradients, each clipped to a bound
before averaging (Abadi et al. 2016). Gradients are computed with
``jax.vmap(jax.grad(loss_fn))``; with ``chunk_size`` the batch is processed a
chunk at a time, so only one chunk's per-example gradients are ever held.

Numerics are those of the other scopes (see ``clipx.transforms``): norms
accumulate in float32 and do not overflow on finite input; an example is
scaled only where its norm exceeds the threshold; a non-finite gradient is
never clipped, so it reaches the mean and is seen, not zeroed.

Why norms are not ``jax.vmap(clipx.global_norm)``: ``global_norm`` guards
overflow with a ``lax.cond``, and under ``vmap`` a cond whose predicate is
batched becomes a ``select`` that runs *both* branches for every example, so
the rare scaled recomputation (a max and a second sum of squares over every
per-example gradient) would be paid on every step. Here the per-example sums
of squares are computed batched, and one scalar ``lax.cond`` for the whole
chunk decides whether any of them overflowed; only then is the fallback run,
and it recomputes the chunk's gradients rather than taking them as operands
(see :func:`per_example_norms`). ``benchmarks/per_example.py`` measures the
difference.

Why convolutions are rewritten (on CPU, by default): see
:func:`convs_as_matmuls`.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from clipx import norms, scaling, validation
from clipx.privacy import PrivateQuantileState
from clipx.stats import ClipStats
from clipx.thresholds import QuantileState, ScheduleState, as_policy
from clipx.transforms import GROUP_MODES, GroupFn, Threshold, layer_groups

# Policies whose threshold for a batch is known before its norms are: the
# state alone fixes it. That is what lets a chunk clip its examples before the
# rest of the batch has been seen (a percentile or z-score of this batch's
# norms would need every per-example gradient held at once, or computed twice).
_BATCH_POLICY_STATES = (optax.EmptyState, ScheduleState, QuantileState, PrivateQuantileState)


class PerExampleClipState(NamedTuple):
  """State carried between calls of a :func:`clipped_grad` function.

  Attributes:
    threshold_state: the threshold policy's state (e.g. ``QuantileState``).
    clip_count: examples clipped so far (per group for per-layer clipping).
  """

  threshold_state: Any
  clip_count: jax.Array


def _check_chunk_size(chunk_size: Any) -> None:
  if chunk_size is None:
    return
  if isinstance(chunk_size, (bool, np.bool_)) or not isinstance(chunk_size, (int, np.integer)):
    raise TypeError(f"clipx.clipped_grad: chunk_size must be an int or None, got {chunk_size!r}.")
  if chunk_size < 1:
    raise ValueError(f"clipx.clipped_grad: chunk_size must be >= 1, got {chunk_size!r}.")


def _group_ids(params: chex.ArrayTree, group: str | GroupFn | None) -> tuple[np.ndarray, int]:
  """The static group id of every param leaf, and the number of groups."""
  if group is None:
    return np.zeros(len(jax.tree_util.tree_leaves(params)), np.int32), 1
  ids, names = layer_groups(params, group)
  return ids, len(names)


def _batch_size(batch: chex.ArrayTree) -> int:
  """The common leading dimension of every leaf of ``batch``."""
  leaves = jax.tree_util.tree_leaves_with_path(batch)
  if not leaves:
    raise ValueError("clipx.clipped_grad: the batch has no arrays.")
  size: Any = None  # the first leaf's leading dimension, once seen
  for path, leaf in leaves:
    shape = jnp.shape(leaf)
    where = jax.tree_util.keystr(path) or "<root>"
    if not shape:
      raise ValueError(
        f"clipx.clipped_grad: batch leaf {where} is a scalar; every batch leaf needs a"
        " leading example axis."
      )
    if size is None:
      size = shape[0]
    elif shape[0] != size:
      raise ValueError(
        f"clipx.clipped_grad: batch leaves disagree on the number of examples: {size}"
        f" before {where}, which has {shape[0]}."
      )
  if size == 0:
    raise ValueError("clipx.clipped_grad: the batch is empty (0 examples).")
  return int(size)


def per_example_norms(
  leaves: list[jax.Array],
  segment_ids: np.ndarray,
  num_groups: int,
  *,
  recompute: tuple[Callable[[Any], list[jax.Array]], Any] | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Overflow-safe norms of each example's groups of leaves, shape ``(b, num_groups)``.

  As ``(divisor, root)`` with norm ``divisor * root`` (see
  :func:`clipx.norms.group_norms_split`), so a norm beyond float32's range is
  still clipped.

  Args:
    leaves: per-example gradients, each of shape ``(b, ...)``.
    segment_ids: the static group of each leaf.
    num_groups: number of groups.
    recompute: optional ``(fn, operands)`` with ``fn(operands) == leaves``.
      The overflow branch then recomputes the gradients from the (small)
      operands instead of receiving them: with the per-example gradients as
      ``lax.cond`` operands XLA copied them, and the unchunked clipped step ran
      about 25% slower on CPU (measured on the digits CNN at batch 256).

  Returns:
    Float32 (or wider) ``(divisor, root)``; one scalar ``lax.cond`` guards the whole batch.
  """
  # Sums of squares of every (example, leaf): one read of each gradient.
  sq = jax.vmap(norms.leaf_sq_norms)(leaves)  # (b, leaves)
  sq = jax.ops.segment_sum(sq.T, segment_ids, num_groups).T  # (b, groups)
  dtype = norms._common_dtype(leaves)
  fn, operands = recompute if recompute is not None else (lambda x: x, leaves)

  def fallback(operands):
    # Rare (some example's sum of squares overflowed, or is NaN/Inf): each
    # leaf's norm with its largest magnitude factored out, as in group_norms.
    def one_example(example_leaves):
      d, r = norms._scaled_leaf_norms(example_leaves, dtype)
      return norms.combine_norms(d, r, segment_ids, num_groups)

    return jax.vmap(one_example)(fn(operands))

  def common(_):
    return jnp.ones_like(sq), norms.safe_sqrt(sq)

  return lax.cond(jnp.all(jnp.isfinite(sq)), common, fallback, operands)


# Convolutions as matrix products.
#
# Under ``jax.vmap`` the kernel gradient of a convolution, batched over
# examples on both operands, becomes one convolution with
# ``feature_group_count`` = the number of examples. XLA's CPU backend has no
# fast path for grouped convolutions: on the digits CNN the per-example step
# ran 5x slower than one example at a time. Written as patches times a
# matrix (im2col), the same convolution's kernel gradient is a batched matrix
# product, which every backend runs well, and the per-example step ran 3x
# faster than with XLA's convolution (``benchmarks/per_example.py``).
# GPUs and TPUs have grouped convolutions in their libraries, so this is the
# default on CPU only.

# Primitives whose sub-jaxpr is a plain function call: inlined, so the
# convolutions inside them are rewritten too.
_CALL_PRIMITIVES = ("jit", "pjit", "closed_call", "core_call")


def _conv_as_matmul(lhs, rhs, *, params: dict) -> jax.Array:
  """``lax.conv_general_dilated`` (no groups, no input dilation) as patches @ kernel."""
  lhs_spec, rhs_spec, out_spec = params["dimension_numbers"]
  strides, dilation = params["window_strides"], params["rhs_dilation"]
  spatial = len(strides)
  x = jnp.transpose(lhs, (lhs_spec[0], *lhs_spec[2:], lhs_spec[1]))  # N, spatial..., C
  kernel = jnp.transpose(rhs, (*rhs_spec[2:], rhs_spec[1], rhs_spec[0]))  # spatial..., I, O
  x = lax.pad(
    x,
    jnp.zeros((), x.dtype),
    [(0, 0, 0), *((lo, hi, 0) for lo, hi in params["padding"]), (0, 0, 0)],
  )
  window = kernel.shape[:spatial]
  out_size = [
    (x.shape[1 + d] - (window[d] - 1) * dilation[d] - 1) // strides[d] + 1 for d in range(spatial)
  ]
  columns = []
  for offset in itertools.product(*(range(w) for w in window)):
    start = [0, *(o * r for o, r in zip(offset, dilation)), 0]
    limit = [
      x.shape[0],
      *(b + (n - 1) * s + 1 for b, n, s in zip(start[1:], out_size, strides)),
      x.shape[-1],
    ]
    columns.append(lax.slice(x, start, limit, (1, *strides, 1)))
  # Patch features run offset-major, then input channel: the row order of
  # the (spatial..., I, O) kernel flattened to a matrix.
  patches = jnp.concatenate(columns, axis=-1) if len(columns) > 1 else columns[0]
  out = lax.dot_general(
    patches,
    kernel.reshape(-1, kernel.shape[-1]),
    (((patches.ndim - 1,), (0,)), ((), ())),
    precision=params["precision"],
    preferred_element_type=params["preferred_element_type"],
  )
  # ``out`` is (N, spatial..., O); out_spec[i] is where logical dim i (N, C,
  # spatial...) goes in the result.
  axis_of = [0, spatial + 1, *range(1, spatial + 1)]
  return jnp.transpose(out, [axis_of[out_spec.index(j)] for j in range(spatial + 2)])


def _matmul_conv_ok(params: dict) -> bool:
  return (
    params["feature_group_count"] == 1
    and params["batch_group_count"] == 1
    and all(d == 1 for d in params["lhs_dilation"])
  )


def _eval_rewriting_convs(jaxpr, consts, args) -> list:
  """Evaluates ``jaxpr``, computing each plain convolution as a matrix product."""
  env: dict = {}

  def read(var):
    return var.val if isinstance(var, jax.extend.core.Literal) else env[var]

  for var, value in zip(jaxpr.constvars, consts):
    env[var] = value
  for var, value in zip(jaxpr.invars, args):
    env[var] = value
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    name = eqn.primitive.name
    if name == "conv_general_dilated" and _matmul_conv_ok(eqn.params):
      outvals = [_conv_as_matmul(*invals, params=eqn.params)]
    elif name in _CALL_PRIMITIVES and isinstance(
      eqn.params.get("jaxpr"), jax.extend.core.ClosedJaxpr
    ):
      closed = eqn.params["jaxpr"]
      outvals = _eval_rewriting_convs(closed.jaxpr, closed.consts, invals)
    else:
      # Everything else (custom derivatives, remat, control flow) is bound
      # as it was: correct, though convolutions inside are not rewritten.
      bind_params = eqn.primitive.get_bind_params(eqn.params)
      subfuns: tuple = ()
      if isinstance(bind_params, tuple):  # older JAX returns (subfuns, params)
        subfuns, bind_params = bind_params
      context = getattr(getattr(eqn, "ctx", None), "manager", contextlib.nullcontext())
      with context:
        result = eqn.primitive.bind(*subfuns, *invals, **bind_params)
      outvals = result if eqn.primitive.multiple_results else [result]
    for var, value in zip(eqn.outvars, outvals):
      env[var] = value
  return [read(v) for v in jaxpr.outvars]


def convs_as_matmuls(fn: Callable) -> Callable:
  """``fn`` with every ungrouped convolution computed as patches times a matrix.

  The values are those of ``fn`` up to the order of floating point sums; the
  point is the gradient under ``jax.vmap``: see the comment above.
  """

  def rewritten(*args):
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
    outs = _eval_rewriting_convs(closed.jaxpr, closed.consts, jax.tree_util.tree_leaves(args))
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), outs)

  return rewritten


class PerExampleGrad:
  """The function :func:`clipped_grad` returns; see there."""

  def __init__(self, loss_fn, policy, group, chunk_size, has_aux, conv_as_matmul):
    self._loss_fn = loss_fn
    self._conv_as_matmul = conv_as_matmul
    self._policy = policy
    self._group = group
    self._chunk_size = chunk_size
    self._has_aux = has_aux
    self._stateless = isinstance(policy.init(jnp.zeros(())), optax.EmptyState)

  def init(self, params: optax.Params) -> PerExampleClipState:
    """The state to pass to the first call: the policy's, and a zero clip count."""
    _, count = _group_ids(params, self._group)
    shape = () if self._group is None else (count,)
    dtype = norms._common_dtype(jax.tree_util.tree_leaves(params))
    return PerExampleClipState(
      threshold_state=self._policy.init(jnp.zeros(shape, dtype)),
      clip_count=jnp.zeros(shape, jnp.int32),
    )

  def __call__(
    self, params: optax.Params, batch: chex.ArrayTree, state: PerExampleClipState | None = None
  ) -> tuple[Any, ...]:
    """``(grads, stats)``, or ``(grads, stats, state)`` when ``state`` is passed."""
    if state is None and not self._stateless:
      raise ValueError(
        "clipx.clipped_grad: this threshold keeps state (a schedule or a quantile policy);"
        " create it with state = grad_fn.init(params) and call"
        " grads, stats, state = grad_fn(params, batch, state)."
      )
    param_leaves = norms.check_float_leaves(params, "params")
    dtype = norms._common_dtype(param_leaves)
    rewrite = self._conv_as_matmul
    if rewrite is None:
      rewrite = jax.default_backend() == "cpu"
    loss_fn = convs_as_matmuls(self._loss_fn) if rewrite else self._loss_fn
    grad_fn = jax.grad(loss_fn, has_aux=self._has_aux)
    ids, count = _group_ids(params, self._group)
    shape = () if self._group is None else (count,)
    return_state = state is not None
    if state is None:
      state = self.init(params)
    batch_size = _batch_size(batch)

    # The threshold depends only on the state (see _BATCH_POLICY_STATES), so
    # a dummy norm gives it; the state is advanced with the real norms below.
    threshold, _ = self._policy.update(jnp.zeros(shape, dtype), state.threshold_state)
    threshold = jnp.broadcast_to(jnp.asarray(threshold, dtype), shape).reshape(-1)

    def chunk_fn(params, examples, valid):
      """Per-example clip of one chunk: (sums of clipped grads, per-example outputs)."""

      def gradients(operands):
        out = jax.vmap(grad_fn, in_axes=(None, 0))(*operands)
        return out if self._has_aux else (out, None)

      grads, aux = gradients((params, examples))
      leaves = norms.check_float_leaves(grads, "gradient")
      recompute = (lambda operands: jax.tree.leaves(gradients(operands)[0]), (params, examples))
      divisor, root = per_example_norms(leaves, ids, count, recompute=recompute)  # (b, groups)
      decision = scaling.decide(divisor, root, threshold)
      norm, clipped, scale = decision.norm, decision.clipped, decision.scale
      # Weight of each example in the sum: its scale where clipped, 1 where not
      # (an unclipped gradient is summed as it is), 0 for padding. Padding
      # examples are copies of real ones, so a NaN there is also a NaN in the
      # real example and the sum is non-finite either way.
      weight = jnp.where(valid[:, None], jnp.where(clipped, scale, 1), 0)
      sums = []
      for leaf, group in zip(leaves, ids):
        wide = jnp.promote_types(leaf.dtype, dtype)
        # A dot over the example axis: on CPU it ran faster than a multiply
        # and a sum over the leading axis. HIGHEST precision, or GPUs and TPUs
        # would take TF32/bfloat16 passes by default.
        sums.append(
          jnp.tensordot(
            weight[:, group].astype(wide),
            leaf.astype(wide),
            axes=1,
            precision=lax.Precision.HIGHEST,
          )
        )
      return sums, (norm, clipped, scale, aux)

    if self._chunk_size is None or self._chunk_size >= batch_size:
      sums, (norm, clipped, scale, aux) = chunk_fn(
        params, batch, jnp.ones((batch_size,), jnp.bool_)
      )
    else:
      sums, (norm, clipped, scale, aux) = _chunked(
        chunk_fn, params, batch, batch_size, self._chunk_size
      )

    clipped_sums = [(s / batch_size).astype(leaf.dtype) for s, leaf in zip(sums, param_leaves)]
    grads = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), clipped_sums)

    if self._group is None:
      norm, clipped, scale, threshold = norm[:, 0], clipped[:, 0], scale[:, 0], threshold[0]
    _, threshold_state = self._policy.update(norm, state.threshold_state)
    clip_count = state.clip_count + jnp.sum(clipped, axis=0, dtype=jnp.int32)
    stats = ClipStats(
      norm=norm,
      clipped_norm=jnp.where(clipped, threshold, norm),
      threshold=threshold,
      scale=scale,
      clipped=clipped,
      clip_count=clip_count,
    )
    if self._has_aux:
      grads = (grads, aux)
    if not return_state:
      return grads, stats
    return grads, stats, PerExampleClipState(threshold_state, clip_count)


def _chunked(chunk_fn, params, batch, batch_size: int, chunk_size: int):
  """Runs ``chunk_fn`` over the batch in chunks, summing the clipped gradients.

  A ``lax.scan`` (what ``lax.map`` is built on) whose carry is the running sum:
  only one chunk of per-example gradients is live at a time, and the sums do
  not grow with the number of chunks. A batch that is not a multiple of
  ``chunk_size`` is padded with copies of its first examples, masked out of
  the sums and cut from the per-example outputs, so one compiled chunk serves
  every chunk.
  """
  num_chunks = math.ceil(batch_size / chunk_size)
  padded = num_chunks * chunk_size
  pad = padded - batch_size  # < chunk_size < batch_size

  def split(x):
    x = jnp.asarray(x)
    if pad:
      x = jnp.concatenate([x, x[:pad]])
    return x.reshape((num_chunks, chunk_size) + x.shape[1:])

  chunks = jax.tree.map(split, batch)
  valid = (jnp.arange(padded) < batch_size).reshape(num_chunks, chunk_size)
  first = jax.tree.map(lambda x: x[0], chunks)
  sums_shape, _ = jax.eval_shape(chunk_fn, params, first, valid[0])
  zeros = [jnp.zeros(s.shape, s.dtype) for s in sums_shape]

  def step(total, chunk):
    examples, chunk_valid = chunk
    sums, outputs = chunk_fn(params, examples, chunk_valid)
    return [t + s for t, s in zip(total, sums)], outputs

  sums, outputs = lax.scan(step, zeros, (chunks, valid))
  outputs = jax.tree.map(lambda y: y.reshape((padded,) + y.shape[2:])[:batch_size], outputs)
  return sums, outputs


def clipped_grad(
  loss_fn: Callable[..., Any],
  max_norm: Threshold,
  *,
  group: str | GroupFn | None = None,
  chunk_size: int | None = None,
  has_aux: bool = False,
  conv_as_matmul: bool | None = None,
) -> PerExampleGrad:
  """The mean over a batch of per-example gradients, each clipped first.

  ``grad_fn = clipped_grad(loss_fn, max_norm)`` returns a function
  ``grad_fn(params, batch) -> (grads, stats)``: ``grads`` is shaped like
  ``params`` and equals ``mean_i clip(grad loss_fn(params, example_i))``,
  where ``clip`` scales an example's gradient to norm ``max_norm`` only if
  its norm is larger. This is the clipping step of DP-SGD; add the noise with
  :func:`clipx.add_noise`.

  ``loss_fn(params, example)`` sees *one* example: each leaf of ``batch``
  without its leading axis. A model that expects a batch can be given one of
  size 1: ``lambda p, ex: loss(p, jax.tree.map(lambda x: x[None], ex))``.

  A threshold that keeps state (an Optax schedule, or :func:`clipx.quantile`
  for adaptive clipping) needs it carried between calls::

    state = grad_fn.init(params)
    grads, stats, state = grad_fn(params, batch, state)

  The threshold must be known before the batch's norms are (so a chunk can be
  clipped before the next is computed): a float, an array (per group), a
  schedule, :func:`clipx.quantile` or :func:`clipx.private_quantile`, whose
  update takes the whole batch of per-example norms. Other policies raise
  ``TypeError``. With :func:`clipx.quantile` the threshold moves with the
  exact fraction of examples left unclipped, which is not private; for DP-SGD
  use :func:`clipx.private_quantile`, which adds noise to that count (Andrew
  et al.), and give :func:`clipx.add_noise` the multiplier
  :func:`clipx.gradient_noise_multiplier` returns.

  Args:
    loss_fn: ``loss_fn(params, example) -> loss`` (a float scalar), or
      ``-> (loss, aux)`` with ``has_aux=True``.
    max_norm: the per-example bound (see above). For per-layer clipping, one
      bound for every group, or an array with one per group.
    group: ``None`` (default) clips each example's global norm; ``"leaf"``,
      ``"module"`` or a function of the key path clip each example's per-layer
      norms, grouped as in :func:`clipx.clip_by_layer_norm`. The sensitivity
      of the sum is then ``sqrt(sum of squared bounds)``, not ``max_norm``.
    chunk_size: process this many examples at a time (``jax.lax.scan`` over
      vmapped chunks): peak memory is bounded by the chunk, not the batch. A
      batch not divisible by it is padded with masked examples. ``None``: the
      whole batch at once. Chunks are also faster when the whole batch's
      per-example gradients would not fit in cache: on the digits CNN on CPU,
      chunks of 8 to 32 ran 3x faster than the whole batch of 256
      (``benchmarks/per_example.py``).
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``; ``grads`` is then
      ``(grads, aux)`` with ``aux`` stacked over the batch.
    conv_as_matmul: compute ``loss_fn``'s convolutions as patches times a
      matrix (im2col), so their per-example kernel gradients are batched
      matrix products. Under ``vmap`` XLA otherwise makes them grouped
      convolutions, which its CPU backend runs slowly (3.5x slower per-example
      step on the digits CNN). ``None``: on CPU only. Only ungrouped
      convolutions without input dilation, outside custom-derivative and
      remat regions, are rewritten; values agree to float rounding.

  Returns:
    A :class:`PerExampleGrad`, called as ``grad_fn(params, batch)`` or
    ``grad_fn(params, batch, state)``. Its :class:`ClipStats` are per
    example: ``norm``, ``clipped_norm``, ``scale``, ``clipped`` have shape
    ``(batch,)`` (``(batch, groups)`` per layer), ``threshold`` is the bound
    used, ``clip_count`` counts clipped examples (since ``init`` when a state
    is passed).

  References:
    Abadi et al., `Deep Learning with Differential Privacy
    <https://arxiv.org/abs/1607.00133>`_, CCS 2016;
    McMahan et al., `A General Approach to Adding Differential Privacy to
    Iterative Training Procedures <https://arxiv.org/abs/1812.06210>`_, 2018
    (per-layer clipping); Andrew et al., `Differentially Private Learning with
    Adaptive Clipping <https://arxiv.org/abs/1905.03871>`_, NeurIPS 2021.

  Example:
    >>> import jax.numpy as jnp, clipx
    >>> loss = lambda w, x: jnp.dot(w, x)  # gradient: the example itself
    >>> grad_fn = clipx.clipped_grad(loss, 2.0)
    >>> grads, stats = grad_fn(jnp.zeros(2), jnp.array([[6.0, 8.0], [0.0, 1.0]]))
    >>> grads  # mean of [1.2, 1.6] (clipped to norm 2) and [0, 1] (not clipped)
    Array([0.6, 1.3], dtype=float32)
    >>> stats.norm, stats.clipped
    (Array([10.,  1.], dtype=float32), Array([ True, False], dtype=bool))
  """
  if not callable(loss_fn):
    raise TypeError(f"clipx.clipped_grad: loss_fn must be callable, got {loss_fn!r}.")
  if not isinstance(has_aux, (bool, np.bool_)):
    raise TypeError(f"clipx.clipped_grad: has_aux must be a bool, got {has_aux!r}.")
  _check_chunk_size(chunk_size)
  if conv_as_matmul is not None and not isinstance(conv_as_matmul, (bool, np.bool_)):
    raise TypeError(
      f"clipx.clipped_grad: conv_as_matmul must be True, False or None, got {conv_as_matmul!r}."
    )
  if group is not None:
    validation.choice("clipped_grad", "group", group, GROUP_MODES, function=True)
  policy = as_policy(max_norm, "max_norm", "clipped_grad")
  probe = policy.init(jnp.zeros(()))
  if not isinstance(probe, _BATCH_POLICY_STATES):
    raise TypeError(
      f"clipx.clipped_grad: a {type(probe).__name__} threshold needs the norms of the"
      " batch before it is known; per-example clipping takes a float, an array, an"
      " Optax schedule, clipx.quantile(...) or clipx.private_quantile(...)."
    )
  if isinstance(probe, PrivateQuantileState) and group is not None:
    raise ValueError(
      f"clipx.clipped_grad: group must be None with clipx.private_quantile (one private"
      f" count, one bound for the whole gradient), got {group!r}."
    )
  return PerExampleGrad(loss_fn, policy, group, chunk_size, bool(has_aux), conv_as_matmul)
