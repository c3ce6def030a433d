"""The RNN example runs: a few steps on tiny settings, and its d loss / d h_t is right.

The hidden-state gradient norms are checked against independent computations:
backpropagation through time written out in numpy for the tanh RNN, and a
product of per-step Jacobians (``jax.jacobian`` of one cell step) for the LSTM.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from examples import rnn, train_rnn  # noqa: E402

METRICS_KEYS = {
  "test_loss",
  "baseline_loss",
  "solved",
  "success_criterion",
  "diverged",
  "grad_norm",
  "threshold",
  "clip_rate",
  "steps",
  "evaluations",
  "wall_seconds",
}

# Short sequences and a small net: a few seconds per run. At lr 0.3 the unclipped
# run blows up within 30 steps; clipping at 0.1 trains (measured: test MSE 0.015 to 0.05
# over seeds, the trivial predictor's 0.16; at 1.0 the clipped steps are too long here).
TINY = ["--seq-len", "8", "--hidden-size", "16", "--steps", "300", "--lr", "0.3", "--quiet"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  out = tmp_path_factory.mktemp("rnn")
  clipped = train_rnn.main([*TINY, "--clip", "global", "--max-norm", "0.1", "--out", str(out)])
  unclipped = train_rnn.main([*TINY, "--clip", "none"])
  return clipped, unclipped, out


@pytest.mark.slow
def test_clipping_cuts_the_loss(runs):
  clipped, unclipped, _ = runs
  losses = np.array(clipped["step_loss"])
  assert not clipped["diverged"] and clipped["steps"] == 300
  # The untrained net is worse than predicting the mean; clipped training goes well below it.
  assert np.mean(losses[-30:]) < 0.5 * clipped["baseline_loss"] < np.mean(losses[:10])
  assert clipped["test_loss"] < 0.5 * clipped["baseline_loss"]
  # The same init and batches without clipping: thrown off, no better than the trivial predictor.
  assert unclipped["diverged"] or not unclipped["test_loss"] < clipped["baseline_loss"]
  assert unclipped["grad_norm"][0] == pytest.approx(clipped["grad_norm"][0], rel=1e-6)


@pytest.mark.slow
def test_metrics_files(runs):
  clipped, _, out = runs
  metrics = json.loads((out / "metrics.json").read_text())
  assert METRICS_KEYS <= set(metrics)
  assert isinstance(metrics["solved"], bool) and isinstance(metrics["diverged"], bool)
  assert metrics["solved"] == (metrics["test_loss"] < 0.1 * metrics["baseline_loss"])
  assert metrics["baseline_loss"] == pytest.approx(1 / 6, rel=0.1)  # Var(a + b), a, b ~ U(0, 1)
  steps = metrics["steps"]
  assert len(metrics["grad_norm"]) == len(metrics["threshold"]) == steps
  assert metrics["threshold"] == pytest.approx([0.1] * steps)
  norms = np.array(metrics["grad_norm"])
  assert metrics["clip_rate"] == pytest.approx(np.mean(norms > 0.1))
  evaluations = metrics["evaluations"]
  assert evaluations["step"][0] == 0 and evaluations["step"][-1] == steps
  assert evaluations["test_loss"][-1] == metrics["test_loss"]
  assert all(len(p) == 8 for p in evaluations["hidden_grad_norms"])
  with open(out / "metrics.csv") as f:
    rows = list(csv.DictReader(f))
  assert [int(r["step"]) for r in rows] == list(range(1, steps + 1))
  np.testing.assert_allclose([float(r["clip/global/norm"]) for r in rows], norms, rtol=1e-6)
  assert (out / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unclipped_threshold_is_null(runs):
  _, unclipped, _ = runs
  assert unclipped["threshold"] == [None] * unclipped["steps"]
  assert unclipped["clip_rate"] == 0.0


def test_adding_problem():
  inputs, targets = rnn.adding_problem(np.random.default_rng(0), 500, 10)
  assert inputs.shape == (500, 10, 2) and targets.shape == (500,)
  markers = inputs[..., 1]
  assert (markers.sum(axis=1) == 2).all()
  assert (markers[:, :5].sum(axis=1) == 1).all()  # one marker in each half
  np.testing.assert_allclose((inputs[..., 0] * markers).sum(axis=1), targets, rtol=1e-6)


def tiny_batch(seq_len=6, batch_size=3):
  inputs, targets = rnn.adding_problem(np.random.default_rng(1), batch_size, seq_len)
  return jnp.asarray(inputs), jnp.asarray(targets)


def numpy_bptt_norms(params, inputs, targets) -> np.ndarray:
  """||d loss_i / d h_t|| for the tanh RNN, backpropagation through time by hand."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  w_x, b, w_h = p["cell"]["input"]["kernel"], p["cell"]["input"]["bias"], p["cell"]["recurrent"]
  w_h = w_h["kernel"]
  x = np.asarray(inputs, np.float64)
  hidden = [np.zeros((x.shape[0], w_h.shape[0]))]
  for t in range(x.shape[1]):
    hidden.append(np.tanh(x[:, t] @ w_x + b + hidden[-1] @ w_h))
  prediction = hidden[-1] @ p["readout"]["kernel"][:, 0] + p["readout"]["bias"][0]
  grad = 2 * (prediction - np.asarray(targets))[:, None] * p["readout"]["kernel"][:, 0]
  norms = []
  for t in range(x.shape[1], 0, -1):  # grad is d loss / d h_t
    norms.append(np.linalg.norm(grad, axis=1).mean())
    grad = (grad * (1 - hidden[t] ** 2)) @ w_h.T
  return np.array(norms[::-1])


def test_hidden_grad_norms_match_numpy_bptt():
  apply_fn, params = rnn.init("rnn", hidden_size=5, seed=3)
  inputs, targets = tiny_batch()
  norms = rnn.hidden_grad_norms(apply_fn, params, inputs, targets)
  expected = numpy_bptt_norms(params, inputs, targets)
  np.testing.assert_allclose(norms, expected, rtol=1e-4)
  # And the perturbation leaves the forward pass alone.
  zeros = jnp.zeros((6, 3, 5))
  np.testing.assert_array_equal(apply_fn(params, inputs, zeros), apply_fn(params, inputs))


def test_hidden_grad_norms_match_jacobian_product_lstm():
  hidden_size, seq_len = 4, 6
  apply_fn, params = rnn.init("lstm", hidden_size=hidden_size, seed=5)
  inputs, targets = tiny_batch(seq_len)
  graphdef, state = nnx.split(rnn.RNN("lstm", hidden_size=hidden_size, rngs=nnx.Rngs(0)))
  nnx.replace_by_pure_dict(state, params)
  model = nnx.merge(graphdef, state)

  @jax.jit
  def step(state_vector, x):  # one cell step on the flat state (c, h) of one example
    c, h = jnp.split(state_vector[None], 2, axis=-1)
    return jnp.concatenate(model.cell((c, h), x[None]), axis=-1)[0]

  def readout(state_vector):
    return model.readout(state_vector[None, hidden_size:])[0, 0]

  step_jacobian = jax.jit(jax.jacobian(step))
  expected = np.zeros(seq_len)
  for i in range(inputs.shape[0]):
    states = [jnp.zeros(2 * hidden_size)]
    for t in range(seq_len):
      states.append(step(states[-1], inputs[i, t]))
    grad = 2 * (readout(states[-1]) - targets[i]) * jax.grad(readout)(states[-1])
    for t in range(seq_len, 0, -1):  # grad is d loss_i / d (c_t, h_t)
      expected[t - 1] += float(jnp.linalg.norm(grad)) / inputs.shape[0]
      grad = grad @ step_jacobian(states[t - 1], inputs[i, t - 1])
  norms = rnn.hidden_grad_norms(apply_fn, params, inputs, targets)
  np.testing.assert_allclose(norms, expected, rtol=1e-4)


@pytest.mark.slow
def test_run_seeds_rows():
  runs = train_rnn.run_seeds([3], ("none", "global"), seq_len=4, hidden_size=4, steps=5)
  assert [(r["clip"], r["seed"]) for r in runs["rows"]] == [("none", 3), ("global", 3)]
  assert set(runs["runs"]) == {("none", 3), ("global", 3)}
  assert all(r["steps"] == 5 and isinstance(r["solved"], bool) for r in runs["rows"])
  with pytest.raises(TypeError, match="unknown setting 'sequence_length'"):
    train_rnn.run_seeds([0], ("none",), sequence_length=4)


def test_flag_errors(capsys):
  with pytest.raises(SystemExit):
    train_rnn.parse_args(["--seq-len", "1"])
  with pytest.raises(SystemExit):
    train_rnn.parse_args(["--clip", "none", "--max-norm", "1.0"])
  assert "--max-norm has no meaning with --clip none" in capsys.readouterr().err
  assert train_rnn.parse_args([]).max_norm == 1.0
