"""Update clipping: window_zscore after the optimizer (levanter) and clip_by_block_rms (Adafactor).

Parity is checked step by step against the ports in ``tests/references``:
levanter's ``clip_update_by_historical_norm`` (NumPy float32), optax's
``clip_by_block_rms`` (NumPy port and optax itself, alone and inside
``optax.adafactor``) and torch's Adafactor (skipped where torch is absent).
"""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from orbax_roundtrip import save_and_restore
from references import adafactor_rms, levanter_clip_update_norm

import clipx
from clipx.thresholds import WindowZScoreState, window_zscore
from clipx.update_clipping import clip_by_block_rms, group_sizes

INF = math.inf

# float32 rounding: the window's mean and std are summed in a different order
# than NumPy's (pairwise) sums, and the global norm likewise; a few ulp.
RTOL = 2e-6


def _shapes_tree(shapes):
  return jax.tree.map(
    lambda shape: np.zeros(shape, np.float32), shapes, is_leaf=lambda x: isinstance(x, tuple)
  )


def _grad_stream(params, steps, *, seed=0, spikes=(), spike_factor=30.0, drift=0.0):
  """Gaussian gradients whose scale drifts, with ``spike_factor`` spikes at ``spikes``."""
  rng = np.random.default_rng(seed)
  out = []
  for step in range(steps):
    scale = math.exp(drift * step) * (spike_factor if step in spikes else 1.0)
    out.append(
      jax.tree.map(
        lambda p, scale=scale: (scale * rng.standard_normal(p.shape) + 0.1).astype(np.float32),
        params,
      )
    )
  return out


# ------------------------------------------------------------- window_zscore


@pytest.mark.parametrize(
  "make, error",
  [
    (lambda: window_zscore(sigma=0.0), ValueError),
    (lambda: window_zscore(sigma=-1.0), ValueError),
    (lambda: window_zscore(sigma=float("nan")), ValueError),
    (lambda: window_zscore(sigma="3"), TypeError),
    (lambda: window_zscore(history=0), ValueError),
    (lambda: window_zscore(history=2.0), TypeError),
    (lambda: window_zscore(warmup_steps=0), ValueError),
    (lambda: window_zscore(warmup_steps=1.5), TypeError),
    (lambda: window_zscore(std_floor=-1e-6), ValueError),
    (lambda: window_zscore(std_floor=INF), ValueError),
    (lambda: window_zscore(initial=0.0), ValueError),
    (lambda: window_zscore(max_threshold=-1.0), ValueError),
  ],
)
def test_window_zscore_rejects_bad_arguments(make, error):
  with pytest.raises(error, match="clipx.window_zscore"):
    make()


def test_window_zscore_uncalled_is_caught():
  with pytest.raises(TypeError, match="call it"):
    clipx.clip_by_global_norm(window_zscore)


def _run_policy(policy, norms):
  norms = jnp.asarray(norms, jnp.float32)

  def body(state, norm):
    threshold, state = policy.update(norm, state)
    return state, threshold

  state, thresholds = jax.lax.scan(body, policy.init(jnp.zeros(norms.shape[1:])), norms)
  return np.asarray(thresholds, np.float64), state


def _reference_thresholds(norms, sigma, history, warmup, std_floor=1e-6, max_threshold=INF):
  """float64: mean + sigma * max(std, floor) of the last ``history`` recorded norms."""
  window, out = [], []
  for x in norms:
    if len(window) >= warmup:
      last = np.asarray(window[-history:])
      out.append(min(last.mean() + sigma * max(last.std(), std_floor), max_threshold))
    else:
      out.append(min(INF, max_threshold))
    if np.isfinite(x) and x != 0:
      window.append(float(x))
  return np.asarray(out)


@pytest.mark.parametrize("sigma, history, warmup", [(3.0, 8, None), (2.0, 5, 3), (1.0, 4, 9)])
def test_window_zscore_matches_float64_reference(sigma, history, warmup):
  rng = np.random.default_rng(1)
  norms = np.exp(rng.normal(0, 0.3, 60)).astype(np.float32)
  norms[[20, 41]] *= 50
  norms[25], norms[30], norms[33] = np.nan, np.inf, 0.0  # none of them is recorded
  thresholds, state = _run_policy(window_zscore(sigma, history, warmup_steps=warmup), norms)
  expected = _reference_thresholds(
    norms.astype(np.float64), sigma, history, max(2, history // 2) if warmup is None else warmup
  )
  np.testing.assert_allclose(thresholds, expected, rtol=1e-5)
  assert int(state.count) == 57
  assert isinstance(state, WindowZScoreState)


def test_window_zscore_default_warmup_is_levanters():
  for history, warmup in [(1, 2), (2, 2), (5, 2), (6, 3), (128, 64)]:
    thresholds, _ = _run_policy(window_zscore(history=history), np.arange(1, 70, dtype=np.float32))
    assert np.all(np.isinf(thresholds[:warmup])) and np.all(np.isfinite(thresholds[warmup:]))


def test_window_zscore_per_group_histories_cap_and_floor():
  norms = np.ones((12, 3), np.float32)
  norms[:, 1] = 2.0
  norms[5, 2] = 0.0  # group 2 records one norm fewer
  policy = window_zscore(sigma=3.0, history=4, warmup_steps=4, max_threshold=1.5)
  thresholds, state = _run_policy(policy, norms)
  np.testing.assert_array_equal(state.count, [12, 12, 11])
  # Equal norms: std 0, floored at 1e-6; group 1's bound 2 + 3e-6 is capped at 1.5.
  np.testing.assert_allclose(thresholds[-1], [1 + 3e-6, 1.5, 1 + 3e-6], rtol=1e-7)
  assert np.all(thresholds[:4] == 1.5)  # the cap holds during warm-up


def test_window_zscore_infinite_sigma_never_clips():
  thresholds, _ = _run_policy(
    window_zscore(sigma=INF, history=4, std_floor=0.0), np.ones(10, np.float32)
  )
  assert np.all(np.isposinf(thresholds))


def test_window_zscore_does_not_record_nan_where_levanter_does():
  """The documented deviation: levanter's bound is NaN for a window after a NaN norm."""
  norms = [1.0, 2.0, 1.0, 2.0, float("nan"), 1.0, 2.0, 100.0]
  steps = [[np.full(1, n, np.float32)] for n in norms]
  ref = levanter_clip_update_norm.clip_update_by_historical_norm(steps, rolling_interval_length=4)
  thresholds, _ = _run_policy(window_zscore(history=4), np.asarray(norms, np.float32))
  assert np.isnan(ref[-1]["max_norm"]) and not ref[-1]["clipped"]  # the spike goes through
  assert thresholds[-1] == pytest.approx(1.5 + 3 * 0.5)  # the last four finite norms: 1, 2, 1, 2


# ------------------------------------------ (a) window_zscore after Adam vs levanter


@pytest.mark.parametrize("sigma, history", [(3.0, 128), (2.0, 16)])
def test_update_clipping_after_adam_matches_levanter(sigma, history):
  params = _shapes_tree({"dense": {"kernel": (8, 4), "bias": (4,)}, "out": {"kernel": (4, 2)}})
  steps = 300
  spikes = (70, 71, 130, 200, 201, 202, 260)
  grads = _grad_stream(params, steps, seed=2, spikes=spikes, drift=-0.004)

  tx = optax.chain(
    optax.scale_by_adam(), clipx.clip_by_global_norm(window_zscore(sigma=sigma, history=history))
  )
  adam = optax.scale_by_adam()
  step, adam_step = jax.jit(tx.update), jax.jit(adam.update)
  state, adam_state = tx.init(params), adam.init(params)
  ours, adam_updates = [], []
  for g in grads:
    updates, state = step(g, state)
    raw, adam_state = adam_step(g, adam_state)
    report = clipx.stats(state)["global"]
    ours.append((jax.tree.leaves(updates), report))
    adam_updates.append([np.asarray(u) for u in jax.tree.leaves(raw)])

  ref = levanter_clip_update_norm.clip_update_by_historical_norm(
    adam_updates, rolling_interval_length=history, sigma_factor=sigma
  )
  decisions = []
  for (updates, report), r in zip(ours, ref):
    assert bool(report.clipped) == r["clipped"]
    decisions.append(r["clipped"])
    np.testing.assert_allclose(float(report.norm), r["norm"], rtol=RTOL)
    np.testing.assert_allclose(float(report.threshold), r["max_norm"], rtol=RTOL)  # inf in warm-up
    # No decision is within rounding of the bound, so the equal decisions are not luck.
    assert abs(r["norm"] - r["max_norm"]) > 1e-4 * r["norm"]
    for a, b in zip(updates, r["updates"]):
      np.testing.assert_allclose(np.asarray(a), b, rtol=RTOL, atol=1e-7)
  warmup = max(2, history // 2)
  assert not any(decisions[:warmup])
  # The first spike after warm-up is caught. (Later ones may not be: the window
  # records raw norms, spikes included, which widens the bound for a while.)
  assert decisions[70] and sum(decisions) >= 4


def test_window_zscore_sigma_is_an_injectable_hyperparameter():
  make = optax.inject_hyperparams(
    lambda sigma: clipx.clip_by_global_norm(window_zscore(sigma, history=4, warmup_steps=2))
  )
  tx = make(sigma=3.0)
  params = {"w": jnp.zeros(3)}
  state = tx.init(params)
  chex.clear_trace_counter()
  update = jax.jit(chex.assert_max_traces(tx.update, n=1))
  for norm in [1.0, 3.0]:
    _, state = update({"w": jnp.asarray([norm, 0.0, 0.0])}, state)
  _, loose = update({"w": jnp.asarray([4.0, 0.0, 0.0])}, state)
  # Same dtype as the array already there: a new value, not a new program.
  state.hyperparams["sigma"] = jnp.asarray(1.0, state.hyperparams["sigma"].dtype)
  _, tight = update({"w": jnp.asarray([4.0, 0.0, 0.0])}, state)
  assert not bool(clipx.stats(loose)["global"].clipped)  # bound 2 + 3 * 1 = 5
  assert float(clipx.stats(tight)["global"].threshold) == 3.0  # 2 + 1 * 1


# --------------------------------------------------------------- clip_by_block_rms


def test_block_rms_rejects_bad_arguments():
  with pytest.raises(ValueError, match="clipx.clip_by_block_rms"):
    clip_by_block_rms(0.0)
  with pytest.raises(ValueError, match="clipx.clip_by_block_rms"):
    clip_by_block_rms(-1.0)
  with pytest.raises(ValueError, match="group"):
    clip_by_block_rms(1.0, group="layer")
  with pytest.raises(ValueError, match="stacked"):
    clip_by_block_rms(1.0, stacked=-1)


def test_group_sizes():
  tree = {"blocks": {"kernel": np.zeros((3, 4, 5)), "bias": np.zeros((3, 5))}, "head": np.zeros(7)}
  np.testing.assert_array_equal(group_sizes(tree), [15, 60, 7])  # bias, kernel, head
  np.testing.assert_array_equal(
    group_sizes(tree, stacked=lambda path, leaf: 1 if path[0].key == "blocks" else 0),
    [5, 5, 5, 20, 20, 20, 7],
  )
  np.testing.assert_array_equal(group_sizes(tree, group="module"), [75, 7])


def _update_stream(shapes, steps, seed):
  """Preconditioned-update-like leaves: entries of order 1, some blocks far larger."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(steps):
    out.append(
      [
        (math.exp(rng.normal(0, 1.0)) * rng.standard_normal(shape)).astype(np.float32)
        for shape in shapes
      ]
    )
  return out


@pytest.mark.parametrize("max_rms", [1.0, 0.3])
def test_block_rms_matches_optax_and_its_port(max_rms):
  shapes = [(6, 5), (5,), (2, 3, 4), (1,)]
  stream = _update_stream(shapes, 40, seed=3)
  tx = clip_by_block_rms(max_rms)
  theirs = optax.clip_by_block_rms(max_rms)
  step = jax.jit(tx.update)
  state = tx.init(stream[0])
  clipped_any = unclipped_any = False
  for updates in stream:
    ours, state = step(updates, state)
    expected_optax, _ = theirs.update(updates, theirs.init(updates))
    expected_port = adafactor_rms.clip_by_block_rms(updates, max_rms)
    for a, b, c, u in zip(ours, expected_optax, expected_port, updates):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=RTOL, atol=1e-7)
      np.testing.assert_allclose(np.asarray(a), c, rtol=RTOL, atol=1e-7)
      rms = float(np.sqrt(np.mean(np.square(u.astype(np.float64)))))
      clipped_any |= rms > max_rms
      unclipped_any |= rms < max_rms
      if rms < max_rms:
        np.testing.assert_array_equal(np.asarray(a), u)  # unchanged, bit for bit
  assert clipped_any and unclipped_any


def test_block_rms_inside_adafactor_matches_optax_adafactor():
  params = {"w": np.full((6, 4), 0.3, np.float32), "b": np.full((4,), 0.1, np.float32)}
  grads = _grad_stream(params, 30, seed=4, spikes=(10, 20), spike_factor=100.0)
  lr = 1e-2
  ours = optax.chain(
    optax.scale_by_factored_rms(min_dim_size_to_factor=2),
    clip_by_block_rms(1.0),
    optax.scale_by_learning_rate(lr, flip_sign=False),
    optax.scale_by_param_block_rms(),
    optax.scale(-1),
  )
  theirs = optax.adafactor(lr, min_dim_size_to_factor=2)
  ours_step, theirs_step = jax.jit(ours.update), jax.jit(theirs.update)
  p_ours, p_theirs = params, params
  s_ours, s_theirs = ours.init(params), theirs.init(params)
  for g in grads:
    u_ours, s_ours = ours_step(g, s_ours, p_ours)
    u_theirs, s_theirs = theirs_step(g, s_theirs, p_theirs)
    p_ours, p_theirs = optax.apply_updates(p_ours, u_ours), optax.apply_updates(p_theirs, u_theirs)
    for a, b in zip(jax.tree.leaves(u_ours), jax.tree.leaves(u_theirs)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-8)
  assert clipx.stats(s_ours)["layer"].clip_count.sum() > 0  # the clip was active
  for a, b in zip(jax.tree.leaves(p_ours), jax.tree.leaves(p_theirs)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5)


@pytest.mark.parametrize("d", [1.0, 1.5])
def test_block_rms_matches_torch_adafactor(d):
  torch = pytest.importorskip("torch", reason="torch is the `bench` extra, not installed in CI")
  rng = np.random.default_rng(5)
  shapes = [(6, 4), (4,), (3, 2, 5)]
  params = [rng.standard_normal(s).astype(np.float32) for s in shapes]
  steps = []
  for step in range(25):
    factor = 50.0 if step in (8, 9, 17) else 1.0
    steps.append(
      [torch.from_numpy(factor * rng.standard_normal(s).astype(np.float32)) for s in shapes]
    )
  records = adafactor_rms.torch_adafactor(steps, [torch.from_numpy(p) for p in params], d=d)
  tx = clip_by_block_rms(d)
  step_fn = jax.jit(tx.update)
  state = tx.init([np.zeros(s, np.float32) for s in shapes])
  decisions = []
  for record in records:
    updates = [u.numpy() for u in record["update"]]
    ours, state = step_fn(updates, state)
    clipped = np.asarray(clipx.stats(state)["layer"].clipped)
    for a, expected, denom, rms, flag in zip(
      ours, record["clipped_update"], record["denom"], record["rms"], clipped
    ):
      np.testing.assert_allclose(np.asarray(a), expected.numpy(), rtol=RTOL, atol=1e-7)
      if abs(rms / d - 1) > 1e-5:  # a decision away from rounding of the bound
        assert bool(flag) == (denom > 1)
        decisions.append(denom > 1)
  assert any(decisions) and not all(decisions)


def test_block_rms_float16_does_not_overflow_where_optax_does():
  updates = {"w": jnp.full((1000,), 300.0, jnp.float16)}  # sum of squares 9e7 > float16 max
  ours, _ = clip_by_block_rms(1.0).update(updates, clip_by_block_rms(1.0).init(updates))
  theirs, _ = optax.clip_by_block_rms(1.0).update(updates, optax.EmptyState())
  assert ours["w"].dtype == jnp.float16
  np.testing.assert_allclose(np.asarray(ours["w"], np.float32), 1.0, rtol=1e-3)
  assert not np.any(np.asarray(theirs["w"]) == 1.0)  # optax's mean of squares overflows


def test_block_rms_module_groups_and_empty_leaf():
  updates = {"a": {"kernel": jnp.full((2, 2), 2.0), "bias": jnp.zeros(4)}, "e": jnp.zeros((0, 3))}
  tx = clip_by_block_rms(1.0, group="module")
  out, _ = tx.update(updates, tx.init(updates))
  # Module "a" has 8 elements with squares summing to 16: RMS sqrt(2) -> scale 1/sqrt(2).
  np.testing.assert_allclose(np.asarray(out["a"]["kernel"]), 2 / math.sqrt(2), rtol=1e-6)
  assert out["e"].shape == (0, 3)


@pytest.mark.slow
def test_block_rms_schedule_and_policy():
  updates = {"w": jnp.full((4,), 2.0)}  # RMS 2
  tx = clip_by_block_rms(optax.linear_schedule(4.0, 1.0, 3))
  state = tx.init(updates)
  seen = []
  for _ in range(4):
    out, state = tx.update(updates, state)
    seen.append(float(out["w"][0]))
  np.testing.assert_allclose(seen, [2.0, 2.0, 2.0, 1.0], rtol=1e-6)  # max_rms 4, 3, 2, 1

  # A policy sees the RMS: its thresholds are window_zscore's on the RMS stream, times sqrt(n).
  rms = np.asarray([1.0, 2.0, 1.0, 2.0, 10.0], np.float32)
  tx = clip_by_block_rms(window_zscore(sigma=1.0, history=4, warmup_steps=4))
  state = tx.init(updates)
  for r in rms:
    _, state = tx.update({"w": jnp.full((4,), r)}, state)
  np.testing.assert_allclose(float(clipx.stats(state)["layer"].threshold[0]) / 2, 1.5 + 0.5)


# ------------------------------------------------- (c) stacked equals the unstacked twin


@pytest.mark.parametrize("group", ["leaf", "module"])
def test_block_rms_stacked_equals_unstacked_twin(group):
  layers = 4
  rng = np.random.default_rng(6)
  # Layers at very different scales, so per-layer and whole-stack blocks differ.
  scales = np.asarray([0.2, 1.0, 5.0, 30.0], np.float32)
  kernel = (scales[:, None, None] * rng.standard_normal((layers, 5, 3))).astype(np.float32)
  bias = (scales[:, None] * rng.standard_normal((layers, 3))).astype(np.float32)
  head = (3 * rng.standard_normal((3, 2))).astype(np.float32)
  stacked = {"blocks": {"kernel": kernel, "bias": bias}, "head": {"kernel": head}}
  twin = {
    "blocks": [{"kernel": kernel[i], "bias": bias[i]} for i in range(layers)],
    "head": {"kernel": head},
  }
  stacked_fn = lambda path, leaf: 1 if path[0].key == "blocks" else 0
  tx_stacked = clip_by_block_rms(1.0, group=group, stacked=stacked_fn)
  tx_twin = clip_by_block_rms(1.0, group=group)
  out_stacked, state = jax.jit(tx_stacked.update)(stacked, tx_stacked.init(stacked))
  out_twin, _ = jax.jit(tx_twin.update)(twin, tx_twin.init(twin))
  for i in range(layers):
    for name in ("kernel", "bias"):
      np.testing.assert_allclose(
        np.asarray(out_stacked["blocks"][name][i]),
        np.asarray(out_twin["blocks"][i][name]),
        rtol=1e-6,
      )
  np.testing.assert_allclose(out_stacked["head"]["kernel"], out_twin["head"]["kernel"], rtol=1e-6)
  assert np.asarray(clipx.stats(state)["layer"].clipped).sum() >= 2

  if group == "leaf":
    # levanter's scan-aware rule: optax's formula on each layer of the stack.
    per_layer = np.stack(adafactor_rms.clip_by_block_rms(list(kernel), 1.0))
    np.testing.assert_allclose(np.asarray(out_stacked["blocks"]["kernel"]), per_layer, rtol=RTOL)
    # optax's own rule treats the whole stack as one block: a different answer.
    whole, _ = optax.clip_by_block_rms(1.0).update(stacked, optax.EmptyState())
    assert not np.allclose(np.asarray(whole["blocks"]["kernel"]), per_layer)


# ----------------------------------------- (d) jit, inject_hyperparams, Orbax round trip


def test_block_rms_injectable_in_a_chain_without_recompiling():
  params = {"w": jnp.ones((3, 4)), "b": jnp.ones(4)}
  tx = optax.chain(
    optax.scale_by_adam(),
    optax.inject_hyperparams(clip_by_block_rms)(max_rms=1.0),
    optax.scale(-0.1),
  )
  state = tx.init(params)
  chex.clear_trace_counter()
  update = jax.jit(chex.assert_max_traces(tx.update, n=1))
  grads = {"w": jnp.full((3, 4), 2.0), "b": jnp.full(4, -1.0)}
  loose, state = update(grads, state, params)  # Adam's first step: entries +-1, RMS 1
  state[1].hyperparams["max_rms"] = jnp.asarray(0.25, state[1].hyperparams["max_rms"].dtype)
  tight, state = update(grads, state, params)
  np.testing.assert_allclose(np.abs(np.asarray(loose["w"])), 0.1, rtol=1e-4)
  np.testing.assert_allclose(np.abs(np.asarray(tight["w"])), 0.025, rtol=1e-4)


def test_orbax_round_trip_gives_the_identical_next_update(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint", reason="orbax-checkpoint is the `checkpoint` extra")
  params = _shapes_tree({"blocks": {"kernel": (2, 3, 4)}, "head": {"kernel": (4, 2)}})
  tx = optax.chain(
    optax.scale_by_adam(),
    clipx.clip_by_global_norm(window_zscore(sigma=1.0, history=4, warmup_steps=2)),
    clip_by_block_rms(0.5, stacked=lambda path, leaf: 1 if path[0].key == "blocks" else 0),
    optax.scale(-1e-2),
  )
  chex.clear_trace_counter()
  update = jax.jit(chex.assert_max_traces(tx.update, n=1))
  state = jax.device_put(jax.jit(tx.init)(params), jax.devices()[0])
  grads = _grad_stream(params, 7, seed=7, spikes=(4,), spike_factor=10.0)
  for g in grads[:6]:
    _, state = update(g, state, params)
  assert int(state[1].threshold_state.count) == 6

  restored = save_and_restore(ocp, state, tmp_path)

  assert jax.tree.structure(restored) == jax.tree.structure(state)
  expected = update(grads[6], state, params)
  got = update(grads[6], restored, params)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(a, b)


def test_block_rms_errors_name_it_not_the_layer_clip_it_is_built_on():
  tx = clipx.clip_by_block_rms(1.0)
  state = tx.init({"a": jnp.ones(3)})
  with pytest.raises(ValueError, match=r"^clipx\.clip_by_block_rms: updates have 2 groups"):
    tx.update({"a": jnp.ones(3), "b": jnp.ones(2)}, state)
