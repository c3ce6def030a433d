"""Stable-SPAM's AdaClip and AdaGN as clipx transforms (clipx.rescaling).

The parity tests run the authors' clipping, ported line by line to torch in
``tests/references/stable_spam.py``, and clipx on one gradient stream with
spikes, and compare every step and tensor. The numpy tests check the formulas
independently and run without torch.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from orbax_roundtrip import assert_resumes_identically

import clipx
from clipx.rescaling import (
  EmaPeakState,
  LayerNormalizeState,
  OutlierRescaleState,
  ema_peak,
  normalize_by_layer_norm,
  rescale_outliers,
  stable_spam_clip,
)

STEPS = 300
SPIKE_EVERY = 37
THETA, GAMMA1, GAMMA2, EPS = 0.999, 0.7, 0.9, 1e-8

# Tensors of different scales (the reference works per tensor), in jax.tree.leaves order.
SHAPES = {"a_kernel": ((64, 32), 1.0), "b_bias": ((32,), 0.01), "c_conv": ((16, 8, 3), 10.0)}
SHAPES["d_tiny"] = ((128,), 1e-3)


def _stream(steps: int = STEPS, seed: int = 0) -> list[dict[str, np.ndarray]]:
  """Gaussian gradients with slowly drifting scale; every 37 steps a few entries x50."""
  rng = np.random.default_rng(seed)
  out = []
  for t in range(steps):
    drift = 1.0 + 0.5 * np.sin(t / 40)
    grads = {}
    for name, (shape, scale) in SHAPES.items():
      g = (rng.standard_normal(shape) * scale * drift).astype(np.float32)
      if t % SPIKE_EVERY == SPIKE_EVERY - 1:
        flat = g.reshape(-1)
        flat[rng.choice(flat.size, size=3, replace=False)] *= 50
      grads[name] = g
    out.append(grads)
  return out


def _leaves(tree) -> list[np.ndarray]:
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _run_clipx(tx, stream):
  """Per step: (updates, state), with one jitted update (one trace for the whole stream)."""
  chex.clear_trace_counter()
  update = jax.jit(chex.assert_max_traces(tx.update, n=1))
  state = tx.init(stream[0])
  out = []
  for grads in stream:
    updates, state = update(grads, state)
    out.append((updates, state))
  return out


# --------------------------------------------------------------- parity with the authors' code


@pytest.fixture(scope="module")
def parity_runs():
  torch = pytest.importorskip("torch", reason="the parity reference is a torch port; not in CI")
  from references.stable_spam import stable_spam_clip as reference_clip

  torch.set_num_threads(1)
  stream = _stream()
  reference = reference_clip(
    [[torch.from_numpy(g) for g in _leaves(s)] for s in stream],
    gamma1=GAMMA1,
    gamma2=GAMMA2,
    gamma3=THETA,
    eps=EPS,
    total_t=None,  # no cosine schedule on gamma1
    update_proj_gap=0,  # no momentum reset
  )
  adaclip = _run_clipx(rescale_outliers(ema_peak(THETA)), stream)
  both = _run_clipx(stable_spam_clip(THETA, GAMMA1, GAMMA2, EPS), stream)
  return stream, reference, adaclip, both


def _relative(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-30)))


def test_adaclip_matches_reference_step_by_step(parity_runs):
  """Per step and tensor: the max, the bound, which entries are outliers, the output."""
  stream, reference, adaclip, _ = parity_runs
  total_outliers = spike_steps_clipped = 0
  for t, (grads, ref, (out, state)) in enumerate(zip(stream, reference, adaclip)):
    stats = state.stats
    for i, (g, x) in enumerate(zip(_leaves(grads), _leaves(out))):
      where = f"step {t}, tensor {i}"
      # The statistic is the same float32 maximum: bit for bit.
      assert float(stats.norm[i]) == float(ref["max_abs"][i]), where
      bound, ref_bound = float(stats.threshold[i]), float(ref["bound"][i])
      # The bound: EMA and bias correction in float32, as the reference's (measured 3.3e-7).
      assert abs(bound - ref_bound) <= 1e-6 * ref_bound, (where, bound, ref_bound)
      # Identical decisions: the same entries are outliers (the reference's mask, L124).
      ours, theirs = np.abs(g) > bound, np.abs(g) > ref_bound
      np.testing.assert_array_equal(ours, theirs, err_msg=where)
      assert int(ours.sum()) == ref["n_clipped"][i], where
      assert bool(stats.clipped[i]) == (ref["n_clipped"][i] > 0), where
      # Outputs: unchanged entries bit for bit, rescaled ones to float32 rounding.
      expected = ref["clipped_grad"][i].numpy()
      np.testing.assert_array_equal(x[~ours], g[~ours], err_msg=where)
      np.testing.assert_allclose(x, expected, rtol=1e-6, atol=0, err_msg=where)
      if ours.any():
        # The largest lands on the bound, sign kept.
        peak = np.argmax(np.abs(g))
        assert np.sign(x.reshape(-1)[peak]) == np.sign(g.reshape(-1)[peak])
        np.testing.assert_allclose(np.abs(x).max(), bound, rtol=1e-6)
      total_outliers += int(ours.sum())
      spike_steps_clipped += int(t % SPIKE_EVERY == SPIKE_EVERY - 1 and ours.any())
  # The stream exercises the rescaling: every spike step, and many ordinary ones.
  assert spike_steps_clipped == len(SHAPES) * (STEPS // SPIKE_EVERY)
  assert total_outliers > STEPS


def test_stable_spam_clip_matches_reference_step_by_step(parity_runs):
  """AdaClip then AdaGN: the post-AdaClip norm, AdaGN's target, and what Adam receives."""
  stream, reference, _, both = parity_runs
  worst = {"norm": 0.0, "target": 0.0, "grads": 0.0}
  for t, (ref, (out, state)) in enumerate(zip(reference, both)):
    outliers, normalize = state
    assert isinstance(outliers, OutlierRescaleState)
    assert isinstance(normalize, LayerNormalizeState)
    assert np.all(np.asarray(normalize.count) == ref["step"][0]) and ref["step"][0] == t + 1
    for i, x in enumerate(_leaves(out)):
      where = f"step {t}, tensor {i}"
      worst["norm"] = max(worst["norm"], _relative(normalize.stats.norm[i], ref["norm"][i]))
      target = normalize.stats.threshold[i]
      worst["target"] = max(worst["target"], _relative(target, ref["target_norm"][i]))
      expected = ref["grads"][i].numpy()
      np.testing.assert_allclose(x, expected, rtol=5e-6, atol=1e-6 * np.abs(expected).max())
      worst["grads"] = max(worst["grads"], _relative(np.linalg.norm(x), np.linalg.norm(expected)))
      assert bool(normalize.stats.clipped[i]), where
  # Float32 rounding: the norms of up to 2048 entries, summed in another order than torch's,
  # and the EMAs over 300 steps (measured: norm 4.8e-7, target 3.4e-7, entries 5.8e-7).
  assert worst["norm"] < 2e-6, worst
  assert worst["target"] < 2e-6, worst
  assert worst["grads"] < 2e-6, worst


# ------------------------------------------------------- independent checks (numpy, no torch)


def _numpy_stable_spam(stream, theta, gamma1, gamma2, eps):
  """The formulas of the paper, per tensor, in float64."""
  state: dict[str, list[float]] = {}
  out = []
  for k, grads in enumerate(stream, start=1):
    step = {}
    for name, g in grads.items():
      g = g.astype(np.float64)
      m_max, m_n, v_n = state.get(name, [0.0, 0.0, 0.0])
      peak = np.abs(g).max()
      m_max = theta * m_max + (1 - theta) * peak
      bound = m_max / (1 - theta**k)
      g = np.where(np.abs(g) > bound, g / peak * bound, g)
      n = np.linalg.norm(g)
      m_n = gamma1 * m_n + (1 - gamma1) * n
      v_n = gamma2 * v_n + (1 - gamma2) * n**2
      target = (m_n / (1 - gamma1**k)) / (np.sqrt(v_n / (1 - gamma2**k)) + eps)
      step[name] = (g / n * target, bound, target, n)
      state[name] = [m_max, m_n, v_n]
    out.append(step)
  return out


def test_formulas_against_numpy_for_a_few_steps():
  stream = _stream(steps=40, seed=1)  # includes the spike at step 36
  expected = _numpy_stable_spam(stream, 0.9, 0.6, 0.95, 1e-8)
  runs = _run_clipx(stable_spam_clip(0.9, 0.6, 0.95, 1e-8), stream)
  for t, (want, (out, (outliers, normalize))) in enumerate(zip(expected, runs)):
    for i, name in enumerate(sorted(want)):
      grads, bound, target, _ = want[name]
      np.testing.assert_allclose(float(outliers.stats.threshold[i]), bound, rtol=2e-6)
      np.testing.assert_allclose(float(normalize.stats.threshold[i]), target, rtol=2e-6)
      np.testing.assert_allclose(
        out[name], grads, rtol=1e-5, atol=1e-6 * np.abs(grads).max(), err_msg=f"step {t} {name}"
      )


@pytest.mark.parametrize("scale", [1e-30, 1.0, 1e30])
def test_one_pass_equals_the_chain_of_its_two_steps(scale):
  """The fused preset against rescale_outliers then normalize_by_layer_norm, and numpy.

  At tiny and huge scales (the norm's divisor), with entries tied at the
  bound (not outliers: ``|g| > b`` is strict) and a spiked step.
  """
  rng = np.random.default_rng(5)
  stream = []
  for t in range(12):
    grads = {
      "w": rng.standard_normal((6, 5)).astype(np.float32),
      "b": np.array([1.0, -1.0, 1.0, 0.5], np.float32),  # every peak equal: bound == peak
    }
    if t == 6:
      grads["w"][2, 3] = 40.0  # one outlier
    if t == 9:
      grads["b"][1] = -8.0  # one outlier among entries tied with each other
    stream.append(jax.tree.map(lambda g: (g * np.float32(scale)).astype(np.float32), grads))
  chain = optax.chain(rescale_outliers(ema_peak(0.9)), normalize_by_layer_norm(0.6, 0.95, 0.0))
  fused = stable_spam_clip(0.9, 0.6, 0.95, 0.0)
  expected = _numpy_stable_spam(stream, 0.9, 0.6, 0.95, 0.0)
  chain_state, fused_state = chain.init(stream[0]), fused.init(stream[0])
  chain_update, fused_update = jax.jit(chain.update), jax.jit(fused.update)
  rescaled = 0
  for t, grads in enumerate(stream):
    chain_out, chain_state = chain_update(grads, chain_state)
    fused_out, fused_state = fused_update(grads, fused_state)
    chex.assert_trees_all_close(fused_out, chain_out, rtol=2e-6, atol=0)
    for a, b in zip(fused_state, chain_state):
      np.testing.assert_array_equal(a.stats.clipped, b.stats.clipped, err_msg=f"step {t}")
    np.testing.assert_allclose(fused_state[0].stats.norm, chain_state[0].stats.norm, rtol=2e-6)
    for i, name in enumerate(sorted(grads)):
      want, _, _, norm = expected[t][name]
      # The norm after AdaClip, at every scale (the chain's reads 0 below ~1e-19).
      np.testing.assert_allclose(fused_state[1].stats.norm[i], norm, rtol=2e-6, err_msg=name)
      if scale == 1.0:  # elsewhere n**2 leaves float32: AdaGN records nothing and passes through
        np.testing.assert_allclose(fused_out[name], want, rtol=1e-5, err_msg=f"step {t} {name}")
      else:
        assert not fused_state[1].stats.clipped[i], f"step {t} {name}"
    rescaled += int(np.sum(fused_state[0].stats.clipped))
  assert rescaled >= 2


def test_ema_peak_is_bias_corrected_and_includes_the_current_step():
  policy = ema_peak(0.9)
  state = policy.init(jnp.zeros((2,)))
  assert isinstance(state, EmaPeakState)
  update = jax.jit(policy.update)
  xs = np.array([[1.0, 2.0], [3.0, 0.0], [5.0, np.nan], [2.0, 4.0]], np.float32)
  ema, count = np.zeros(2), np.zeros(2, int)
  for x in xs:
    bound, state = update(jnp.asarray(x), state)
    record = np.isfinite(x) & (x != 0)  # zero and NaN are not recorded
    ema = np.where(record, 0.9 * ema + 0.1 * x, ema)
    count = count + record
    np.testing.assert_allclose(bound, ema / (1 - 0.9**count), rtol=1e-6)
    np.testing.assert_array_equal(state.count, count)
  assert float(ema_peak().update(jnp.float32(0), ema_peak().init(jnp.zeros(())))[0]) == np.inf


def test_rescale_outliers_formula():
  g = {"a": jnp.array([1.0, -3.0, 8.0, -8.5]), "b": jnp.array([[0.5, -0.25]])}
  tx = rescale_outliers(2.0)
  out, state = jax.jit(tx.update)(g, tx.init(g))
  np.testing.assert_allclose(out["a"], [1.0, -3 / 8.5 * 2, 8 / 8.5 * 2, -2.0], rtol=1e-7)
  np.testing.assert_array_equal(out["b"], g["b"])  # under the bound: bit for bit
  np.testing.assert_array_equal(state.stats.norm, [8.5, 0.5])
  np.testing.assert_allclose(state.stats.scale, [2 / 8.5, 1.0])
  np.testing.assert_array_equal(state.stats.clipped, [True, False])
  np.testing.assert_array_equal(state.stats.clipped_norm, [2.0, 0.5])


def test_normalize_can_scale_up():
  """AdaGN is not a clip: a norm below the running mean is scaled up."""
  tx = normalize_by_layer_norm(0.5, 0.5, 0.0)
  update, state = jax.jit(tx.update), tx.init({"w": jnp.zeros(2)})
  for w in ([3.0, 4.0], [0.3, 0.4]):
    out, state = update({"w": jnp.array(w)}, state)
  m = (0.25 * 5 + 0.5 * 0.5) / 0.75
  v = (0.25 * 25 + 0.5 * 0.25) / 0.75
  np.testing.assert_allclose(np.linalg.norm(out["w"]), m / np.sqrt(v), rtol=1e-6)
  assert float(state.stats.scale[0]) > 1


# ------------------------------------------------------------------------------- edges


def test_nonfinite_input_propagates_and_is_not_recorded():
  tx = stable_spam_clip()
  good = {"a": jnp.arange(1.0, 5.0), "b": jnp.array([1.0, -2.0])}
  update = jax.jit(tx.update)
  _, state = update(good, tx.init(good))
  for bad in (jnp.nan, jnp.inf):
    grads = {"a": jnp.array([1.0, bad, 100.0, 4.0]), "b": good["b"]}
    out, new = update(grads, state)
    np.testing.assert_array_equal(out["a"], grads["a"])  # unchanged: never zeroed
    assert np.all(np.isfinite(out["b"]))
    outliers, normalize = new
    assert int(outliers.threshold_state.count[0]) == 1  # not recorded
    assert int(normalize.count[0]) == 1
    assert int(normalize.count[1]) == 2


def test_invalid_run_time_bound_gives_nan_and_zero_bound_zeroes():
  g = {"w": jnp.array([1.0, -3.0])}
  for value, check in ((-1.0, np.isnan), (jnp.nan, np.isnan), (0.0, lambda x: x == 0)):
    tx = rescale_outliers(lambda count, value=value: jnp.float32(value))
    out, state = jax.jit(tx.update)(g, tx.init(g))
    assert np.all(check(np.asarray(out["w"]))), value
    assert bool(state.stats.clipped[0])


def test_empty_leaves_and_zero_gradients_pass():
  g = {"e": jnp.zeros((0, 3)), "z": jnp.zeros(3), "w": jnp.array([1.0, 2.0])}
  tx = stable_spam_clip(stacked=lambda path, leaf: 1 if leaf.ndim == 2 else 0)
  out, _ = jax.jit(tx.update)(g, tx.init(g))
  assert out["e"].shape == (0, 3)
  np.testing.assert_array_equal(out["z"], g["z"])
  assert np.all(np.isfinite(out["w"]))


def test_dtype_is_kept():
  g = {"w": jnp.array([1.0, -3.0, 40.0], jnp.bfloat16)}
  tx = stable_spam_clip()
  state = tx.init(g)
  update = jax.jit(tx.update)
  for _ in range(3):
    out, state = update(jax.tree.map(lambda x: x * 0.5, g), state)
  out, state = update(g, state)
  assert out["w"].dtype == jnp.bfloat16
  assert state[0].stats.norm.dtype == jnp.float32


@pytest.mark.parametrize(
  ("make", "error"),
  [
    (lambda: ema_peak(1.0), ValueError),
    (lambda: ema_peak("0.9"), TypeError),
    (lambda: rescale_outliers(0.0), ValueError),
    (lambda: rescale_outliers(ema_peak), TypeError),
    (lambda: rescale_outliers(1.0, stacked=-1), ValueError),
    (lambda: normalize_by_layer_norm(gamma1=1.5), ValueError),
    (lambda: normalize_by_layer_norm(eps=-1.0), ValueError),
    (lambda: normalize_by_layer_norm(eps=float("inf")), ValueError),
    (lambda: stable_spam_clip(theta=0.0), ValueError),
  ],
)
def test_bad_arguments_fail_at_construction(make, error):
  with pytest.raises(error, match="clipx"):
    make()


# ------------------------------------------------------------------------ the Optax contract


def test_inside_chain_with_inject_hyperparams():
  stream = _stream(steps=12, seed=2)
  params = jax.tree.map(np.zeros_like, stream[0])
  plain = optax.chain(stable_spam_clip(THETA, GAMMA1, GAMMA2, EPS), optax.adam(1e-3))
  injected = optax.chain(
    optax.inject_hyperparams(stable_spam_clip)(theta=THETA, gamma1=GAMMA1, gamma2=GAMMA2, eps=EPS),
    optax.adam(1e-3),
  )
  chex.clear_trace_counter()
  plain_update = jax.jit(plain.update)
  injected_update = jax.jit(chex.assert_max_traces(injected.update, n=1))
  a, b = plain.init(params), injected.init(params)
  for grads in stream:
    ua, a = plain_update(grads, a, params)
    ub, b = injected_update(grads, b, params)
    # A traced decay forms 1 - decay in float32: the EMAs agree to ~1e-5, not bit for bit.
    for x, y in zip(_leaves(ua), _leaves(ub)):
      np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-9)
  report = clipx.stats(b)
  assert {"outliers", "normalize"} <= set(report)
  assert "clip/outliers/norm/a_kernel" in report.as_dict()
  # A new gamma1 takes effect at run time, without retracing.
  b[0].hyperparams["gamma1"] = jnp.asarray(0.2, b[0].hyperparams["gamma1"].dtype)
  ub, b = injected_update(stream[0], b, params)
  ua, a = plain_update(stream[0], a, params)
  assert not np.allclose(_leaves(ua)[0], _leaves(ub)[0], rtol=1e-4)


LAYERS = 3


def _stacked(seed: int, spike: bool):
  rng = np.random.default_rng(seed)
  kernel = rng.standard_normal((LAYERS, 6, 5)).astype(np.float32) * np.array([1, 0.1, 10])[
    :, None, None
  ].astype(np.float32)
  if spike:
    kernel[1, 2, 3] *= 50
  return {"blocks": {"kernel": kernel}, "head": rng.standard_normal(4).astype(np.float32)}


def _unstacked(tree):
  blocks = {str(i): {"kernel": tree["blocks"]["kernel"][i]} for i in range(LAYERS)}
  return {"blocks": blocks, "head": tree["head"]}


def test_stacked_equals_the_unstacked_twin():
  stream = [_stacked(t, spike=t % 5 == 4) for t in range(15)]
  stacked_fn = lambda path, leaf: 1 if clipx.stacking.path_name(path).startswith("blocks") else 0  # noqa: E731
  stacked = _run_clipx(stable_spam_clip(stacked=stacked_fn), stream)
  twin = _run_clipx(stable_spam_clip(), [_unstacked(s) for s in stream])
  for (out, state), (twin_out, twin_state) in zip(stacked, twin):
    for x, y in zip(_leaves(_unstacked(jax.tree.map(np.asarray, out))), _leaves(twin_out)):
      np.testing.assert_allclose(x, y, rtol=1e-6)
    # Groups in the same order: blocks layers 0..2, then head (the twin's leaf order).
    for mine, theirs in zip(state, twin_state):
      np.testing.assert_allclose(mine.stats.norm, theirs.stats.norm, rtol=1e-6)
      np.testing.assert_allclose(mine.stats.threshold, theirs.stats.threshold, rtol=1e-6)
      np.testing.assert_array_equal(mine.stats.clipped, theirs.stats.clipped)
  assert np.asarray(stacked[4][1][0].stats.clipped)[1]  # the spiked layer was rescaled
  names = clipx.stats(stacked[-1][1]).as_dict()
  assert "clip/outliers/norm/blocks/kernel[2]" in names
  assert "clip/normalize/threshold/head" in names


def test_orbax_round_trip_then_identical_next_update(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint", reason="orbax-checkpoint is the `checkpoint` extra")
  stream = _stream(steps=6, seed=3)
  params = jax.tree.map(np.zeros_like, stream[0])
  tx = optax.chain(stable_spam_clip(), optax.adam(1e-3))
  assert_resumes_identically(ocp, tx, stream, params, tmp_path)
