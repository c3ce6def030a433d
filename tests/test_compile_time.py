"""Compile time must grow no faster than the tree (guards a 25-40x regression).

A per-leaf overflow fallback once made the 400-leaf norm compile in 37-47 s
against 1-1.5 s; these bound the growth from 60 to 240 leaves.
"""

import time

import jax
import numpy as np
import optax
import pytest

import clipx


def _seconds(fn, *args) -> float:
  jax.clear_caches()  # measure a real compile, not a cache hit
  start = time.perf_counter()
  jax.jit(fn).lower(*args).compile()
  return time.perf_counter() - start


def _distinct_shapes(num_leaves):
  # The worst case for stacking: no two small leaves share a shape.
  return [np.ones((i % 20 + 1, i // 20 + 1), np.float32) for i in range(num_leaves)]


def _layers(num_leaves):
  return [
    {"w": np.ones((16, 16), np.float32), "b": np.ones(16, np.float32)}
    for _ in range(num_leaves // 2)
  ]


def test_global_norm_compile_time_grows_at_most_linearly():
  _seconds(clipx.global_norm, _distinct_shapes(10))  # warm up the compiler
  small = _seconds(clipx.global_norm, _distinct_shapes(60))
  large = _seconds(clipx.global_norm, _distinct_shapes(240))
  # Linear growth is 4x; the per-leaf fallback regression was ~23x.
  assert large / small < 6, (small, large)


@pytest.mark.slow
def test_clip_and_sgd_compile_time_grows_at_most_linearly():
  tx = optax.chain(clipx.clip_by_global_norm(1.0), optax.sgd(0.1, momentum=0.9))

  def seconds(num_leaves):
    tree = _layers(num_leaves)
    return _seconds(tx.update, tree, tx.init(tree), tree)

  seconds(10)
  small = seconds(60)
  large = seconds(240)
  assert large / small < 6, (small, large)
