"""clipx.global_norm and group norms against numpy in float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import clipx
from clipx import norms


def _np_norm(tree) -> float:
  leaves = jax.tree_util.tree_leaves(tree)
  return float(np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in leaves)))


def test_matches_numpy_on_mixed_tree():
  key = jax.random.PRNGKey(0)
  k1, k2, k3 = jax.random.split(key, 3)
  tree = {
    "big": jax.random.normal(k1, (300, 200)),  # above SMALL_LEAF_SIZE: reduced alone
    "small": [jax.random.normal(k2, (16,)), jax.random.normal(k3, (16,)), jnp.arange(5.0)],
    "matrix": jnp.ones((4, 4)),
  }
  assert tree["big"].size > norms.SMALL_LEAF_SIZE
  np.testing.assert_allclose(float(clipx.global_norm(tree)), _np_norm(tree), rtol=1e-6)
  np.testing.assert_allclose(float(jax.jit(clipx.global_norm)(tree)), _np_norm(tree), rtol=1e-6)


def test_float16_no_overflow():
  tree = {"a": jnp.full(1000, 30.0, jnp.float16)}
  norm = clipx.global_norm(tree)
  assert norm.dtype == jnp.float32
  np.testing.assert_allclose(float(norm), 30.0 * np.sqrt(1000), rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_huge_finite_values_take_the_scaled_branch(dtype):
  # 1000 * (1e20)^2 = 1e43 overflows float32; the fallback divides by the max first.
  tree = {"a": jnp.full(1000, 1e20, dtype), "b": jnp.ones((3, 3), dtype)}
  expected = np.sqrt(1000 * float(jnp.asarray(1e20, dtype)) ** 2 + 9)
  np.testing.assert_allclose(float(jax.jit(clipx.global_norm)(tree)), expected, rtol=1e-5)


@pytest.mark.parametrize("small", [3.0, 3e-12, 3e-15])
def test_fallback_keeps_groups_that_did_not_overflow(small):
  # One huge leaf forces the fallback; the other group keeps its norm, even with
  # values that a fixed factor such as 2**-96 would flush (3e-12 * 2**-96 < 2**-126).
  tree = [jnp.full(10, 3e19), jnp.array([small, small * 4 / 3])]
  groups = jax.jit(norms.group_norms, static_argnums=(1, 2))(tree, (0, 1), 2)
  np.testing.assert_allclose(np.asarray(groups), [3e19 * np.sqrt(10), small * 5 / 3], rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_fallback_on_large_16_bit_leaves(dtype):
  # Large leaves (not merged with others) of 16-bit floats, whose maximum is
  # taken apart from the sum of squares (norms.widen's reader). The largest
  # magnitude is negative. bfloat16's overflows the float32 sum of squares;
  # float16 reaches the fallback only through inf or NaN.
  big = 3e38 if dtype == jnp.bfloat16 else 6e4
  values = np.linspace(-1.0, 0.5, norms.SMALL_LEAF_SIZE + 7)
  values[100] = -big
  leaf = jnp.asarray(values, dtype)
  exact = np.asarray(leaf, np.float64)
  tree = {"a": leaf, "b": jnp.ones(3, dtype)}
  expected = np.sqrt(np.sum(exact**2) + 3)
  np.testing.assert_allclose(float(jax.jit(clipx.global_norm)(tree)), expected, rtol=1e-5)
  with_nan = {"a": leaf.at[5].set(jnp.nan), "b": tree["b"]}
  assert np.isnan(float(jax.jit(clipx.global_norm)(with_nan)))
  with_inf = {"a": leaf.at[5].set(-jnp.inf), "b": tree["b"]}
  assert float(jax.jit(clipx.global_norm)(with_inf)) == np.inf


def test_largest_float32_has_a_finite_norm():
  norm = jax.jit(clipx.global_norm)({"a": jnp.array([3e38, 1.0, -1e38], jnp.float32)})
  np.testing.assert_allclose(float(norm), np.hypot(3e38, 1e38), rtol=1e-6)


def test_nonfinite_input_propagates():
  assert np.isnan(float(clipx.global_norm({"a": jnp.array([1.0, jnp.nan])})))
  assert float(clipx.global_norm({"a": jnp.array([1.0, jnp.inf])})) == np.inf


def test_group_norms_match_numpy():
  leaves = [jnp.arange(i + 1.0) for i in range(6)] + [jnp.ones((200, 100))]
  ids = np.array([0, 0, 1, 2, 2, 1, 0])
  result = norms.group_norms(leaves, ids, 3)
  expected = [
    np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x, g in zip(leaves, ids) if g == k))
    for k in range(3)
  ]
  np.testing.assert_allclose(np.asarray(result), expected, rtol=1e-6)


def test_empty_tree_and_zero_tree():
  assert float(clipx.global_norm({})) == 0.0
  assert float(clipx.global_norm({"a": jnp.zeros(3)})) == 0.0


def test_complex_leaves():
  x = jnp.array([3 + 4j, 1j], jnp.complex64)
  np.testing.assert_allclose(float(clipx.global_norm(x)), np.sqrt(25 + 1), rtol=1e-6)


def test_integer_leaf_raises_type_error_naming_path():
  with pytest.raises(TypeError, match=r"\['step'\]"):
    clipx.global_norm({"w": jnp.ones(2), "step": jnp.ones(2, jnp.int32)})


def test_many_small_leaves_concatenate_in_two_levels():
  # More same-shape leaves than one concatenation takes (norms.MAX_CONCAT).
  rng = np.random.default_rng(0)
  count = 2 * norms.MAX_CONCAT + 3
  leaves = [jnp.asarray(rng.normal(size=(4, 3)), jnp.float32) for _ in range(count)]
  leaves += [jnp.asarray(rng.normal(size=5), jnp.float32) for _ in range(count)]
  exact = [np.asarray(x, np.float64) for x in leaves]
  np.testing.assert_allclose(
    float(jax.jit(clipx.global_norm)(leaves)), np.sqrt(sum(np.sum(x**2) for x in exact)), rtol=1e-6
  )
  per_leaf = jax.jit(norms.leaf_sq_norms)(leaves)
  np.testing.assert_allclose(np.asarray(per_leaf), [np.sum(x**2) for x in exact], rtol=1e-6)
