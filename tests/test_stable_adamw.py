"""StableAdamW's update clipping (clipx.stable_adamw_clip) against optimi's StableAdamW.

The parity test runs ``optimi.StableAdamW`` (torch-optimi, the PyPI package,
its plain for-loop path) and ``clipx.stable_adamw_clip(optax.adamw(...))`` on
the same spiky gradients; it skips where torch or optimi is not installed
(CI). The numpy tests check the formula independently and run everywhere.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from orbax_roundtrip import assert_resumes_identically

import clipx
from clipx.stable_adamw import StableAdamWClipState, stable_adamw_clip

STEPS = 300
LR, B1, B2, EPS, WD = 1e-2, 0.9, 0.99, 1e-6, 1e-2
SHAPES = {"a_kernel": ((16, 8), 1.0), "b_bias": ((8,), 0.01), "c_embed": ((32, 4), 5.0)}


def _stream(steps: int = STEPS, seed: int = 0) -> list[dict[str, np.ndarray]]:
  """Gaussian gradients of drifting scale; every 29 steps one tensor's gradient x30."""
  rng = np.random.default_rng(seed)
  out = []
  names = sorted(SHAPES)
  for t in range(steps):
    grads = {}
    for name, (shape, scale) in SHAPES.items():
      g = rng.standard_normal(shape) * scale * (1 + 0.5 * np.sin(t / 20))
      if t % 29 == 28 and name == names[(t // 29) % len(names)]:
        g *= 30  # a sudden rise that v has not seen: RMS > 1
      grads[name] = g.astype(np.float32)
    out.append(grads)
  return out


def _initial_params(seed: int = 1) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return {
    name: rng.standard_normal(shape).astype(np.float32) for name, (shape, _) in SHAPES.items()
  }


def _tx(**kwargs):
  inner = optax.adamw(LR, b1=B1, b2=B2, eps=EPS, weight_decay=WD)
  return stable_adamw_clip(inner, b2=B2, eps=EPS, **kwargs)


def _numpy_rms(grads: np.ndarray, v_hat: np.ndarray, eps: float) -> float:
  g, v = grads.astype(np.float64), v_hat.astype(np.float64)
  return float(np.sqrt(np.mean(g**2 / np.maximum(v, eps**2))))


# --------------------------------------------------------------- parity with the authors' code


@pytest.fixture(scope="module")
def parity_runs():
  torch = pytest.importorskip("torch", reason="the parity reference is optimi, in torch; not in CI")
  optimi = pytest.importorskip("optimi", reason="torch-optimi runs the reference; not in CI")
  torch.set_num_threads(1)
  stream, start = _stream(), _initial_params()
  names = sorted(SHAPES)
  tensors = [torch.nn.Parameter(torch.from_numpy(start[n].copy())) for n in names]
  reference = optimi.StableAdamW(
    tensors, lr=LR, betas=(B1, B2), weight_decay=WD, eps=EPS, foreach=False, triton=False
  )
  ref_steps = []
  for grads in stream:
    for p, n in zip(tensors, names):
      p.grad = torch.from_numpy(grads[n].copy())
    reference.step()
    # optimi's own factor, from its state after the step: the line it computes it with.
    rms = [
      float(
        torch.from_numpy(grads[n].copy())
        .pow(2)
        .div_(reference.state[p]["exp_avg_sq"].maximum(reference.state[p]["eps_sq"]))
        .mean()
        .sqrt()
      )
      for p, n in zip(tensors, names)
    ]
    ref_steps.append(
      {
        "factors": [1 / max(1.0, r) for r in rms],
        "v_hat": {
          n: reference.state[p]["exp_avg_sq"].numpy().copy() for p, n in zip(tensors, names)
        },
        "params": {n: p.detach().numpy().copy() for p, n in zip(tensors, names)},
      }
    )
  tx = _tx()
  chex.clear_trace_counter()
  update = jax.jit(chex.assert_max_traces(tx.update, n=1))
  params = jax.tree.map(jnp.asarray, start)
  state = tx.init(params)
  ours = []
  for grads in stream:
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
    ours.append({"state": state, "params": params})
  return names, stream, ref_steps, ours


def test_factors_and_parameters_match_optimi_step_by_step(parity_runs):
  """Per step and tensor: the RMS factor, and the weights after (Adam, decay and the cut)."""
  names, _, ref_steps, ours = parity_runs
  cut_steps = 0
  for t, (ref, mine) in enumerate(zip(ref_steps, ours)):
    scale = np.asarray(mine["state"].stats.scale)
    for i, name in enumerate(names):
      where = f"step {t}, {name}"
      np.testing.assert_allclose(scale[i], ref["factors"][i], rtol=1e-5, err_msg=where)
      np.testing.assert_allclose(
        np.asarray(mine["params"][name]), ref["params"][name], rtol=1e-5, atol=2e-6, err_msg=where
      )
    cut_steps += int(np.any(scale < 1))
  # The cut acts: on the spikes, and on the first steps (v_hat holds one gradient).
  assert cut_steps >= STEPS // 29, cut_steps


def test_rms_is_the_formula_on_the_reference_second_moment(parity_runs):
  """clipx's RMS against numpy on optimi's own v_hat (its debiased-beta EMA)."""
  names, stream, ref_steps, ours = parity_runs
  for t in (0, 1, 28, 57, 299):
    for i, name in enumerate(names):
      expected = _numpy_rms(stream[t][name], ref_steps[t]["v_hat"][name], EPS)
      np.testing.assert_allclose(float(ours[t]["state"].stats.norm[i]), expected, rtol=1e-5)


# ----------------------------------------------------------- the formula, against numpy (no torch)


def test_first_step_and_a_jump_against_numpy():
  """Step 1: v_hat = g**2, so RMS = 1 (no cut); then a 10x jump in one tensor is cut by 1/RMS."""
  g1 = {"a": np.full(4, 0.1, np.float32), "b": np.array([1.0, -2.0], np.float32)}
  g2 = {"a": np.full(4, 1.0, np.float32), "b": np.array([1.0, -2.0], np.float32)}
  params = jax.tree.map(np.zeros_like, g1)
  plain = optax.adam(0.1, b2=0.99)
  tx = stable_adamw_clip(plain, b2=0.99)
  state, plain_state = tx.init(params), plain.init(params)
  out, state = tx.update(g1, state, params)
  ref, plain_state = plain.update(g1, plain_state, params)
  np.testing.assert_allclose(np.asarray(state.stats.norm), [1.0, 1.0], rtol=1e-6)
  chex.assert_trees_all_equal(out, ref)  # not cut: bit for bit
  out, state = tx.update(g2, state, params)
  ref, plain_state = plain.update(g2, plain_state, params)
  v_hat = (0.99 * 0.01 * 0.01 + 0.01 * 1.0) / (1 - 0.99**2)
  rms = _numpy_rms(g2["a"], np.full(4, v_hat), 1e-6)
  np.testing.assert_allclose(float(state.stats.norm[0]), rms, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(out["a"]), np.asarray(ref["a"]) / rms, rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(out["b"]), np.asarray(ref["b"]))
  report = clipx.stats(state).as_dict()
  assert report["clip/update_rms/clipped/a"] == 1.0 and report["clip/update_rms/clipped/b"] == 0.0


@pytest.mark.slow
def test_stacked_layers_get_their_own_factor():
  rng = np.random.default_rng(2)
  g1 = rng.standard_normal((3, 4, 2)).astype(np.float32)
  g2 = g1.copy()
  g2[1] *= 20  # one layer jumps
  params = {"k": np.zeros((3, 4, 2), np.float32)}
  stacked, twin = stable_adamw_clip(optax.adam(0.1), b2=0.999, stacked=1), None
  state = stacked.init(params)
  for g in (g1, g2):
    out, state = stacked.update({"k": g}, state, params)
  twin_scales = []
  for layer in range(3):
    twin = stable_adamw_clip(optax.adam(0.1), b2=0.999)
    twin_state = twin.init({"k": params["k"][layer]})
    for g in (g1, g2):
      twin_out, twin_state = twin.update({"k": g[layer]}, twin_state, {"k": params["k"][layer]})
    np.testing.assert_allclose(np.asarray(out["k"][layer]), np.asarray(twin_out["k"]), rtol=1e-6)
    twin_scales.append(float(twin_state.stats.scale[0]))
  np.testing.assert_allclose(np.asarray(state.stats.scale), twin_scales, rtol=1e-6)
  assert twin_scales[1] < 1 and twin_scales[0] == 1.0


@pytest.mark.slow
def test_axis_name_takes_the_mean_over_shards():
  rng = np.random.default_rng(3)
  g1, g2 = rng.standard_normal((2, 4, 6)).astype(np.float32)
  g2[0] *= 15
  whole = stable_adamw_clip(optax.adam(0.1), b2=0.99)
  params = {"w": np.zeros((4, 6), np.float32)}
  state = whole.init(params)
  for g in (g1, g2):
    expected, state = whole.update({"w": g}, state, params)
  tx = stable_adamw_clip(optax.adam(0.1), b2=0.99, axis_name="shards")
  sharded = jax.vmap(tx.init)({"w": np.zeros((4, 6), np.float32)})  # each shard one row
  update = jax.vmap(tx.update, axis_name="shards")
  for g in (g1, g2):
    out, sharded = update({"w": g}, sharded, {"w": np.zeros((4, 6), np.float32)})
  np.testing.assert_allclose(np.asarray(out["w"]), np.asarray(expected["w"]), rtol=1e-6)
  np.testing.assert_allclose(
    np.asarray(sharded.stats.norm[:, 0]), float(state.stats.norm[0]), rtol=1e-6
  )


@pytest.mark.parametrize(
  "make, error",
  [
    (lambda: stable_adamw_clip(optax.adam(0.1), b2=1.0), ValueError),
    (lambda: stable_adamw_clip(optax.adam(0.1), b2="0.99"), TypeError),
    (lambda: stable_adamw_clip(optax.adam(0.1), b2=0.99, eps=-1.0), ValueError),
    (lambda: stable_adamw_clip(optax.adam(0.1), b2=0.99, max_rms=0.0), ValueError),
    (lambda: stable_adamw_clip(optax.adam, b2=0.99), TypeError),
  ],
)
def test_bad_arguments_fail_at_construction(make, error):
  with pytest.raises(error, match="clipx"):
    make()


def test_inner_without_adam_fails_at_init_naming_it():
  tx = stable_adamw_clip(optax.sgd(0.1), b2=0.99)
  with pytest.raises(ValueError, match="clipx.stable_adamw_clip: inner .*ScaleByAdamState"):
    tx.init({"w": jnp.zeros(2)})


# ------------------------------------------------------------------------ the Optax contract


def test_inject_hyperparams_changes_max_rms_without_retracing():
  make = optax.inject_hyperparams(
    lambda max_rms: stable_adamw_clip(optax.adam(0.1, b2=0.99), b2=0.99, max_rms=max_rms)
  )
  tx = make(max_rms=1.0)
  chex.clear_trace_counter()
  update = jax.jit(chex.assert_max_traces(tx.update, n=1))
  params = {"w": jnp.zeros(4)}
  state = tx.init(params)
  _, state = update({"w": jnp.full(4, 0.01)}, state, params)
  _, state = update({"w": jnp.full(4, 1.0)}, state, params)
  assert bool(state.inner_state.stats.clipped[0])
  state.hyperparams["max_rms"] = jnp.asarray(100.0, state.hyperparams["max_rms"].dtype)
  _, state = update({"w": jnp.full(4, 10.0)}, state, params)
  assert not bool(state.inner_state.stats.clipped[0])
  assert isinstance(state.inner_state, StableAdamWClipState)


def test_orbax_round_trip_then_identical_next_update(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint", reason="orbax-checkpoint is the `checkpoint` extra")
  stream = _stream(steps=6, seed=2)
  tx = _tx()
  params = jax.tree.map(jnp.asarray, _initial_params())
  assert_resumes_identically(ocp, tx, stream, params, tmp_path)
