"""The noise of DP-SGD: on the gradient, and on the count an adaptive bound moves by.

Per-example clipping (:func:`clipx.clipped_grad`) bounds what one example can
change in the sum of gradients; :func:`add_noise` then adds Gaussian noise
scaled to that bound, which is what makes a step differentially private. The
privacy budget (epsilon at a given delta) of a run follows from the noise
multiplier, the sampling rate and the number of steps; compute it with an
accountant such as ``dp-accounting`` (the ``dp`` extra; see
``examples/dp_train_cnn.py``).

An adaptive bound learned from the data is a second release: it moves with
how many examples went unclipped. :func:`private_quantile` adds Gaussian
noise to that count, and :func:`gradient_noise_multiplier` splits one noise
budget between the two releases so the pair costs what a single Gaussian
mechanism does (Andrew et al. 2021, Theorem 1); the accountant is told that
single multiplier.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from clipx import norms, validation
from clipx.thresholds import ThresholdPolicy, policy_factory, quantile_step


class AddNoiseState(NamedTuple):
  """State of :func:`add_noise`.

  Attributes:
    key: the data (``jax.random.key_data``, uint32) of the PRNG key the next
      step's noise is drawn from: plain integers, so any checkpointer saves it.
    count: steps taken so far (int32), for the privacy accountant.
  """

  key: jax.Array
  count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as Optax states do


def _as_key(key: Any, owner: str = "add_noise") -> jax.Array:
  """``key`` as a typed PRNG key; a clear error, naming ``key``, for anything else."""
  accepts = (
    f"clipx.{owner}: key must be jax.random.key(seed), jax.random.PRNGKey(seed) or an int seed"
  )
  if isinstance(key, (bool, np.bool_)):
    raise TypeError(f"{accepts}, got {key!r} (a bool).")
  if isinstance(key, (int, np.integer)):
    # jax.random.key takes int64 seeds; beyond that it raises an OverflowError.
    if not -(2**63) <= int(key) < 2**63:
      raise ValueError(f"{accepts} in [-2**63, 2**63), got {key!r}.")
    return jax.random.key(int(key))
  if not isinstance(key, (jax.Array, np.ndarray, list, tuple)):
    # Strings, None, dicts and other objects: JAX's own error would not name key.
    raise TypeError(f"{accepts}, got {key!r} ({type(key).__name__}).")
  try:
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
  except (TypeError, ValueError) as error:  # a ragged or non-numeric list
    raise TypeError(f"{accepts}, got {key!r}.") from error
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    if key.shape != ():
      raise ValueError(f"clipx.{owner}: key must be a single PRNG key, got shape {key.shape}.")
    return key
  if key.dtype == jnp.uint32 and key.shape == (2,):  # a raw jax.random.PRNGKey
    return jax.random.wrap_key_data(key)
  raise TypeError(f"{accepts}, got an array of dtype {key.dtype} and shape {key.shape}.")


def add_noise(
  noise_multiplier: chex.Numeric,
  max_norm: chex.Numeric,
  batch_size: int,
  key: jax.Array | int,
) -> optax.GradientTransformationExtraArgs:
  """Adds Gaussian noise of std ``noise_multiplier * max_norm / batch_size``.

  Put it after the mean of per-example clipped gradients (which is what
  :func:`clipx.clipped_grad` returns) and before the optimizer: the noise on
  the *sum* of clipped gradients has std ``noise_multiplier * max_norm``, the
  Gaussian mechanism of DP-SGD, and dividing by the batch size gives this.
  Every element of every leaf gets independent noise, drawn in float32 (or
  wider) and added before casting back to the leaf's dtype.

  The key lives in the state and is split every step, so noise never repeats
  and a checkpointed state resumes the same stream.

  For adaptive clipping (:func:`clipx.quantile`) the bound changes every step;
  pass the one used as an extra argument, ``tx.update(grads, state, params,
  max_norm=stats.threshold)`` (``optax.chain`` forwards it), so the noise
  follows it. For per-layer clipping pass the bound of the whole gradient,
  ``sqrt(sum of squared per-layer bounds)``.

  Args:
    noise_multiplier: std of the noise relative to the sensitivity, finite and
      >= 0 (0 adds nothing: useful to compare with a non-private run; no privacy).
    max_norm: the per-example clipping bound (the L2 sensitivity of the sum),
      finite and > 0.
    batch_size: the number the sum was divided by: the (expected) batch size,
      finite and > 0.
    key: ``jax.random.key(seed)``, a raw ``jax.random.PRNGKey(seed)``, or an int seed.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is :class:`AddNoiseState`.

  References:
    Abadi et al., `Deep Learning with Differential Privacy
    <https://arxiv.org/abs/1607.00133>`_, CCS 2016; Dwork and Roth, `The
    Algorithmic Foundations of Differential Privacy
    <https://www.cis.upenn.edu/~aaroth/Papers/privacybook.pdf>`_, 2014
    (the Gaussian mechanism).

  Example:
    >>> import jax, jax.numpy as jnp, optax, clipx
    >>> tx = optax.chain(clipx.add_noise(1.0, 1.0, 100, key=0), optax.sgd(0.1))
    >>> params = {"w": jnp.zeros(10_000)}
    >>> updates, state = tx.update({"w": jnp.zeros(10_000)}, tx.init(params))
    >>> round(float(jnp.std(updates["w"])), 4)  # 0.1 * 1.0 * 1.0 / 100
    0.001
  """
  # Finite: an infinite batch size or bound would make the noise 0 or inf,
  # and privacy would be lost (or the update destroyed) without a word.
  validation.nonnegative("add_noise", "noise_multiplier", noise_multiplier, finite=True)
  validation.positive("add_noise", "max_norm", max_norm, finite=True)
  validation.positive("add_noise", "batch_size", batch_size, finite=True)
  initial_key = _as_key(key)
  impl = jax.random.key_impl(initial_key)

  def init_fn(params):
    del params
    return AddNoiseState(jax.random.key_data(initial_key), count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None, *, max_norm=max_norm, **extra_args):
    del params, extra_args
    # Arrays (a Python float leaf has no dtype); an integer leaf is a TypeError naming it.
    leaves = norms.check_float_leaves(updates)
    treedef = jax.tree_util.tree_structure(updates)
    next_key, step_key = jax.random.split(jax.random.wrap_key_data(state.key, impl=impl))
    leaf_keys = jax.random.split(step_key, max(len(leaves), 1))
    std = (
      jnp.asarray(noise_multiplier, jnp.float32)
      * jnp.asarray(max_norm, jnp.float32)
      / jnp.asarray(batch_size, jnp.float32)
    )
    noisy = []
    for leaf, leaf_key in zip(leaves, leaf_keys):
      wide = jnp.promote_types(leaf.dtype, jnp.float32)
      noise = jax.random.normal(leaf_key, jnp.shape(leaf), wide)
      noisy.append((leaf.astype(wide) + std.astype(wide) * noise).astype(leaf.dtype))
    updates = jax.tree_util.tree_unflatten(treedef, noisy)
    return updates, AddNoiseState(jax.random.key_data(next_key), optax.safe_increment(state.count))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def gradient_noise_multiplier(noise_multiplier: float, count_noise: float) -> float:
  """The gradient's noise multiplier when an adaptive bound spends part of the budget.

  DP-SGD with :func:`private_quantile` releases two noisy sums per step: the
  clipped gradients (noise ``sigma_grad * bound``, sensitivity ``bound``) and
  the centred unclipped count (noise ``count_noise``, sensitivity 1/2). Their
  pair is exactly as private as one Gaussian mechanism with multiplier
  ``noise_multiplier`` when ``noise_multiplier**-2 = sigma_grad**-2 + (2 *
  count_noise)**-2``, so

    ``sigma_grad = (noise_multiplier**-2 - (2 * count_noise)**-2) ** -1/2``,

  slightly more gradient noise than without adaptive clipping. Give
  ``sigma_grad`` to :func:`add_noise` and ``noise_multiplier`` to the privacy
  accountant, as Opacus' ``AdaClipDPOptimizer`` does.

  Args:
    noise_multiplier: the noise multiplier the run is accounted at, finite and
      >= 0 (0: no noise and no privacy; returns 0).
    count_noise: the std of the noise on the unclipped count (``sigma_b``),
      finite and > ``noise_multiplier / 2``: the count noise alone must not
      already cost the whole budget. Andrew et al. suggest ``batch_size / 20``.

  Returns:
    ``sigma_grad``, a Python float >= ``noise_multiplier``.

  References:
    Andrew et al., `Differentially Private Learning with Adaptive Clipping
    <https://arxiv.org/abs/1905.03871>`_, NeurIPS 2021, Theorem 1.

  Example:
    >>> import clipx
    >>> round(clipx.gradient_noise_multiplier(1.0, count_noise=2.5), 4)  # (1 - 1/25) ** -1/2
    1.0206
  """
  owner = "gradient_noise_multiplier"
  validation.nonnegative(owner, "noise_multiplier", noise_multiplier, finite=True)
  validation.positive(owner, "count_noise", count_noise, finite=True)
  sigma, sigma_b = float(noise_multiplier), float(count_noise)
  if sigma == 0:
    return 0.0
  if not 2 * sigma_b > sigma:
    raise ValueError(
      f"clipx.{owner}: count_noise must be > noise_multiplier / 2 = {sigma / 2:g} (the count"
      f" noise alone would spend the whole budget), got {count_noise!r}."
    )
  return (sigma**-2 - (2 * sigma_b) ** -2) ** -0.5


class PrivateQuantileState(NamedTuple):
  """State of :func:`private_quantile`.

  Attributes:
    threshold: the bound the next batch is clipped to (float32 scalar).
    key: the data (``jax.random.key_data``, uint32) of the PRNG key the next
      step's count noise comes from: the step splits it into ``(next key,
      step key)`` and draws ``count_noise * jax.random.normal(step key)``.
    noisy_count: the last step's noisy count of unclipped examples, the value
      the threshold moved by (0 before the first step). It is a private
      release, so it may be logged.
  """

  threshold: jax.Array
  key: jax.Array
  noisy_count: jax.Array


@policy_factory
def private_quantile(
  target_quantile: chex.Numeric = 0.5,
  learning_rate: chex.Numeric = 0.2,
  initial: chex.Numeric = 1.0,
  *,
  count_noise: chex.Numeric,
  batch_size: chex.Numeric,
  key: jax.Array | int,
  max_threshold: chex.Numeric = float("inf"),
) -> ThresholdPolicy:
  """:func:`clipx.quantile` with Gaussian noise on the unclipped count: adaptive clipping for DP.

  For :func:`clipx.clipped_grad`. Each step the batch is clipped to the
  current bound ``C``; then, with ``b_i = 1[norm_i <= C]`` over the batch's
  examples and ``z ~ N(0, 1)`` drawn from the key in the state,

    ``b~ = (sum_i (b_i - 1/2) + count_noise * z) / batch_size + 1/2``,
    ``C <- C * exp(-learning_rate * (b~ - target_quantile))``.

  Centring ``b_i`` halves the count's sensitivity (adding or removing one
  example moves the sum by 1/2), which is what :func:`gradient_noise_multiplier`
  assumes; dividing by the *expected* batch size (public) rather than the
  number of examples present keeps the batch size private under Poisson
  sampling. Where the batch holds exactly ``batch_size`` examples,
  ``b~ = (sum_i b_i + count_noise * z) / batch_size``: the form of Opacus'
  ``AdaClipDPOptimizer``. As in every clipx policy, examples with a zero or
  non-finite norm are left out of the sum, so the padding rows of a fixed
  physical batch (weight 0, gradient 0) do not count; a real example with a
  zero gradient then counts neither as clipped nor unclipped.

  The threshold is kept within ``[tiny, max_threshold]`` of float32, moves by
  a factor of at most about ``exp(learning_rate * (1/2 + |noise| / batch_size))``
  per step, and has no warm-up. Only the global bound is supported
  (``clipped_grad(..., group=None)``): per-layer counts are several releases,
  each with its own privacy cost.

  Args:
    target_quantile: the fraction of examples to leave unclipped, in (0, 1).
    learning_rate: step size of the geometric update, > 0 (the paper uses 0.2).
    initial: the starting bound, positive and finite.
    count_noise: the std ``sigma_b`` of the noise on the unclipped count,
      finite and > 0; Andrew et al. suggest ``batch_size / 20``. Split the
      noise budget with :func:`gradient_noise_multiplier`.
    batch_size: the expected number of examples per batch (the public
      denominator), finite and > 0.
    key: ``jax.random.key(seed)``, a raw ``jax.random.PRNGKey(seed)``, or an int
      seed, for the count noise; use another key than :func:`add_noise`'s.
    max_threshold: an upper cap on the bound, > 0 (``inf``: no cap).

  Returns:
    A :class:`ThresholdPolicy` whose state is :class:`PrivateQuantileState`;
    ``update`` takes the batch's per-example norms, shape ``(B,)``, and
    returns the bound before this step's move (the one the batch is clipped to).

  References:
    Andrew et al., `Differentially Private Learning with Adaptive Clipping
    <https://arxiv.org/abs/1905.03871>`_, NeurIPS 2021 (Algorithm 1; the
    centred count as in TensorFlow Privacy's ``QuantileAdaptiveClipSumQuery``).

  Example:
    >>> import jax.numpy as jnp, optax, clipx
    >>> sigma, sigma_b, batch = 1.0, 3.2, 64
    >>> policy = clipx.private_quantile(0.5, count_noise=sigma_b, batch_size=batch, key=1)
    >>> grad_fn = clipx.clipped_grad(lambda w, x: jnp.dot(w, x), policy)
    >>> tx = optax.chain(
    ...   clipx.add_noise(clipx.gradient_noise_multiplier(sigma, sigma_b), 1.0, batch, key=0),
    ...   optax.sgd(0.1),
    ... )
    >>> params = jnp.zeros(2)
    >>> clip_state, opt_state = grad_fn.init(params), tx.init(params)
    >>> grads, stats, clip_state = grad_fn(params, jnp.ones((batch, 2)), clip_state)
    >>> updates, opt_state = tx.update(grads, opt_state, params, max_norm=stats.threshold)
  """
  owner = "private_quantile"
  validation.number(owner, "target_quantile", target_quantile, low=0.0, high=1.0, high_open=True)
  validation.positive(owner, "learning_rate", learning_rate, finite=True)
  validation.positive(owner, "initial", initial, finite=True)
  validation.positive(owner, "count_noise", count_noise, finite=True)
  validation.positive(owner, "batch_size", batch_size, finite=True)
  validation.positive(owner, "max_threshold", max_threshold)
  initial_key = _as_key(key, owner)
  impl = jax.random.key_impl(initial_key)

  def init(norm):
    if jnp.shape(norm) != ():
      raise ValueError(
        f"clipx.{owner}: one bound for the whole gradient only (clipped_grad with"
        f" group=None); got norms of shape {jnp.shape(norm)} per example."
      )
    dtype = jnp.float32
    start = jnp.minimum(jnp.asarray(initial, dtype), jnp.asarray(max_threshold, dtype))
    return PrivateQuantileState(
      threshold=start, key=jax.random.key_data(initial_key), noisy_count=jnp.zeros([], dtype)
    )

  def update(norm, state):
    current = state.threshold
    dtype = current.dtype
    norm = jnp.asarray(norm)
    if norm.ndim > 1:
      raise ValueError(
        f"clipx.{owner}: norm has shape {norm.shape}; expected the per-example norms of a"
        " batch, shape (B,) (one bound for the whole gradient)."
      )
    batch = jnp.atleast_1d(norm).astype(dtype)
    recorded = jnp.isfinite(batch) & (batch != 0)  # as in every policy: see clipx.thresholds
    centred = jnp.where(recorded, jnp.where(batch <= current, 0.5, -0.5), 0.0).astype(dtype)
    next_key, step_key = jax.random.split(jax.random.wrap_key_data(state.key, impl=impl))
    noise = jnp.asarray(count_noise, dtype) * jax.random.normal(step_key, (), dtype)
    size = jnp.asarray(batch_size, dtype)
    noisy_count = jnp.sum(centred) + noise + size / 2
    moved = quantile_step(
      current, noisy_count / size, target_quantile, learning_rate, max_threshold
    )
    return current, PrivateQuantileState(moved, jax.random.key_data(next_key), noisy_count)

  return ThresholdPolicy(init, update)
