"""clipx inside the ecosystem: Flax NNX and linen, and Optax's wrappers.

Every test checks numbers against an independent computation (numpy, or the
formula), not only that the combination runs.
"""

import re
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen, nnx
from flax.training import train_state

import clipx

GLOBAL_KEYS = {
  f"clip/global/{field}"
  for field in (
    "norm",
    "clipped_norm",
    "threshold",
    "scale",
    "clipped",
    "clip_count",
    "source",
    "share",
  )
}


def _np_norm(tree) -> float:
  return float(np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in jax.tree.leaves(tree))))


def _np_clip(tree, max_norm: float):
  """Global-norm clipping in float64 numpy: the reference for every test."""
  scale = min(1.0, max_norm / _np_norm(tree))
  return jax.tree.map(lambda x: np.asarray(x, np.float64) * scale, tree)


def _conv_tree(seed: int = 0, scale: float = 3.0):
  """Two conv layers: per-layer clipping should touch kernels and leave biases alone."""
  # numpy's generator: jax.random would compile a program per shape (seconds on 2 cores).
  rng = np.random.default_rng(seed)
  shapes = {"conv1": ((3, 3, 1, 4), (4,)), "conv2": ((3, 3, 4, 4), (4,))}
  return {
    layer: {
      "kernel": jnp.asarray(scale * rng.standard_normal(kernel), jnp.float32),
      "bias": jnp.asarray(scale * rng.standard_normal(bias), jnp.float32),
    }
    for layer, (kernel, bias) in shapes.items()
  }


def _is_kernel(tree):
  return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key == "kernel", tree)


# ---------------------------------------------------------------- Flax


def test_nnx_optimizer_clips_and_reports():
  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  max_norm, learning_rate = 0.5, 0.1
  tx = optax.chain(clipx.clip_by_global_norm(max_norm), optax.sgd(learning_rate))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  x = jnp.arange(12.0).reshape(4, 3) / 4

  def loss_fn(m):
    return jnp.sum(m(x) ** 2)

  @nnx.jit
  def train_step(model, optimizer):
    grads = nnx.grad(loss_fn)(model)
    optimizer.update(model, grads)
    return grads

  before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
  grads = jax.tree.map(np.asarray, train_step(model, optimizer))

  expected = jax.tree.map(lambda p, g: p - learning_rate * g, before, _np_clip(grads, max_norm))
  chex.assert_trees_all_close(
    jax.tree.map(np.asarray, nnx.state(model, nnx.Param)), expected, rtol=1e-5
  )
  logged = clipx.stats(optimizer.opt_state).as_dict()
  assert set(logged) == GLOBAL_KEYS
  assert _np_norm(grads) > max_norm  # so the step above really clipped
  np.testing.assert_allclose(logged["clip/global/norm"], _np_norm(grads), rtol=1e-5)
  np.testing.assert_allclose(logged["clip/global/clipped_norm"], max_norm, rtol=1e-5)
  assert logged["clip/global/clip_count"] == 1.0


class _LinenMLP(linen.Module):
  @linen.compact
  def __call__(self, x):
    return linen.Dense(2)(jnp.tanh(linen.Dense(4)(x)))


def test_linen_train_state_clips_and_reports():
  model = _LinenMLP()
  x = jnp.arange(12.0).reshape(4, 3) / 4
  params = model.init(jax.random.PRNGKey(0), x)["params"]
  max_norm, learning_rate = 0.05, 0.1
  state = train_state.TrainState.create(
    apply_fn=model.apply,
    params=params,
    tx=optax.chain(clipx.clip_by_global_norm(max_norm), optax.sgd(learning_rate, momentum=0.9)),
  )

  def loss_fn(params):
    return jnp.sum(model.apply({"params": params}, x) ** 2)

  @jax.jit
  def train_step(state):
    grads = jax.grad(loss_fn)(state.params)
    return state.apply_gradients(grads=grads), grads

  momentum = jax.tree.map(lambda p: np.zeros(p.shape), params)
  expected = jax.tree.map(np.asarray, params)
  for _ in range(2):
    state, grads = train_step(state)
    momentum = jax.tree.map(lambda m, g: 0.9 * m + g, momentum, _np_clip(grads, max_norm))
    expected = jax.tree.map(lambda p, m: p - learning_rate * m, expected, momentum)
    assert _np_norm(grads) > max_norm
  chex.assert_trees_all_close(jax.tree.map(np.asarray, state.params), expected, rtol=1e-5)
  logged = clipx.stats(state.opt_state).as_dict()
  assert set(logged) == GLOBAL_KEYS
  np.testing.assert_allclose(logged["clip/global/norm"], _np_norm(grads), rtol=1e-5)
  assert logged["clip/global/clip_count"] == 2.0


# ---------------------------------------------------------------- inject_hyperparams


def test_inject_hyperparams_max_norm_changes_without_retrace():
  def clip_then_sgd(max_norm, learning_rate):
    return optax.chain(clipx.clip_by_global_norm(max_norm), optax.sgd(learning_rate))

  tx = optax.inject_hyperparams(clip_then_sgd)(max_norm=1.0, learning_rate=0.1)
  grads = {"w": jnp.array([3.0, 4.0])}  # norm 5
  state = tx.init(grads)
  chex.clear_trace_counter()

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(state):
    return tx.update(grads, state, grads)

  updates, state = step(state)
  np.testing.assert_allclose(updates["w"], [-0.06, -0.08], rtol=1e-6)
  # Same dtype and shape as the array already there: a new value, not a new program.
  state.hyperparams["max_norm"] = jnp.asarray(0.25, state.hyperparams["max_norm"].dtype)
  updates, state = step(state)
  np.testing.assert_allclose(updates["w"], [-0.015, -0.02], rtol=1e-6)
  logged = clipx.stats(state).as_dict()
  assert set(logged) == GLOBAL_KEYS
  assert logged["clip/global/threshold"] == 0.25
  assert logged["clip/global/clip_count"] == 2.0


def test_inject_hyperparams_percentile_changes_without_retrace():
  def autoclip_then_sgd(percentile, learning_rate):
    policy = clipx.autoclip(percentile, history=8, warmup_steps=2)
    return optax.chain(clipx.clip_by_global_norm(policy), optax.sgd(learning_rate))

  tx = optax.inject_hyperparams(autoclip_then_sgd)(percentile=50.0, learning_rate=1.0)
  state = tx.init({"w": jnp.zeros(2)})
  chex.clear_trace_counter()

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(grads, state):
    return tx.update(grads, state)

  history = [1.0, 4.0, 2.0, 3.0]
  for norm in history:
    _, state = step({"w": jnp.array([norm, 0.0])}, state)
  spike = {"w": jnp.array([0.0, 10.0])}
  for percentile in (50.0, 90.0):
    state.hyperparams["percentile"] = jnp.asarray(percentile, jnp.float32)
    updates, new_state = step(spike, state)
    threshold = np.percentile(history, percentile)
    np.testing.assert_allclose(updates["w"], [0.0, -threshold], rtol=1e-6)
    np.testing.assert_allclose(clipx.stats(new_state)["global"].threshold, threshold, rtol=1e-6)


# ---------------------------------------------------------------- MultiSteps


def test_multisteps_clips_the_accumulated_gradient():
  # The mean of the micro-batch gradients is (2, 2), norm 2.83, clipped to 1.
  # Clipping each micro-batch first would give (0.57, 0.57) instead.
  micro = [jnp.array([4.0, 0.0]), jnp.array([0.0, 4.0]), jnp.array([2.0, 2.0])]
  tx = optax.MultiSteps(
    optax.chain(clipx.clip_by_global_norm(1.0), optax.sgd(1.0)), every_k_schedule=3
  )
  params = {"w": jnp.zeros(2)}
  state = tx.init(params)
  update = jax.jit(tx.update)
  for i, grad in enumerate(micro):
    updates, state = update({"w": grad}, state, params)
    logged = clipx.stats(state).as_dict()
    assert set(logged) == GLOBAL_KEYS
    if i < 2:  # no optimizer step yet: zero update, clipping has not run
      np.testing.assert_array_equal(updates["w"], 0.0)
      assert logged["clip/global/clip_count"] == 0.0
  mean = np.mean(np.stack(micro), axis=0)
  expected = -_np_clip({"w": mean}, 1.0)["w"]
  np.testing.assert_allclose(updates["w"], expected, rtol=1e-6)
  np.testing.assert_allclose(logged["clip/global/norm"], np.linalg.norm(mean), rtol=1e-6)
  assert logged["clip/global/clip_count"] == 1.0


# ---------------------------------------------------------------- masked and partition


def _check_kernels_clipped_biases_untouched(grads, updates, state, max_norm):
  for layer in ("conv1", "conv2"):
    kernel = np.asarray(grads[layer]["kernel"], np.float64)
    expected = kernel * min(1.0, max_norm / np.linalg.norm(kernel))
    np.testing.assert_allclose(updates[layer]["kernel"], expected, rtol=1e-5)
    np.testing.assert_array_equal(updates[layer]["bias"], grads[layer]["bias"])
  logged = clipx.stats(state).as_dict()
  kernel_norms = [np.linalg.norm(np.asarray(grads[k]["kernel"])) for k in ("conv1", "conv2")]
  assert min(kernel_norms) > max_norm
  # One group per kernel, in tree order; the biases are not groups at all.
  assert sorted(k for k in logged if k.startswith("clip/layer/norm/")) == [
    "clip/layer/norm/conv1/kernel",
    "clip/layer/norm/conv2/kernel",
  ]
  np.testing.assert_allclose(
    [logged["clip/layer/norm/conv1/kernel"], logged["clip/layer/norm/conv2/kernel"]],
    kernel_norms,
    rtol=1e-5,
  )
  assert logged["clip/layer/clip_count/conv1/kernel"] == 1.0
  assert logged["clip/layer/clip_count/conv2/kernel"] == 1.0


def test_masked_clips_conv_kernels_per_layer():
  grads = _conv_tree()
  tx = optax.masked(clipx.clip_by_layer_norm(0.5), _is_kernel(grads))
  updates, state = jax.jit(tx.update)(grads, tx.init(grads))
  _check_kernels_clipped_biases_untouched(grads, updates, state, 0.5)


def test_partition_clips_conv_kernels_per_layer():
  grads = _conv_tree()
  labels = jax.tree.map(lambda kernel: "kernel" if kernel else "bias", _is_kernel(grads))
  tx = optax.partition({"kernel": clipx.clip_by_layer_norm(0.5), "bias": optax.identity()}, labels)
  updates, state = jax.jit(tx.update)(grads, tx.init(grads))
  _check_kernels_clipped_biases_untouched(grads, updates, state, 0.5)


# ---------------------------------------------------------------- apply_if_finite


def test_apply_if_finite_keeps_clip_state_of_the_last_good_step():
  tx = optax.apply_if_finite(
    optax.chain(clipx.clip_by_global_norm(1.0), optax.sgd(1.0)), max_consecutive_errors=3
  )
  params = {"w": jnp.zeros(2)}
  state = tx.init(params)
  update = jax.jit(tx.update)
  updates, state = update({"w": jnp.array([3.0, 4.0])}, state, params)
  np.testing.assert_allclose(updates["w"], [-0.6, -0.8], rtol=1e-6)
  good = clipx.stats(state).as_dict()
  updates, state = update({"w": jnp.array([jnp.nan, 1.0])}, state, params)
  np.testing.assert_array_equal(updates["w"], 0.0)
  assert int(state.notfinite_count) == 1
  # The bad step left no trace in clipx's state: it is the state of the good step.
  assert clipx.stats(state).as_dict() == good
  assert good["clip/global/norm"] == 5.0
  updates, state = update({"w": jnp.array([0.0, 2.0])}, state, params)
  np.testing.assert_allclose(updates["w"], [0.0, -1.0], rtol=1e-6)
  assert clipx.stats(state).as_dict()["clip/global/clip_count"] == 2.0


# ---------------------------------------------------------------- logging keys


_INNER = lambda: optax.chain(clipx.clip_by_global_norm(1.0), optax.sgd(0.1))  # noqa: E731

WRAPPERS = {
  "chain": _INNER,
  "inject_hyperparams": lambda: optax.inject_hyperparams(optax.sgd)(learning_rate=0.1),
  "multi_steps": lambda: optax.MultiSteps(_INNER(), every_k_schedule=1),
  "masked": lambda: optax.masked(_INNER(), {"a": True, "b": True}),
  "partition": lambda: optax.partition({"all": _INNER()}, {"a": "all", "b": "all"}),
  "apply_if_finite": lambda: optax.apply_if_finite(_INNER(), max_consecutive_errors=1),
  "skip_nonfinite": lambda: clipx.skip_nonfinite(_INNER()),
}


@pytest.mark.parametrize("wrapper", sorted(WRAPPERS))
def test_stats_keys_are_stable_through_wrappers(wrapper):
  tx = WRAPPERS[wrapper]()
  if wrapper == "inject_hyperparams":  # the clipping transform itself is injected
    tx = optax.chain(optax.inject_hyperparams(clipx.clip_by_global_norm)(max_norm=1.0), tx)
  grads = {"a": jnp.array([3.0]), "b": jnp.array([4.0])}
  _, state = tx.update(grads, tx.init(grads), grads)
  logged = clipx.stats(state).as_dict()
  expected = set(GLOBAL_KEYS)
  if wrapper == "skip_nonfinite":
    expected |= {
      f"clip/skip_nonfinite/{f}"
      for f in ("skipped", "skip_count", "nonfinite_leaf", "nonfinite_device")
    }
  assert set(logged) == expected
  assert all(type(value) is float for value in logged.values())
  assert (logged["clip/global/norm"], logged["clip/global/clipped_norm"]) == (5.0, 1.0)


# ---------------------------------------------------------------- documentation


def test_api_reference_documents_every_public_name():
  # docs/api.md lists the API by concern, one `::: clipx.name` per name; a new
  # name must be added there (mkdocs build --strict fails on a removed one).
  api = (Path(__file__).resolve().parents[1] / "docs" / "api.md").read_text()
  documented = set(re.findall(r"^::: clipx\.(\w+)$", api, re.MULTILINE))
  assert set(clipx.__all__) - documented == set(), "add these to docs/api.md"
