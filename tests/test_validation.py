"""Every public constructor rejects bad arguments at construction, naming them.

Values of the wrong kind are a TypeError, numbers out of range a ValueError,
and the message names the argument. Traced values (inject_hyperparams under
jit) still work.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import clipx

WRONG_KINDS = [None, object(), [1.0], "0.5", 1j, True, np.array(["a"])]

# (constructor taking one keyword, argument name): every real-number argument.
NUMBER_ARGUMENTS = [
  (lambda v: clipx.clip_by_global_norm(v), "max_norm"),
  (lambda v: clipx.clip_by_layer_norm(v), "max_norm"),
  (lambda v: clipx.clip_by_value(v), "max_abs"),
  (lambda v: clipx.adaptive_grad_clip(v), "clipping"),
  (lambda v: clipx.adaptive_grad_clip(0.1, eps=v), "eps"),
  (lambda v: clipx.clip_tree({"w": jnp.ones(2)}, v), "max_norm"),
  (lambda v: clipx.clipped_grad(lambda p, x: 0.0, v), "max_norm"),
  (lambda v: clipx.autoclip(percentile=v), "percentile"),
  (lambda v: clipx.autoclip(initial=v), "initial"),
  (lambda v: clipx.autoclip(max_threshold=v), "max_threshold"),
  (lambda v: clipx.zclip(z_threshold=v), "z_threshold"),
  (lambda v: clipx.zclip(alpha=v), "alpha"),
  (lambda v: clipx.zclip(initial=v), "initial"),
  (lambda v: clipx.zclip(max_threshold=v), "max_threshold"),
  (lambda v: clipx.ema_ratio(ratio=v), "ratio"),
  (lambda v: clipx.ema_ratio(decay=v), "decay"),
  (lambda v: clipx.ema_ratio(max_threshold=v), "max_threshold"),
  (lambda v: clipx.quantile(target_quantile=v), "target_quantile"),
  (lambda v: clipx.quantile(learning_rate=v), "learning_rate"),
  (lambda v: clipx.quantile(initial=v), "initial"),
  (lambda v: clipx.quantile(max_threshold=v), "max_threshold"),
  (lambda v: clipx.skip_spikes(optax.sgd(0.1), factor=v), "factor"),
  (lambda v: clipx.skip_spikes(optax.sgd(0.1), decay=v), "decay"),
  (lambda v: clipx.add_noise(v, 1.0, 10, key=0), "noise_multiplier"),
  (lambda v: clipx.add_noise(1.0, v, 10, key=0), "max_norm"),
  (lambda v: clipx.add_noise(1.0, 1.0, v, key=0), "batch_size"),
]

INTEGER_ARGUMENTS = [
  (lambda v: clipx.autoclip(history=v), "history"),
  (lambda v: clipx.autoclip(warmup_steps=v), "warmup_steps"),
  (lambda v: clipx.zclip(warmup_steps=v), "warmup_steps"),
  (lambda v: clipx.ema_ratio(warmup_steps=v), "warmup_steps"),
  (lambda v: clipx.skip_spikes(optax.sgd(0.1), warmup_steps=v), "warmup_steps"),
]


def _ids(cases):
  return [f"{name}-{i}" for i, (_, name) in enumerate(cases)]


@pytest.mark.parametrize("make, name", NUMBER_ARGUMENTS, ids=_ids(NUMBER_ARGUMENTS))
@pytest.mark.parametrize("bad", WRONG_KINDS, ids=repr)
def test_numbers_of_the_wrong_kind_are_type_errors(make, name, bad):
  with pytest.raises(TypeError, match=name):
    make(bad)


@pytest.mark.parametrize("make, name", NUMBER_ARGUMENTS, ids=_ids(NUMBER_ARGUMENTS))
def test_nan_is_never_in_range(make, name):
  with pytest.raises(ValueError, match=name):
    make(float("nan"))


@pytest.mark.parametrize("make, name", INTEGER_ARGUMENTS, ids=_ids(INTEGER_ARGUMENTS))
@pytest.mark.parametrize(
  "bad", [float("nan"), float("inf"), 10.0, 2.5, True, None, "10", -1], ids=repr
)
def test_integer_arguments_take_only_ints(make, name, bad):
  with pytest.raises((TypeError, ValueError), match=name):
    make(bad)


@pytest.mark.parametrize(
  "make, name",
  [
    (lambda: clipx.add_noise(1.0, 1.0, float("inf"), key=0), "batch_size"),  # noise std 0
    (lambda: clipx.add_noise(float("inf"), 1.0, 10, key=0), "noise_multiplier"),
    (lambda: clipx.add_noise(1.0, float("inf"), 10, key=0), "max_norm"),
    (lambda: clipx.quantile(learning_rate=float("inf")), "learning_rate"),
    (lambda: clipx.quantile(initial=float("inf")), "initial"),
    (lambda: clipx.adaptive_grad_clip(0.1, eps=float("inf")), "eps"),
    (lambda: clipx.clip_by_global_norm(-float("inf")), "max_norm"),
    (lambda: clipx.autoclip(percentile=100.5), "percentile"),
    (lambda: clipx.zclip(alpha=1.0), "alpha"),
    (lambda: clipx.ema_ratio(ratio=1.0), "ratio"),
  ],
)
def test_numbers_out_of_range_are_value_errors(make, name):
  with pytest.raises(ValueError, match=name):
    make()


@pytest.mark.parametrize("bad", [0, None, "sgd", optax.sgd, object()], ids=repr)
def test_skip_wrappers_need_a_transformation(bad):
  for wrapper in (clipx.skip_nonfinite, clipx.skip_spikes):
    with pytest.raises(TypeError, match="inner"):
      wrapper(bad)


@pytest.mark.parametrize("factory", [clipx.zclip, clipx.autoclip, clipx.ema_ratio, clipx.quantile])
def test_an_uncalled_policy_constructor_is_caught(factory):
  name = factory.__name__
  for make in (clipx.clip_by_global_norm, clipx.clip_by_layer_norm, clipx.clip_by_value):
    with pytest.raises(TypeError, match=rf"clipx\.{name}\(\)"):
      make(factory)


def test_a_type_is_not_a_schedule():
  with pytest.raises(TypeError, match="max_norm"):
    clipx.clip_by_global_norm(float)


@pytest.mark.parametrize("bad", [np.array("leaf"), np.array(["leaf"]), 3, None])
def test_group_and_mode_take_strings_not_arrays(bad):
  with pytest.raises(TypeError, match="group"):
    clipx.clip_by_layer_norm(1.0, group=bad)
  if bad is not None:  # clipped_grad's group=None is the whole gradient
    with pytest.raises(TypeError, match="group"):
      clipx.clipped_grad(lambda p, x: 0.0, 1.0, group=bad)
  with pytest.raises(TypeError, match="mode"):
    clipx.zclip(mode=bad)


def test_unknown_group_and_mode_strings_are_value_errors():
  with pytest.raises(ValueError, match="group.*'leaf' or 'module'"):
    clipx.clip_by_layer_norm(1.0, group="layer")
  with pytest.raises(ValueError, match="mode"):
    clipx.zclip(mode="zscore")


@pytest.mark.parametrize("bad", [(0, 0), 1.0, "0", (True,), ()], ids=repr)
def test_agc_axis_kind_and_duplicates_fail_at_construction(bad):
  with pytest.raises((TypeError, ValueError), match="axis"):
    clipx.adaptive_grad_clip(0.1, axis=bad)


@pytest.mark.parametrize("axis", [5, -3, (1, -1)])
def test_agc_axis_out_of_range_names_the_leaf(axis):
  tx = clipx.adaptive_grad_clip(0.1, axis=axis)
  params = {"dense": {"kernel": jnp.ones((3, 4))}}
  with pytest.raises(ValueError, match=r"dense/kernel.*rank 2"):
    tx.update(params, tx.init(params), params)


def test_traced_hyperparameters_still_work_under_jit():
  tx = optax.inject_hyperparams(clipx.clip_by_global_norm)(max_norm=1.0)
  inner = optax.inject_hyperparams(clipx.skip_spikes, static_args=("inner",))(
    inner=optax.sgd(0.1), factor=3.0, decay=0.9, warmup_steps=2
  )
  policy_tx = optax.inject_hyperparams(
    lambda z_threshold, alpha: clipx.clip_by_global_norm(clipx.zclip(z_threshold, alpha))
  )(z_threshold=2.0, alpha=0.9)
  grads = {"w": jnp.asarray([3.0, 4.0])}
  for transform in (tx, inner, policy_tx):
    state = transform.init(grads)
    step = jax.jit(transform.update)
    for _ in range(3):
      out, state = step(grads, state, grads)
    assert np.all(np.isfinite(np.asarray(out["w"])))
  np.testing.assert_allclose(
    np.asarray(jax.jit(tx.update)(grads, tx.init(grads))[0]["w"]), [0.6, 0.8]
  )
