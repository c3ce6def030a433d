"""Policies and wrappers never end in a bad state; statistics are pytrees.

Each test drives a policy or wrapper into a corner that used to leave it stuck
(skipping forever, a threshold decayed to nothing, a NaN in the state) and
checks the numbers against the rule written out here.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import clipx

# ---------------------------------------------------------------- skip_spikes warm-up 0


def test_skip_spikes_without_warmup_applies_the_first_steps():
  tx = clipx.skip_spikes(optax.sgd(1.0), factor=2.0, decay=0.5, warmup_steps=0)
  params = {"w": jnp.zeros(2)}
  state = tx.init(params)
  step = jax.jit(tx.update)
  norms = [5.0, 5.0, 5.0, 100.0, 5.0]
  skipped = []
  for norm in norms:
    updates, state = step({"w": jnp.asarray([norm, 0.0])}, state, params)
    skipped.append(bool(clipx.stats(state)["skip_spikes"].skipped))
  # Step 1: no statistics yet, so no spike test; after it, 100 > 2 * 5 is a spike.
  assert skipped == [False, False, False, True, False]
  assert int(clipx.stats(state)["skip_spikes"].skip_count) == 1


# ---------------------------------------------------------------- quantile with frozen layers


def test_quantile_per_layer_ignores_zero_norms_of_a_frozen_layer():
  tx = clipx.clip_by_layer_norm(clipx.quantile(target_quantile=0.5, learning_rate=0.2, initial=1.0))
  params = {"frozen": jnp.zeros(3), "live": jnp.zeros(3)}
  state = tx.init(params)
  step = jax.jit(tx.update)
  for _ in range(300):  # the frozen layer gets exactly zero gradients
    _, state = step({"frozen": jnp.zeros(3), "live": jnp.full(3, 0.5)}, state, params)
  frozen_threshold = float(clipx.stats(state)["layer"].threshold[0])
  assert frozen_threshold == 1.0  # untouched: zero norms are not recorded
  out, state = step(
    {"frozen": jnp.asarray([0.3, 0.4, 0.0]), "live": jnp.full(3, 0.5)}, state, params
  )
  np.testing.assert_allclose(np.asarray(out["frozen"]), [0.3, 0.4, 0.0])  # norm 0.5 < 1


def test_quantile_leaves_zero_per_example_norms_out_of_the_fraction():
  policy = clipx.quantile(target_quantile=0.5, learning_rate=0.2, initial=1.0)
  state = policy.init(jnp.zeros(()))
  # Two real examples, one clipped and one not (b = 0.5 = target), two padding zeros.
  _, state = policy.update(jnp.asarray([0.5, 2.0, 0.0, 0.0]), state)
  assert float(state.threshold) == 1.0


# ---------------------------------------------------------------- zclip with z = inf


@pytest.mark.parametrize("mode", ["reciprocal", "clip_to_max"])
def test_zclip_with_infinite_z_never_clips_and_keeps_a_finite_state(mode):
  policy = clipx.zclip(z_threshold=float("inf"), alpha=0.9, warmup_steps=3, mode=mode)
  state = policy.init(jnp.zeros(()))
  update = jax.jit(policy.update)
  for norm in [2.0] * 10 + [50.0, 2.0]:  # steady norms: std 0
    threshold, state = update(jnp.float32(norm), state)
    assert np.isfinite(float(state.mean)) and np.isfinite(float(state.var))
  assert np.isinf(float(threshold))
  # The mean follows the unclipped norms: EMA of 10 x 2, 50, 2 with alpha 0.9.
  mean = 2.0
  for norm in [50.0, 2.0]:
    mean = 0.9 * mean + 0.1 * norm
  np.testing.assert_allclose(float(state.mean), mean, rtol=1e-6)


# ---------------------------------------------------------------- max_threshold


@pytest.mark.parametrize(
  "make",
  [
    lambda cap: clipx.autoclip(warmup_steps=3, max_threshold=cap),
    lambda cap: clipx.zclip(warmup_steps=3, max_threshold=cap),
    lambda cap: clipx.ema_ratio(warmup_steps=3, max_threshold=cap),
    lambda cap: clipx.quantile(initial=5.0, max_threshold=cap),
  ],
)
def test_max_threshold_caps_every_step_including_warmup(make):
  cap = 0.75
  policy = make(cap)
  state = policy.init(jnp.zeros(()))
  update = jax.jit(policy.update)
  rng = np.random.default_rng(0)
  thresholds = []
  for norm in rng.uniform(0.5, 3.0, 40):
    threshold, state = update(jnp.float32(norm), state)
    thresholds.append(float(threshold))
  assert max(thresholds) <= cap
  assert thresholds[0] == cap  # warm-up (or the initial threshold) is capped too


def test_zclip_max_threshold_matches_a_hand_computed_run():
  # With the cap below every norm, every step is clipped to the cap; the
  # statistics (after warm-up) see the norm clipped by the adaptive threshold
  # alone, never the cap, as the authors' ZClip feeds its EMA
  # (tests/test_zclip_reference.py checks a longer run against their code).
  policy = clipx.zclip(alpha=0.5, warmup_steps=2, mode="clip_to_max", max_threshold=1.0)
  state = policy.init(jnp.zeros(()))
  norms = [3.0, 5.0, 4.0, 20.0]
  thresholds = []
  for norm in norms:
    threshold, state = policy.update(jnp.float32(norm), state)
    thresholds.append(float(threshold))
  assert thresholds == [1.0, 1.0, 1.0, 1.0]
  mean, var = 4.0, 1.0  # warm-up: mean and population variance of 3 and 5
  for norm in norms[2:]:  # 4 is within the bound, 20 is a spike held to it
    fed = min(norm, mean + 2.5 * var**0.5)
    mean = 0.5 * mean + 0.5 * fed
    var = 0.5 * var + 0.5 * (fed - mean) ** 2
  np.testing.assert_allclose([float(state.mean), float(state.var)], [mean, var], rtol=1e-6)


# ---------------------------------------------------------------- MultiSteps


@pytest.mark.parametrize("wrapper", [clipx.skip_nonfinite, clipx.skip_spikes])
def test_skip_wrapping_multisteps_survives_a_nan_minibatch(wrapper):
  inner = optax.chain(clipx.clip_by_global_norm(10.0), optax.sgd(0.1))
  tx = wrapper(optax.MultiSteps(inner, every_k_schedule=2).gradient_transformation())
  params = {"w": jnp.zeros(2)}
  state = tx.init(params)
  step = jax.jit(tx.update)
  batches = [[1.0, 1.0], [np.nan, 1.0], [3.0, 1.0], [1.0, 1.0], [1.0, 3.0]]
  applied = []
  for g in batches:
    updates, state = step({"w": jnp.asarray(g)}, state, params)
    applied.append(np.asarray(updates["w"]))
  # The NaN mini-batch is skipped before accumulation: batches 1 and 3 form the
  # first accumulated step (mean [2, 1]), 4 and 5 the second (mean [1, 2]).
  np.testing.assert_allclose(applied[2], [-0.2, -0.1], rtol=1e-6)
  np.testing.assert_allclose(applied[4], [-0.1, -0.2], rtol=1e-6)
  for i in (0, 1, 3):
    np.testing.assert_array_equal(applied[i], [0.0, 0.0])


def test_stats_warn_about_a_skip_wrapper_inside_multisteps():
  tx = optax.MultiSteps(clipx.skip_nonfinite(optax.sgd(0.1)), every_k_schedule=2)
  state = tx.init({"w": jnp.zeros(2)})
  with pytest.warns(UserWarning, match="MultiSteps"):
    clipx.stats(state)
  right = clipx.skip_nonfinite(optax.MultiSteps(optax.sgd(0.1), 2).gradient_transformation())
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    clipx.stats(right.init({"w": jnp.zeros(2)}))


# ---------------------------------------------------------------- statistics as pytrees


def test_stats_report_is_returned_from_a_jitted_step():
  tx = clipx.skip_nonfinite(
    optax.chain(clipx.clip_by_global_norm(1.0), clipx.clip_by_layer_norm(0.5), optax.sgd(0.1))
  )
  params = {"a": jnp.ones(3), "b": jnp.ones(2)}

  @jax.jit
  def step(grads, state):
    updates, state = tx.update(grads, state, params)
    return updates, state, clipx.stats(state)

  _, _, report = step({"a": jnp.full(3, 2.0), "b": jnp.full(2, jnp.nan)}, tx.init(params))
  assert isinstance(report, clipx.StatsReport)
  assert list(report) == ["skip_nonfinite", "global", "layer"]
  assert int(report["skip_nonfinite"].nonfinite_leaf) == 1  # leaf order: a, b
  host = jax.device_get(report)
  assert isinstance(host, clipx.StatsReport)
  assert isinstance(host["global"].norm, np.ndarray)
  doubled = jax.tree.map(lambda x: x * 2, report)
  assert isinstance(doubled, clipx.StatsReport)
  assert int(doubled["skip_nonfinite"].skip_count) == 2
  # The skipped step left the inner state, and so its stats, as initialised.
  assert float(report["layer"].threshold[0]) == 0.0
  flat = host.as_dict()
  assert flat["clip/skip_nonfinite/skipped"] == 1.0
  assert flat["clip/skip_nonfinite/nonfinite_leaf"] == 1.0
  # Printed, the report names the leaf by its path.
  assert "skip_nonfinite: skipped=True, skip_count=1, nonfinite_leaf=b" in str(report)
  assert report.source_paths()["skip_nonfinite"] == "b"


def test_skip_nonfinite_stats_on_a_finite_step():
  tx = clipx.skip_nonfinite(optax.sgd(0.1))
  params = {"w": jnp.ones(2)}
  _, state = tx.update({"w": jnp.ones(2)}, tx.init(params), params)
  report = clipx.stats(state)["skip_nonfinite"]
  assert report._fields == ("skipped", "skip_count", "nonfinite_leaf", "nonfinite_device")
  assert (bool(report.skipped), int(report.skip_count), int(report.nonfinite_leaf)) == (
    False,
    0,
    -1,
  )
