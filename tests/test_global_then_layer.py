"""``clip_by_global_then_layer_norm``: the chain of a global and a per-group clip, in one pass."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import clipx


def _tree(seed: int, scale: float = 1.0) -> dict:
  rng = np.random.default_rng(seed)
  shapes = {"a": (6, 5), "b": (5,), "c": (3, 4, 2), "d": (7,)}
  return {k: (scale * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}


def test_both_clips_on_one_step_match_numpy():
  grads = _tree(0)
  grads["c"] = grads["c"] * np.float32(8)  # one large leaf: clipped after the global clip too
  global_max, layer_max = 3.0, 0.9
  tx = clipx.clip_by_global_then_layer_norm(global_max, layer_max)
  out, state = jax.jit(tx.update)(grads, tx.init(grads))
  norms = {k: np.linalg.norm(v.astype(np.float64)) for k, v in grads.items()}
  total = np.sqrt(sum(n**2 for n in norms.values()))
  s = min(1.0, global_max / total)
  assert s < 1
  clipped = []
  for k, g in grads.items():
    t = min(1.0, layer_max / (norms[k] * s))
    clipped.append(t < 1)
    np.testing.assert_allclose(out[k], g * s * t, rtol=2e-6, err_msg=k)
  assert 0 < sum(clipped) < len(grads)  # some leaves clipped twice, some once
  np.testing.assert_allclose(state[0].stats.norm, total, rtol=1e-6)
  np.testing.assert_allclose(state[1].stats.norm, [norms[k] * s for k in grads], rtol=2e-6)
  np.testing.assert_array_equal(state[1].stats.clipped, clipped)


def _blocks_stacked(path, leaf) -> int:
  return 1 if jax.tree_util.keystr(path) == "['blocks']" else 0


@pytest.mark.slow
@pytest.mark.parametrize("stacked", [None, _blocks_stacked])
def test_equals_the_chain_with_adaptive_policies(stacked):
  """zclip globally and ema_ratio per layer (separate EMAs per stacked layer) over 25 steps."""

  def make(fused: bool):
    global_policy = clipx.zclip(warmup_steps=3)
    layer_policy = clipx.ema_ratio(1.2, 0.9, warmup_steps=3)
    if fused:
      return clipx.clip_by_global_then_layer_norm(global_policy, layer_policy, stacked=stacked)
    return optax.chain(
      clipx.clip_by_global_norm(global_policy),
      clipx.clip_by_layer_norm(layer_policy, stacked=stacked),
    )

  rng = np.random.default_rng(3)
  stream = []
  for t in range(25):
    grads = {"blocks": (rng.standard_normal((4, 6, 3)) * (1 + t % 3)).astype(np.float32)}
    grads["head"] = rng.standard_normal((5,)).astype(np.float32)
    if t % 7 == 6:
      grads["blocks"][2] *= 30  # a spike in one layer of the stack
    stream.append(grads)
  chain, fused = make(False), make(True)
  chain_state, fused_state = chain.init(stream[0]), fused.init(stream[0])
  assert jax.tree.structure(chain_state) == jax.tree.structure(fused_state)
  chain_update, fused_update = jax.jit(chain.update), jax.jit(fused.update)
  layer_clips = global_clips = 0
  for grads in stream:
    chain_out, chain_state = chain_update(grads, chain_state)
    fused_out, fused_state = fused_update(grads, fused_state)
    chex.assert_trees_all_close(chain_out, fused_out, rtol=5e-6, atol=0)
    for a, b in zip(chain_state, fused_state):
      np.testing.assert_array_equal(a.stats.clipped, b.stats.clipped)
      np.testing.assert_allclose(a.stats.threshold, b.stats.threshold, rtol=5e-6)
      chex.assert_trees_all_close(a.threshold_state, b.threshold_state, rtol=5e-6)
    global_clips += int(fused_state[0].stats.clipped)
    layer_clips += int(np.sum(fused_state[1].stats.clipped))
  assert global_clips > 0 and layer_clips > 0
  assert fused_state[1].stats.norm.shape == ((5,) if stacked else (2,))  # 4 layers and the head


def test_reads_the_updates_once_on_xla_cpu():
  """No gradient-sized temporary: the chain materializes the globally clipped tree."""
  params = {"w": jnp.ones((512, 256)), "b": jnp.ones((256,))}

  def temp_bytes(tx):
    def step(p, s, g):
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s

    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, tx.init(params), params).compile()
    analysis = compiled.memory_analysis()
    if analysis is None:
      pytest.skip("the backend reports no memory analysis")
    return analysis.temp_size_in_bytes

  size = 4 * (512 * 256 + 256)
  chained = optax.chain(
    clipx.clip_by_global_norm(1.0), clipx.clip_by_layer_norm(1.0), optax.adam(1e-3)
  )
  fused = optax.chain(clipx.clip_by_global_then_layer_norm(1.0, 1.0), optax.adam(1e-3))
  if jax.default_backend() == "cpu":
    assert temp_bytes(chained) >= size  # what the fused transform saves
  assert temp_bytes(fused) < size // 8


@pytest.mark.parametrize(
  ("kwargs", "error", "match"),
  [
    ({"global_max_norm": -1.0}, ValueError, "global_max_norm"),
    ({"layer_max_norm": "1"}, TypeError, "layer_max_norm"),
    ({"group": "tensor"}, ValueError, "group"),
    ({"stacked": -1}, ValueError, "stacked"),
  ],
)
def test_bad_arguments_fail_at_construction(kwargs, error, match):
  args = {"global_max_norm": 1.0, "layer_max_norm": 1.0, **kwargs}
  with pytest.raises(error, match=match):
    clipx.clip_by_global_then_layer_norm(**args)


def test_two_tiny_scales_on_one_step_do_not_zero_the_gradient():
  """Each stage scales by ~1e-20: their product, 1e-40, is below float32's normal range."""
  grads = {"a": np.full((4,), 5e19, np.float32), "b": np.full((3,), 1e19, np.float32)}
  tx = clipx.clip_by_global_then_layer_norm(1.0, 1e-20)
  out, state = jax.jit(tx.update)(grads, tx.init(grads))
  total = np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in grads.values()))
  for k, g in grads.items():
    seen = np.linalg.norm(g.astype(np.float64)) / total
    want = g.astype(np.float64) / total * (1e-20 / seen)
    np.testing.assert_allclose(np.asarray(out[k], np.float64), want, rtol=1e-5, err_msg=k)
    assert np.all(np.asarray(out[k]) != 0)
  assert bool(state[0].stats.clipped) and bool(np.all(state[1].stats.clipped))
