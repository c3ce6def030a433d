"""skip_nonfinite: a bad step leaves no trace in the inner optimizer."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import clipx


def _setup():
  params = {"w": jnp.array([1.0, 2.0, 3.0]), "b": jnp.array(0.5)}
  tx = clipx.skip_nonfinite(optax.chain(clipx.clip_by_global_norm(1.0), optax.sgd(0.1, 0.9)))
  return params, tx


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf, -jnp.inf])
def test_nonfinite_step_is_skipped_and_counted(bad):
  params, tx = _setup()
  update = jax.jit(tx.update)
  good = {"w": jnp.array([0.3, -0.2, 0.1]), "b": jnp.array(0.4)}
  _, state = update(good, tx.init(params), params)
  before = state.inner_state
  grads = {"w": jnp.array([0.3, bad, 0.1]), "b": jnp.array(0.4)}
  updates, state = update(grads, state, params)
  chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, grads))
  chex.assert_trees_all_equal(state.inner_state, before)  # momentum untouched
  report = clipx.stats(state)
  assert bool(report["skip_nonfinite"].skipped)
  assert int(report["skip_nonfinite"].skip_count) == 1
  # The clip stats inside are those of the last applied step.
  assert int(report["global"].clip_count) == 0

  # The next good step proceeds exactly as if the bad one never happened.
  ref_tx = optax.chain(clipx.clip_by_global_norm(1.0), optax.sgd(0.1, 0.9))
  ref_state = ref_tx.init(params)
  _, ref_state = ref_tx.update(good, ref_state, params)
  ref_updates, _ = ref_tx.update(good, ref_state, params)
  updates, state = update(good, state, params)
  chex.assert_trees_all_close(updates, ref_updates, rtol=1e-6)
  assert not bool(clipx.stats(state)["skip_nonfinite"].skipped)


def test_finite_steps_pass_through_unchanged():
  params, tx = _setup()
  ref = optax.chain(clipx.clip_by_global_norm(1.0), optax.sgd(0.1, 0.9))
  state, ref_state = tx.init(params), ref.init(params)
  for seed in range(3):
    key = jax.random.PRNGKey(seed)
    grads = jax.tree.map(lambda x, key=key: jax.random.normal(key, x.shape), params)
    updates, state = tx.update(grads, state, params)
    ref_updates, ref_state = ref.update(grads, ref_state, params)
    chex.assert_trees_all_close(updates, ref_updates, rtol=1e-6)
  assert int(clipx.stats(state)["skip_nonfinite"].skip_count) == 0


def test_huge_finite_gradients_are_not_skipped():
  params, tx = _setup()
  grads = {"w": jnp.full(3, 1e30), "b": jnp.array(1e30)}  # sum of squares overflows
  updates, state = tx.update(grads, tx.init(params), params)
  assert int(clipx.stats(state)["skip_nonfinite"].skip_count) == 0
  np.testing.assert_allclose(
    np.asarray(updates["w"]), np.full(3, -0.1 * 0.5), rtol=1e-5
  )  # clipped to norm 1: each of 4 equal entries is 0.5, times -lr


def test_all_finite_vs_numpy():
  tree = {"a": jnp.ones((300, 300)), "b": [jnp.ones(4), jnp.array([1.0, jnp.nan, 2.0, 3.0])]}
  assert not bool(clipx.all_finite(tree))
  tree["b"][1] = jnp.ones(4)
  assert bool(clipx.all_finite(tree))
