"""AdaGC (``clipx.presets.adagc``) against a line-by-line port of the authors' code.

The reference is ``tests.references.adagc.adagc_megatron`` (lishuai-97/AdaGC,
``megatron-gpt2.patch``, commit 32c249fa). The parity tests feed both the same
gradient stream and compare, step by step and tensor by tensor, the clip
decisions, the thresholds, the EMA states and the clipped gradients.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from orbax_roundtrip import save_and_restore
from references.adagc import adagc_megatron

import clipx
from clipx.presets import adagc

# Four tensors of different scales. Keys sort in this order, so jax's leaf order
# (and clip_by_layer_norm's group order) is the order of the reference's list.
SHAPES = {"attn": (8, 8), "bias": (8,), "embed": (16, 8), "out": (8, 4)}
SCALES = {"attn": 0.05, "bias": 0.004, "embed": 0.02, "out": 0.1}
NAMES = sorted(SHAPES)
SPIKE_EVERY = 37


def _stream(steps: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
  """Random normal gradients whose scale falls over training, with spikes.

  The global norm starts near 1.3 and falls toward 0.4 (as early training
  does), so the warm-up's global clip at 1.0 acts on some steps and not on
  others, and after warm-up some tensors are clipped and some are not. Each
  tensor's scale also jitters (log-normal, 15%) from step to step. Every
  ``SPIKE_EVERY`` steps the ``attn`` gradient is multiplied by 50.
  """
  rng = np.random.default_rng(seed)
  out = []
  for t in range(steps):
    trend = 0.4 + 1.2 * np.exp(-t / 60)
    grads = {}
    for name in NAMES:
      jitter = np.exp(0.15 * rng.standard_normal())
      noise = rng.standard_normal(SHAPES[name])
      grads[name] = (SCALES[name] * trend * jitter * noise).astype(np.float32)
    if t % SPIKE_EVERY == SPIKE_EVERY - 1:
      grads["attn"] = grads["attn"] * np.float32(50)
    out.append(grads)
  return out


def _run(tx: optax.GradientTransformation, stream) -> list[dict]:
  """Runs ``tx`` (jitted, one trace) over the stream; per step its outputs and stats."""
  chex.clear_trace_counter()
  update = jax.jit(chex.assert_max_traces(tx.update, n=1))
  state = tx.init(stream[0])
  records = []
  for grads in stream:
    out, state = update(grads, state)
    global_stats, layer_stats = state[0].stats, state[1].stats
    records.append(
      {
        "grads": [np.asarray(out[name]) for name in NAMES],
        "global_norm": float(global_stats.norm),
        "global_threshold": float(global_stats.threshold),
        "global_clipped": bool(global_stats.clipped),
        "norms": np.asarray(layer_stats.norm),
        "threshold": np.asarray(layer_stats.threshold),
        "clipped": np.asarray(layer_stats.clipped),
        "ema": np.asarray(state[1].threshold_state.ema),
      }
    )
  return records


# Tolerance of the parity tests, rtol 1e-5 (float32 has 6e-8 per rounding):
# - the warm-up clip: the reference computes max_norm / (G + eps) in float64
#   from a norm summed in float64; clipx divides float32s;
# - the EMA update: the reference weighs the new norm by float32(1 - 0.99)
#   = 0.0099999998, clipx by 1 - float32(0.99) = 0.0100000501 (so that its two
#   weights sum to exactly 1). The EMA can drift apart by up to ~5e-8 relative
#   per clipped step; over these streams the largest gap measured is ~1.4e-6.
# With eps=0 in the reference there is no other difference.
RTOL = 1e-5


def _compare(ours: list[dict], ref: list[dict], warmup_steps: int, *, eps: float) -> dict:
  """Asserts step-by-step parity; returns counts of what the stream exercised."""
  seen = {"global_clip": 0, "global_pass": 0, "tensor_clip": 0, "tensor_pass": 0}
  for t, (a, b) in enumerate(zip(ours, ref)):
    where = f"step {t}"
    np.testing.assert_allclose(a["global_norm"], b["global_norm"], rtol=1e-6, err_msg=where)
    # The per-tensor norms: after the global clip in warm-up, raw after it (both sides).
    np.testing.assert_allclose(a["norms"], b["norms"], rtol=RTOL, err_msg=where)
    if t < warmup_steps:
      assert b["phase"] == "global", where
      # Warm-up: global clipping at max_norm and no per-tensor clipping.
      assert a["global_threshold"] == 1.0, where
      assert a["global_clipped"] == bool(b["clipped"][0]), where
      assert np.all(np.isinf(a["threshold"])) and not a["clipped"].any(), where
      seen["global_clip" if a["global_clipped"] else "global_pass"] += 1
    else:
      assert b["phase"] == "adaptive", where
      # After it: no global clip; per tensor, the same decisions and thresholds ratio * EMA.
      assert np.isinf(a["global_threshold"]) and not a["global_clipped"], where
      np.testing.assert_array_equal(a["clipped"], b["clipped"], err_msg=where)
      np.testing.assert_allclose(a["threshold"], b["threshold"], rtol=RTOL, err_msg=where)
      seen["tensor_clip"] += int(a["clipped"].sum())
      seen["tensor_pass"] += int((~a["clipped"]).sum())
    # The EMA state (the running minimum during warm-up).
    np.testing.assert_allclose(a["ema"], b["ema"], rtol=RTOL, err_msg=where)
    for i, name in enumerate(NAMES):
      ref_out = b["grads"][i]
      if eps and t >= warmup_steps and b["clipped"][i]:
        # The reference scales by bound / (norm + eps), clipx by bound / norm.
        ref_out = ref_out * np.float32((b["norms"][i] + eps) / b["norms"][i])
      np.testing.assert_allclose(
        a["grads"][i], ref_out, rtol=RTOL, atol=0, err_msg=f"{where}, {name}"
      )
  return seen


@pytest.mark.parametrize(("warmup_steps", "steps"), [(20, 300), (100, 200)])
def test_parity_with_authors_code(warmup_steps, steps):
  """Same stream, eps=0 in the reference (clipx scales by threshold / norm exactly)."""
  stream = _stream(steps)
  ours = _run(adagc(warmup_steps=warmup_steps), stream)
  ref = adagc_megatron(
    [[g[name] for name in NAMES] for g in stream], start_clip_steps=warmup_steps, eps=0.0
  )
  seen = _compare(ours, ref, warmup_steps, eps=0.0)
  # The stream exercises every branch: warm-up steps clipped and not, tensors clipped and not.
  assert all(count > 0 for count in seen.values()), seen
  # Every spike after warm-up is cut in the spiking tensor.
  spikes = [t for t in range(warmup_steps, steps) if t % SPIKE_EVERY == SPIKE_EVERY - 1]
  assert spikes and all(ours[t]["clipped"][NAMES.index("attn")] for t in spikes)


def test_parity_with_reference_eps():
  """With the reference's eps=1e-6: identical decisions; outputs differ by eps / norm only.

  During warm-up the reference's global coefficient is max_norm / (G + 1e-6),
  1e-6 / G relative (G ~ 1) below clipx's; it reaches the seeds, so thresholds
  and EMAs differ by about 1e-6 relative, within RTOL. After warm-up a clipped
  tensor's output differs by the factor (norm + 1e-6) / norm, which for the
  smallest tensor here (norm ~ 5e-3) is 2e-4: _compare takes that factor out
  and checks the rest to RTOL.
  """
  warmup_steps, steps = 20, 300
  stream = _stream(steps, seed=1)
  ours = _run(adagc(warmup_steps=warmup_steps), stream)
  ref = adagc_megatron([[g[name] for name in NAMES] for g in stream], start_clip_steps=warmup_steps)
  _compare(ours, ref, warmup_steps, eps=1e-6)


@pytest.mark.parametrize("group", ["leaf", "module"])
def test_equals_hand_built_chain(group):
  """The preset is the chain of its two pieces, fused: same decisions, values to rounding."""
  ratio, decay, warmup_steps, max_norm = 1.1, 0.9, 5, 0.8

  def warmup_bound(count):
    return jnp.where(count < warmup_steps, max_norm, jnp.inf)

  hand = optax.chain(
    clipx.clip_by_global_norm(warmup_bound),
    clipx.clip_by_layer_norm(
      clipx.ema_ratio(ratio, decay, warmup_steps=warmup_steps, warmup="min"), group=group
    ),
  )
  preset = adagc(ratio, decay, warmup_steps=warmup_steps, warmup_max_norm=max_norm, group=group)
  stream = [
    {"dec": {"attn": g["attn"], "bias": g["bias"]}, "enc": {"embed": g["embed"], "out": g["out"]}}
    for g in _stream(40, seed=2)
  ]
  state_hand, state_preset = hand.init(stream[0]), preset.init(stream[0])
  assert jax.tree.structure(state_hand) == jax.tree.structure(state_preset)
  update_hand, update_preset = jax.jit(hand.update), jax.jit(preset.update)
  leaf_names = clipx.stats(state_hand).group_names["global"]
  group_names = clipx.stats(state_preset).group_names["global"]
  for grads in stream:
    out_hand, state_hand = update_hand(grads, state_hand)
    out_preset, state_preset = update_preset(grads, state_preset)
    chex.assert_trees_all_close(out_hand, out_preset, rtol=2e-6, atol=0)
    for stage, (hand_part, preset_part) in enumerate(zip(state_hand, state_preset)):
      a, b = hand_part.stats, preset_part.stats
      np.testing.assert_array_equal(a.clipped, b.clipped)
      np.testing.assert_array_equal(a.clip_count, b.clip_count)
      # A module's share of the global norm is not its largest leaf's.
      share = ("share",) if stage or group == "leaf" else ()
      for field in ("norm", "threshold", "scale", "clipped_norm", *share):
        np.testing.assert_allclose(getattr(a, field), getattr(b, field), rtol=2e-6)
      chex.assert_trees_all_close(hand_part.threshold_state, preset_part.threshold_state, rtol=2e-6)
    # The chain's global source is a leaf, the preset's a group: the one with most of the norm.
    source = group_names[int(state_preset[0].stats.source)]
    if group == "leaf":
      assert source == leaf_names[int(state_hand[0].stats.source)]
    else:
      squares = {k: sum(float(np.sum(np.square(g))) for g in v.values()) for k, v in grads.items()}
      assert source == max(squares, key=squares.get)
  assert int(state_preset[1].stats.clip_count.sum()) > 0
  assert int(state_preset[0].stats.clip_count) > 0


def test_inject_hyperparams_ratio_changes_without_recompiling():
  params = {name: np.zeros(shape, np.float32) for name, shape in SHAPES.items()}
  injected = optax.chain(
    optax.inject_hyperparams(adagc)(ratio=1.04, warmup_steps=3), optax.sgd(1.0)
  )
  plain = optax.chain(adagc(1.04, warmup_steps=3), optax.sgd(1.0))

  chex.clear_trace_counter()

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(grads, state):
    return injected.update(grads, state, params)

  stream = _stream(8, seed=4)
  plain_update = jax.jit(plain.update)
  state, plain_state = injected.init(params), plain.init(params)
  for grads in stream[:6]:
    out, state = step(grads, state)
    plain_out, plain_state = plain_update(grads, plain_state, params)
    chex.assert_trees_all_close(out, plain_out, rtol=1e-6)
  # A new ratio takes effect at the next step, from the same EMA.
  ema = np.asarray(state[0].inner_state[1].threshold_state.ema)
  state[0].hyperparams["ratio"] = jnp.asarray(3.0, jnp.float32)
  _, state = step(stream[6], state)
  layer = state[0].inner_state[1].stats
  np.testing.assert_allclose(np.asarray(layer.threshold), 3.0 * ema, rtol=1e-6)


def _stacked_tree(rng, layers=3):
  return {
    "blocks": {
      "b": rng.standard_normal((layers, 5)).astype(np.float32),
      "w": rng.standard_normal((layers, 4, 5)).astype(np.float32),
    },
    "head": rng.standard_normal((5, 2)).astype(np.float32),
  }


def _unstack(tree, layers=3):
  """The unstacked twin; its groups come in the stacked tree's group order."""
  blocks = {}
  for name in ("b", "w"):
    for layer in range(layers):
      blocks[f"{name}{layer}"] = tree["blocks"][name][layer]
  return {"blocks": blocks, "head": tree["head"]}


def test_stacked_equals_unstacked_twin():
  def under_blocks(path, leaf):
    del leaf
    return 1 if path[0].key == "blocks" else 0

  rng = np.random.default_rng(5)
  stream = []
  for t in range(12):
    tree = _stacked_tree(rng)
    if t in (8, 10):  # a spike in one layer of the stack
      tree["blocks"]["w"][1] *= 50
    stream.append(tree)
  stacked_tx, twin_tx = adagc(warmup_steps=4, stacked=under_blocks), adagc(warmup_steps=4)
  stacked_state, twin_state = stacked_tx.init(stream[0]), twin_tx.init(_unstack(stream[0]))
  stacked_update, twin_update = jax.jit(stacked_tx.update), jax.jit(twin_tx.update)
  for tree in stream:
    stacked_out, stacked_state = stacked_update(tree, stacked_state)
    twin_out, twin_state = twin_update(_unstack(tree), twin_state)
    chex.assert_trees_all_close(_unstack(stacked_out), twin_out, rtol=1e-6)
    for field in ("threshold_state",):
      chex.assert_trees_all_close(
        getattr(stacked_state[1], field), getattr(twin_state[1], field), rtol=1e-6
      )
    np.testing.assert_array_equal(stacked_state[1].stats.clipped, twin_state[1].stats.clipped)
  # The spiking layer, w[1] (group 4: b[0..2], w[0], w[1], ...), was clipped.
  assert int(stacked_state[1].stats.clip_count[4]) >= 2


def test_orbax_round_trip_gives_identical_next_update(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint", reason="orbax-checkpoint is the `checkpoint` extra")
  tx = optax.chain(adagc(warmup_steps=3), optax.adam(1e-3))
  stream = _stream(8, seed=6)
  params = jax.tree.map(np.zeros_like, stream[0])
  chex.clear_trace_counter()
  update = jax.jit(chex.assert_max_traces(tx.update, n=1))
  # Committed to a device, as Orbax restores it, so the restored state does not retrace.
  state = jax.device_put(jax.jit(tx.init)(params), jax.devices()[0])
  for grads in stream[:6]:
    _, state = update(grads, state, params)
  assert int(state[0][1].stats.clip_count.sum()) > 0  # the EMA is in use
  restored = save_and_restore(ocp, state, tmp_path)
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  expected, expected_state = update(stream[6], state, params)
  got, got_state = update(stream[6], restored, params)
  chex.assert_trees_all_equal(got, expected)
  chex.assert_trees_all_equal(got_state, expected_state)


# ---------------------------------------------------------------- ema_ratio(warmup="min")


def test_ema_ratio_min_warmup_seeds_with_the_minimum():
  policy = clipx.ema_ratio(2.0, 0.5, warmup_steps=3, warmup="min")
  update = jax.jit(policy.update)
  state = policy.init(jnp.zeros(2))
  # Zero and non-finite norms are not recorded, so they neither seed nor lower the minimum.
  for norm in ([0.0, 4.0], [3.0, np.nan], [5.0, 2.0], [2.5, 6.0]):
    threshold, state = update(jnp.asarray(norm, jnp.float32), state)
    assert np.all(np.isinf(threshold))
  np.testing.assert_array_equal(state.count, [3, 3])
  np.testing.assert_array_equal(state.ema, [2.5, 2.0])
  threshold, state = update(jnp.asarray([100.0, 1.0], jnp.float32), state)
  np.testing.assert_array_equal(threshold, [5.0, 4.0])
  np.testing.assert_allclose(state.ema, [0.5 * 2.5 + 0.5 * 5.0, 0.5 * 2.0 + 0.5 * 1.0])


def test_ema_ratio_default_warmup_is_still_the_mean():
  for policy in (clipx.ema_ratio(warmup_steps=2), clipx.ema_ratio(warmup_steps=2, warmup="mean")):
    state = policy.init(jnp.zeros(()))
    for norm in (1.0, 3.0):
      _, state = policy.update(jnp.float32(norm), state)
    assert float(state.ema) == 2.0


@pytest.mark.parametrize(
  ("make", "error", "match"),
  [
    (lambda: clipx.ema_ratio(warmup="max"), ValueError, "ema_ratio: warmup must be 'mean' or"),
    (lambda: clipx.ema_ratio(warmup=None), TypeError, "ema_ratio: warmup"),
    (lambda: adagc(ratio=1.0), ValueError, "adagc: ratio"),
    (lambda: adagc(decay=1.0), ValueError, "adagc: decay"),
    (lambda: adagc(warmup_steps=0), ValueError, "adagc: warmup_steps"),
    (lambda: adagc(warmup_steps=10.0), TypeError, "adagc: warmup_steps"),
    (lambda: adagc(warmup_max_norm=0.0), ValueError, "adagc: warmup_max_norm"),
    (lambda: adagc(warmup_max_norm=float("nan")), ValueError, "adagc: warmup_max_norm"),
    (lambda: adagc(group="layer"), ValueError, "adagc: group"),
    (lambda: adagc(stacked=-1), ValueError, "adagc: stacked"),
  ],
)
def test_bad_arguments_fail_at_construction(make, error, match):
  with pytest.raises(error, match=match):
    make()


def test_zero_norm_in_warmup_deviation():
  """The documented deviation: the reference records a zero norm and zeroes that tensor for good.

  clipx does not record it, so the tensor is clipped by the EMA of its real norms.
  """
  rng = np.random.default_rng(7)
  stream = [{"a": rng.standard_normal(4).astype(np.float32) * 0.1} for _ in range(6)]
  stream[1] = {"a": np.zeros(4, np.float32)}  # e.g. a frozen or unused tensor on one step
  ref = adagc_megatron([[g["a"]] for g in stream], start_clip_steps=3)
  assert ref[-1]["ema"][0] == 0 and not np.any(ref[-1]["grads"][0])
  ours = _run_single(adagc(warmup_steps=3), stream)
  assert ours[-1] > 0 and np.any(ours[-2])


def _run_single(tx, stream):
  state, update, outs = tx.init(stream[0]), jax.jit(tx.update), []
  for grads in stream:
    out, state = update(grads, state)
    outs.append(np.asarray(out["a"]))
  outs.append(float(state[1].threshold_state.ema[0]))
  return outs
