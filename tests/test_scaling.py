"""clipx.scaling: how scales reach the leaves, against numpy and in the compiled program."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import clipx
from clipx import scaling


def test_scale_leaf_keeps_every_bit_at_scale_one():
  x = jnp.array([1.5, -3e-38, 1.0, -0.0, 0.0, 3.0e38, -np.inf, np.inf, np.nan], jnp.float32)
  out = jax.jit(scaling.scale_leaf)(x, jnp.float32(1.0))
  assert np.asarray(out).tobytes() == np.asarray(x).tobytes()


def test_unclipped_step_equals_the_optimizer_alone_bit_for_bit_even_subnormals():
  # XLA CPU flushes subnormals in all arithmetic, so x * 1.0 may zero them in the
  # clip's own output; the optimizer's arithmetic flushes them too, so the step
  # with clipping below the threshold is the step without it, bit for bit.
  grads = {"w": jnp.array([1e-40, -3e-42, 0.25, -0.5], jnp.float32), "b": jnp.array([2e-39])}
  params = {"w": jnp.array([1e-41, 1.0, -2.0, 3.0], jnp.float32), "b": jnp.array([5e-40])}

  def step(tx):
    def run(params, grads):  # arguments, not constants: XLA would fold constants exactly
      updates, _ = tx.update(grads, tx.init(params), params)
      return optax.apply_updates(params, updates)

    return jax.jit(run)(params, grads)

  sgd = optax.sgd(0.1, momentum=0.9)
  clipped = step(optax.chain(clipx.clip_by_global_norm(10.0), sgd))
  alone = step(sgd)
  for key in params:
    assert np.asarray(clipped[key]).tobytes() == np.asarray(alone[key]).tobytes()


def test_scale_tree_matches_scale_leaf_and_numpy():
  tree = {
    "a": jnp.array([[1.0, -2.0], [3.0, 4.0]], jnp.float32),
    "b": jnp.array([[0.5, 0.25], [8.0, -1.0]], jnp.float32),
    "c": jnp.array([1.5, -2.25, 3.0], jnp.bfloat16),
  }
  out = jax.jit(scaling.scale_tree)(tree, jnp.float32(0.3))
  for key, leaf in tree.items():
    assert out[key].dtype == leaf.dtype
    expected = (np.asarray(leaf, np.float32) * np.float32(0.3)).astype(leaf.dtype)
    np.testing.assert_array_equal(np.asarray(out[key]), expected)
    np.testing.assert_array_equal(np.asarray(out[key]), scaling.scale_leaf(leaf, jnp.float32(0.3)))


def test_scale_leaf_scales_in_float32_and_keeps_dtype():
  x = jnp.array([1.5, -2.25, 3.0], jnp.bfloat16)
  out = scaling.scale_leaf(x, jnp.float32(0.3))
  assert out.dtype == jnp.bfloat16
  expected = (np.asarray(x, np.float32) * np.float32(0.3)).astype(jnp.bfloat16)
  np.testing.assert_array_equal(np.asarray(out), expected)


def test_gated_slices_read_each_leafs_span_or_ones():
  hi = jnp.array([0.5, 1.0, 0.25, 0.125, 1.0, 0.75], jnp.float32)
  lo = jnp.array([1.0, 1.0, 2.0**-60, 1.0, 1.0, 0.5], jnp.float32)
  spans = [(0, ()), (1, (1, 3)), (4, (2,)), (2, (3, 1))]
  fn = jax.jit(lambda c: scaling.gated_slices(c, hi, lo, spans))
  for (got_hi, got_lo), (offset, shape) in zip(fn(True), spans):
    size = int(np.prod(shape))
    for got, table in ((got_hi, hi), (got_lo, lo)):
      np.testing.assert_array_equal(
        np.asarray(got), np.asarray(table)[offset : offset + size].reshape(shape)
      )
  for (got_hi, got_lo), (_, shape) in zip(fn(False), spans):
    np.testing.assert_array_equal(np.asarray(got_hi), np.ones(shape, np.float32))
    np.testing.assert_array_equal(np.asarray(got_lo), np.ones(shape, np.float32))


def test_gated_scale():
  assert scaling.gated_scale(jnp.bool_(True), jnp.float32(0.5), jnp.float32(0.25)) == (0.5, 0.25)
  assert scaling.gated_scale(jnp.bool_(False), jnp.float32(0.5), jnp.float32(0.25)) == (1.0, 1.0)


def _distinct_kernels(compiled_text: str) -> int:
  """Fused computations that differ in more than their names."""
  bodies = re.findall(r"^%fused_computation[\w.-]* \(.*?\n(.*?)^}", compiled_text, re.M | re.S)
  normalized = set()
  for body in bodies:
    body = re.sub(r", metadata=\{[^}]*\}", "", body)
    normalized.add(re.sub(r"%[\w.-]+", "%", body))
  return len(normalized)


def _layers(count):
  return [{"w": np.ones((16, 16), np.float32), "b": np.ones(16, np.float32)} for _ in range(count)]


@pytest.mark.slow
@pytest.mark.parametrize(
  "clip",
  [clipx.clip_by_global_norm(1.0), clipx.clip_by_layer_norm(1.0), clipx.adaptive_grad_clip(0.01)],
  ids=["global", "layer", "agc"],
)
def test_same_shape_leaves_share_their_kernels(clip):
  # The compile-time design (clipx/scaling.py): with a static slice per leaf the
  # number of distinct kernels grew with the tree (layer clip: 34 at 16 leaves,
  # 82 at 64), and XLA compiles each distinct kernel.
  tx = optax.chain(clip, optax.sgd(0.1, momentum=0.9))

  def distinct(count):
    tree = _layers(count)
    step = jax.jit(lambda g, s, p: tx.update(g, s, p))
    return _distinct_kernels(step.lower(tree, tx.init(tree), tree).compile().as_text())

  # Per-leaf kernels would add dozens from 8 to 32 layers; the fixed part (norms,
  # decision) may fuse a kernel or two differently as its stacks grow.
  small, large = distinct(8), distinct(32)
  assert 0 < large <= small + 2, (small, large)
