"""The noise of DP-SGD, as an Optax transformation.

Per-example clipping (:func:`clipx.clipped_grad`) bounds what one example can
change in the sum of gradients; :func:`add_noise` then adds Gaussian noise
scaled to that bound, which is what makes a step differentially private. The
privacy budget (epsilon at a given delta) of a run follows from the noise
multiplier, the sampling rate and the number of steps; compute it with an
accountant such as ``dp-accounting`` (the ``dp`` extra; see
``examples/dp_train_cnn.py``).

The module is named for what it is for (privacy), not for its one
transform, so accounting helpers have a home if they are added.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from clipx import validation


class AddNoiseState(NamedTuple):
  """State of :func:`add_noise`.

  Attributes:
    key: the data (``jax.random.key_data``, uint32) of the PRNG key the next
      step's noise is drawn from: plain integers, so any checkpointer saves it.
    count: steps taken so far (int32), for the privacy accountant.
  """

  key: jax.Array
  count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as Optax states do


def _as_key(key: Any) -> jax.Array:
  if isinstance(key, (bool, np.bool_)):
    raise TypeError(f"clipx.add_noise: key must be a PRNG key or an int seed, got {key!r}.")
  if isinstance(key, (int, np.integer)):
    return jax.random.key(int(key))
  key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    if key.shape != ():
      raise ValueError(f"clipx.add_noise: key must be a single PRNG key, got shape {key.shape}.")
    return key
  if key.dtype == jnp.uint32 and key.shape == (2,):  # a raw jax.random.PRNGKey
    return jax.random.wrap_key_data(key)
  raise TypeError(
    "clipx.add_noise: key must be jax.random.key(seed), jax.random.PRNGKey(seed) or an"
    f" int seed, got an array of dtype {key.dtype} and shape {key.shape}."
  )


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
    leaves, treedef = jax.tree_util.tree_flatten(updates)
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
