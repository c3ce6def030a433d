"""The clipping transforms against numpy, Optax and (where installed) PyTorch."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import clipx
from clipx import norms


def _tree(seed=0, scale=1.0):
  keys = jax.random.split(jax.random.PRNGKey(seed), 5)
  return {
    "conv": {
      "kernel": scale * jax.random.normal(keys[0], (3, 3, 4, 8)),
      "bias": scale * jax.random.normal(keys[1], (8,)),
    },
    "dense": {
      "kernel": scale * jax.random.normal(keys[2], (32, 10)),
      "bias": scale * jax.random.normal(keys[3], (10,)),
    },
    "big": scale * jax.random.normal(keys[4], (200, 100)),
  }


def _np_norm(tree):
  return np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in jax.tree.leaves(tree)))


def _update(tx, grads, params=None):
  params = grads if params is None else params
  return jax.jit(tx.update)(grads, tx.init(params), params)


# ---------------------------------------------------------------- numerics


def test_float16_is_scaled_not_zeroed():
  grads = {"a": jnp.full(1000, 30.0, jnp.float16)}
  out, state = _update(clipx.clip_by_global_norm(1.0), grads)
  assert out["a"].dtype == jnp.float16
  # fp16 has an 11-bit significand: relative precision 2^-11.
  np.testing.assert_allclose(np.asarray(out["a"], np.float64), 1 / np.sqrt(1000), rtol=2**-10)
  np.testing.assert_allclose(float(state.stats.norm), 30 * np.sqrt(1000), rtol=1e-6)


def test_float32_1e20_is_scaled_not_zeroed():
  grads = {"a": jnp.full(1000, 1e20, jnp.float32)}
  out, _ = _update(clipx.clip_by_global_norm(1.0), grads)
  np.testing.assert_allclose(np.asarray(out["a"]), 1 / np.sqrt(1000), rtol=1e-5)


@pytest.mark.slow
def test_bfloat16_keeps_dtype_and_matches_float32():
  grads = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _tree())
  out, _ = _update(clipx.clip_by_global_norm(1.0), grads)
  for leaf in jax.tree.leaves(out):
    assert leaf.dtype == jnp.bfloat16
  expected_scale = 1.0 / _np_norm(grads)
  for got, x in zip(jax.tree.leaves(out), jax.tree.leaves(grads)):
    np.testing.assert_allclose(
      np.asarray(got, np.float32), np.asarray(x, np.float32) * expected_scale, rtol=2**-7
    )


finite_arrays = hnp.arrays(
  np.float32,
  hnp.array_shapes(min_dims=1, max_dims=2, max_side=8),
  # No subnormals: XLA CPU flushes them in all arithmetic, the clip's multiply by
  # 1.0 included (tests/test_scaling.py checks that a training step is unchanged).
  elements=st.floats(-1e6, 1e6, width=32, allow_subnormal=False),
)


@given(finite_arrays, finite_arrays, st.floats(1e-3, 1e3))
def test_below_threshold_is_bit_identical(a, b, factor):
  grads = {"a": jnp.asarray(a), "b": jnp.asarray(b)}
  norm = _np_norm(grads)
  max_norm = norm * (1 + factor) + 1e-30  # strictly above the norm
  out, state = _update(clipx.clip_by_global_norm(max_norm), grads)
  for got, x in zip(jax.tree.leaves(out), jax.tree.leaves(grads)):
    assert np.asarray(got).tobytes() == np.asarray(x).tobytes()
  assert not bool(state.stats.clipped)


@given(finite_arrays, finite_arrays, st.floats(1e-4, 0.99))
def test_above_threshold_norm_bounded_direction_kept(a, b, fraction):
  grads = {"a": jnp.asarray(a), "b": jnp.asarray(b)}
  norm = _np_norm(grads)
  if norm < 1e-20:
    return
  max_norm = norm * fraction
  out, state = _update(clipx.clip_by_global_norm(max_norm), grads)
  assert _np_norm(out) <= max_norm * (1 + 1e-6)
  flat_in = np.concatenate([np.ravel(x) for x in jax.tree.leaves(grads)]).astype(np.float64)
  flat_out = np.concatenate([np.ravel(x) for x in jax.tree.leaves(out)]).astype(np.float64)
  cosine = flat_in @ flat_out / (np.linalg.norm(flat_in) * np.linalg.norm(flat_out))
  assert cosine > 1 - 1e-6
  assert bool(state.stats.clipped)


def test_nonfinite_gradients_are_not_hidden():
  grads = {"a": jnp.array([1.0, jnp.nan, 3.0]), "b": jnp.array([5.0])}
  out, state = _update(clipx.clip_by_global_norm(1.0), grads)
  assert np.isnan(float(state.stats.norm))
  np.testing.assert_array_equal(np.asarray(out["a"]), np.asarray(grads["a"]))  # unchanged
  np.testing.assert_array_equal(np.asarray(out["b"]), [5.0])


# ------------------------------------------------------ agreement with optax


@pytest.mark.parametrize(
  "max_norm",
  [0.1, pytest.param(1.0, marks=pytest.mark.slow), pytest.param(100.0, marks=pytest.mark.slow)],
)
def test_global_matches_optax(max_norm):
  grads = _tree(1)
  out, _ = _update(clipx.clip_by_global_norm(max_norm), grads)
  ref, _ = optax.clip_by_global_norm(max_norm).update(grads, optax.EmptyState())
  chex.assert_trees_all_close(out, ref, rtol=1e-6, atol=0)


@pytest.mark.parametrize(
  "clipping",
  [pytest.param(0.001, marks=pytest.mark.slow), 0.01, pytest.param(1.0, marks=pytest.mark.slow)],
)
def test_agc_matches_optax(clipping):
  params, grads = _tree(2), _tree(3, scale=0.05)
  params["conv"]["bias"] = jnp.zeros(8)  # exercises eps
  out, state = _update(clipx.adaptive_grad_clip(clipping), grads, params)
  ref_tx = optax.adaptive_grad_clip(clipping)
  ref, _ = ref_tx.update(grads, ref_tx.init(params), params)
  chex.assert_trees_all_close(out, ref, rtol=1e-6, atol=0)
  np.testing.assert_allclose(float(state.stats.norm), _np_norm(grads), rtol=1e-6)
  np.testing.assert_allclose(float(state.stats.clipped_norm), _np_norm(ref), rtol=1e-5)


def test_agc_matches_numpy_unitwise_formula():
  params = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(6, 4)), jnp.float32)}
  grads = {"w": jnp.asarray(np.random.default_rng(1).normal(size=(6, 4)), jnp.float32)}
  out, _ = _update(clipx.adaptive_grad_clip(0.5, eps=1e-3), grads, params)
  g, p = np.asarray(grads["w"], np.float64), np.asarray(params["w"], np.float64)
  g_norm = np.linalg.norm(g, axis=0, keepdims=True)
  bound = 0.5 * np.maximum(np.linalg.norm(p, axis=0, keepdims=True), 1e-3)
  expected = np.where(g_norm > bound, g * bound / g_norm, g)
  np.testing.assert_allclose(np.asarray(out["w"]), expected, rtol=1e-6)


@pytest.mark.slow
def test_agc_matches_optax_on_more_leaves_than_one_concatenation():
  # Same-shape leaves are stacked for the unit norms; past norms.MAX_CONCAT in two levels.
  count = norms.MAX_CONCAT + 5
  rng = np.random.default_rng(7)
  params = [jnp.asarray(rng.normal(size=(3, 4)), jnp.float32) for _ in range(count)]
  grads = [jnp.asarray(rng.normal(size=(3, 4)) * (i % 3), jnp.float32) for i in range(count)]
  out, _ = _update(clipx.adaptive_grad_clip(0.3), grads, params)
  ref_tx = optax.adaptive_grad_clip(0.3)
  ref, _ = ref_tx.update(grads, ref_tx.init(params), params)
  chex.assert_trees_all_close(out, ref, rtol=1e-6, atol=0)


def test_agc_units_over_several_kept_axes_match_numpy():
  # axis=(0, 1): a unit per (input, output) channel pair of a conv kernel.
  rng = np.random.default_rng(3)
  params = {"k": jnp.asarray(rng.normal(size=(3, 3, 4, 5)), jnp.float32)}
  grads = {"k": jnp.asarray(rng.normal(size=(3, 3, 4, 5)), jnp.float32)}
  out, _ = _update(clipx.adaptive_grad_clip(0.4, axis=(0, 1)), grads, params)
  g, p = np.asarray(grads["k"], np.float64), np.asarray(params["k"], np.float64)
  g_norm = np.linalg.norm(g, axis=(0, 1), keepdims=True)
  bound = 0.4 * np.maximum(np.linalg.norm(p, axis=(0, 1), keepdims=True), 1e-3)
  expected = np.where(g_norm > bound, g * bound / g_norm, g)
  assert (g_norm > bound).any() and (g_norm <= bound).any()
  np.testing.assert_allclose(np.asarray(out["k"]), expected, rtol=1e-6)


def test_global_matches_torch_clip_grad_norm():
  torch = pytest.importorskip("torch")
  grads = _tree(4)
  tensors = [torch.tensor(np.asarray(x)) for x in jax.tree.leaves(grads)]
  params = [torch.nn.Parameter(torch.zeros_like(t)) for t in tensors]
  for p, t in zip(params, tensors):
    p.grad = t.clone()
  total = torch.nn.utils.clip_grad_norm_(params, max_norm=1.0)
  out, state = _update(clipx.clip_by_global_norm(1.0), grads)
  np.testing.assert_allclose(float(state.stats.norm), float(total), rtol=1e-6)
  for got, p in zip(jax.tree.leaves(out), params):
    # torch scales by max_norm / (norm + 1e-6); clipx by max_norm / norm.
    np.testing.assert_allclose(np.asarray(got), p.grad.numpy(), rtol=1e-5)


# --------------------------------------------------------- the other scopes


@pytest.mark.parametrize("group", ["leaf", "module", lambda path: path[0].key])
def test_layer_norm_matches_numpy(group):
  grads = _tree(5)
  max_norm = 3.0
  out, state = _update(clipx.clip_by_layer_norm(max_norm, group=group), grads)
  ids, _ = clipx.layer_groups(grads, group)
  leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(grads)]
  group_norm = {
    g: np.sqrt(sum(np.sum(x**2) for x, i in zip(leaves, ids) if i == g)) for g in set(ids)
  }
  for got, x, g in zip(jax.tree.leaves(out), leaves, ids):
    expected = x * min(1.0, max_norm / group_norm[g])
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-6)
  np.testing.assert_allclose(
    np.asarray(state.stats.norm), [group_norm[g] for g in range(len(group_norm))], rtol=1e-6
  )


def test_layer_groups_module_and_leaf():
  tree = _tree()
  leaf_ids, leaf_names = clipx.layer_groups(tree, "leaf")
  module_ids, module_names = clipx.layer_groups(tree, "module")
  assert len(leaf_names) == 5 and list(leaf_ids) == [0, 1, 2, 3, 4]
  assert module_names == ["['big']", "['conv']", "['dense']"] or len(module_names) == 3
  assert len(set(module_ids.tolist())) == 3


def test_clip_by_value_matches_numpy_clip():
  grads = _tree(6)
  out, state = _update(clipx.clip_by_value(0.5), grads)
  for got, x in zip(jax.tree.leaves(out), jax.tree.leaves(grads)):
    np.testing.assert_array_equal(np.asarray(got), np.clip(np.asarray(x), -0.5, 0.5))
  largest = max(float(np.max(np.abs(np.asarray(x)))) for x in jax.tree.leaves(grads))
  np.testing.assert_allclose(float(state.stats.norm), largest, rtol=1e-7)
  assert bool(state.stats.clipped)


def test_schedule_threshold_follows_step_count():
  schedule = optax.linear_schedule(4.0, 1.0, transition_steps=3)
  tx = clipx.clip_by_global_norm(schedule)
  grads = {"w": jnp.array([30.0, 40.0])}  # norm 50
  state = tx.init(grads)
  update = jax.jit(tx.update)
  for step in range(5):
    out, state = update(grads, state)
    expected = float(schedule(step))
    np.testing.assert_allclose(float(state.stats.threshold), expected, rtol=1e-6)
    np.testing.assert_allclose(_np_norm(out), expected, rtol=1e-6)
  assert int(state.stats.clip_count) == 5


def test_clip_tree_functional_form():
  clipped, stats = clipx.clip_tree({"w": jnp.array([3.0, 4.0])}, 1.0)
  np.testing.assert_allclose(np.asarray(clipped["w"]), [0.6, 0.8], rtol=1e-6)
  assert float(stats.norm) == 5.0 and int(stats.clip_count) == 1
  with pytest.raises(TypeError, match="transform"):
    clipx.clip_tree({"w": jnp.ones(2)}, optax.constant_schedule(1.0))


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("-inf"), True])
def test_bad_max_norm_raises_naming_argument(bad):
  with pytest.raises((ValueError, TypeError), match="max_norm"):
    clipx.clip_by_global_norm(bad)
  with pytest.raises((ValueError, TypeError), match="max_norm"):
    clipx.clip_by_layer_norm(bad)
  with pytest.raises((ValueError, TypeError), match="max_norm"):
    clipx.clip_tree({"w": jnp.ones(2)}, bad)


@pytest.mark.parametrize("bad", [0.0, -0.01, float("nan")])
def test_bad_clipping_factor_raises(bad):
  with pytest.raises((ValueError, TypeError), match="clipping"):
    clipx.adaptive_grad_clip(bad)
  with pytest.raises((ValueError, TypeError), match="max_abs"):
    clipx.clip_by_value(bad)


def test_bad_group_raises():
  with pytest.raises(ValueError, match="group"):
    clipx.clip_by_layer_norm(1.0, group="layer")


@pytest.mark.parametrize(
  "tx",
  [clipx.clip_by_global_norm(1.0), clipx.clip_by_layer_norm(1.0), clipx.clip_by_value(1.0)],
)
def test_integer_gradients_raise_type_error(tx):
  grads = {"w": jnp.ones(3), "n": jnp.ones(3, jnp.int32)}
  with pytest.raises(TypeError, match=r"\['n'\]"):
    tx.update(grads, tx.init(grads))


def test_agc_params_mismatch_names_the_path():
  tx = clipx.adaptive_grad_clip(0.01)
  grads = {"a": jnp.ones(3), "b": {"w": jnp.ones((2, 2))}}
  with pytest.raises(ValueError, match=r"\['b'\]\['w'\]"):
    tx.update(grads, tx.init(grads), {"a": jnp.ones(3), "b": {"w": jnp.ones((3, 2))}})
  with pytest.raises(ValueError, match=r"\['b'\]\['v'\]|\['b'\]\['w'\]"):
    tx.update(grads, tx.init(grads), {"a": jnp.ones(3), "b": {"v": jnp.ones((2, 2))}})
  with pytest.raises(ValueError, match="params"):
    tx.update(grads, tx.init(grads), None)


# --------------------------------------------------- in the Optax ecosystem

TRANSFORMS = {
  "global": lambda t: clipx.clip_by_global_norm(t),
  "layer": lambda t: clipx.clip_by_layer_norm(t, group="module"),
  "agc": lambda t: clipx.adaptive_grad_clip(t),
  "value": lambda t: clipx.clip_by_value(t),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", TRANSFORMS)
def test_inject_hyperparams_changes_threshold_without_retracing(name):
  chex.clear_trace_counter()  # the nested step is "the same function" across params
  factory = TRANSFORMS[name]
  params, grads = _tree(7), _tree(8)
  tx = optax.inject_hyperparams(factory)(1.0)
  state = tx.init(params)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(grads, state, params):
    return tx.update(grads, state, params)

  outputs = []
  for threshold in [1.0, 0.01, 0.5]:
    state.hyperparams[list(state.hyperparams)[0]] = jnp.asarray(threshold)
    out, state = step(grads, state, params)
    ref_tx = factory(threshold)
    ref, _ = ref_tx.update(grads, ref_tx.init(params), params)
    chex.assert_trees_all_close(out, ref, rtol=1e-6)
    outputs.append(out)
  assert not np.allclose(outputs[0]["big"], outputs[1]["big"])


@pytest.mark.slow
@pytest.mark.parametrize("name", TRANSFORMS)
def test_chain_multisteps_and_masked(name):
  factory = TRANSFORMS[name]
  params, grads = _tree(9), _tree(10)
  # chain + sgd equals clip then sgd by hand.
  tx = optax.chain(factory(0.1), optax.sgd(0.5))
  out, state = jax.jit(tx.update)(grads, tx.init(params), params)
  clip = factory(0.1)
  clipped, _ = clip.update(grads, clip.init(params), params)
  chex.assert_trees_all_close(out, jax.tree.map(lambda x: -0.5 * x, clipped), rtol=1e-6)
  assert list(clipx.stats(state)) == [name]

  # MultiSteps: clipping applies to the mean of the accumulated gradients.
  multi = optax.MultiSteps(optax.chain(factory(0.1), optax.sgd(1.0)), every_k_schedule=2)
  mstate = multi.init(params)
  g2 = _tree(11)
  _, mstate = multi.update(grads, mstate, params)
  out, mstate = multi.update(g2, mstate, params)
  mean = jax.tree.map(lambda a, b: (a + b) / 2, grads, g2)
  expected, _ = clip.update(mean, clip.init(params), params)
  chex.assert_trees_all_close(out, jax.tree.map(lambda x: -x, expected), rtol=1e-5, atol=1e-7)
  assert int(clipx.stats(mstate)[name].clip_count.reshape(-1)[0]) >= 0

  # masked: only the conv subtree is clipped.
  mask = jax.tree.map(lambda _: False, params)
  mask["conv"] = jax.tree.map(lambda _: True, params["conv"])
  masked = optax.masked(factory(1e-3), mask)
  out, mstate = masked.update(grads, masked.init(params), params)
  chex.assert_trees_all_equal(out["dense"], grads["dense"])
  assert float(jnp.abs(out["conv"]["kernel"]).max()) < float(jnp.abs(grads["conv"]["kernel"]).max())
  assert name in clipx.stats(mstate)


def test_module_groups_are_the_same_for_nnx_variables_and_plain_arrays():
  nnx = pytest.importorskip("flax.nnx")

  class TwoLayers(nnx.Module):
    def __init__(self, rngs):
      self.a = nnx.Linear(3, 4, rngs=rngs)
      self.b = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
      return self.b(jax.nn.relu(self.a(x)))

  model = TwoLayers(nnx.Rngs(0))
  variables = nnx.state(model, nnx.Param)  # paths end in .value
  plain = jax.tree.map(lambda v: v, nnx.to_pure_dict(variables))
  ids_variables, names = clipx.layer_groups(variables, "module")
  ids_plain, _ = clipx.layer_groups(plain, "module")
  assert names == ["['a']", "['b']"]
  np.testing.assert_array_equal(ids_variables, ids_plain)

  optimizer = nnx.Optimizer(
    model,
    optax.chain(clipx.clip_by_layer_norm(0.01, group="module"), optax.sgd(0.1)),
    wrt=nnx.Param,
  )
  grads = nnx.grad(lambda m: (m(jnp.ones((2, 3))) ** 2).sum())(model)
  optimizer.update(model, grads)
  report = clipx.stats(optimizer.opt_state)["layer"]
  assert report.norm.shape == (2,)
  np.testing.assert_allclose(np.asarray(report.clipped_norm), [0.01, 0.01], rtol=1e-6)


def test_agc_overflow_fallback_matches_formula():
  # Unit sums of squares of 1e30 overflow float32: the scaled branch must take over.
  grads = {"w": jnp.full((4, 3), 1e30), "b": jnp.array([1e30, 2e30])}
  params = {"w": jnp.ones((4, 3)), "b": jnp.ones(2)}
  out, state = _update(clipx.adaptive_grad_clip(0.5), grads, params)
  # w: each column has norm 2e30 and bound 0.5 * 2; b is one unit of norm sqrt(5)e30.
  np.testing.assert_allclose(np.asarray(out["w"]), np.full((4, 3), 0.5), rtol=1e-6)
  b_bound = 0.5 * np.sqrt(2)
  np.testing.assert_allclose(
    np.asarray(out["b"]), b_bound * np.array([1, 2]) / np.sqrt(5), rtol=1e-6
  )
  np.testing.assert_allclose(float(state.stats.norm), np.sqrt(17) * 1e30, rtol=1e-6)


def _agc_reference(g, p, clipping, eps=1e-3):
  """AGC of a (in, out) kernel in float64, units are columns; a non-finite param norm: no bound."""
  g_norm = np.linalg.norm(g, axis=0, keepdims=True)
  with np.errstate(invalid="ignore"):
    p_norm = np.linalg.norm(p, axis=0, keepdims=True)
    bound = np.where(np.isfinite(p_norm), clipping * np.maximum(p_norm, eps), np.inf)
    return np.where(g_norm > bound, g * (bound / g_norm), g)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: d.__name__)
@pytest.mark.parametrize("jit", [False, True])
def test_agc_leaves_a_unit_with_a_nonfinite_param_unclipped(bad, dtype, jit):
  # The contract: a unit whose parameter norm is not finite has no bound (its parameter,
  # not the gradient, is what went wrong), so its finite gradient passes unchanged;
  # every other unit is clipped as usual. NaN used to turn the unit's gradient into NaN.
  rng = np.random.default_rng(5)
  g = (rng.normal(size=(3, 4)) * 3).astype(np.float32)
  p = rng.normal(size=(3, 4)).astype(np.float32)
  p[1, 2] = bad  # unit (column) 2
  b_g, b_p = np.array([4.0, -3.0], np.float32), np.array([bad, 1.0], np.float32)  # one unit
  grads = {"w": jnp.asarray(g, dtype), "b": jnp.asarray(b_g, dtype)}
  params = {"w": jnp.asarray(p, dtype), "b": jnp.asarray(b_p, dtype)}
  tx = clipx.adaptive_grad_clip(0.1)
  update = jax.jit(tx.update) if jit else tx.update
  out, state = update(grads, tx.init(params), params)
  as64 = lambda x: np.asarray(jnp.asarray(x, jnp.float32), np.float64)  # noqa: E731
  expected_w = _agc_reference(as64(grads["w"]), as64(params["w"]), 0.1)
  expected_b = _agc_reference(as64(grads["b"])[:, None], as64(params["b"])[:, None], 0.1)[:, 0]
  rtol = 1e-6 if dtype == jnp.float32 else 1e-2
  assert out["w"].dtype == dtype and out["b"].dtype == dtype
  np.testing.assert_allclose(as64(out["w"]), expected_w, rtol=rtol)
  np.testing.assert_allclose(as64(out["b"]), expected_b, rtol=rtol)
  assert not np.array_equal(expected_w[:, 0], as64(grads["w"])[:, 0])  # other units clipped
  np.testing.assert_array_equal(as64(out["w"])[:, 2], as64(grads["w"])[:, 2])
  assert bool(state.stats.clipped) and np.isfinite(float(state.stats.clipped_norm))


def test_agc_zero_ratio_zeroes_even_a_unit_with_an_infinite_param():
  # A run-time ratio of 0 (a schedule decayed to 0) scales every unit to zero, as in every
  # scope: 0 * inf must not make the unit's gradient NaN.
  grads = {"w": jnp.array([[3.0, 4.0], [1.0, 2.0]])}
  params = {"w": jnp.array([[1.0, jnp.inf], [1.0, 2.0]])}
  tx = clipx.adaptive_grad_clip(lambda count: 0.0)
  out, _ = _update(tx, grads, params)
  np.testing.assert_array_equal(np.asarray(out["w"]), np.zeros((2, 2)))
