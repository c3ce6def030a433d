"""A small decoder-only transformer in Flax NNX, blocks stacked by ``nnx.vmap`` + ``nnx.scan``.

Pre-LayerNorm blocks (causal multi-head attention, then a 4x GELU MLP), a
learned position embedding, byte vocabulary (256), no QK-LayerNorm and no
z-loss: the two fixes Wortsman et al. 2023 found for attention-logit growth
are left out, so that clipping is what is tested.

The blocks' parameters are made once with ``nnx.vmap`` and run with
``nnx.scan``, so every block parameter has a layer axis, as in MaxText and
levanter. ``layer_axis=0`` puts it first (``nnx.scan``'s usual layout);
``layer_axis=1`` second, as MaxText's default ``param_scan_axis=1`` (a kernel
``[embed, layers, mlp]``). Every parameter carries sharding metadata, and the
block parameters the partition name ``"layers"`` at their layer axis
(``transform_metadata={nnx.PARTITION_NAME: "layers"}``), so
``clipx.layer_axes_from_metadata`` finds the layer axes without being told.

The forward pass also returns, per layer and head, the largest pre-softmax
attention logit in the batch (masked positions excluded): Wortsman et al.'s
small-scale proxy of large-model instability, and what QK-Clip bounds.

Stable API: ``LMConfig``, ``define(config) -> Definition`` (pure functions),
``init(config, seed) -> Model`` (with params), ``apply_fn(params, tokens) ->
(logits, attention_logit_max)``, ``next_byte_loss``, ``bits``, ``generate``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

LAYERS_NAME = "layers"  # the partition name of the layer axis (MaxText and levanter use it)


class LMConfig(NamedTuple):
  """The model's shape. ``dtype`` is the activations' dtype; parameters stay float32."""

  layers: int = 2
  width: int = 128
  heads: int = 4
  seq_len: int = 128
  vocab_size: int = 256
  layer_axis: int = 0
  dtype: Any = jnp.float32


def _metadata(*names: str | None) -> dict[str, Any]:
  """Sharding metadata (no mesh needed: eager sharding off) for a parameter's axes."""
  return {"out_sharding": names, "eager_sharding": False}


class Attention(nnx.Module):
  """Causal multi-head self-attention with separate query, key and value projections."""

  def __init__(self, config: LMConfig, *, rngs: nnx.Rngs):
    width, self.heads = config.width, config.heads
    if width % self.heads:
      raise ValueError(f"lm: width {width} is not divisible by heads {self.heads}")
    dense = lambda: nnx.Linear(  # noqa: E731
      width,
      width,
      use_bias=False,
      dtype=config.dtype,
      kernel_metadata=_metadata(None, None),
      rngs=rngs,
    )
    self.query, self.key, self.value, self.out = dense(), dense(), dense(), dense()

  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    batch, length, width = x.shape
    head_dim = width // self.heads
    split = lambda y: y.reshape(batch, length, self.heads, head_dim)  # noqa: E731
    q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / math.sqrt(head_dim)
    causal = jnp.tril(jnp.ones((length, length), bool))
    logit_max = jnp.max(jnp.where(causal, logits, -jnp.inf), axis=(0, 2, 3))  # per head
    logits = jnp.where(causal, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(x.dtype)
    mixed = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, length, width)
    return self.out(mixed), logit_max


class Block(nnx.Module):
  """Pre-LayerNorm transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

  def __init__(self, config: LMConfig, *, rngs: nnx.Rngs):
    width = config.width
    norm = lambda: nnx.LayerNorm(  # noqa: E731
      width,
      dtype=config.dtype,
      scale_metadata=_metadata(None),
      bias_metadata=_metadata(None),
      rngs=rngs,
    )
    dense = lambda a, b: nnx.Linear(  # noqa: E731
      a,
      b,
      dtype=config.dtype,
      kernel_metadata=_metadata(None, None),
      bias_metadata=_metadata(None),
      rngs=rngs,
    )
    self.attn_norm, self.attn = norm(), Attention(config, rngs=rngs)
    self.mlp_norm, self.mlp_in, self.mlp_out = (
      norm(),
      dense(width, 4 * width),
      dense(4 * width, width),
    )

  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    attended, logit_max = self.attn(self.attn_norm(x))
    x = x + attended
    x = x + self.mlp_out(jax.nn.gelu(self.mlp_in(self.mlp_norm(x))))
    return x, logit_max


class Transformer(nnx.Module):
  """Byte embedding + positions, ``config.layers`` scanned blocks, final LayerNorm, head."""

  def __init__(self, config: LMConfig, *, rngs: nnx.Rngs):
    if config.layer_axis not in (0, 1):
      raise ValueError(f"lm: layer_axis must be 0 or 1, got {config.layer_axis}")
    self.config = config
    width = config.width
    self.embed = nnx.Embed(
      config.vocab_size,
      width,
      dtype=config.dtype,
      embedding_metadata=_metadata(None, None),
      rngs=rngs,
    )
    self.position = nnx.Param(
      0.02 * jax.random.normal(rngs.params(), (config.seq_len, width)), **_metadata(None, None)
    )

    @nnx.split_rngs(splits=config.layers)
    @nnx.vmap(
      in_axes=0, out_axes=config.layer_axis, transform_metadata={nnx.PARTITION_NAME: LAYERS_NAME}
    )
    def make_blocks(rngs: nnx.Rngs) -> Block:
      return Block(config, rngs=rngs)

    self.blocks = make_blocks(rngs)
    self.final_norm = nnx.LayerNorm(
      width,
      dtype=config.dtype,
      scale_metadata=_metadata(None),
      bias_metadata=_metadata(None),
      rngs=rngs,
    )
    self.head = nnx.Linear(
      width,
      config.vocab_size,
      dtype=config.dtype,
      kernel_metadata=_metadata(None, None),
      bias_metadata=_metadata(None),
      rngs=rngs,
    )

  def __call__(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(batch, length)`` bytes -> float32 logits ``(batch, length, 256)``, ``(layers, heads)``."""
    length = tokens.shape[1]
    x = self.embed(tokens) + self.position[:length].astype(self.config.dtype)

    @nnx.scan(
      in_axes=(nnx.Carry, self.config.layer_axis),
      out_axes=(nnx.Carry, 0),
      transform_metadata={nnx.PARTITION_NAME: LAYERS_NAME},
    )
    def run_blocks(x: jax.Array, block: Block) -> tuple[jax.Array, jax.Array]:
      return block(x)

    x, logit_max = run_blocks(x, self.blocks)
    return self.head(self.final_norm(x)).astype(jnp.float32), logit_max


class Definition(NamedTuple):
  """The transformer as pure functions, for jitted, vmapped and scanned training code.

  Attributes:
    apply_fn: ``(params, tokens) -> (logits, attention_logit_max)``.
    create_params: ``seed -> params`` (traceable: ``jax.vmap`` it over seeds).
    variables: abstract ``nnx.Param`` Variables with their metadata
      (for ``clipx.layer_axes_from_metadata``).
  """

  apply_fn: Callable[[optax.Params, jax.Array], tuple[jax.Array, jax.Array]]
  create_params: Callable[[Any], dict]
  variables: Any


def define(config: LMConfig) -> Definition:
  """The model of ``config`` as pure functions; parameters drawn with JAX's ``rbg`` keys."""

  def create(seed) -> Transformer:
    # The "rbg" generator compiles in a fraction of threefry's time (see cnn.init).
    return Transformer(config, rngs=nnx.Rngs(jax.random.key(seed, impl="rbg")))

  def create_params(seed) -> dict:
    # A plain nested dict: paths end in the parameter name, not in an nnx.Variable's .value.
    return nnx.to_pure_dict(nnx.state(create(seed), nnx.Param))

  graphdef, variables = nnx.split(nnx.eval_shape(lambda: create(0)), nnx.Param)

  def apply_fn(params: optax.Params, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    return nnx.merge(graphdef, params)(tokens)

  return Definition(apply_fn, create_params, variables)


class Model(NamedTuple):
  """A defined model and its parameters for one seed."""

  apply_fn: Callable[[optax.Params, jax.Array], tuple[jax.Array, jax.Array]]
  params: dict
  variables: Any
  config: LMConfig


_DEFINITIONS: dict = {}


def init(config: LMConfig, seed: int = 0) -> Model:
  """The model of ``config`` with parameters drawn from ``seed`` (one compiled initialiser)."""
  if config not in _DEFINITIONS:
    definition = define(config)
    _DEFINITIONS[config] = (definition, jax.jit(definition.create_params))
  definition, create_params = _DEFINITIONS[config]
  params = create_params(np.uint32(seed))
  return Model(definition.apply_fn, params, definition.variables, config)


def next_byte_loss(apply_fn: Callable, params: optax.Params, windows: jax.Array):
  """Mean next-byte cross-entropy (nats) of ``(batch, length + 1)`` windows; the logit maxima."""
  logits, logit_max = apply_fn(params, windows[:, :-1])
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, windows[:, 1:])
  return jnp.mean(losses), logit_max


def bits(nats: Any) -> Any:
  """Nats per byte as bits per byte."""
  return nats / math.log(2)


def generate(
  apply_fn: Callable,
  params: optax.Params,
  prompt: bytes,
  count: int,
  seq_len: int,
  *,
  temperature: float = 0.7,
  seed: int = 0,
) -> bytes:
  """``count`` bytes sampled after ``prompt``, each from the last ``seq_len`` bytes."""
  if not prompt:
    raise ValueError("lm.generate: the prompt must hold at least one byte")
  buffer = np.zeros(max(len(prompt) + count, seq_len), np.int32)
  buffer[: len(prompt)] = np.frombuffer(prompt, np.uint8)

  @jax.jit
  def step(buffer, position, key):
    start = jnp.maximum(position - seq_len, 0)
    window = jax.lax.dynamic_slice(buffer, (start,), (seq_len,))[None]
    logits, _ = apply_fn(params, window)
    last = jnp.minimum(position, seq_len) - 1
    return jax.random.categorical(key, logits[0, last] / temperature)

  buffer = jnp.asarray(buffer)
  keys = jax.random.split(jax.random.key(seed), count)
  for i in range(count):
    position = len(prompt) + i
    buffer = buffer.at[position].set(step(buffer, position, keys[i]))
  return bytes(np.asarray(buffer[: len(prompt) + count], np.uint8).tobytes())
