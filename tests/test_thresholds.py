"""Adaptive threshold policies and skip_spikes against reference computations.

Each policy is run over a synthetic norm stream (with spikes, NaN, Inf and a
zero) and compared step by step with an independent float64 implementation:
np.percentile of the window for autoclip, a transcription of the authors'
loops for zclip and OLMo's ratio clipping, the geometric update of Andrew et
al. for quantile.
"""

import math
import pickle

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import clipx

INF = math.inf


def _stream(steps=80, groups=(), seed=0, spikes=(40, 61), bad=True):
  """Log-normal norms around 1 with 100x spikes, and (optionally) NaN, Inf and 0."""
  rng = np.random.default_rng(seed)
  norms = np.exp(rng.normal(0.0, 0.3, (steps,) + groups)).astype(np.float32)
  for step in spikes:
    norms[step] *= 100
  if bad:
    norms[33] = np.nan
    norms[47] = np.inf
    norms[52] = 0.0
  return norms


def _run(policy, norms):
  """Thresholds and the state after every step, from one lax.scan."""
  norms = jnp.asarray(norms)

  def body(state, norm):
    threshold, state = policy.update(norm, state)
    return state, (threshold, state)

  _, (thresholds, states) = jax.lax.scan(body, policy.init(jnp.zeros(norms.shape[1:])), norms)
  return np.asarray(thresholds, np.float64), jax.tree.map(np.asarray, states)


def _recordable(x) -> bool:
  return bool(np.isfinite(x)) and x != 0


# ---------------------------------------------------------------- construction


@pytest.mark.parametrize(
  "make",
  [
    lambda: clipx.autoclip(percentile=0.0),
    lambda: clipx.autoclip(percentile=100.5),
    lambda: clipx.autoclip(percentile=float("nan")),
    lambda: clipx.autoclip(history=0),
    lambda: clipx.autoclip(history=2.5),
    lambda: clipx.autoclip(warmup_steps=0),
    lambda: clipx.autoclip(initial=0.0),
    lambda: clipx.zclip(z_threshold=0.0),
    lambda: clipx.zclip(z_threshold=-1.0),
    lambda: clipx.zclip(alpha=1.0),
    lambda: clipx.zclip(alpha=0.0),
    lambda: clipx.zclip(warmup_steps=0),
    lambda: clipx.zclip(mode="zscore"),
    lambda: clipx.zclip(initial=-1.0),
    lambda: clipx.ema_ratio(ratio=1.0),
    lambda: clipx.ema_ratio(ratio=0.5),
    lambda: clipx.ema_ratio(decay=1.5),
    lambda: clipx.ema_ratio(warmup_steps=-1),
    lambda: clipx.quantile(target_quantile=0.0),
    lambda: clipx.quantile(target_quantile=1.0),
    lambda: clipx.quantile(learning_rate=0.0),
    lambda: clipx.quantile(initial=float("inf")),
    lambda: clipx.quantile(initial=0.0),
    lambda: clipx.skip_spikes(optax.sgd(0.1), factor=1.0),
    lambda: clipx.skip_spikes(optax.sgd(0.1), decay=1.0),
  ],
)
def test_bad_arguments_fail_at_construction(make):
  with pytest.raises((ValueError, TypeError), match="clipx"):
    make()


# ---------------------------------------------------------------- autoclip


@pytest.mark.parametrize("percentile", [10.0, 37.5, 100.0])
def test_autoclip_is_np_percentile_of_the_window(percentile):
  history, warmup = 16, 5
  norms = _stream()
  thresholds, _ = _run(clipx.autoclip(percentile, history, warmup_steps=warmup, initial=7.0), norms)
  recorded = []
  for step, norm in enumerate(norms):
    if len(recorded) < warmup:
      expected = 7.0
    else:
      expected = np.percentile(np.asarray(recorded[-history:], np.float64), percentile)
    np.testing.assert_allclose(thresholds[step], expected, rtol=1e-6, err_msg=f"step {step}")
    if _recordable(norm):
      recorded.append(norm)
  assert len(recorded) > history + warmup  # the ring buffer wrapped around


def test_autoclip_per_group_keeps_separate_windows():
  history, warmup = 8, 3
  norms = _stream(groups=(3,)) * np.array([1.0, 1e-3, 50.0], np.float32)
  norms[20, 1] = np.nan  # a bad value in one group only
  thresholds, _ = _run(clipx.autoclip(25.0, history, warmup_steps=warmup), norms)
  for group in range(3):
    recorded = []
    for step, norm in enumerate(norms[:, group]):
      if len(recorded) >= warmup:
        expected = np.percentile(np.asarray(recorded[-history:], np.float64), 25.0)
        np.testing.assert_allclose(thresholds[step, group], expected, rtol=1e-6)
      else:
        assert thresholds[step, group] == INF
      if _recordable(norm):
        recorded.append(norm)


# ---------------------------------------------------------------- zclip


def _zclip_reference(norms, z_t, alpha, warmup, mode):
  """The authors' loop (warm-up buffer, then EMA of the clipped norm), in float64."""
  buffer, mean, var = [], None, None
  rows = []
  for x in np.asarray(norms, np.float64):
    if mean is None:
      threshold = INF
      if _recordable(x):
        buffer.append(x)
        if len(buffer) == warmup:
          mean, var = np.mean(buffer), np.var(buffer)
    else:
      std = math.sqrt(var)
      bound = mean + z_t * std
      z = (x - mean) / std if std > 0 else (INF if x > mean else 0.0)
      if z > z_t:
        threshold = mean + z_t * std / (z / z_t) if mode == "reciprocal" else bound
      else:
        threshold = bound
      if _recordable(x):
        clipped = min(x, threshold)
        mean = alpha * mean + (1 - alpha) * clipped
        var = alpha * var + (1 - alpha) * (clipped - mean) ** 2
    rows.append((threshold, np.nan if mean is None else mean, np.nan if var is None else var))
  return np.asarray(rows)


@pytest.mark.parametrize("mode", ["reciprocal", "clip_to_max"])
def test_zclip_matches_reference_loop(mode):
  warmup = 10
  norms = _stream()
  thresholds, states = _run(clipx.zclip(2.5, 0.9, warmup, mode), norms)
  reference = _zclip_reference(norms, 2.5, 0.9, warmup, mode)
  np.testing.assert_allclose(thresholds, reference[:, 0], rtol=2e-5)
  warm = ~np.isnan(reference[:, 1])
  np.testing.assert_allclose(states.mean[warm], reference[warm, 1], rtol=2e-5)
  np.testing.assert_allclose(states.var[warm], reference[warm, 2], rtol=2e-4)
  assert states.count[-1] == sum(_recordable(x) for x in norms)


@pytest.mark.parametrize("mode", ["clip_to_max", "reciprocal"])
def test_zclip_spike_is_clipped_and_moves_stats_only_as_its_clipped_value(mode):
  policy = clipx.zclip(z_threshold=2.5, alpha=0.97, warmup_steps=25, mode=mode)
  quiet = _stream(steps=40, spikes=(), bad=False)
  _, states = _run(policy, quiet)
  state = jax.tree.map(lambda x: jnp.asarray(x[-1]), states)
  mean, std = float(state.mean), math.sqrt(float(state.var))
  spike = 100.0 * float(quiet[-1])

  # Through the transform: the spike's gradient comes out at the bound.
  tx = clipx.clip_by_global_norm(policy)
  tx_state = clipx.GlobalNormClipState(tx.init({"w": jnp.zeros(2)}).stats, state)
  grad = {"w": jnp.array([0.6, 0.8]) * spike}
  clipped, tx_state = jax.jit(tx.update)(grad, tx_state)
  if mode == "clip_to_max":
    expected = mean + 2.5 * std
  else:
    expected = mean + 2.5**2 * std / ((spike - mean) / std)
  np.testing.assert_allclose(np.linalg.norm(clipped["w"]), expected, rtol=1e-5)
  np.testing.assert_allclose(float(tx_state.stats.threshold), expected, rtol=1e-5)

  # The statistics moved exactly as if the clipped norm had been observed.
  _, as_if_clipped = jax.jit(policy.update)(jnp.float32(expected), state)
  chex.assert_trees_all_close(tx_state.threshold_state, as_if_clipped, rtol=1e-5)
  assert float(tx_state.threshold_state.mean) < mean + 2.5 * std


def test_zclip_per_group_matches_one_policy_per_group():
  policy = clipx.zclip(warmup_steps=5)
  norms = _stream(groups=(3,)) * np.array([1.0, 1e-4, 30.0], np.float32)
  thresholds, states = _run(policy, norms)
  for group in range(3):
    alone, alone_states = _run(policy, norms[:, group])
    np.testing.assert_allclose(thresholds[:, group], alone, rtol=1e-6)
    np.testing.assert_allclose(states.mean[:, group], alone_states.mean, rtol=1e-6)


# ---------------------------------------------------------------- ema_ratio


def test_ema_ratio_matches_reference_loop():
  ratio, decay, warmup = 1.5, 0.9, 4
  norms = _stream()
  thresholds, states = _run(clipx.ema_ratio(ratio, decay, warmup_steps=warmup), norms)
  recorded, ema = [], None
  for step, x in enumerate(np.asarray(norms, np.float64)):
    threshold = INF if ema is None else ratio * ema
    np.testing.assert_allclose(thresholds[step], threshold, rtol=1e-5, err_msg=f"step {step}")
    if _recordable(x):
      if ema is None:
        recorded.append(x)
        if len(recorded) == warmup:
          ema = np.mean(recorded)
      else:
        ema = decay * ema + (1 - decay) * min(x, threshold)
    if ema is not None:
      np.testing.assert_allclose(states.ema[step], ema, rtol=1e-5)


# ---------------------------------------------------------------- quantile


def test_quantile_matches_geometric_update_and_settles_on_the_target():
  target, lr = 0.8, 0.05
  rng = np.random.default_rng(1)
  norms = np.exp(rng.normal(0.0, 0.5, 3000)).astype(np.float32)
  norms[10] = np.nan
  thresholds, states = _run(clipx.quantile(target, lr, initial=0.1), norms)
  estimate, expected = 0.1, []
  for x in norms:
    expected.append(estimate)
    if np.isfinite(x):
      estimate = estimate * math.exp(-lr * (float(x <= estimate) - target))
  np.testing.assert_allclose(thresholds, expected, rtol=1e-4)
  np.testing.assert_allclose(states.threshold[-1], estimate, rtol=1e-4)
  # Over the second half the unclipped fraction is the target.
  late = slice(1500, None)
  assert abs(np.mean(norms[late] <= thresholds[late]) - target) < 0.03


def test_quantile_batch_of_per_example_norms():
  policy = clipx.quantile(target_quantile=0.25, learning_rate=0.2, initial=1.0)
  update = jax.jit(policy.update)
  state = policy.init(jnp.zeros((2,)))  # two groups
  per_example = jnp.array(
    [[0.5, 3.0], [0.9, 0.2], [2.0, jnp.nan], [4.0, 5.0]], jnp.float32
  )  # (batch=4, groups=2)
  threshold, new_state = update(per_example, state)
  assert threshold.shape == (2,)
  np.testing.assert_array_equal(threshold, [1.0, 1.0])  # this step clips with the old one
  unclipped = np.array([2 / 4, 1 / 3])  # group 1: the NaN example is left out
  np.testing.assert_allclose(new_state.threshold, np.exp(-0.2 * (unclipped - 0.25)), rtol=1e-6)
  # A batch with no finite norm does not move the threshold.
  _, same = update(jnp.full((3, 2), jnp.nan), new_state)
  np.testing.assert_array_equal(same.threshold, new_state.threshold)
  with pytest.raises(ValueError, match="leading batch axis"):
    update(jnp.zeros((2, 2, 2)), state)


def test_quantile_never_collapses_to_zero():
  policy = clipx.quantile(target_quantile=0.5, learning_rate=1.0, initial=1.0)
  zeros = np.zeros(300, np.float32)  # every norm unclipped: the threshold only falls
  _, states = _run(policy, np.concatenate([zeros, np.ones(300, np.float32)]))
  assert states.threshold.min() > 0
  np.testing.assert_allclose(states.threshold[-1], 1.0, rtol=0.7)  # and it recovers


# ---------------------------------------------------------------- shared behaviour


POLICIES = {
  "autoclip": lambda: clipx.autoclip(20.0, history=8, warmup_steps=3),
  "zclip": lambda: clipx.zclip(warmup_steps=3),
  "ema_ratio": lambda: clipx.ema_ratio(warmup_steps=3),
  "quantile": lambda: clipx.quantile(),
}


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_non_finite_norms_do_not_touch_the_statistics(name):
  policy = POLICIES[name]()
  norms = _stream(steps=30, spikes=(), bad=False)
  bad = norms.copy()
  bad[[5, 12, 20]] = [np.nan, np.inf, -np.inf]
  _, clean_states = _run(policy, np.delete(norms, [5, 12, 20]))
  _, bad_states = _run(policy, bad)
  final = jax.tree.map(lambda x: x[-1], bad_states)
  chex.assert_trees_all_close(final, jax.tree.map(lambda x: x[-1], clean_states), rtol=1e-6)
  assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(final))


def test_checkpoint_round_trip_gives_the_same_next_update(tmp_path):
  # Every policy in one optimizer (per layer and global), so one compilation.
  tx = optax.chain(
    clipx.clip_by_layer_norm(POLICIES["autoclip"]()),
    clipx.clip_by_global_norm(POLICIES["zclip"]()),
    clipx.clip_by_layer_norm(POLICIES["ema_ratio"]()),
    clipx.clip_by_global_norm(POLICIES["quantile"]()),
    optax.sgd(0.1, momentum=0.9),
  )
  params = {"a": jnp.ones((3, 2)), "b": jnp.ones(4)}
  update = jax.jit(tx.update)
  state = tx.init(params)
  rng = np.random.default_rng(0)
  grads = [
    jax.tree.map(lambda p, s=s: jnp.asarray(rng.normal(size=p.shape) * s, p.dtype), params)
    for s in [1.0, 2.0, 0.5, 1.5, 1.0, 0.7, 50.0]
  ]
  for grad in grads[:-1]:
    _, state = update(grad, state, params)

  leaves, treedef = jax.tree_util.tree_flatten(state)
  np.savez(tmp_path / "ckpt.npz", *[np.asarray(x) for x in leaves])
  with np.load(tmp_path / "ckpt.npz") as saved:
    restored = jax.tree_util.tree_unflatten(
      treedef, [saved[f"arr_{i}"] for i in range(len(leaves))]
    )
  restored = pickle.loads(pickle.dumps(restored))

  expected_updates, expected_state = update(grads[-1], state, params)
  updates, new_state = update(grads[-1], restored, params)
  chex.assert_trees_all_equal(updates, expected_updates)
  chex.assert_trees_all_equal(new_state, expected_state)
  assert np.all(clipx.stats(new_state)["layer"].clipped)  # autoclip cut the spike


def test_states_can_be_donated_to_jit():
  # Training loops donate the optimizer state; a state holding one buffer
  # twice fails there ("Attempt to donate the same buffer twice").
  tx = optax.chain(*[clipx.clip_by_global_norm(make()) for make in POLICIES.values()])
  params = {"w": jnp.ones(3)}
  update = jax.jit(tx.update, donate_argnums=1)
  state = tx.init(params)
  for _ in range(2):
    _, state = update({"w": jnp.ones(3)}, state, params)
  jax.block_until_ready(state)


def test_hyperparameters_change_at_run_time_without_retracing():
  # history is injected too: a traced value, while the window length comes from the state.
  def make(percentile, z_threshold, history):
    return optax.chain(
      clipx.clip_by_global_norm(clipx.autoclip(percentile, history=history, warmup_steps=2)),
      clipx.clip_by_global_norm(clipx.zclip(z_threshold, warmup_steps=2)),
    )

  tx = optax.inject_hyperparams(make)(percentile=10.0, z_threshold=2.5, history=4)
  params = {"w": jnp.zeros(3)}

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(grad, state):
    return tx.update(grad, state, params)

  state = tx.init(params)
  recorded = []
  for scale in [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]:
    _, state = step({"w": jnp.array([0.0, 0.6, 0.8]) * scale}, state)
    recorded.append(scale)
  state.hyperparams["percentile"] = jnp.asarray(90.0, jnp.float32)
  state.hyperparams["z_threshold"] = jnp.asarray(0.5, jnp.float32)
  zclip_before = state.inner_state[1].threshold_state
  _, state = step({"w": jnp.array([0.0, 0.6, 0.8]) * 7.0}, state)
  report = clipx.stats(state)
  first = np.percentile(recorded[-4:], 90.0)
  np.testing.assert_allclose(float(report["global"].threshold), first, rtol=1e-6)
  # The second clip sees the norm left by the first; its bound uses the new z.
  mean, var = float(zclip_before.mean), float(zclip_before.var)
  assert first > mean + 0.5 * math.sqrt(var)  # a spike at z = 0.5 (it was not at 2.5)
  expected = mean + 0.5**2 * var / (first - mean)  # reciprocal
  np.testing.assert_allclose(float(report["global.1"].threshold), expected, rtol=1e-5)


# ---------------------------------------------------------------- skip_spikes


def test_skip_spikes_skips_a_spike_and_leaves_the_inner_state_alone():
  factor, decay, warmup = 3.0, 0.9, 5
  tx = clipx.skip_spikes(
    optax.sgd(0.1, momentum=0.9), factor=factor, decay=decay, warmup_steps=warmup
  )
  params = {"w": jnp.zeros(2)}
  update = jax.jit(tx.update)
  state = tx.init(params)
  norms = [1.0, 1.2, 0.8, 1.1, 0.9, 1.0, 50.0, 1.0, np.nan, 1.3, 40.0]
  ema, count, skips = 0.0, 0, 0
  for norm in norms:
    grad = {"w": jnp.array([0.6, 0.8], jnp.float32) * norm}
    debiased = ema / (1 - decay**count) if count else np.nan
    threshold = factor * debiased if count >= warmup else INF
    keep = bool(np.isfinite(norm)) and norm <= threshold
    updates, new_state = update(grad, state, params)
    report = clipx.stats(new_state)["skip_spikes"]
    np.testing.assert_allclose(float(report.threshold), threshold, rtol=1e-5)
    assert bool(report.skipped) == (not keep)
    if keep:
      ema, count = decay * ema + (1 - decay) * norm, count + 1
      assert float(jnp.abs(updates["w"]).sum()) > 0
    else:
      skips += 1
      chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, grad))
      chex.assert_trees_all_equal(new_state.inner_state, state.inner_state)
    np.testing.assert_allclose(float(new_state.ema), ema, rtol=1e-5)
    assert int(report.skip_count) == skips
    state = new_state
  assert skips == 3  # the two spikes after warm-up and the NaN
