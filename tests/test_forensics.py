"""Spike forensics: the statistics say where a norm came from.

``source`` is the leaf (global, AGC, value) or group (per layer) with the
largest share of the squared norm, ``share`` that fraction; the skip wrappers
say the same, and ``skip_nonfinite`` names the first leaf and, under
``shard_map``, the first device holding NaN/Inf. Checked against numpy.
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
from clipx import norms


def _tree(spike_leaf: str | None = None, big: float = 50.0):
  rng = np.random.default_rng(0)
  tree = {
    "decoder": {"w": rng.normal(size=(300, 200)), "b": rng.normal(size=(200,))},
    "encoder": {"w": rng.normal(size=(8, 8)), "b": rng.normal(size=(8,))},
    "head": rng.normal(size=(3,)),
  }
  tree = jax.tree.map(lambda x: jnp.asarray(x * 0.01, jnp.float32), tree)
  if spike_leaf:
    outer, inner = spike_leaf.split("/")
    tree[outer][inner] = tree[outer][inner] * big
  return tree


def _expected(tree):
  paths = [clipx.stacking.path_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]
  sq = np.asarray([np.sum(np.asarray(x, np.float64) ** 2) for x in jax.tree.leaves(tree)])
  return paths, int(np.argmax(sq)), float(np.max(sq) / np.sum(sq))


@pytest.mark.parametrize("spike", ["decoder/w", "encoder/b", "encoder/w", "decoder/b"])
def test_global_clip_names_the_spiking_leaf(spike):
  tree = _tree(spike, big=2000.0)
  tx = clipx.clip_by_global_norm(1.0)
  _, state = jax.jit(tx.update)(tree, tx.init(tree))
  paths, index, share = _expected(tree)
  report = clipx.stats(state)
  assert paths[index] == spike
  assert int(report["global"].source) == index
  np.testing.assert_allclose(float(report["global"].share), share, rtol=1e-5)
  assert report.source_paths() == {"global": spike}
  assert f"source={spike}" in str(report)
  assert report.as_dict()["clip/global/source"] == float(index)


def test_global_forensics_on_the_overflow_path():
  tree = _tree()
  tree["encoder"]["b"] = tree["encoder"]["b"].at[0].set(3e38)  # sum of squares overflows
  _, stats = clipx.clip_tree(tree, 1.0)
  assert int(stats.source) == 2  # leaf order: decoder/b, decoder/w, encoder/b, ...
  assert float(stats.share) == pytest.approx(1.0)


def test_layer_clip_names_the_group_with_the_largest_norm():
  tree = _tree("encoder/w", big=5000.0)
  tx = clipx.clip_by_layer_norm(1.0, group="module")
  _, state = jax.jit(tx.update)(tree, tx.init(tree))
  report = clipx.stats(state)
  norms = np.asarray(report["layer"].norm, np.float64)
  assert report.source_paths()["layer"] == "encoder"
  np.testing.assert_allclose(float(report["layer"].share), np.max(norms**2) / np.sum(norms**2))


def test_agc_and_value_clip_name_the_leaf():
  tree = _tree("encoder/b", big=5000.0)
  params = jax.tree.map(jnp.ones_like, tree)
  agc = clipx.adaptive_grad_clip(0.01)
  _, state = jax.jit(agc.update)(tree, agc.init(params), params)
  paths, index, share = _expected(tree)
  assert clipx.stats(state).source_paths()["agc"] == "encoder/b"
  np.testing.assert_allclose(float(clipx.stats(state)["agc"].share), share, rtol=1e-5)
  value = clipx.clip_by_value(0.1)
  _, state = jax.jit(value.update)(tree, value.init(tree))
  largest = [float(np.max(np.abs(np.asarray(x)))) for x in jax.tree.leaves(tree)]
  assert int(clipx.stats(state)["value"].source) == int(np.argmax(largest))


def test_skip_spikes_names_the_leaf_of_a_skipped_step():
  tx = clipx.skip_spikes(optax.sgd(0.1), warmup_steps=3)
  params = _tree()
  state = tx.init(params)
  step = jax.jit(tx.update)
  for _ in range(5):
    _, state = step(_tree(), state, params)
  _, state = step(_tree("decoder/b", big=1e4), state, params)
  report = clipx.stats(state)
  assert bool(report["skip_spikes"].skipped)
  assert report.source_paths()["skip_spikes"] == "decoder/b"


def test_nonfinite_device_under_shard_map():
  code = textwrap.dedent(
    """
    from functools import partial
    import jax, jax.numpy as jnp, numpy as np, optax, clipx
    from jax.sharding import PartitionSpec as P
    mesh = jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
    tx = clipx.skip_nonfinite(optax.sgd(0.1), axis_name="d")

    @jax.jit
    @partial(jax.shard_map, mesh=mesh, in_specs=(P("d"), P(), P("d")), out_specs=(P("d"), P()))
    def step(grads, state, params):
      updates, state = tx.update(grads, state, params)
      return updates, state

    params = {"a": jnp.zeros(16), "b": jnp.zeros(16)}
    grads = {"a": jnp.ones(16), "b": jnp.ones(16).at[11].set(jnp.nan)}  # device 5 holds 10, 11
    _, state = step(grads, tx.init(params), params)
    stats = clipx.stats(state)["skip_nonfinite"]
    assert bool(stats.skipped), stats
    assert int(stats.nonfinite_device) == 5, stats
    assert int(stats.nonfinite_leaf) == 1, stats
    print("ok")
    """
  )
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip().endswith("ok")


@pytest.mark.slow
@pytest.mark.parametrize(
  "tree",
  [
    {"a": jnp.ones((3, 4)), "b": jnp.full((2, 4), 3.0)},  # one shape group: not flattened
    {"a": jnp.ones((3, 4)), "b": jnp.full((2,), 3.0), "c": jnp.asarray(2.0)},
    {"a": jnp.ones(5), "big": jnp.full((20000,), 0.01), "c": jnp.full((2, 2), 0.5)},
    # More small shapes than norms.MAX_SMALL_SHAPES: the merged vector's segment sums.
    {f"v{i:02d}": jnp.full((i + 1,), 0.1 + 0.01 * i) for i in range(40)},  # one shape group
    {
      **{f"v{i:02d}": jnp.full((i + 1,), 0.1) for i in range(20)},
      **{f"m{i:02d}": jnp.full((i + 1, 3), 0.2 - 0.001 * i) for i in range(20)},
      "big": jnp.full((20000,), 0.001),
    },
  ],
)
def test_global_forensics_on_every_layout_of_small_leaves(tree):
  _, stats = jax.jit(clipx.clip_tree)(tree, 1.0)
  paths, index, share = _expected(tree)
  sq = sum(np.sum(np.asarray(x, np.float64) ** 2) for x in jax.tree.leaves(tree))
  np.testing.assert_allclose(float(stats.norm), np.sqrt(sq), rtol=1e-6)
  assert int(stats.source) == index
  np.testing.assert_allclose(float(stats.share), share, rtol=1e-5)
  many = len({x.shape for x in jax.tree.leaves(tree) if x.size <= norms.SMALL_LEAF_SIZE})
  assert (many > norms.MAX_SMALL_SHAPES) == (len(tree) >= 40)  # both paths are exercised


@pytest.mark.slow
@pytest.mark.parametrize(
  "tree",
  [
    {"a": jnp.zeros(0), "b": jnp.ones(3), "c": jnp.full(3, 10.0)},  # the tree
    {"a": jnp.ones(2), "e": jnp.zeros((0, 4)), "f": jnp.full((2, 4), 3.0), "g": jnp.ones(4)},
    {"a": jnp.zeros(0), "big": jnp.full((20000,), 0.01), "c": jnp.full(3, 2.0)},
    # More small shapes than norms.MAX_SMALL_SHAPES: the merged vector's segment sums.
    {"a": jnp.zeros(0), **{f"v{i:02d}": jnp.full((i + 1,), 0.1 + 0.01 * i) for i in range(40)}},
  ],
)
def test_zero_size_leaf_does_not_shift_the_global_source(tree):
  paths, index, share = _expected(tree)
  for scope in ("clip_tree", "global", "skip_spikes"):
    if scope == "clip_tree":
      _, stats = jax.jit(clipx.clip_tree)(tree, 1.0)
    else:
      tx = (
        clipx.clip_by_global_norm(1.0) if scope == "global" else clipx.skip_spikes(optax.sgd(1.0))
      )
      _, state = jax.jit(tx.update)(tree, tx.init(tree), tree)
      stats = clipx.stats(state)[scope]
      assert clipx.stats(state).source_paths()[scope] == paths[index]
    assert int(stats.source) == index, scope
    np.testing.assert_allclose(float(stats.share), share, rtol=1e-5)


@pytest.mark.parametrize(
  "tree",
  [
    # Same-shape leaves apart in the tree: their units share one stack (bucket).
    {"a": jnp.ones(3), "b": jnp.ones((2, 2)), "c": jnp.full(3, 10.0)},
    {"a": jnp.ones((4, 2)), "b": jnp.ones(3), "c": jnp.full((4, 2), 5.0), "d": jnp.full(3, 0.5)},
    {"a": jnp.ones(5), "big": jnp.full((200, 100), 0.1), "c": jnp.ones(7), "d": jnp.full(5, 9.0)},
  ],
)
def test_agc_credits_units_to_their_own_leaves(tree):
  params = jax.tree.map(jnp.ones_like, tree)
  agc = clipx.adaptive_grad_clip(0.01)
  _, state = jax.jit(agc.update)(tree, agc.init(params), params)
  paths, index, share = _expected(tree)
  report = clipx.stats(state)
  assert int(report["agc"].source) == index
  assert report.source_paths()["agc"] == paths[index]
  np.testing.assert_allclose(float(report["agc"].share), share, rtol=1e-5)


def _nonfinite_expected(values: list[np.ndarray]) -> tuple[int, float]:
  """The first non-finite entry's index and 1 / (number of non-finite entries)."""
  bad = [not np.isfinite(np.sum(np.square(np.asarray(v, np.float64)))) for v in values]
  return bad.index(True), 1.0 / sum(bad)


def _scope_stats(scope: str, tree) -> tuple[list, list]:
  """``[(stats, per-entry values the source indexes)]`` of each clip in ``scope``."""
  params = jax.tree.map(jnp.ones_like, tree)
  leaves = jax.tree.leaves(tree)
  modules = [np.concatenate([np.ravel(x) for x in jax.tree.leaves(v)]) for v in tree.values()]
  if scope == "clip_tree":
    return [clipx.clip_tree(tree, 1.0)[1]], [leaves]
  txs = {
    "global": clipx.clip_by_global_norm(1.0),
    "skip_spikes": clipx.skip_spikes(optax.sgd(1.0)),
    "layer": clipx.clip_by_layer_norm(1.0),
    "module": clipx.clip_by_layer_norm(1.0, group="module"),
    "global_then_layer": clipx.clip_by_global_then_layer_norm(1.0, 1.0, group="module"),
    "agc": clipx.adaptive_grad_clip(0.01),
  }
  tx = txs[scope]
  _, state = tx.update(tree, tx.init(params), params)
  report = clipx.stats(state)
  if scope == "global_then_layer":
    return [report["global"], report["layer"]], [modules, modules]
  entry = {"module": "layer"}.get(scope, scope)
  return [report[entry]], [modules if scope == "module" else leaves]


@pytest.mark.parametrize(
  "scope", ["clip_tree", "global", "skip_spikes", "layer", "module", "global_then_layer", "agc"]
)
@pytest.mark.parametrize(
  "bad",
  [
    {"enc/b": jnp.inf},  # one leaf: share 1
    {"enc/w": -jnp.inf, "dec/b": jnp.inf},  # two leaves: each holds half
    pytest.param({"dec/w": jnp.nan}, marks=pytest.mark.slow),  # NaN is non-finite too
    pytest.param({"enc/b": jnp.inf, "dec/w": jnp.nan}, marks=pytest.mark.slow),
  ],
)
def test_share_of_a_nonfinite_leaf_is_never_nan(scope, bad):
  tree = {
    "dec": {"b": jnp.ones(3), "w": jnp.ones((3, 4))},
    "enc": {"b": jnp.full(3, 2.0), "w": jnp.ones((3, 4))},
    "head": jnp.ones(2),
  }
  for path, value in bad.items():
    outer, inner = path.split("/")
    tree[outer][inner] = tree[outer][inner].at[0].set(value)
  for stats, values in zip(*_scope_stats(scope, tree)):
    index, share = _nonfinite_expected(values)
    assert int(stats.source) == index
    assert float(stats.share) == pytest.approx(share, rel=1e-6)


def test_overflow_path_norm_and_shares_match_float64():
  """A norm beyond sqrt(float32 max) takes the overflow branch: one fixed divisor
  (norms.overflow_divisor) for stacked small leaves and a large leaf; the norm, the
  source and its share against numpy in float64."""
  rng = np.random.default_rng(0)
  tree = {f"small{i:02d}": rng.normal(size=(4, 4)).astype(np.float32) for i in range(40)}
  tree["small07"] = tree["small07"] * np.float32(3e19)
  tree["large"] = (rng.normal(size=(200, 100)) * 1e18).astype(np.float32)
  leaves = jax.tree_util.tree_leaves(tree)
  squares = np.array([np.sum(np.square(x.astype(np.float64))) for x in leaves])
  assert squares.sum() > np.finfo(np.float32).max  # the common path's sum overflows
  _, stats = clipx.clip_tree(jax.tree.map(jnp.asarray, tree), 1.0)
  np.testing.assert_allclose(float(stats.norm), np.sqrt(squares.sum()), rtol=1e-6)
  assert int(stats.source) == int(np.argmax(squares))
  np.testing.assert_allclose(float(stats.share), squares.max() / squares.sum(), rtol=1e-5)


def test_overflow_path_with_many_small_shapes_matches_float64():
  """More small shapes than MAX_SMALL_SHAPES: the overflow branch stacks the leaves itself."""
  rng = np.random.default_rng(1)
  count = clipx.norms.MAX_SMALL_SHAPES + 8
  tree = {f"small{i:02d}": rng.normal(size=(i + 1,)).astype(np.float32) for i in range(count)}
  tree["small05"] = tree["small05"] * np.float32(2e19)
  tree["small30"] = tree["small30"] * np.float32(1e19)
  leaves = jax.tree_util.tree_leaves(tree)
  squares = np.array([np.sum(np.square(x.astype(np.float64))) for x in leaves])
  assert squares.sum() > np.finfo(np.float32).max
  _, stats = jax.jit(clipx.clip_tree, static_argnums=1)(jax.tree.map(jnp.asarray, tree), 1.0)
  np.testing.assert_allclose(float(stats.norm), np.sqrt(squares.sum()), rtol=1e-6)
  assert int(stats.source) == int(np.argmax(squares))
  np.testing.assert_allclose(float(stats.share), squares.max() / squares.sum(), rtol=1e-5)
