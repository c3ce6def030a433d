"""Python scalar leaves (``{"a": 5.0, "b": jnp.ones(3)}``, legal in a pytree) in every transform.

Every public transform must treat a Python ``float`` leaf as the 0-d float32
array ``jnp.asarray(5.0)`` it stands for, eagerly and under ``jit``: the same
updates and the same state. The list of transforms is read from
``clipx.__all__``, so a new transform without a case here fails the first test.
"""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import clipx

FACTORIES = {
  "adagc": lambda: clipx.adagc(warmup_steps=1),
  "adaptive_grad_clip": lambda: clipx.adaptive_grad_clip(0.1),
  "add_noise": lambda: clipx.add_noise(1.0, 1.0, 4, 0),
  "clip_by_block_rms": lambda: clipx.clip_by_block_rms(1.0),
  "clip_by_global_norm": lambda: clipx.clip_by_global_norm(1.0),
  "clip_by_global_then_layer_norm": lambda: clipx.clip_by_global_then_layer_norm(2.0, 1.0),
  "clip_by_layer_norm": lambda: clipx.clip_by_layer_norm(1.0),
  "clip_by_value": lambda: clipx.clip_by_value(1.0),
  "clippy": lambda: clipx.clippy(0.1, 1e-3),
  "normalize_by_layer_norm": lambda: clipx.normalize_by_layer_norm(),
  "qk_clip": lambda: _qk_clip_case(),
  "rescale_outliers": lambda: clipx.rescale_outliers(clipx.ema_peak()),
  "skip_nonfinite": lambda: clipx.skip_nonfinite(clipx.clip_by_value(1.0)),
  "scale_by_spam": lambda: clipx.scale_by_spam(delay=1),
  "skip_spikes": lambda: clipx.skip_spikes(clipx.clip_by_value(1.0), warmup_steps=1),
  "spam": lambda: clipx.spam(0.1, weight_decay=0.1, delay=1),
  "stable_adamw_clip": lambda: clipx.stable_adamw_clip(optax.adam(0.1), b2=0.999),
  "stable_spam_clip": lambda: clipx.stable_spam_clip(),
}


def _qk_clip_case() -> optax.GradientTransformation:
  """QK-Clip needs a query and a key leaf and the logits: ``b`` serves as both (a copy)."""
  inner = clipx.qk_clip(
    1.0,
    query=lambda path: jax.tree_util.keystr(path) == "['b']",
    key=lambda path: jax.tree_util.keystr(path) == "['k']",
    heads=1,
  )
  with_key = lambda tree: {**tree, "k": tree["b"]}  # noqa: E731

  def update(updates, state, params=None):
    out, state = inner.update(with_key(updates), state, with_key(params), attention_logits=[4.0])
    return {"a": out["a"], "b": out["b"]}, state

  return optax.GradientTransformation(lambda params: inner.init(with_key(params)), update)


def _public_transforms() -> list[str]:
  """The names in ``clipx.__all__`` of functions that return a GradientTransformation."""
  names = []
  for name in clipx.__all__:
    obj = getattr(clipx, name)
    if inspect.isfunction(obj):
      returns = str(inspect.signature(obj).return_annotation)
      if "GradientTransformation" in returns:
        names.append(name)
  return names


def _trees(scalar_a, scalar_p):
  grads = {"a": scalar_a, "b": jnp.array([1.0, -2.0, 0.5])}
  params = {"a": scalar_p, "b": jnp.array([0.5, 1.0, 2.0])}
  return grads, params


def test_every_public_transform_has_a_case():
  assert set(_public_transforms()) == set(FACTORIES)


@pytest.mark.parametrize("name", _public_transforms())
@pytest.mark.parametrize("jit", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_python_scalar_leaves_act_as_zero_dim_arrays(name, jit):
  runs = []
  for as_leaf in (float, lambda v: jnp.asarray(v, jnp.float32)):
    tx = FACTORIES[name]()
    grads, params = _trees(as_leaf(5.0), as_leaf(2.0))
    update = jax.jit(tx.update) if jit else tx.update
    state = tx.init(params)
    outs = []
    for step in range(3):  # past warm-ups, so the adaptive states move
      scaled = jax.tree.map(lambda g, s=1.0 + step: g * s, grads)
      out, state = update(scaled, state, params)
      outs.append(out)
    runs.append((outs, state))
  (outs, state), (ref_outs, ref_state) = runs
  for out, ref in zip(outs, ref_outs):
    assert jnp.asarray(out["a"]).dtype == jnp.float32
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), out, ref)
  jax.tree.map(
    lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), state, ref_state
  )


@pytest.mark.parametrize("jit", [False, True])
def test_scalar_leaves_are_clipped_as_the_formula_says(jit):
  grads, params = _trees(5.0, 2.0)
  value = clipx.clip_by_value(1.0)
  update = jax.jit(value.update) if jit else value.update
  out, _ = update(grads, value.init(params))
  np.testing.assert_array_equal(np.asarray(out["a"]), 1.0)
  np.testing.assert_array_equal(np.asarray(out["b"]), [1.0, -1.0, 0.5])
  agc = clipx.adaptive_grad_clip(0.1)
  update = jax.jit(agc.update) if jit else agc.update
  out, _ = update(grads, agc.init(params), params)
  # A scalar is one unit: |5| > 0.1 * |2|, so it becomes 0.1 * 2 with its sign.
  np.testing.assert_allclose(np.asarray(out["a"]), 0.2, rtol=1e-6)
  b, p = np.array([1.0, -2.0, 0.5]), np.array([0.5, 1.0, 2.0])
  bound = 0.1 * np.linalg.norm(p)
  np.testing.assert_allclose(np.asarray(out["b"]), b * bound / np.linalg.norm(b), rtol=1e-6)


def test_tree_functions_take_scalar_leaves():
  tree = {"a": 3.0, "b": jnp.array([4.0])}
  np.testing.assert_allclose(float(clipx.global_norm(tree)), 5.0, rtol=1e-6)
  clipped, _ = clipx.clip_tree(tree, 1.0)
  np.testing.assert_allclose(np.asarray(clipped["a"]), 0.6, rtol=1e-6)
  assert bool(clipx.all_finite(tree)) and not bool(clipx.all_finite({"a": float("nan")}))


@pytest.mark.parametrize("name", _public_transforms())
def test_a_python_int_leaf_is_a_type_error_naming_it(name):
  tx = FACTORIES[name]()
  grads, params = {"a": 5, "b": jnp.ones(3)}, {"a": 2.0, "b": jnp.ones(3)}
  with pytest.raises(TypeError, match=r"\['a'\].*floating point"):
    tx.update(grads, tx.init(params), params)
