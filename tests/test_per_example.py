"""Per-example clipping (clipx.clipped_grad) and DP noise (clipx.add_noise) against numpy."""

import math
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import clipx

# The examples package of this repository (not another distribution's
# top-level "examples", which Opacus 1.6 installs into site-packages).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# A two-layer linear model whose per-example gradients numpy computes by hand:
# f(x) = v . (x @ W + b) + c, loss = (f - y)^2 / 2, residual r = f - y.
IN, HIDDEN = 3, 4


def _params(seed=0):
  rng = np.random.default_rng(seed)
  return {
    "hidden": {
      "kernel": jnp.asarray(rng.normal(size=(IN, HIDDEN)), jnp.float32),
      "bias": jnp.asarray(rng.normal(size=HIDDEN), jnp.float32),
    },
    "out": {
      "kernel": jnp.asarray(rng.normal(size=HIDDEN), jnp.float32),
      "bias": jnp.asarray(rng.normal(), jnp.float32),
    },
  }


def _loss(params, example):
  x, y = example
  h = x @ params["hidden"]["kernel"] + params["hidden"]["bias"]
  f = h @ params["out"]["kernel"] + params["out"]["bias"]
  return 0.5 * (f - y) ** 2


def _batch(size, seed=1):
  # Example scales spread over two decades, so some are clipped and some not.
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(size, IN)) * np.exp(rng.uniform(-2, 2, size=(size, 1)))
  y = rng.normal(size=size)
  return jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)


def _np_per_example_grads(params, batch):
  """Per-example gradients by hand, in float64, as a list of flat dicts."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  out = []
  for x, y in zip(*(np.asarray(a, np.float64) for a in batch)):
    h = x @ p["hidden"]["kernel"] + p["hidden"]["bias"]
    r = h @ p["out"]["kernel"] + p["out"]["bias"] - y
    out.append(
      {
        ("hidden", "kernel"): r * np.outer(x, p["out"]["kernel"]),
        ("hidden", "bias"): r * p["out"]["kernel"],
        ("out", "kernel"): r * h,
        ("out", "bias"): np.asarray(r),
      }
    )
  return out


def _np_clipped_mean(params, batch, max_norm, groups):
  """Mean of per-example clipped gradients; ``groups`` lists the leaf keys sharing a norm."""
  grads = _np_per_example_grads(params, batch)
  total = {k: np.zeros_like(v) for k, v in grads[0].items()}
  norms = []
  for g in grads:
    example_norms = []
    for group in groups:
      norm = math.sqrt(sum(np.sum(g[k] ** 2) for k in group))
      scale = min(1.0, max_norm / norm)
      for k in group:
        total[k] += scale * g[k]
      example_norms.append(norm)
    norms.append(example_norms)
  return {k: v / len(grads) for k, v in total.items()}, np.asarray(norms)


def _flat(tree):
  return {tuple(k.key for k in path): np.asarray(v) for path, v in jax.tree.leaves_with_path(tree)}


# In jax.tree order (dict keys sorted), which is the order of stats per group.
LEAVES = [("hidden", "bias"), ("hidden", "kernel"), ("out", "bias"), ("out", "kernel")]
GROUPINGS = {
  None: [LEAVES],
  "leaf": [[k] for k in LEAVES],
  "module": [LEAVES[:2], LEAVES[2:]],
}


# ------------------------------------------------------------ against numpy


@pytest.mark.parametrize("group", [None, "leaf", "module"])
def test_matches_numpy_loop_over_examples(group):
  params, batch = _params(), _batch(12)
  grad_fn = jax.jit(clipx.clipped_grad(_loss, 1.0, group=group))
  grads, stats = grad_fn(params, batch)
  expected, expected_norms = _np_clipped_mean(params, batch, 1.0, GROUPINGS[group])
  got = _flat(grads)
  for key in LEAVES:
    np.testing.assert_allclose(got[key], expected[key], rtol=2e-5, atol=1e-7)
  norms = np.asarray(stats.norm).reshape(expected_norms.shape)
  np.testing.assert_allclose(norms, expected_norms, rtol=2e-5)
  clipped = expected_norms > 1.0
  assert 0 < clipped.sum() < clipped.size  # the test exercises both sides
  np.testing.assert_array_equal(np.asarray(stats.clipped).reshape(clipped.shape), clipped)
  np.testing.assert_array_equal(
    stats.clip_count, clipped.sum(axis=0).reshape(stats.clip_count.shape)
  )
  np.testing.assert_allclose(
    np.asarray(stats.clipped_norm).reshape(clipped.shape),
    np.minimum(expected_norms, 1.0),
    rtol=2e-5,
  )


def test_matches_optax_per_example_global_norm_clip():
  params, batch = _params(), _batch(16)
  grad_fn = clipx.clipped_grad(_loss, 0.7)

  @jax.jit
  def both(params, batch):
    per_example = jax.vmap(jax.grad(_loss), in_axes=(None, 0))(params, batch)
    leaves, treedef = jax.tree.flatten(per_example)
    summed, _ = optax.per_example_global_norm_clip(leaves, 0.7)
    return grad_fn(params, batch)[0], jax.tree.unflatten(treedef, [s / 16 for s in summed])

  grads, expected = both(params, batch)
  chex.assert_trees_all_close(grads, expected, rtol=1e-5, atol=1e-7)


def test_unclipped_single_example_is_its_gradient_bit_for_bit():
  params, batch = _params(), _batch(1)
  grads, stats = jax.jit(clipx.clipped_grad(_loss, 1e6))(params, batch)
  expected = jax.jit(jax.grad(_loss))(params, jax.tree.map(lambda x: x[0], batch))
  assert not bool(stats.clipped[0])
  chex.assert_trees_all_equal(grads, expected)


def test_per_group_thresholds():
  params, batch = _params(), _batch(12)
  bounds = jnp.asarray([0.5, 2.0])
  grads, stats = jax.jit(clipx.clipped_grad(_loss, bounds, group="module"))(params, batch)
  per_example = _np_per_example_grads(params, batch)
  expected = {k: 0.0 for k in LEAVES}
  for g in per_example:
    for bound, group in zip([0.5, 2.0], GROUPINGS["module"]):
      norm = math.sqrt(sum(np.sum(g[k] ** 2) for k in group))
      for k in group:
        expected[k] = expected[k] + min(1.0, bound / norm) * g[k] / len(per_example)
  got = _flat(grads)
  for key in LEAVES:
    np.testing.assert_allclose(got[key], expected[key], rtol=2e-5, atol=1e-7)
  np.testing.assert_array_equal(stats.threshold, bounds)


def test_has_aux_stacks_aux_per_example():
  params, batch = _params(), _batch(10)

  def loss_with_aux(p, example):
    loss = _loss(p, example)
    return loss, {"loss": loss, "twice": 2 * loss}

  grad_fn = clipx.clipped_grad(loss_with_aux, 1.0, has_aux=True, chunk_size=4)
  (grads, aux), _ = jax.jit(grad_fn)(params, batch)
  x, y = (np.asarray(a, np.float64) for a in batch)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  f = (x @ p["hidden"]["kernel"] + p["hidden"]["bias"]) @ p["out"]["kernel"] + p["out"]["bias"]
  expected_loss = 0.5 * (f - y) ** 2
  np.testing.assert_allclose(aux["loss"], expected_loss, rtol=1e-5)
  np.testing.assert_allclose(aux["twice"], 2 * expected_loss, rtol=1e-5)
  expected, _ = _np_clipped_mean(params, batch, 1.0, GROUPINGS[None])
  got = _flat(grads)
  for key in LEAVES:
    np.testing.assert_allclose(got[key], expected[key], rtol=2e-5, atol=1e-7)


# ------------------------------------------------------------ chunking


# 3 and 4 do not divide 10.
@pytest.mark.parametrize(
  ("group", "chunk_size"),
  [
    pytest.param(None, 1, marks=pytest.mark.slow),
    (None, 3),
    pytest.param("module", 4, marks=pytest.mark.slow),
  ],
)
def test_chunked_equals_unchunked(group, chunk_size):
  params, batch = _params(), _batch(10)
  whole_fn = clipx.clipped_grad(_loss, 1.0, group=group)
  chunked_fn = clipx.clipped_grad(_loss, 1.0, group=group, chunk_size=chunk_size)
  (whole, whole_stats), (chunked, stats) = jax.jit(lambda p, b: (whole_fn(p, b), chunked_fn(p, b)))(
    params, batch
  )
  # Only the order of the sum differs.
  chex.assert_trees_all_close(chunked, whole, rtol=1e-6, atol=1e-7)
  # Padding examples are neither counted nor returned.
  assert stats.norm.shape == whole_stats.norm.shape
  np.testing.assert_allclose(stats.norm, whole_stats.norm, rtol=1e-6)
  np.testing.assert_array_equal(stats.clipped, whole_stats.clipped)
  np.testing.assert_array_equal(stats.clip_count, whole_stats.clip_count)


@pytest.mark.parametrize("chunk_size", [4, 8])  # 8 > the batch: one chunk, no padding
def test_padding_does_not_leak_into_the_mean(chunk_size):
  # 5 examples in chunks of 4: the last chunk has 3 padding copies of the first
  # examples. If they were summed, the first example would weigh 2x.
  loss = lambda w, x: jnp.dot(w, x)  # the gradient is the example itself
  examples = jnp.asarray([[100.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0]])
  grads, stats = jax.jit(clipx.clipped_grad(loss, 1.0, chunk_size=chunk_size))(
    jnp.zeros(2), examples
  )
  np.testing.assert_allclose(grads, [1.0 / 5, 4.0 / 5], rtol=1e-6)
  assert int(stats.clip_count) == 1


# ------------------------------------------------------------ convolutions as matmuls


CONV_CASES = [
  # (input shape, kernel shape, strides, padding, kernel dilation, dimension numbers)
  ((2, 9, 7, 3), (3, 2, 3, 5), (1, 1), "SAME", (1, 1), ("NHWC", "HWIO", "NHWC")),
  ((2, 9, 7, 3), (3, 3, 3, 4), (2, 3), "VALID", (1, 1), ("NHWC", "HWIO", "NCHW")),
  ((2, 3, 10, 11), (4, 3, 3, 3), (1, 2), ((2, 0), (1, 3)), (2, 1), ("NCHW", "OIHW", "NCHW")),
  ((2, 12, 3), (5, 3, 4), (2,), "SAME", (2,), ("NWC", "WIO", "NWC")),
]


def test_convs_as_matmuls_match_xla_values_and_gradients():
  from clipx.per_example import convs_as_matmuls

  rng = np.random.default_rng(0)
  inputs = [
    (jnp.asarray(rng.normal(size=x), jnp.float32), jnp.asarray(rng.normal(size=k), jnp.float32))
    for x, k, *_ in CONV_CASES
  ]

  def loss(inputs):
    total = 0.0
    for (x, k), (_, _, strides, padding, dilation, numbers) in zip(inputs, CONV_CASES):
      y = jax.lax.conv_general_dilated(
        x, k, strides, padding, rhs_dilation=dilation, dimension_numbers=numbers
      )
      total = total + jnp.sum(jnp.tanh(y) ** 2)
    # A grouped convolution is left to XLA, and must still be right.
    x, k = inputs[0][0], inputs[0][1][..., :3, :]
    grouped = jax.lax.conv_general_dilated(
      jnp.concatenate([x, x], -1),
      jnp.concatenate([k, k], -1),
      (1, 1),
      "SAME",
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=2,
    )
    return total + jnp.sum(grouped)

  (value, grads), (expected, expected_grads) = jax.jit(
    lambda i: (jax.value_and_grad(convs_as_matmuls(loss))(i), jax.value_and_grad(loss)(i))
  )(inputs)
  np.testing.assert_allclose(value, expected, rtol=1e-5)
  chex.assert_trees_all_close(grads, expected_grads, rtol=1e-4, atol=1e-4)


def test_conv_as_matmul_gives_the_same_clipped_gradients():
  rng = np.random.default_rng(0)
  params = {
    "conv": jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32),
    "dense": jnp.asarray(rng.normal(size=(4 * 4 * 4,)), jnp.float32),
  }
  batch = jnp.asarray(rng.normal(size=(6, 4, 4, 2)), jnp.float32)

  def loss(p, image):
    y = jax.lax.conv_general_dilated(
      image[None], p["conv"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return jnp.sum(jnp.tanh(y).reshape(-1) * p["dense"])

  rewritten = clipx.clipped_grad(loss, 13.0, chunk_size=4, conv_as_matmul=True)
  plain = clipx.clipped_grad(loss, 13.0, chunk_size=4, conv_as_matmul=False)
  (a, stats), (b, expected_stats) = jax.jit(lambda p, x: (rewritten(p, x), plain(p, x)))(
    params, batch
  )
  chex.assert_trees_all_close(a, b, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(stats.norm, expected_stats.norm, rtol=1e-5)
  assert 0 < int(stats.clip_count) < 6  # norms here are 10 to 17: both sides exercised


# ------------------------------------------------------------ numerics


def test_huge_finite_gradients_are_scaled_not_zeroed():
  loss = lambda w, x: jnp.dot(w, x)
  examples = jnp.asarray([[1e20, 1e20], [3.0, 4.0]], jnp.float32)  # sum of squares overflows
  grads, stats = jax.jit(clipx.clipped_grad(loss, 1.0))(jnp.zeros(2), examples)
  np.testing.assert_allclose(stats.norm, [math.sqrt(2) * 1e20, 5.0], rtol=1e-6)
  expected = (np.asarray([1, 1]) / math.sqrt(2) + np.asarray([0.6, 0.8])) / 2
  np.testing.assert_allclose(grads, expected, rtol=1e-6)


def test_nonfinite_gradient_is_not_hidden():
  loss = lambda w, x: jnp.dot(w, x)
  examples = jnp.asarray([[jnp.nan, 1.0], [3.0, 4.0], [0.3, 0.4]])
  grads, stats = jax.jit(clipx.clipped_grad(loss, 1.0, chunk_size=2))(jnp.zeros(2), examples)
  assert np.isnan(np.asarray(grads)[0])
  np.testing.assert_array_equal(stats.clipped, [False, True, False])


@pytest.mark.parametrize("dtype", [jnp.bfloat16])
def test_low_precision_params_keep_dtype_and_use_float32_norms(dtype):
  params = jax.tree.map(lambda x: x.astype(dtype), _params())
  batch = jax.tree.map(lambda x: x.astype(dtype), _batch(8))
  grads, stats = jax.jit(clipx.clipped_grad(_loss, 1.0))(params, batch)
  assert all(leaf.dtype == dtype for leaf in jax.tree.leaves(grads))
  assert stats.norm.dtype == jnp.float32
  reference, _ = _np_clipped_mean(params, batch, 1.0, GROUPINGS[None])
  got = _flat(grads)
  for key in LEAVES:  # low precision forward pass: a loose check
    np.testing.assert_allclose(
      np.asarray(got[key], np.float32), reference[key], rtol=0.1, atol=0.05
    )


def test_jitted_call_does_not_retrace():
  grad_fn = clipx.clipped_grad(_loss, 1.0, chunk_size=3)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(params, batch):
    return grad_fn(params, batch)

  params = _params()
  step(params, _batch(8, seed=1))
  step(params, _batch(8, seed=2))


# ------------------------------------------------------------ stateful thresholds


def test_quantile_converges_to_target_fraction():
  # The gradient of w . x is x: per-example norms are |x|, drawn log-normal, so
  # the threshold should settle at their target quantile exp(sigma * z_q).
  target, sigma, batch_size = 0.7, 0.5, 64
  loss = lambda w, x: jnp.dot(w, x)
  grad_fn = clipx.clipped_grad(loss, clipx.quantile(target, learning_rate=0.2, initial=0.1))
  params = jnp.zeros(2)

  @jax.jit
  def run(state, key):
    def step(state, key):
      k1, k2 = jax.random.split(key)
      radius = jnp.exp(sigma * jax.random.normal(k1, (batch_size,)))
      angle = jax.random.uniform(k2, (batch_size,), maxval=2 * jnp.pi)
      examples = radius[:, None] * jnp.stack([jnp.cos(angle), jnp.sin(angle)], axis=1)
      _, stats, state = grad_fn(params, examples, state)
      return state, (stats.threshold, 1 - jnp.mean(stats.clipped))

    return jax.lax.scan(step, state, jax.random.split(key, 600))

  _, (thresholds, unclipped) = run(grad_fn.init(params), jax.random.key(0))
  # From 0.1 the threshold must climb by a factor ~15 (it moves at most
  # exp(0.2 * 0.7) per step), then fluctuate around the quantile.
  assert float(thresholds[0]) == pytest.approx(0.1)
  settled_fraction = float(jnp.mean(unclipped[300:]))
  # Per step the fraction has std sqrt(q (1 - q) / 64) = 0.057; 300 correlated
  # steps average it far below 0.03.
  assert abs(settled_fraction - target) < 0.03
  true_quantile = math.exp(sigma * 0.5244005127080407)  # z_0.7 of the standard normal
  assert float(jnp.median(thresholds[300:])) == pytest.approx(true_quantile, rel=0.1)


def test_quantile_threshold_clips_with_state_before_update():
  loss = lambda w, x: jnp.dot(w, x)
  grad_fn = clipx.clipped_grad(loss, clipx.quantile(0.5, learning_rate=0.5, initial=1.0))
  state, step = grad_fn.init(jnp.zeros(2)), jax.jit(grad_fn)
  examples = jnp.asarray([[3.0, 4.0], [6.0, 8.0]])  # both above 1: fraction 0
  grads, stats, state = step(jnp.zeros(2), examples, state)
  assert float(stats.threshold) == 1.0
  np.testing.assert_allclose(grads, [0.6, 0.8], rtol=1e-6)
  np.testing.assert_allclose(state.threshold_state.threshold, math.exp(0.5 * 0.5), rtol=1e-6)
  assert int(state.clip_count) == 2
  _, stats, state = step(jnp.zeros(2), examples, state)
  np.testing.assert_allclose(stats.threshold, math.exp(0.25), rtol=1e-6)
  assert int(stats.clip_count) == 4  # cumulative with a state


def test_per_layer_quantile_has_one_threshold_per_group():
  params, batch = _params(), _batch(12)
  grad_fn = clipx.clipped_grad(_loss, clipx.quantile(0.5, initial=1.0), group="module")
  state = grad_fn.init(params)
  _, stats, state = jax.jit(grad_fn)(params, batch, state)
  assert stats.norm.shape == (12, 2)
  assert state.threshold_state.threshold.shape == (2,)
  fraction = np.mean(np.asarray(stats.norm) <= 1.0, axis=0)
  np.testing.assert_allclose(
    state.threshold_state.threshold, np.exp(-0.2 * (fraction - 0.5)), rtol=1e-6
  )


def test_schedule_threshold_advances_per_call():
  loss = lambda w, x: jnp.dot(w, x)
  grad_fn = clipx.clipped_grad(loss, optax.linear_schedule(4.0, 1.0, 3))
  state, step = grad_fn.init(jnp.zeros(2)), jax.jit(grad_fn)
  seen = []
  for _ in range(4):
    _, stats, state = step(jnp.zeros(2), jnp.asarray([[3.0, 4.0]]), state)
    seen.append(float(stats.threshold))
  np.testing.assert_allclose(seen, [4.0, 3.0, 2.0, 1.0], rtol=1e-6)


# ------------------------------------------------------------ noise


def test_noise_has_the_stated_std():
  noise_multiplier, max_norm, batch_size, n = 1.3, 2.0, 50, 200_000
  tx = clipx.add_noise(noise_multiplier, max_norm, batch_size, key=jax.random.key(42))
  zeros = {"a": jnp.zeros((n // 2,)), "b": jnp.zeros((n // 4, 2))}
  state = tx.init(zeros)
  first, state = jax.jit(tx.update)(zeros, state)
  second, state = jax.jit(tx.update)(zeros, state)
  sample = np.concatenate([np.ravel(x) for x in jax.tree.leaves(first)]).astype(np.float64)
  std = noise_multiplier * max_norm / batch_size
  # For n normal samples the sample std has standard error std / sqrt(2 n) and
  # the mean std / sqrt(n); allow five standard errors.
  assert abs(sample.std() / std - 1) < 5 / math.sqrt(2 * n)
  assert abs(sample.mean()) < 5 * std / math.sqrt(n)
  # Fresh noise each step, and independent across leaves: correlations ~ 0.
  other = np.concatenate([np.ravel(x) for x in jax.tree.leaves(second)])
  assert abs(np.corrcoef(sample, other)[0, 1]) < 5 / math.sqrt(n)
  a, b = np.ravel(first["a"]), np.ravel(first["b"])
  assert abs(np.corrcoef(a, b)[0, 1]) < 5 / math.sqrt(n // 2)
  assert int(state.count) == 2


def test_noise_is_reproducible_from_the_key_and_keeps_dtype():
  grads = {"w": jnp.ones(8, jnp.bfloat16)}
  a, _ = clipx.add_noise(1.0, 1.0, 4, key=7).update(
    grads, clipx.add_noise(1.0, 1.0, 4, 7).init(grads)
  )
  raw = clipx.add_noise(1.0, 1.0, 4, key=jax.random.PRNGKey(7))
  b, state = raw.update(grads, raw.init(grads))
  assert a["w"].dtype == jnp.bfloat16
  chex.assert_trees_all_equal(a, b)  # an int seed and a raw key of that seed agree
  # The state holds the key as plain uint32 data (checkpointable), split once.
  expected_key = jax.random.key_data(jax.random.split(jax.random.key(7))[0])
  chex.assert_trees_all_equal(state.key, expected_key)


def test_noise_follows_an_adaptive_bound_passed_through_chain():
  tx = optax.chain(clipx.add_noise(1.0, 1.0, 1, key=0), optax.identity())
  zeros = {"w": jnp.zeros(40_000)}
  state = tx.init(zeros)
  fixed, _ = tx.update(zeros, state)
  moved, _ = tx.update(zeros, state, max_norm=3.0)
  np.testing.assert_allclose(moved["w"], 3.0 * fixed["w"], rtol=1e-6)


def test_zero_noise_is_identity():
  tx = clipx.add_noise(0.0, 1.0, 8, key=0)
  grads = {"w": jnp.arange(5.0)}
  out, _ = tx.update(grads, tx.init(grads))
  chex.assert_trees_all_equal(out, grads)


# ------------------------------------------------------------ bad arguments


@pytest.mark.parametrize(
  ("kwargs", "error", "match"),
  [
    ({"chunk_size": 0}, ValueError, "chunk_size"),
    ({"chunk_size": -2}, ValueError, "chunk_size"),
    ({"chunk_size": 2.5}, TypeError, "chunk_size"),
    ({"chunk_size": True}, TypeError, "chunk_size"),
    ({"group": "layers"}, ValueError, "group"),
    ({"has_aux": "yes"}, TypeError, "has_aux"),
    ({"conv_as_matmul": "auto"}, TypeError, "conv_as_matmul"),
    ({"max_norm": -1.0}, ValueError, "max_norm"),
    ({"max_norm": 0.0}, ValueError, "max_norm"),
    ({"max_norm": float("nan")}, ValueError, "max_norm"),
    ({"max_norm": clipx.zclip()}, TypeError, "ZClipState"),
    ({"max_norm": clipx.autoclip()}, TypeError, "quantile"),
  ],
)
def test_clipped_grad_rejects_bad_arguments(kwargs, error, match):
  kwargs = {"max_norm": 1.0, **kwargs}
  with pytest.raises(error, match=match):
    clipx.clipped_grad(_loss, **kwargs)


def test_clipped_grad_rejects_bad_calls():
  with pytest.raises(TypeError, match="callable"):
    clipx.clipped_grad("loss", 1.0)
  params = _params()
  x, y = _batch(4)
  with pytest.raises(ValueError, match="disagree"):
    clipx.clipped_grad(_loss, 1.0)(params, (x, y[:3]))
  with pytest.raises(ValueError, match="scalar"):
    clipx.clipped_grad(_loss, 1.0)(params, (x, jnp.float32(1.0)))
  with pytest.raises(ValueError, match="empty"):
    clipx.clipped_grad(_loss, 1.0)(params, (x[:0], y[:0]))
  with pytest.raises(ValueError, match="grad_fn.init"):
    clipx.clipped_grad(_loss, clipx.quantile())(params, (x, y))


@pytest.mark.parametrize(
  ("args", "error"),
  [
    ((-1.0, 1.0, 8, 0), ValueError),
    ((float("nan"), 1.0, 8, 0), ValueError),
    ((1.0, 0.0, 8, 0), ValueError),
    ((1.0, 1.0, 0, 0), ValueError),
    ((1.0, 1.0, 8, "seed"), TypeError),
    ((1.0, 1.0, 8, jnp.zeros(3)), TypeError),
    ((1.0, 1.0, 8, jax.random.split(jax.random.key(0), 2)), ValueError),
  ],
)
def test_add_noise_rejects_bad_arguments(args, error):
  with pytest.raises(error):
    clipx.add_noise(*args)


@pytest.mark.parametrize(
  ("key", "error"),
  [
    ("seed", TypeError),
    (None, TypeError),
    (object(), TypeError),
    ({"seed": 0}, TypeError),
    ([0, 1], TypeError),
    (1.5, TypeError),
    (np.float32(3.0), TypeError),
    (2**64, ValueError),  # beyond the int64 seeds jax.random.key takes
    (-(2**63) - 1, ValueError),
  ],
)
def test_add_noise_names_a_bad_key(key, error):
  # The error is clipx's, at construction, and names the argument (JAX's own
  # errors for these say "not a valid JAX array type" or "too large to convert").
  with pytest.raises(error, match=r"clipx\.add_noise: key must be"):
    clipx.add_noise(1.0, 1.0, 8, key=key)


# ------------------------------------------------------------ the DP-SGD example


def test_example_poisson_batches_mask_and_truncate():
  from examples import dp_train_cnn

  rng = np.random.default_rng(0)
  sizes = []
  for indices, weights in dp_train_cnn.poisson_batches(rng, 1000, 0.05, 90, steps=400):
    used = int(weights.sum())
    assert weights.shape == indices.shape == (90,)
    assert np.all(weights[:used] == 1) and np.all(weights[used:] == 0)
    assert len(set(indices[:used].tolist())) == used  # no example twice in a batch
    sizes.append(used)
  # Binomial(1000, 0.05): mean 50, variance 47.5; the mean of 400 within 5 standard errors.
  assert abs(np.mean(sizes) - 50) < 5 * math.sqrt(47.5 / 400)
  # Rate 0.5 of 100 examples, at most 10 rows: always truncated to exactly 10.
  for indices, weights in dp_train_cnn.poisson_batches(rng, 100, 0.5, 10, steps=5):
    assert weights.sum() == 10 and len(set(indices.tolist())) == 10


def test_example_epsilon_matches_untruncated_poisson_accounting():
  pytest.importorskip("dp_accounting")
  import dp_accounting
  from dp_accounting import pld

  from examples import dp_train_cnn

  # With room for the whole dataset, truncation never happens: the epsilon is
  # that of the plain Poisson-subsampled Gaussian mechanism.
  epsilon = dp_train_cnn.privacy_epsilon(
    dataset_size=200, batch_size=20, max_batch=200, noise_multiplier=1.0, steps=30, delta=1e-5
  )
  accountant = pld.PLDAccountant()
  event = dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(1.0))
  accountant.compose(event, 30)
  assert epsilon == pytest.approx(accountant.get_epsilon(1e-5), rel=0.02)


@pytest.mark.slow
def test_example_runs_and_reports_accuracy_and_epsilon(capsys):
  pytest.importorskip("dp_accounting")
  from examples import dp_train_cnn

  report = dp_train_cnn.main(["--epochs", "0.5", "--batch-size", "48", "--quiet"])
  # 15 noisy steps: the loss is below that of uniform predictions, log(10).
  assert report["test_loss"] < math.log(10)
  assert 0 <= report["test_accuracy"] <= 1
  assert 0 < report["epsilon"] < 10
  assert "privacy: (" in capsys.readouterr().out
