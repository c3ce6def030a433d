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


def init(
  num_classes: int = 10, input_shape: tuple[int, int, int] = (8, 8, 1), seed: int = 0
) -> tuple[Callable[[optax.Params, jax.Array], jax.Array], optax.Params]:
  """The CNN as a pure ``apply_fn(params, images) -> logits`` and its params.

  The params are a nested dict ``{"conv1": {"kernel": ..., "bias": ...}, ...}``
  of ``jax.Array``; any Optax optimizer, ``jax.grad`` and ``jax.vmap`` work on
  it directly.
  """
  model = CNN(num_classes, input_shape=input_shape, rngs=nnx.Rngs(seed))
  graphdef, state = nnx.split(model, nnx.Param)
  # A plain nested dict, so key paths end in the parameter name
  # ("['conv1']['kernel']"), not in an nnx.Variable's ".value": per-module
  # grouping (clip_by_layer_norm(group="module")) then sees kernel and bias
  # as siblings.
  params = nnx.to_pure_dict(state)

  def apply_fn(params: optax.Params, images: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, params)(images)

  return apply_fn, params


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy against integer labels."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Fraction of rows whose arg-max logit is the label."""
  return jnp.mean(jnp.argmax(logits, axis=-1) == labels)
