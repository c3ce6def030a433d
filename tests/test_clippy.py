"""Clippy (clipx.clippy) against the authors' ClippyAdagrad, run as is under Keras 3.

The parity test runs keras-rs' ``ClippyAdagrad`` (vendored unchanged in
``tests/references/clippy_adagrad.py``: it never reached a keras-rs release)
on the JAX backend, and ``optax.chain(optax.adagrad(...), clipx.clippy(...))``,
on the same spiky gradients; it skips where Keras is not installed (CI). The
numpy tests check the formula independently and run everywhere.
"""

import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from orbax_roundtrip import assert_resumes_identically

import clipx
from clipx.clippy import ClippyState, clippy

STEPS = 300
LR, RELATIVE, ABSOLUTE, INITIAL, EPS = 0.1, 0.1, 1e-7, 0.1, 1e-7
SHAPES = {"a_kernel": ((16, 8), 1.0), "b_bias": ((8,), 0.01), "c_embed": ((32, 4), 5.0)}


def _stream(steps: int = STEPS, seed: int = 0) -> list[dict[str, np.ndarray]]:
  """Gaussian gradients of drifting scale; every 23 steps a few entries x100."""
  rng = np.random.default_rng(seed)
  out = []
  for t in range(steps):
    grads = {}
    for name, (shape, scale) in SHAPES.items():
      g = rng.standard_normal(shape) * scale * (1 + 0.5 * np.sin(t / 20))
      if t % 23 == 22:
        g.reshape(-1)[rng.choice(g.size, size=2, replace=False)] *= 100
      grads[name] = g.astype(np.float32)
    out.append(grads)
  return out


def _initial_params(seed: int = 1) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  params = {
    name: rng.standard_normal(shape).astype(np.float32) for name, (shape, _) in SHAPES.items()
  }
  params["b_bias"][:3] = 0.0  # zero weights: the absolute term alone bounds them
  return params


def _numpy_clippy(delta: np.ndarray, weight: np.ndarray, relative: float, absolute: float):
  """The paper's factor in float64: min(1, min_i (relative |w_i| + absolute) / |delta_i|)."""
  d, w = np.abs(delta.astype(np.float64)), np.abs(weight.astype(np.float64))
  per_entry = np.where(d == 0, np.inf, (relative * w + absolute) / np.where(d == 0, 1, d))
  return min(1.0, float(per_entry.min(initial=np.inf)))


# --------------------------------------------------------------- parity with the authors' code


@pytest.fixture(scope="module")
def parity_runs():
  os.environ.setdefault("KERAS_BACKEND", "jax")
  keras = pytest.importorskip("keras", reason="the parity reference is Keras code; not in CI")
  if keras.backend.backend() != "jax":
    pytest.skip("the vendored ClippyAdagrad is run on Keras' JAX backend")
  from references.clippy_adagrad import ClippyAdagrad

  stream, start = _stream(), _initial_params()
  names = sorted(SHAPES)
  variables = [keras.Variable(start[n].copy()) for n in names]
  reference = ClippyAdagrad(
    learning_rate=LR,
    initial_accumulator_value=INITIAL,
    variable_relative_threshold=RELATIVE,
    absolute_threshold=ABSOLUTE,
    epsilon=EPS,
    export_clipping_factors=True,
    use_standard_accumulator_update=True,  # optax.adagrad's accumulator (see clipx.clippy)
  )
  ref_steps = []
  for grads in stream:
    reference.apply_gradients(zip([grads[n] for n in names], variables))
    ref_steps.append(
      {
        "factors": [float(np.asarray(f)) for f in reference.clipping_factors],
        "params": {n: np.asarray(v).copy() for n, v in zip(names, variables)},
      }
    )
  tx = optax.chain(
    optax.adagrad(LR, initial_accumulator_value=INITIAL, eps=EPS), clippy(RELATIVE, ABSOLUTE)
  )
  chex.clear_trace_counter()
  update = jax.jit(chex.assert_max_traces(tx.update, n=1))
  params = jax.tree.map(jnp.asarray, start)
  state = tx.init(params)
  ours = []
  for grads in stream:
    previous = params
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
    ours.append({"state": state[1], "updates": updates, "previous": previous, "params": params})
  return names, ref_steps, ours


def test_factors_and_parameters_match_clippy_adagrad_step_by_step(parity_runs):
  """Per step and tensor: the factor, the clipped update, and the weights after."""
  names, ref_steps, ours = parity_runs
  clipped_steps = 0
  for t, (ref, mine) in enumerate(zip(ref_steps, ours)):
    scale = np.asarray(mine["state"].stats.scale)
    for i, name in enumerate(names):
      where = f"step {t}, {name}"
      np.testing.assert_allclose(scale[i], ref["factors"][i], rtol=2e-6, err_msg=where)
      # Parameters: the reference's own trajectory, to float32 rounding accumulated over steps.
      np.testing.assert_allclose(
        np.asarray(mine["params"][name]), ref["params"][name], rtol=1e-5, atol=1e-6, err_msg=where
      )
    clipped_steps += int(np.any(scale < 1))
  # Clippy acts on this stream: on spikes and on the zero-initialised bias entries.
  assert clipped_steps >= STEPS // 23, clipped_steps


def test_clipped_update_is_the_formula_on_the_reference_inputs(parity_runs):
  """The clipped update is the optimizer's update times the numpy factor of the paper."""
  _, _, ours = parity_runs
  for t in (0, 22, 45, 299):
    mine = ours[t]
    for i, name in enumerate(sorted(SHAPES)):
      delta = np.asarray(mine["updates"][name]) / float(mine["state"].stats.scale[i])
      factor = _numpy_clippy(delta, np.asarray(mine["previous"][name]), RELATIVE, ABSOLUTE)
      np.testing.assert_allclose(float(mine["state"].stats.scale[i]), factor, rtol=1e-6)


# ----------------------------------------------------------- the formula, against numpy (no Keras)


def test_factor_per_tensor_matches_numpy():
  rng = np.random.default_rng(3)
  params = {"a": rng.standard_normal((5, 4)).astype(np.float32), "b": np.zeros(3, np.float32)}
  delta = {
    "a": rng.standard_normal((5, 4)).astype(np.float32),
    "b": np.array([1e-8, 0.0, -3e-7], np.float32),
  }
  tx = clippy(0.05, 1e-7)
  out, state = jax.jit(tx.update)(delta, tx.init(params), params)
  for i, name in enumerate(["a", "b"]):
    factor = _numpy_clippy(delta[name], params[name], 0.05, 1e-7)
    np.testing.assert_allclose(float(state.stats.scale[i]), factor, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(out[name]), delta[name] * np.float32(factor), rtol=1e-6)
    bound = 0.05 * np.abs(params[name]) + 1e-7
    assert np.all(np.abs(np.asarray(out[name])) <= bound * (1 + 1e-6))
  report = clipx.stats(state).as_dict()
  assert report["clip/clippy/threshold/a"] == 1.0
  assert report["clip/clippy/norm/b"] == pytest.approx(3.0, rel=1e-6)  # 3e-7 over a bound of 1e-7


def test_an_update_within_its_bound_passes_bit_for_bit():
  params = {"w": jnp.array([1.0, -2.0, 0.5])}
  delta = {"w": jnp.array([0.01, -0.03, 0.001])}
  tx = clippy(0.1, 1e-7)
  out, state = tx.update(delta, tx.init(params), params)
  np.testing.assert_array_equal(np.asarray(out["w"]), np.asarray(delta["w"]))
  assert not bool(state.stats.clipped[0])


def test_huge_finite_update_is_scaled_not_zeroed():
  params = {"w": jnp.array([0.0, 1.0])}
  delta = {"w": jnp.array([3e38, 1e30], jnp.float32)}  # |delta| / b = 3e45: beyond float32
  tx = clippy(0.1, 1e-7)
  out, state = jax.jit(tx.update)(delta, tx.init(params), params)
  w = np.asarray(out["w"], np.float64)
  np.testing.assert_allclose(w[0], 1e-7, rtol=1e-5)  # on its bound
  # The factor, 3e-46, is below float32's range: applied as two factors, not flushed to 0.
  np.testing.assert_allclose(w[1], 1e30 * 1e-7 / 3e38, rtol=1e-5)


def test_nonfinite_update_passes_through_unchanged():
  params = {"w": jnp.array([1.0, 1.0]), "v": jnp.array([1.0])}
  delta = {"w": jnp.array([jnp.inf, 0.5]), "v": jnp.array([10.0])}
  tx = clippy(0.1, 1e-7)
  out, state = tx.update(delta, tx.init(params), params)
  np.testing.assert_array_equal(np.asarray(out["w"]), [np.inf, 0.5])
  np.testing.assert_allclose(np.asarray(out["v"]), [0.1], rtol=1e-6)  # the other tensor is clipped


def test_stacked_layers_get_their_own_factor():
  rng = np.random.default_rng(4)
  kernel = rng.standard_normal((3, 4, 2)).astype(np.float32)
  delta = 0.01 * rng.standard_normal((3, 4, 2)).astype(np.float32)
  delta[1, 0, 0] = 5.0  # one layer far over its bound
  tx = clippy(0.1, 1e-7, stacked=1)
  out, state = tx.update({"k": delta}, tx.init({"k": kernel}), {"k": kernel})
  for layer in range(3):
    factor = _numpy_clippy(delta[layer], kernel[layer], 0.1, 1e-7)
    np.testing.assert_allclose(float(state.stats.scale[layer]), factor, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(out["k"][layer]), delta[layer] * factor, rtol=1e-6)
  assert "clip/clippy/scale/k[1]" in clipx.stats(state).as_dict()


def test_axis_name_takes_the_factor_over_shards():
  rng = np.random.default_rng(5)
  params = rng.standard_normal((4, 6)).astype(np.float32)
  delta = 0.2 * rng.standard_normal((4, 6)).astype(np.float32)
  whole = clippy(0.1, 1e-3)
  expected, _ = whole.update({"w": delta}, whole.init({"w": params}), {"w": params})
  tx = clippy(0.1, 1e-3, axis_name="shards")
  state = jax.vmap(tx.init, in_axes=None, axis_size=4)({"w": jnp.zeros(6)})
  out, state = jax.vmap(tx.update, axis_name="shards")({"w": delta}, state, {"w": params})
  np.testing.assert_allclose(np.asarray(out["w"]), np.asarray(expected["w"]), rtol=1e-6)


@pytest.mark.parametrize(
  "make, error",
  [
    (lambda: clippy(-0.1), ValueError),
    (lambda: clippy(float("inf")), ValueError),
    (lambda: clippy(0.1, 0.0), ValueError),
    (lambda: clippy(0.1, float("nan")), ValueError),
    (lambda: clippy("0.1"), TypeError),
    (lambda: clippy(stacked="layers"), TypeError),
  ],
)
def test_bad_arguments_fail_at_construction(make, error):
  with pytest.raises(error, match="clipx"):
    make()


def test_update_without_params_names_the_fix():
  tx = clippy()
  params = {"w": jnp.ones(2)}
  with pytest.raises(ValueError, match="clipx.clippy.*params"):
    tx.update(params, tx.init(params))


# ------------------------------------------------------------------------ the Optax contract


def test_inject_hyperparams_changes_relative_without_retracing():
  tx = optax.inject_hyperparams(clippy)(relative=0.1, absolute=1e-7)
  chex.clear_trace_counter()
  update = jax.jit(chex.assert_max_traces(tx.update, n=1))
  params, delta = {"w": jnp.array([1.0, 2.0])}, {"w": jnp.array([0.5, 0.1])}
  state = tx.init(params)
  out, state = update(delta, state, params)
  np.testing.assert_allclose(np.asarray(out["w"]), [0.1, 0.02], rtol=1e-5)
  state.hyperparams["relative"] = jnp.asarray(0.25, state.hyperparams["relative"].dtype)
  out, state = update(delta, state, params)
  np.testing.assert_allclose(np.asarray(out["w"]), [0.25, 0.05], rtol=1e-5)
  assert isinstance(state.inner_state, ClippyState)


def test_orbax_round_trip_then_identical_next_update(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint", reason="orbax-checkpoint is the `checkpoint` extra")
  stream = _stream(steps=6, seed=2)
  tx = optax.chain(optax.adagrad(LR), clippy(RELATIVE, 1e-3))
  params = jax.tree.map(jnp.asarray, _initial_params())
  assert_resumes_identically(ocp, tx, stream, params, tmp_path)
