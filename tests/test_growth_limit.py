"""Fira's norm-growth limiter as a clipx threshold policy (clipx.growth_limit).

The parity test runs ``pytorch_optimizer``'s Fira itself (``tests/references/fira.py``
watches its limiter) on a matrix with spiky gradients and feeds the same
compensation terms to ``clip_by_layer_norm(growth_limit())``; it skips where
torch or pytorch_optimizer is not installed (CI). The numpy tests check the
rule independently and run everywhere.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from orbax_roundtrip import assert_resumes_identically

import clipx
from clipx.growth_limit import GrowthLimitState, growth_limit

STEPS = 300


def _numpy_limiter(norms: list[float], gamma: float) -> tuple[list[float], list[float]]:
  """(thresholds, limited norms) of the rule, in float64: the first norm seeds it."""
  thresholds, limited, previous = [], [], None
  for n in norms:
    threshold = np.inf if previous is None else gamma * previous
    previous = min(n, threshold)
    thresholds.append(threshold)
    limited.append(previous)
  return thresholds, limited


def _spiky_norms(steps: int, seed: int = 0) -> np.ndarray:
  rng = np.random.default_rng(seed)
  norms = np.exp(rng.normal(0, 0.05, steps)) * (1 + 0.3 * np.sin(np.arange(steps) / 30))
  norms[::41] *= 30  # spikes
  return norms.astype(np.float32)


# --------------------------------------------------------------- parity with the authors' code


@pytest.fixture(scope="module")
def fira_run():
  pytest.importorskip("torch", reason="the parity reference is pytorch_optimizer's Fira; not in CI")
  pytest.importorskip("pytorch_optimizer", reason="pytorch_optimizer runs the reference; not in CI")
  import torch
  from references.fira import run_fira

  torch.set_num_threads(1)
  rng = np.random.default_rng(0)
  weight = rng.standard_normal((24, 16)).astype(np.float32)
  grads = []
  for t in range(STEPS):
    g = rng.standard_normal((24, 16)) * (1 + 0.5 * np.sin(t / 25))
    if t % 37 == 36:
      g[rng.integers(24), :] *= 40  # a row spikes: the full-rank residual jumps
    grads.append(g.astype(np.float32))
  return weight, run_fira(weight, grads, lr=1e-2, rank=4, update_proj_gap=50)


def test_limiter_matches_fira_step_by_step(fira_run):
  """Per step: the factor, the limited norm, the limited term, and the weights after."""
  weight, steps = fira_run
  tx = clipx.clip_by_layer_norm(growth_limit(1.01))
  update = jax.jit(tx.update)
  state = tx.init({"w": weight})
  param = weight.astype(np.float32)
  limited_steps = 0
  for t, ref in enumerate(steps):
    where = f"step {t}"
    out, state = update({"w": ref["before"]}, state)
    stats = state.stats
    ref_norm = float(np.linalg.norm(ref["before"].astype(np.float64)))
    ref_factor = float(np.linalg.norm(ref["after"].astype(np.float64))) / ref_norm
    # The factor (1 / limiter) and the limited norm Fira keeps (state["scaling_grad"]).
    np.testing.assert_allclose(float(stats.scale[0]), ref_factor, rtol=2e-6, err_msg=where)
    np.testing.assert_allclose(
      float(stats.clipped_norm[0]), ref["previous"], rtol=2e-6, err_msg=where
    )
    assert bool(stats.clipped[0]) == (ref_factor < 1 - 1e-6), where
    limited_steps += bool(stats.clipped[0])
    # The limited term itself.
    np.testing.assert_allclose(
      np.asarray(out["w"]), ref["after"], rtol=2e-5, atol=1e-6, err_msg=where
    )
    # The weights: Fira's step with clipx's limited term in place of its own.
    param = param - np.float32(ref["step_size"]) * (ref["low_rank"] + np.asarray(out["w"]))
    np.testing.assert_allclose(param, ref["param"], rtol=1e-5, atol=1e-5, err_msg=where)
  # The stream exercises the limiter: every spike, and the climb back after it.
  assert limited_steps >= STEPS // 37, limited_steps


# ----------------------------------------------------------- the rule, against numpy (no torch)


@pytest.mark.parametrize("gamma", [1.01, 1.5])
def test_thresholds_follow_the_rule(gamma):
  norms = _spiky_norms(200)
  expected_thresholds, expected_limited = _numpy_limiter([float(n) for n in norms], gamma)
  policy = growth_limit(gamma)
  update = jax.jit(policy.update)
  state = policy.init(jnp.zeros(()))
  for n, threshold, limited in zip(norms, expected_thresholds, expected_limited):
    got, state = update(jnp.float32(n), state)
    np.testing.assert_allclose(float(got), threshold, rtol=1e-5)
    np.testing.assert_allclose(float(state.previous), limited, rtol=1e-5)


def test_global_scope_scales_tree_to_the_bound():
  tx = clipx.clip_by_global_norm(growth_limit(1.1))
  update = jax.jit(tx.update)
  state = tx.init({"a": jnp.zeros(3), "b": jnp.zeros(2)})
  grads = {"a": jnp.array([3.0, 0.0, 4.0]), "b": jnp.array([0.0, 0.0])}  # norm 5
  out, state = update(grads, state)
  np.testing.assert_array_equal(np.asarray(out["a"]), [3.0, 0.0, 4.0])  # first: unlimited
  big = jax.tree.map(lambda g: 10 * g, grads)  # norm 50: cut to 5.5
  out, state = update(big, state)
  np.testing.assert_allclose(
    np.asarray(out["a"]), np.array([30.0, 0.0, 40.0]) * 5.5 / 50, rtol=1e-6
  )
  report = clipx.stats(state).as_dict()
  assert report["clip/global/threshold"] == pytest.approx(5.5)
  assert report["clip/global/clip_count"] == 1


def test_zero_and_nonfinite_norms_are_not_recorded():
  policy = growth_limit(2.0)
  state = policy.init(jnp.zeros(3))
  _, state = policy.update(jnp.array([1.0, 0.0, jnp.nan]), state)
  np.testing.assert_array_equal(np.asarray(state.count), [1, 0, 0])
  threshold, state = policy.update(jnp.array([5.0, 3.0, 4.0]), state)
  np.testing.assert_array_equal(np.asarray(threshold), [2.0, np.inf, np.inf])
  np.testing.assert_array_equal(np.asarray(state.previous), [2.0, 3.0, 4.0])


def test_max_threshold_caps_from_the_first_step():
  policy = growth_limit(1.01, max_threshold=2.0)
  state = policy.init(jnp.zeros(()))
  threshold, state = policy.update(jnp.float32(10.0), state)
  assert float(threshold) == 2.0 and float(state.previous) == 2.0


@pytest.mark.parametrize(
  "make, error",
  [
    (lambda: growth_limit(0.99), ValueError),
    (lambda: growth_limit(float("nan")), ValueError),
    (lambda: growth_limit("1.01"), TypeError),
    (lambda: growth_limit(initial=0.0), ValueError),
    (lambda: growth_limit(max_threshold=-1.0), ValueError),
    (lambda: clipx.clip_by_layer_norm(clipx.growth_limit), TypeError),  # not called
  ],
)
def test_bad_arguments_fail_at_construction(make, error):
  with pytest.raises(error, match="clipx"):
    make()


# ------------------------------------------------------------------------ the Optax contract


def test_inject_hyperparams_changes_gamma_without_retracing():
  make = optax.inject_hyperparams(lambda gamma: clipx.clip_by_layer_norm(growth_limit(gamma)))
  tx = make(gamma=1.5)
  chex.clear_trace_counter()
  update = jax.jit(chex.assert_max_traces(tx.update, n=1))
  grads = {"w": jnp.array([3.0, 4.0])}
  state = tx.init(grads)
  _, state = update(grads, state)
  out, state = update(jax.tree.map(lambda g: 10 * g, grads), state)
  np.testing.assert_allclose(float(jnp.linalg.norm(out["w"])), 7.5, rtol=1e-6)
  state.hyperparams["gamma"] = jnp.asarray(2.0, state.hyperparams["gamma"].dtype)
  out, state = update(jax.tree.map(lambda g: 100 * g, grads), state)
  np.testing.assert_allclose(float(jnp.linalg.norm(out["w"])), 15.0, rtol=1e-6)
  assert isinstance(state.inner_state.threshold_state, GrowthLimitState)


def test_axis_name_limits_the_global_norm_over_shards():
  tx = clipx.clip_by_global_norm(growth_limit(1.01), axis_name="shards")
  whole = clipx.clip_by_global_norm(growth_limit(1.01))
  grads = [np.full((4, 3), s, np.float32) for s in (1.0, 1.0, 5.0)]
  state = jax.vmap(tx.init, axis_size=4)({"w": jnp.zeros((4, 3))})
  whole_state = whole.init({"w": jnp.zeros((4, 3))})
  update = jax.jit(jax.vmap(tx.update, axis_name="shards"))
  for g in grads:
    out, state = update({"w": jnp.asarray(g)}, state)  # each shard holds one row
    expected, whole_state = whole.update({"w": jnp.asarray(g)}, whole_state)
    np.testing.assert_allclose(np.asarray(out["w"]), np.asarray(expected["w"]), rtol=1e-6)
  assert bool(state.stats.clipped[0])


def test_orbax_round_trip_then_identical_next_update(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint", reason="orbax-checkpoint is the `checkpoint` extra")
  norms = _spiky_norms(6)
  stream = [{"w": jnp.full((3, 2), n / np.sqrt(6), jnp.float32)} for n in norms]
  tx = optax.chain(clipx.clip_by_layer_norm(growth_limit()), optax.adam(1e-3))
  params = {"w": jnp.zeros((3, 2))}
  assert_resumes_identically(ocp, tx, stream, params, tmp_path)
