"""clipx.stats finds every ClipStats, through Optax's wrappers, and logs floats."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import clipx


def test_stats_through_wrappers_and_flat_floats():
  params = {"conv": {"kernel": jnp.ones((3, 3)), "bias": jnp.ones(3)}, "out": jnp.ones(2)}
  grads = jax.tree.map(lambda x: 10 * x, params)
  inner = optax.chain(
    clipx.clip_by_global_norm(1.0),
    optax.masked(clipx.clip_by_layer_norm(0.5, group="module"), {"conv": True, "out": False}),
    optax.sgd(0.1),
  )
  tx = clipx.skip_nonfinite(optax.MultiSteps(inner, every_k_schedule=1).gradient_transformation())
  state = tx.init(params)
  _, state = tx.update(grads, state, params)
  report = clipx.stats(state)
  assert list(report) == ["skip_nonfinite", "global", "layer"]

  flat = report.as_dict()
  norm = np.sqrt(sum(float(jnp.sum(x**2)) for x in jax.tree.leaves(grads)))
  np.testing.assert_allclose(flat["clip/global/norm"], norm, rtol=1e-6)
  assert flat["clip/global/clipped"] == 1.0
  assert flat["clip/global/clip_count"] == 1.0
  # The layer clip sees already globally clipped gradients: norm of conv <= 1.
  assert flat["clip/layer/norm/conv"] <= 1.0 + 1e-6
  assert all(isinstance(v, float) for v in flat.values())
  assert "global: norm=" in str(report)


def test_duplicate_kinds_get_numbered_names():
  tx = optax.chain(clipx.clip_by_global_norm(1.0), clipx.clip_by_global_norm(2.0))
  params = {"w": jnp.ones(3)}
  _, state = tx.update(params, tx.init(params), params)
  report = clipx.stats(state)
  assert list(report) == ["global", "global.1"]
  assert float(report["global.1"].threshold) == 2.0


def test_stats_of_state_without_clipx_is_empty():
  tx = optax.sgd(0.1)
  assert clipx.stats(tx.init({"w": jnp.ones(2)})) == {}
