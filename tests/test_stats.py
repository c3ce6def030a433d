"""clipx.stats finds every ClipStats, through Optax's wrappers, and logs floats."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax

import clipx
from clipx.stats import SHOWN_GROUPS


def test_stats_through_wrappers_and_flat_floats():
  params = {"conv": {"kernel": jnp.ones((3, 3)), "bias": jnp.ones(3)}, "out": jnp.ones(2)}
  grads = jax.tree.map(lambda x: 10 * x, params)
  inner = optax.chain(
    clipx.clip_by_global_norm(1.0),
    optax.masked(clipx.clip_by_layer_norm(0.5, group="module"), {"conv": True, "out": False}),
    optax.sgd(0.1),
  )
  tx = clipx.skip_nonfinite(optax.MultiSteps(inner, every_k_schedule=1).gradient_transformation())
  state = tx.init(params)
  _, state = tx.update(grads, state, params)
  report = clipx.stats(state)
  assert list(report) == ["skip_nonfinite", "global", "layer"]

  flat = report.as_dict()
  norm = np.sqrt(sum(float(jnp.sum(x**2)) for x in jax.tree.leaves(grads)))
  np.testing.assert_allclose(flat["clip/global/norm"], norm, rtol=1e-6)
  assert flat["clip/global/clipped"] == 1.0
  assert flat["clip/global/clip_count"] == 1.0
  # The layer clip sees already globally clipped gradients: norm of conv <= 1.
  assert flat["clip/layer/norm/conv"] <= 1.0 + 1e-6
  assert all(isinstance(v, float) for v in flat.values())
  assert "global: norm=" in str(report)


def test_duplicate_kinds_get_numbered_names():
  tx = optax.chain(clipx.clip_by_global_norm(1.0), clipx.clip_by_global_norm(2.0))
  params = {"w": jnp.ones(3)}
  _, state = tx.update(params, tx.init(params), params)
  report = clipx.stats(state)
  assert list(report) == ["global", "global.1"]
  assert float(report["global.1"].threshold) == 2.0


def test_stats_of_state_without_clipx_is_empty():
  tx = optax.sgd(0.1)
  assert clipx.stats(tx.init({"w": jnp.ones(2)})) == {}


def _norms(tree) -> list[float]:
  return [float(np.linalg.norm(np.asarray(x, np.float64))) for x in jax.tree.leaves(tree)]


def _layer_norm_keys(report, entry: str = "layer") -> dict[str, float]:
  prefix = f"clip/{entry}/norm/"
  return {k[len(prefix) :]: v for k, v in report.as_dict().items() if k.startswith(prefix)}


def test_a_key_with_a_slash_beside_nested_keys_gets_its_own_stats():
  tree = {"a/b": jnp.ones(3), "a": {"b": jnp.full(2, 2.0)}}  # both read a/b
  for tx in (clipx.clip_by_layer_norm(100.0), clipx.clip_by_global_then_layer_norm(1e3, 1e3)):
    _, state = tx.update(tree, tx.init(tree))
    report = clipx.stats(state)
    names = report.group_names["layer"]
    assert len(set(names)) == len(names) == 2
    keys = _layer_norm_keys(report)
    assert list(keys) == list(names)  # one key per group: none overwritten
    np.testing.assert_allclose(list(keys.values()), _norms(tree), rtol=1e-6)


def test_an_unstacked_key_like_a_layer_name_gets_its_own_stats():
  tree = {"k": jnp.asarray([[1.0, 1.0], [2.0, 2.0]]), "k[0]": jnp.full(2, 5.0)}
  tx = clipx.clip_by_layer_norm(100.0, stacked=lambda path, leaf: int(path[0].key == "k"))
  _, state = tx.update(tree, tx.init(tree))
  report = clipx.stats(state)
  names = report.group_names["layer"]
  assert len(set(names)) == len(names) == 3
  keys = _layer_norm_keys(report)
  rows = [tree["k"][0], tree["k"][1], tree["k[0]"]]  # groups: k's two layers, then the leaf
  np.testing.assert_allclose(list(keys.values()), _norms(rows), rtol=1e-6)


def test_group_keys_that_print_alike_get_distinct_names():
  tree = {"x": jnp.ones(3), "y": jnp.full(3, 2.0)}
  tx = clipx.clip_by_layer_norm(100.0, group=lambda path: 1 if path[0].key == "x" else "1")
  _, state = tx.update(tree, tx.init(tree))
  keys = _layer_norm_keys(clipx.stats(state))
  np.testing.assert_allclose(list(keys.values()), _norms(tree), rtol=1e-6)


def test_global_source_names_one_leaf_when_paths_read_alike():
  tree = {"a/b": jnp.ones(3), "a": {"b": jnp.full(2, 50.0)}}
  tx = clipx.clip_by_global_norm(1.0)
  _, state = tx.update(tree, tx.init(tree))
  report = clipx.stats(state)
  names = report.group_names["global"]
  assert len(set(names)) == len(names) == 2
  spike = int(np.argmax(_norms(tree)))
  assert report.source_paths() == {"global": names[spike]}


def test_printed_layer_report_names_the_largest_groups():
  rng = np.random.default_rng(1)
  tree = {f"layer{i:02d}": jnp.asarray(rng.normal(size=4) * (i % 5 + 1)) for i in range(12)}
  tree["layer07"] = tree["layer07"] * 100  # the spike
  tx = clipx.clip_by_layer_norm(1.0)
  _, state = tx.update(tree, tx.init(tree))
  text = str(clipx.stats(state))
  assert "values]" not in text
  shown = SHOWN_GROUPS
  norms = _norms(tree)
  order = np.argsort(norms)[::-1][:shown]
  names = list(tree)  # sorted, as jax orders dict keys
  rows = re.findall(r"^  (\S+): norm=(\S+),", text, flags=re.M)
  assert [name for name, _ in rows] == [names[i] for i in order]
  np.testing.assert_allclose([float(v) for _, v in rows], [norms[i] for i in order], rtol=1e-3)
  assert f"{len(tree) - shown} more" in text
  assert "source=layer07" in text


def test_printed_layer_report_shows_a_nonfinite_group_first():
  tree = {"a": jnp.full(3, 100.0), "b": jnp.ones(3).at[1].set(jnp.nan), "c": jnp.ones(3)}
  tx = clipx.clip_by_layer_norm(1.0)
  _, state = tx.update(tree, tx.init(tree))
  rows = re.findall(r"^  (\S+): norm=(\S+),", str(clipx.stats(state)), flags=re.M)
  assert [name for name, _ in rows] == ["b", "a", "c"]
