"""Recurrent models and the adding problem, for ``examples/train_rnn.py``.

The setting where gradient clipping was born (Pascanu, Mikolov & Bengio 2013,
"On the difficulty of training recurrent neural networks",
https://arxiv.org/abs/1211.5063): a recurrent net on a synthetic long-range
task. Back through time the gradient is multiplied by one Jacobian per step,
so it grows (explodes) or shrinks (vanishes) geometrically with the distance.

Stable API (the training script, sweeps and tests import it):

- ``adding_problem(rng, batch_size, seq_len) -> (inputs, targets)``: the adding
  problem (Hochreiter & Schmidhuber 1997; section 5.1 of Pascanu et al.).
  ``inputs`` is ``(batch, seq_len, 2)`` float32: a value drawn from U(0, 1) and
  a marker that is 1 at exactly two steps, one in each half of the sequence;
  ``targets`` is ``(batch,)``: the sum of the two marked values. Predicting the
  constant 1 (the mean) scores ``BASELINE_MSE`` = 1/6, the variance of the sum.
- ``RNN(cell="rnn" | "lstm", hidden_size=..., rngs=...)``: the NNX module;
  ``model(inputs, perturbation=None)`` runs the cell over time with
  ``jax.lax.scan`` and reads the prediction from the last hidden state.
  ``perturbation`` (optional, ``(seq_len, *state_shape)`` per state leaf) is
  added to the state after each step: the gradient with respect to it is the
  gradient with respect to the hidden state ``h_t``.
- ``init(cell, hidden_size, seed) -> (apply_fn, params)``: the same model as a
  pure ``apply_fn(params, inputs, perturbation=None) -> predictions`` and a
  params dict, for ``jax.jit``/``jax.grad`` and plain Optax optimizers.
- ``hidden_grad_norms(apply_fn, params, inputs, targets) -> (seq_len,)``: for
  each step t, the mean over examples of ``||d loss_i / d h_t||`` (for the
  LSTM, the state is the pair (c, h)): how the gradient grows or vanishes back
  through time.
- ``mse(predictions, targets)``: the loss.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

CELLS = ("rnn", "lstm")

# Predicting the constant 1 = E[a + b] for a, b ~ U(0, 1): MSE = Var(a + b) = 2/12.
BASELINE_MSE = 1.0 / 6.0


def adding_problem(
  rng: np.random.Generator, batch_size: int, seq_len: int
) -> tuple[np.ndarray, np.ndarray]:
  """A batch of the adding problem: ``(inputs (batch, seq_len, 2), targets (batch,))``.

  One marker falls uniformly in the first half of the sequence, the other in
  the second half, so the first is at least ``seq_len // 2`` steps from the end
  and its value must be carried that far.
  """
  if seq_len < 2:
    raise ValueError(f"adding_problem: seq_len must be >= 2, got {seq_len}")
  values = rng.random((batch_size, seq_len), dtype=np.float32)
  half = seq_len // 2
  rows = np.arange(batch_size)
  first = rng.integers(0, half, batch_size)
  second = rng.integers(half, seq_len, batch_size)
  markers = np.zeros((batch_size, seq_len), np.float32)
  markers[rows, first] = 1.0
  markers[rows, second] = 1.0
  targets = values[rows, first] + values[rows, second]
  return np.stack([values, markers], axis=-1), targets


class TanhCell(nnx.Module):
  """The vanilla RNN of the paper: ``h_t = tanh(W_x x_t + W_h h_{t-1} + b)``."""

  def __init__(self, in_features: int, hidden_size: int, *, rngs: nnx.Rngs):
    self.hidden_size = hidden_size
    self.input = nnx.Linear(in_features, hidden_size, rngs=rngs)
    # Variance 1/hidden: the recurrent matrix has spectral radius about 1, the edge
    # between vanishing and exploding, where training pushes it either way.
    self.recurrent = nnx.Linear(hidden_size, hidden_size, use_bias=False, rngs=rngs)

  def initial_state(self, batch_size: int) -> jax.Array:
    return jnp.zeros((batch_size, self.hidden_size), jnp.float32)

  def __call__(self, state: jax.Array, x: jax.Array) -> jax.Array:
    return jnp.tanh(self.input(x) + self.recurrent(state))

  def output(self, state: jax.Array) -> jax.Array:
    return state


class LSTMCell(nnx.Module):
  """An LSTM (Hochreiter & Schmidhuber 1997, with forget gate); the state is ``(c, h)``."""

  def __init__(self, in_features: int, hidden_size: int, *, rngs: nnx.Rngs):
    self.hidden_size = hidden_size
    # Gates in the order input, forget, cell, output. A forget-gate bias of 1 keeps
    # the memory open at the start (Jozefowicz et al. 2015).
    bias = np.zeros(4 * hidden_size, np.float32)
    bias[hidden_size : 2 * hidden_size] = 1.0
    self.input = nnx.Linear(
      in_features, 4 * hidden_size, bias_init=lambda *_: jnp.asarray(bias), rngs=rngs
    )
    self.recurrent = nnx.Linear(hidden_size, 4 * hidden_size, use_bias=False, rngs=rngs)

  def initial_state(self, batch_size: int) -> tuple[jax.Array, jax.Array]:
    zeros = jnp.zeros((batch_size, self.hidden_size), jnp.float32)
    return zeros, zeros

  def __call__(self, state: tuple[jax.Array, jax.Array], x: jax.Array):
    c, h = state
    i, f, g, o = jnp.split(self.input(x) + self.recurrent(h), 4, axis=-1)
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    return c, jax.nn.sigmoid(o) * jnp.tanh(c)

  def output(self, state: tuple[jax.Array, jax.Array]) -> jax.Array:
    return state[1]


class RNN(nnx.Module):
  """A recurrent cell run over the sequence, and a linear read-out of the last state."""

  def __init__(
    self, cell: str = "rnn", *, hidden_size: int = 64, in_features: int = 2, rngs: nnx.Rngs
  ):
    if cell not in CELLS:
      raise ValueError(f"RNN: cell must be one of {CELLS}, got {cell!r}")
    cell_type = TanhCell if cell == "rnn" else LSTMCell
    self.cell = cell_type(in_features, hidden_size, rngs=rngs)
    self.readout = nnx.Linear(hidden_size, 1, rngs=rngs)

  def __call__(self, inputs: jax.Array, perturbation=None) -> jax.Array:
    """``inputs (batch, seq_len, features) -> predictions (batch,)``."""
    steps = jnp.swapaxes(inputs, 0, 1)  # time first, for the scan

    def step(state, scanned):
      x, delta = scanned
      state = self.cell(state, x)
      if delta is not None:
        state = jax.tree.map(jnp.add, state, delta)
      return state, None

    state = self.cell.initial_state(inputs.shape[0])
    state, _ = jax.lax.scan(step, state, (steps, perturbation))
    return self.readout(self.cell.output(state))[:, 0]


_INIT_CACHE: dict = {}


def init(
  cell: str = "rnn", hidden_size: int = 64, seed: int = 0
) -> tuple[Callable[..., jax.Array], optax.Params]:
  """The model as a pure ``apply_fn(params, inputs, perturbation=None)`` and its params.

  Parameters are drawn with JAX's ``"rbg"`` generator (as ``cnn.init`` does: one
  compiled initialiser for every seed) and returned as a plain nested dict.
  """

  def create(seed) -> RNN:
    return RNN(cell, hidden_size=hidden_size, rngs=nnx.Rngs(jax.random.key(seed, impl="rbg")))

  key = (cell, hidden_size)
  if key not in _INIT_CACHE:
    _INIT_CACHE[key] = jax.jit(lambda seed: nnx.to_pure_dict(nnx.state(create(seed), nnx.Param)))
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: create(0)), nnx.Param)
  params = _INIT_CACHE[key](np.uint32(seed))

  def apply_fn(params: optax.Params, inputs: jax.Array, perturbation=None) -> jax.Array:
    return nnx.merge(graphdef, params)(inputs, perturbation)

  return apply_fn, params


def mse(predictions: jax.Array, targets: jax.Array) -> jax.Array:
  """Mean squared error."""
  return jnp.mean((predictions - targets) ** 2)


def hidden_grad_norms(
  apply_fn: Callable, params: optax.Params, inputs: jax.Array, targets: jax.Array
) -> jax.Array:
  """``(seq_len,)``: mean over examples of ``||d loss_i / d h_t||`` at each step t.

  The gradient with respect to an additive perturbation of ``h_t``, taken at
  zero, is the gradient with respect to ``h_t`` itself (through every later
  step). The loss is summed over examples, so each example's rows are the
  gradient of its own squared error.
  """
  batch_size, seq_len = inputs.shape[:2]
  hidden_size = params["readout"]["kernel"].shape[0]
  zeros = jnp.zeros((seq_len, batch_size, hidden_size), jnp.float32)
  if cell_of(params) == "lstm":
    zeros = (zeros, zeros)

  def total_loss(perturbation):
    return jnp.sum((apply_fn(params, inputs, perturbation) - targets) ** 2)

  grads = jax.grad(total_loss)(zeros)
  squares = sum(jnp.sum(g**2, axis=-1) for g in jax.tree.leaves(grads))  # (seq_len, batch)
  return jnp.mean(jnp.sqrt(squares), axis=1)


def cell_of(params: optax.Params) -> str:
  """``"lstm"`` or ``"rnn"``, read from the recurrent kernel's width (4 gates or 1)."""
  hidden_size = params["readout"]["kernel"].shape[0]
  return "lstm" if params["cell"]["recurrent"]["kernel"].shape[1] == 4 * hidden_size else "rnn"
