"""Published clipping methods as presets: clipx scopes and policies, composed.

A preset adds no numerics of its own: it picks scopes, threshold policies
and their arguments (see ``DESIGN.md``, "scope x threshold x response"), so
it behaves, jits, shards and checkpoints as the pieces it is built from.
Where a method is two scopes in a row, it uses their one-pass form
(:func:`clipx.clip_by_global_then_layer_norm`), which has the chain's state.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from clipx import stacking, thresholds, transforms, validation


def adagc(
  ratio: float = 1.04,
  decay: float = 0.99,
  *,
  warmup_steps: int = 100,
  warmup_max_norm: float = 1.0,
  group: str | transforms.GroupFn = "leaf",
  stacked: stacking.Stacked = None,
  axis_name: Any = None,
) -> optax.GradientTransformation:
  """AdaGC: each tensor clipped to ``ratio`` times an EMA of its own clipped norm.

  Spikes in language-model pre-training usually start in a few tensors
  (embeddings, some attention weights) while the global norm barely moves, so
  one global threshold either misses them or throttles every other tensor.
  AdaGC gives every parameter tensor its own adaptive bound: after the
  warm-up, tensor ``i`` with norm ``n_i`` gets threshold ``ratio * ema_i``,
  is scaled by ``min(1, ratio * ema_i / n_i)``, and
  ``ema_i <- decay * ema_i + (1 - decay) * min(n_i, ratio * ema_i)``.

  Warm-up, as in the authors' code: for the first ``warmup_steps`` steps the
  gradient is clipped to global norm ``warmup_max_norm`` (plain global-norm
  clipping, Megatron's ``--clip-grad``) and not per tensor; meanwhile each
  tensor's EMA is seeded with the *minimum* of its norms measured after that
  global clip (not their mean, which the paper's text suggests). So this is,
  computed in one pass by :func:`clipx.clip_by_global_then_layer_norm` (the
  global norm comes from the per-tensor norms; chained, the second clip must
  first materialize the first one's output, 2.7x the step time of a fixed
  global clip before Adam on XLA CPU, see ``benchmarks/README.md``),

  .. code-block:: python

    optax.chain(
      clipx.clip_by_global_norm(lambda t: warmup_max_norm if t < warmup_steps else inf),
      clipx.clip_by_layer_norm(
        clipx.ema_ratio(ratio, decay, warmup_steps=warmup_steps, warmup="min"),
        group=group, stacked=stacked,
      ),
    )

  Put it before the optimizer, as the paper does (it replaces Megatron's
  global clip before AdamW).

  The minimum seed plus the slow growth of the bound (at most a factor
  ``decay + (1 - decay) * ratio``, 1.0004 with the defaults, per step: about
  1700 steps to double) make AdaGC a regulariser of the step size and not
  only a spike guard: a tensor whose warm-up minimum lies well below its
  typical norm is clipped on most steps until its EMA has caught up (the
  paper relies on norms falling early in training). Check ``clipx.stats``.
  One near-zero warm-up norm is enough to freeze a tensor: on the digits CNN
  with injected spikes (``results/spike-methods.json``, seed 1) a spiked
  batch on the last warm-up step saturated the network, its gradient norms
  fell to 1e-13-1e-10, every bound was seeded there, and the model stayed at
  0.74 test accuracy with 99% of steps clipped. Only exactly-zero norms are
  left out of the seed; use a ``warmup_steps`` that ends on clean batches.

  Deviations from the authors' code (all at the edges; on a stream of
  finite, non-zero norms the per-tensor decisions and thresholds agree to
  float32 rounding, see ``tests/test_adagc.py``):

  - zero and non-finite norms are not recorded (as in every clipx policy);
    the reference records them, so a zero norm in warm-up seeds the EMA at 0
    and zeroes that tensor's gradient from then on;
  - the scale is ``threshold / norm`` exactly; the reference uses
    ``bound / (norm + 1e-6)`` (and ``max_norm / (norm + 1e-6)`` in warm-up),
    which is 1e-6 relative smaller for norms near 1 but clips a tensor whose
    norm is near 1e-6 to well below its bound;
  - the per-tensor warm-up counts *recorded* norms of each tensor, the
    global warm-up clip counts calls; the reference counts calls for both
    (they agree when no norm is zero or non-finite). Paddle's port warms up
    for ``warmup_steps + 1`` steps, seeds with the norms before the global
    clip and uses ``eps=1e-8``.

  Args:
    ratio: the allowed multiple of each tensor's EMA, > 1 (the paper's
      ``lambda_rel``; 1.04 in the authors' scripts, 1.03 in ERNIE's copy).
      May be changed at run time inside ``optax.inject_hyperparams``.
    decay: the EMA's decay, in (0, 1) (the paper's ``beta``, 0.99).
    warmup_steps: steps of global clipping before the per-tensor clip starts,
      >= 1 (the reference's ``start_clip_steps``, 100).
    warmup_max_norm: the global-norm bound during warm-up, > 0 (``inf``: no
      clipping during warm-up).
    group: what one "tensor" is: ``"leaf"`` (every array, as the paper),
      ``"module"`` or a function ``path -> key`` (see
      :func:`clipx.clip_by_layer_norm`).
    stacked: for scanned models, which axes of a leaf index layers (an
      int: that many leading axes; a tuple of positions such as ``(1,)``,
      MaxText's ``param_scan_axis=1``; or a function ``(path, leaf) -> int |
      tuple``), so each layer of a stack keeps its own EMA, as its unstacked
      twin would (see :func:`clipx.clip_by_layer_norm`).
    axis_name: inside ``shard_map``/``pmap``, the mapped axis the leaves are
      split over: the global (warm-up) and per-tensor norms are then over all
      shards.

  Returns:
    An ``optax.GradientTransformation`` whose state is the chain's,
    ``(GlobalNormClipState, LayerNormClipState)``; ``clipx.stats`` reports
    both (``clip/global/...`` for the warm-up clip, ``clip/layer/...`` per tensor).

  References:
    Wang et al., `Adaptive Gradient Clipping for Robust LLM Pre-Training
    <https://arxiv.org/abs/2502.11034>`_, 2025. The authors' code:
    `lishuai-97/AdaGC <https://github.com/lishuai-97/AdaGC>`_, file
    ``megatron-gpt2.patch`` (class ``AdaGC`` in Megatron's ``clip_grads.py``),
    commit ``32c249fa365e08169779d63d416bfa76c2be31fc``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, clipx
    >>> from clipx.presets import adagc
    >>> tx = adagc(warmup_steps=2)
    >>> grads = {"a": jnp.array([0.3, 0.4]), "b": jnp.array([0.0, 0.2])}
    >>> state, update = tx.init(grads), jax.jit(tx.update)
    >>> for scale in [1.0, 0.5]:  # warm-up; EMA seeds: norms 0.25, 0.1 (the minimum)
    ...   _, state = update(jax.tree.map(lambda g: scale * g, grads), state)
    >>> clipped, state = update({"a": jnp.array([3.0, 4.0]), "b": jnp.array([0.0, 0.1])}, state)
    >>> clipped["a"].round(3), clipped["b"]  # a: 5 cut to 1.04 * 0.25; b passes
    (Array([0.156, 0.208], dtype=float32), Array([0. , 0.1], dtype=float32))
  """
  owner = "adagc"
  validation.number(owner, "ratio", ratio, low=1.0)
  validation.number(owner, "decay", decay, low=0.0, high=1.0, high_open=True)
  validation.integer(owner, "warmup_steps", warmup_steps, 1)
  validation.positive(owner, "warmup_max_norm", warmup_max_norm)
  validation.choice(owner, "group", group, transforms.GROUP_MODES, function=True)
  stacking.as_stacked_fn(owner, stacked)

  def warmup_bound(count: jax.Array) -> jax.Array:
    bound = jnp.asarray(warmup_max_norm, jnp.float32)
    return jnp.where(count < warmup_steps, bound, jnp.asarray(jnp.inf, jnp.float32))

  policy = thresholds.ema_ratio(ratio, decay, warmup_steps=warmup_steps, warmup="min")
  # The private form, so errors at init and update name clipx.adagc, the function called.
  return transforms._clip_by_global_then_layer_norm(
    owner, warmup_bound, policy, group, stacked, axis_name
  )
