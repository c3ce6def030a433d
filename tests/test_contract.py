"""The numerical contract at its edges, in every scope (issue: trust).

Huge finite norms are clipped to the threshold (never zeroed, never left
unclipped), empty leaves pass through, the derivative through a clip is finite
at a zero gradient, and a run-time threshold has one answer in every scope.
Expected values come from numpy in float64.
"""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import clipx

FMAX = float(np.finfo(np.float32).max)


def _norm64(tree) -> float:
  return float(np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in jax.tree.leaves(tree))))


def _update(tx, grads, params=None):
  params = grads if params is None else params
  return jax.jit(tx.update)(grads, tx.init(params), params)


NORM_SCOPES = {
  "global": lambda t: clipx.clip_by_global_norm(t),
  "layer": lambda t: clipx.clip_by_layer_norm(t),
  "layer-module": lambda t: clipx.clip_by_layer_norm(t, group="module"),
}


# ---------------------------------------------------------------- huge finite norms


@pytest.mark.parametrize("scope", sorted(NORM_SCOPES))
@pytest.mark.parametrize(
  "values",
  [np.full(1000, 3e36), np.array([FMAX, FMAX, -FMAX]), np.array([3e38, 1.0, -1e38])],
  ids=["3e36x1000", "fmax", "mixed"],
)
def test_huge_finite_norms_are_scaled_to_the_threshold(scope, values):
  grads = {"a": jnp.asarray(values, jnp.float32)}
  out, state = _update(NORM_SCOPES[scope](1.0), grads)
  exact = np.asarray(grads["a"], np.float64)
  expected = exact / np.sqrt(np.sum(exact**2))  # norm 1, in float64
  np.testing.assert_allclose(np.asarray(out["a"], np.float64), expected, rtol=1e-5, atol=1e-30)
  stats = clipx.stats(state)[scope.split("-")[0]]
  assert bool(np.all(stats.clipped))
  true_norm = np.sqrt(np.sum(exact**2))
  if true_norm > FMAX:  # beyond float32's range: reported as inf, clipped all the same
    assert np.all(np.isinf(stats.norm))
  else:
    np.testing.assert_allclose(np.asarray(stats.norm), true_norm, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(stats.clipped_norm), 1.0)


def test_clip_tree_of_huge_leaf_is_not_zeroed():
  clipped, stats = clipx.clip_tree({"a": jnp.full(1000, 3e36)}, 1.0)
  np.testing.assert_allclose(np.asarray(clipped["a"]), np.full(1000, 1 / np.sqrt(1000)), rtol=1e-5)
  assert bool(stats.clipped) and float(stats.scale) == pytest.approx(1 / (3e36 * np.sqrt(1000)))


def test_huge_norm_in_one_layer_leaves_the_others_alone():
  grads = {"a": jnp.asarray([FMAX, -FMAX]), "b": jnp.asarray([0.3, 0.4])}
  out, _ = _update(clipx.clip_by_layer_norm(1.0), grads)
  np.testing.assert_allclose(np.asarray(out["a"]), [2**-0.5, -(2**-0.5)], rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(out["b"]), np.asarray(grads["b"]))


@pytest.mark.parametrize("big", [3e36, FMAX])
def test_agc_scales_huge_units_to_their_bound(big):
  grads = {"w": jnp.asarray([[big, 1.0], [big, 1.0]], jnp.float32)}
  params = {"w": jnp.ones((2, 2))}
  out, state = _update(clipx.adaptive_grad_clip(0.1), grads, params)
  bound = 0.1 * np.sqrt(2)  # each column (unit) of a dense kernel: ratio * ||param unit||
  np.testing.assert_allclose(np.asarray(out["w"])[:, 0], [bound / np.sqrt(2)] * 2, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(out["w"])[:, 1], [bound / np.sqrt(2)] * 2, rtol=1e-5)
  assert bool(clipx.stats(state)["agc"].clipped)


def test_tiny_threshold_times_huge_norm_is_not_flushed():
  # scale = 1e-10 / 1e36 = 1e-46 would be subnormal: applied as two factors.
  grads = {"a": jnp.full(4, 5e35)}
  out, _ = _update(clipx.clip_by_global_norm(1e-10), grads)
  np.testing.assert_allclose(np.asarray(out["a"]), np.full(4, 0.5e-10), rtol=1e-5)


# ---------------------------------------------------------------- empty leaves


def _empty_tree():
  return {"e": jnp.zeros((0,)), "k": jnp.zeros((0, 4)), "w": jnp.asarray([3.0, 4.0])}


@pytest.mark.slow
@pytest.mark.parametrize(
  "make",
  [
    lambda: clipx.clip_by_global_norm(1.0),
    lambda: clipx.clip_by_layer_norm(1.0),
    lambda: clipx.clip_by_layer_norm(clipx.zclip(warmup_steps=1)),
    lambda: clipx.clip_by_layer_norm(clipx.quantile()),
    lambda: clipx.clip_by_layer_norm(clipx.autoclip(warmup_steps=1)),
    lambda: clipx.adaptive_grad_clip(0.1),
    lambda: clipx.clip_by_value(1.0),
    lambda: clipx.skip_nonfinite(optax.sgd(0.1)),
  ],
)
def test_empty_leaves_have_norm_zero_and_pass_through(make):
  grads = _empty_tree()
  # The overflow fallback must handle them too: an Inf elsewhere forces it.
  for w in ([3.0, 4.0], [FMAX, FMAX]):
    grads = {**grads, "w": jnp.asarray(w)}
    out, _ = _update(make(), grads, jax.tree.map(jnp.ones_like, grads))
    assert out["e"].shape == (0,) and out["k"].shape == (0, 4)
    assert np.all(np.isfinite(np.asarray(out["w"])))


def test_empty_leaf_norm_is_zero_and_global_norm_of_empty_tree():
  assert float(clipx.global_norm({"e": jnp.zeros((0, 3))})) == 0.0
  assert float(clipx.global_norm({})) == 0.0


def test_clipped_grad_with_an_empty_parameter():
  params = {"w": jnp.ones(3), "empty": jnp.zeros((0, 2))}

  def loss(p, x):
    return jnp.sum(p["w"] * x) + jnp.sum(p["empty"])

  grads, stats = clipx.clipped_grad(loss, 1.0)(params, jnp.asarray([[3.0, 4.0, 0.0], [0.1, 0, 0]]))
  np.testing.assert_allclose(np.asarray(grads["w"]), [(0.6 + 0.1) / 2, 0.8 / 2, 0.0], rtol=1e-6)
  assert grads["empty"].shape == (0, 2)
  np.testing.assert_allclose(np.asarray(stats.norm), [5.0, 0.1], rtol=1e-6)


@pytest.mark.slow
def test_empty_leaves_on_eight_devices():
  code = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np, optax, clipx
    from jax.sharding import NamedSharding, PartitionSpec as P
    assert jax.device_count() == 8
    mesh = jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
    grads = {"e": jnp.zeros((0,)), "k": jnp.zeros((0, 8)), "w": jnp.arange(8.0)}
    grads = jax.device_put(grads, NamedSharding(mesh, P()))
    for tx in (clipx.clip_by_global_norm(1.0), clipx.clip_by_layer_norm(1.0),
               clipx.adaptive_grad_clip(0.1), clipx.clip_by_value(1.0)):
      out, _ = jax.jit(tx.update)(grads, tx.init(grads), grads)
      assert out["k"].shape == (0, 8) and np.all(np.isfinite(np.asarray(out["w"])))
    print("ok")
    """
  )
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip().endswith("ok")


# ---------------------------------------------------------------- derivatives at zero


def test_global_norm_derivative_at_zero_is_zero():
  grad = jax.grad(lambda g: clipx.global_norm(g))({"a": jnp.zeros(3), "b": jnp.zeros((2, 2))})
  for leaf in jax.tree.leaves(grad):
    np.testing.assert_array_equal(np.asarray(leaf), 0.0)


@pytest.mark.parametrize(
  "make",
  [
    lambda: clipx.clip_by_global_norm(1.0),
    lambda: clipx.clip_by_layer_norm(1.0),
    lambda: clipx.adaptive_grad_clip(0.1),
  ],
)
def test_derivative_through_a_clip_at_zero_is_the_identity(make):
  tx = make()
  params = {"w": jnp.ones((2, 3))}
  weights = jnp.arange(6.0).reshape(2, 3)

  def output(grads):
    out, _ = tx.update(grads, tx.init(params), params)
    return jnp.sum(out["w"] * weights)

  derivative = jax.grad(output)({"w": jnp.zeros((2, 3))})
  np.testing.assert_array_equal(np.asarray(derivative["w"]), np.asarray(weights))


def test_derivative_above_the_threshold_matches_the_formula():
  # d/dg of sum(c * g / |g|) at |g| > 1: (c - (c . u) u) / |g| with u = g / |g|.
  g = jnp.asarray([3.0, 4.0])
  c = jnp.asarray([1.0, -2.0])
  derivative = jax.grad(lambda x: jnp.sum(c * clipx.clip_tree({"a": x}, 1.0)[0]["a"]))(g)
  u = np.asarray(g) / 5.0
  expected = (np.asarray(c) - np.dot(c, u) * u) / 5.0
  np.testing.assert_allclose(np.asarray(derivative), expected, rtol=1e-6)


# ---------------------------------------------------------------- value-clip stats


def test_value_clip_stats_on_inf_input_say_clipped():
  grads = {"a": jnp.asarray([1.0, jnp.inf, -0.5])}
  out, state = _update(clipx.clip_by_value(0.5), grads)
  np.testing.assert_array_equal(np.asarray(out["a"]), [0.5, 0.5, -0.5])
  stats = clipx.stats(state)["value"]
  assert bool(stats.clipped)
  assert float(stats.clipped_norm) == 0.5 and float(stats.scale) == 0.0
  assert np.isinf(float(stats.norm))


# ---------------------------------------------------------------- run-time thresholds


RUNTIME_SCOPES = {
  "global": (clipx.clip_by_global_norm, "max_norm"),
  "layer": (clipx.clip_by_layer_norm, "max_norm"),
  "value": (clipx.clip_by_value, "max_abs"),
  "agc": (clipx.adaptive_grad_clip, "clipping"),
}


def _with_runtime_threshold(scope: str, value: float):
  factory, name = RUNTIME_SCOPES[scope]
  tx = optax.inject_hyperparams(factory)(**{name: 1.0})
  grads = {"a": jnp.asarray([3.0, -4.0]), "b": jnp.asarray([[1.0, 2.0], [0.5, -1.0]])}
  params = jax.tree.map(jnp.ones_like, grads)
  state = tx.init(params)
  state.hyperparams[name] = jnp.asarray(value, jnp.float32)
  out, _ = jax.jit(tx.update)(grads, state, params)
  return out


@pytest.mark.parametrize("scope", sorted(RUNTIME_SCOPES))
@pytest.mark.parametrize("value", [-1.0, -np.inf, np.nan])
def test_invalid_runtime_threshold_makes_the_update_nan_in_every_scope(scope, value):
  out = _with_runtime_threshold(scope, value)
  for leaf in jax.tree.leaves(out):
    assert np.all(np.isnan(np.asarray(leaf))), (scope, value, leaf)


@pytest.mark.parametrize("scope", sorted(RUNTIME_SCOPES))
def test_zero_runtime_threshold_scales_to_zero_in_every_scope(scope):
  out = _with_runtime_threshold(scope, 0.0)
  for leaf in jax.tree.leaves(out):
    np.testing.assert_array_equal(np.abs(np.asarray(leaf)), 0.0)


@pytest.mark.parametrize("scope", sorted(RUNTIME_SCOPES))
def test_infinite_runtime_threshold_never_clips(scope):
  out = _with_runtime_threshold(scope, np.inf)
  np.testing.assert_array_equal(np.asarray(out["a"]), [3.0, -4.0])


def test_skip_nonfinite_catches_a_nan_runtime_threshold():
  inner = optax.chain(
    optax.inject_hyperparams(clipx.clip_by_global_norm)(max_norm=1.0), optax.sgd(0.1)
  )
  tx = clipx.skip_nonfinite(inner)
  params = {"w": jnp.ones(2)}
  state = tx.init(params)
  state.inner_state[0].hyperparams["max_norm"] = jnp.float32(np.nan)
  updates, state = jax.jit(tx.update)({"w": jnp.asarray([3.0, 4.0])}, state, params)
  np.testing.assert_array_equal(np.asarray(updates["w"]), [0.0, 0.0])
  report = clipx.stats(state)["skip_nonfinite"]
  assert bool(report.skipped) and int(report.skip_count) == 1
  assert int(report.nonfinite_leaf) == -1  # the gradients were finite; the update was not
