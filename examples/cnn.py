"""The small Flax NNX CNN shared by the examples, benchmarks and tests.

Conv(64, 3x3, same) - ReLU - MaxPool 2 - Conv(128, 3x3, same) - ReLU - MaxPool 2 -
flatten - Dense(num_classes). (The often-copied PyTorch snippet of this net
forgets the flatten before the dense layer; this one does not.)

Stable API (other examples and tests import it):

- ``CNN(num_classes=10, *, input_shape=(8, 8, 1), rngs=nnx.Rngs(0))``: the NNX
  module; ``model(images)`` maps NHWC float images to logits. ``input_shape``
  is ``(height, width, channels)`` of one image: ``(8, 8, 1)`` for digits,
  ``(28, 28, 1)`` for MNIST, ``(32, 32, 3)`` for CIFAR-10. Height and width
  must be divisible by 4 (two 2x2 poolings).
- ``init(num_classes, input_shape, seed) -> (apply_fn, params)``: the same
  model as a pure function ``apply_fn(params, images) -> logits`` and a params
  pytree, for ``jax.jit``/``jax.grad``/``jax.vmap`` code (per-example
  gradients, vmapped sweeps, sharded steps) and plain ``optax`` optimizers.
- ``cross_entropy(logits, labels)``: mean softmax cross-entropy with integer
  labels; ``accuracy(logits, labels)``: fraction of correct predictions.

Example (from the repository root, or with it on ``sys.path``)::

  from examples import cnn
  apply_fn, params = cnn.init(10, (8, 8, 1), seed=0)
  logits = apply_fn(params, images)  # images: (batch, 8, 8, 1) float32
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx


class CNN(nnx.Module):
  """Two conv blocks and a dense classifier, for NHWC images."""

  def __init__(
    self,
    num_classes: int = 10,
    *,
    input_shape: tuple[int, int, int] = (8, 8, 1),
    rngs: nnx.Rngs,
  ):
    height, width, channels = input_shape
    if height % 4 or width % 4:
      raise ValueError(
        f"CNN: image height and width must be divisible by 4 (two 2x2 poolings),"
        f" got input_shape={input_shape!r}."
      )
    self.input_shape = tuple(input_shape)
    self.conv1 = nnx.Conv(channels, 64, kernel_size=(3, 3), padding="SAME", rngs=rngs)
    self.conv2 = nnx.Conv(64, 128, kernel_size=(3, 3), padding="SAME", rngs=rngs)
    self.dense = nnx.Linear((height // 4) * (width // 4) * 128, num_classes, rngs=rngs)

  def __call__(self, images: jax.Array) -> jax.Array:
    x = nnx.max_pool(nnx.relu(self.conv1(images)), window_shape=(2, 2), strides=(2, 2))
    x = nnx.max_pool(nnx.relu(self.conv2(x)), window_shape=(2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)  # the flatten the PyTorch snippet forgets
    return self.dense(x)


_INIT_CACHE: dict = {}


def _compiled_init(create_params, num_classes: int, input_shape: tuple) -> Callable:
  """One jitted initialiser per model shape (an eager init compiles every op on its own)."""
  key = (num_classes, input_shape)
  if key not in _INIT_CACHE:
    _INIT_CACHE[key] = jax.jit(create_params)
  return _INIT_CACHE[key]


def init(
  num_classes: int = 10, input_shape: tuple[int, int, int] = (8, 8, 1), seed: int = 0
) -> tuple[Callable[[optax.Params, jax.Array], jax.Array], optax.Params]:
  """The CNN as a pure ``apply_fn(params, images) -> logits`` and its params.

  Parameters are drawn with JAX's ``"rbg"`` generator (fast to compile), so
  they differ from ``CNN(..., rngs=nnx.Rngs(seed))`` but follow the same
  initialisers. The params are a nested dict ``{"conv1": {"kernel": ..., "bias": ...}, ...}``
  of ``jax.Array``; any Optax optimizer, ``jax.grad`` and ``jax.vmap`` work on
  it directly.
  """
  input_shape = tuple(int(d) for d in input_shape)

  def create(seed) -> CNN:
    # The "rbg" generator: XLA's RngBitGenerator compiles in a fraction of the
    # time of the default threefry (about 2 s against 11 s for these kernels
    # on a loaded 2-core CPU), and the seed is traced, so every seed shares
    # one compiled program.
    return CNN(
      num_classes, input_shape=input_shape, rngs=nnx.Rngs(jax.random.key(seed, impl="rbg"))
    )

  def create_params(seed) -> dict:
    # A plain nested dict, so key paths end in the parameter name
    # ("['conv1']['kernel']"), not in an nnx.Variable's ".value": per-module
    # grouping (clip_by_layer_norm(group="module")) then sees kernel and bias
    # as siblings.
    return nnx.to_pure_dict(nnx.state(create(seed), nnx.Param))

  graphdef, _ = nnx.split(nnx.eval_shape(lambda: create(0)), nnx.Param)
  params = _compiled_init(create_params, num_classes, input_shape)(np.uint32(seed))

  def apply_fn(params: optax.Params, images: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, params)(images)

  return apply_fn, params


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy against integer labels."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Fraction of rows whose arg-max logit is the label."""
  return jnp.mean(jnp.argmax(logits, axis=-1) == labels)
