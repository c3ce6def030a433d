"""Stacked (scanned) layers: each layer of a stack is clipped as its unstacked twin.

Every comparison runs the same clipping on a tree whose repeated blocks are
stacked on a leading axis (as ``nnx.vmap``/``nnx.scan`` and ``linen.scan``
make them) and on the twin tree with one leaf per layer, and checks updates,
per-group norms and thresholds agree to float32 rounding over several steps.
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

LAYERS = 4


def _stacked_tree(seed: int, scale: float = 1.0):
  rng = np.random.default_rng(seed)
  draw = lambda *shape: jnp.asarray(rng.normal(size=shape) * scale, jnp.float32)  # noqa: E731
  return {
    "embed": draw(6, 5),
    "blocks": {"dense": {"kernel": draw(LAYERS, 5, 3), "bias": draw(LAYERS, 3)}},
    "conv": {"kernel": draw(LAYERS, 3, 3, 2, 4)},
    "head": draw(5),
  }


def _unstack(tree):
  """The twin: layer i of every stacked leaf as its own leaf, under blocks/i and conv/i."""
  return {
    "embed": tree["embed"],
    "blocks": {str(i): {"dense": _layer(tree["blocks"]["dense"], i)} for i in range(LAYERS)},
    "conv": {str(i): {"kernel": tree["conv"]["kernel"][i]} for i in range(LAYERS)},
    "head": tree["head"],
  }


def _is_stacked(path, leaf) -> int:
  name = clipx.stacking.path_name(path)
  return 1 if name.startswith(("blocks", "conv")) else 0


def _agc(tx, grads, params):
  out, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  return out


def _layer(tree, i: int):
  return jax.tree.map(lambda x: x[i], tree)


def _agc(tx, grads, params):
  out, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  return out


def _run(tx, trees, params):
  state = tx.init(params)
  step = jax.jit(tx.update)
  outs = []
  for grads in trees:
    out, state = step(grads, state, params)
    outs.append(out)
  return outs, state


POLICIES = {
  "fixed": lambda: 2.0,
  "schedule": lambda: optax.linear_schedule(3.0, 1.0, 5),
  "autoclip": lambda: clipx.autoclip(percentile=50, history=8, warmup_steps=2),
  "zclip": lambda: clipx.zclip(warmup_steps=2, alpha=0.8),
  "ema_ratio": lambda: clipx.ema_ratio(warmup_steps=2, ratio=1.5),
  "quantile": lambda: clipx.quantile(learning_rate=0.3),
}


def _layer_norm_pairs(group):
  """(stacked transform, unstacked transform, map from stacked group order to unstacked)."""
  return (
    clipx.clip_by_layer_norm(POLICIES["fixed"](), group=group, stacked=_is_stacked),
    clipx.clip_by_layer_norm(POLICIES["fixed"](), group=group),
  )


@pytest.mark.parametrize(
  "policy",
  [p if p == "fixed" else pytest.param(p, marks=pytest.mark.slow) for p in sorted(POLICIES)],
)
@pytest.mark.parametrize("group", ["leaf", "module"])
def test_layer_norm_of_a_stack_equals_its_unstacked_twin(policy, group):
  trees = [_stacked_tree(seed, scale=1.0 + seed) for seed in range(6)]
  stacked_tx = clipx.clip_by_layer_norm(POLICIES[policy](), group=group, stacked=_is_stacked)
  flat_tx = clipx.clip_by_layer_norm(POLICIES[policy](), group=group)
  outs, state = _run(stacked_tx, trees, trees[0])
  twin_outs, twin_state = _run(flat_tx, [_unstack(t) for t in trees], _unstack(trees[0]))
  for out, twin in zip(outs, twin_outs):
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-7), _unstack(out), twin
    )
  logged, twin_logged = clipx.stats(state).as_dict(), clipx.stats(twin_state).as_dict()
  # Same groups by readable name: blocks/dense/kernel[2] is the twin's blocks/2/dense/kernel.
  for key, value in twin_logged.items():
    name = key.split("/", 3)[3] if key.count("/") >= 3 else None
    if not name:
      continue
    parts = name.split("/")
    if parts[0] in ("blocks", "conv") and parts[1].isdigit():
      name = "/".join([parts[0], *parts[2:]]) + f"[{parts[1]}]"
    stacked_key = "/".join(key.split("/")[:3] + [name])
    np.testing.assert_allclose(logged[stacked_key], value, rtol=2e-6, atol=1e-7, err_msg=key)


def test_stats_name_each_layer_of_a_stack():
  tree = _stacked_tree(0)
  tx = clipx.clip_by_layer_norm(1.0, stacked=_is_stacked)
  _, state = jax.jit(tx.update)(tree, tx.init(tree))
  keys = [k for k in clipx.stats(state).as_dict() if k.startswith("clip/layer/norm/")]
  # Tree order (dict keys sorted), each stack's layers in order.
  assert keys[:2] == [
    "clip/layer/norm/blocks/dense/bias[0]",
    "clip/layer/norm/blocks/dense/bias[1]",
  ]
  assert "clip/layer/norm/embed" in keys
  assert "clip/layer/norm/conv/kernel[3]" in keys
  assert len(keys) == 2 + 3 * LAYERS
  kernel = np.asarray(tree["conv"]["kernel"][3], np.float64)
  np.testing.assert_allclose(
    clipx.stats(state).as_dict()["clip/layer/norm/conv/kernel[3]"],
    np.sqrt(np.sum(kernel**2)),
    rtol=1e-6,
  )


@pytest.mark.slow
@pytest.mark.parametrize("huge", [False, True])
def test_agc_of_a_stack_equals_its_unstacked_twin(huge):
  grads = _stacked_tree(1, scale=3.0)
  if huge:  # the overflow fallback, with a norm beyond float32's range in one layer
    grads["conv"]["kernel"] = grads["conv"]["kernel"].at[2, 0, 0, 0, 0].set(3e38)
  params = _stacked_tree(2)
  stacked_tx = clipx.adaptive_grad_clip(0.05, stacked=_is_stacked)
  flat_tx = clipx.adaptive_grad_clip(0.05)
  out, state = jax.jit(stacked_tx.update)(grads, stacked_tx.init(params), params)
  twin, twin_state = jax.jit(flat_tx.update)(
    _unstack(grads), flat_tx.init(params), _unstack(params)
  )
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-7), _unstack(out), twin
  )
  a, b = clipx.stats(state)["agc"], clipx.stats(twin_state)["agc"]
  np.testing.assert_allclose(float(a.clipped_norm), float(b.clipped_norm), rtol=1e-6)


@pytest.mark.slow
def test_agc_without_stacked_reads_a_stack_as_one_kernel():
  # The silent error stacked= fixes: (L, in, out) is read as a multi-head kernel.
  grads, params = _stacked_tree(1, scale=3.0), _stacked_tree(2)
  out = _agc(clipx.adaptive_grad_clip(0.05), grads, params)
  twin = _agc(clipx.adaptive_grad_clip(0.05), _unstack(grads), _unstack(params))
  assert not np.allclose(
    out["blocks"]["dense"]["kernel"][0], twin["blocks"]["0"]["dense"]["kernel"]
  )


@pytest.mark.slow
def test_nnx_vmap_and_linen_scan_trees():
  from flax import linen as nn
  from flax import nnx

  @nnx.vmap(in_axes=0, out_axes=0)
  def make_layers(key):
    return nnx.Linear(4, 4, rngs=nnx.Rngs(key))

  layers = make_layers(jax.random.split(jax.random.key(0), LAYERS))
  nnx_params = nnx.state(layers, nnx.Param)
  assert jax.tree.leaves(nnx_params)[0].shape[0] == LAYERS

  class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
      return nn.Dense(4)(x), None

  scanned = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=LAYERS)
  linen_params = scanned().init(jax.random.key(1), jnp.ones((2, 4)), None)["params"]
  for params in (nnx_params, linen_params):
    grads = jax.tree.map(lambda x: 5.0 * jnp.ones_like(x) + x, params)
    tx = clipx.clip_by_layer_norm(1.0, group="module", stacked=1)
    out, _ = jax.jit(tx.update)(grads, tx.init(params))
    for i in range(LAYERS):
      layer = _layer(grads, i)
      norm = np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in jax.tree.leaves(layer)))
      got = _layer(out, i)
      jax.tree.map(
        lambda g, x, n=norm: np.testing.assert_allclose(g, np.asarray(x) / n, rtol=2e-6),
        got,
        layer,
      )
    out = _agc(clipx.adaptive_grad_clip(0.01, stacked=1), grads, params)
    for i in range(LAYERS):
      one = _layer(grads, i), _layer(params, i)
      twin = _agc(clipx.adaptive_grad_clip(0.01), *one)
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-6), _layer(out, i), twin)


def test_stacked_errors_name_the_path():
  tree = {"blocks": {"kernel": jnp.ones((2, 3))}, "scale": jnp.ones((2,))}
  with pytest.raises(ValueError, match=r"scale.*rank 1"):
    tx = clipx.clip_by_layer_norm(1.0, stacked=2)
    tx.init(tree)
  unstacked_head = {"blocks": {"kernel": jnp.ones((2, 3))}, "head": jnp.ones((5,))}
  with pytest.raises(ValueError, match=r"^clipx\.adaptive_grad_clip: stacked=1 .*head"):
    clipx.adaptive_grad_clip(0.1, stacked=1).init(unstacked_head)
  mixed = {"m": {"kernel": jnp.ones((3, 2, 2)), "bias": jnp.ones((2,))}}
  with pytest.raises(ValueError, match=r"m/bias.*m/kernel"):
    clipx.clip_by_layer_norm(
      1.0, group="module", stacked=lambda p, x: x.ndim - 2 if x.ndim > 2 else 0
    ).init(mixed)
  for bad in (-1, 1.0, "1", True):
    with pytest.raises((TypeError, ValueError), match="stacked"):
      clipx.clip_by_layer_norm(1.0, stacked=bad)


@pytest.mark.slow
def test_stacked_on_eight_devices_matches_one_device():
  code = textwrap.dedent(
    r"""
    import re
    import jax, jax.numpy as jnp, numpy as np, clipx
    from jax.sharding import NamedSharding, PartitionSpec as P
    mesh = jax.make_mesh((2, 4), ("layer", "unit"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    rng = np.random.default_rng(0)
    grads = {"k": jnp.asarray(rng.normal(size=(4, 16, 8)) * 3, jnp.float32),
             "b": jnp.asarray(rng.normal(size=(4, 8)), jnp.float32)}
    params = jax.tree.map(lambda x: x * 0.5 + 1, grads)
    specs = {"k": P("layer", "unit", None), "b": P("layer", None)}
    sharded = lambda t: jax.device_put(t, {k: NamedSharding(mesh, s) for k, s in specs.items()})
    for tx in (clipx.clip_by_layer_norm(1.0, stacked=1), clipx.adaptive_grad_clip(0.05, stacked=1)):
      expected, _ = jax.jit(tx.update)(grads, tx.init(params), params)
      step = jax.jit(tx.update)
      got, _ = step(sharded(grads), tx.init(params), sharded(params))
      for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
      hlo = step.lower(sharded(grads), tx.init(params), sharded(params)).compile().as_text()
      # Only per-layer or per-unit vectors move (32 units; the table of two scale
      # factors per unit is 136), never a gradient (512 elements).
      for line in hlo.splitlines():
        if re.search(r"= \S+ (all-gather|all-to-all|all-reduce)\(", line):
          dims = line.split("=")[1].split("{")[0].split("[")[1]
          size = int(np.prod([int(d) for d in re.findall(r"\d+", dims)] or [1]))
          assert size <= 160, line
    print("ok")
    """
  )
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip().endswith("ok")


# An int or tuple stacked= says every leaf is stacked alike (the scanned-model trap, issue 24).

PER_LAYER = {
  "clip_by_layer_norm": lambda s: clipx.clip_by_layer_norm(1.0, stacked=s),
  "clip_by_global_then_layer_norm": lambda s: clipx.clip_by_global_then_layer_norm(
    1.0, 1.0, stacked=s
  ),
  "adaptive_grad_clip": lambda s: clipx.adaptive_grad_clip(0.1, stacked=s),
  "adagc": lambda s: clipx.adagc(stacked=s),
  "rescale_outliers": lambda s: clipx.rescale_outliers(1.0, stacked=s),
  "normalize_by_layer_norm": lambda s: clipx.normalize_by_layer_norm(stacked=s),
  "stable_spam_clip": lambda s: clipx.stable_spam_clip(stacked=s),
  "clip_by_block_rms": lambda s: clipx.clip_by_block_rms(1.0, stacked=s),
}


def _mlp_params():
  """An ordinary NNX MLP: an unscanned input and output layer around 4 scanned blocks."""
  from flax import nnx

  class MLP(nnx.Module):
    def __init__(self, rngs):
      self.input = nnx.Linear(8, 16, rngs=rngs)

      @nnx.split_rngs(splits=LAYERS)
      @nnx.vmap(in_axes=0, out_axes=0)
      def blocks(rngs):
        return nnx.Linear(16, 16, rngs=rngs)

      self.blocks = blocks(rngs)
      self.output = nnx.Linear(16, 3, rngs=rngs)

  return nnx.state(MLP(nnx.Rngs(0)), nnx.Param)


@pytest.mark.parametrize("owner", sorted(PER_LAYER))
def test_an_int_stacked_refuses_leaves_that_are_not_stacked(owner):
  # The README's stacked=1 on this model made one group per row of the input kernel and
  # per element of each bias, silently. Now init refuses, naming stacked and the leaves.
  params = _mlp_params()
  for stacked in (1, (0,)):
    tx = PER_LAYER[owner](stacked)
    with pytest.raises(ValueError, match=rf"^clipx\.{owner}: stacked=") as error:
      tx.init(params)
    message = str(error.value)
    for text in ("blocks/kernel", "input/kernel", "output/bias", "layer_axes_from_metadata"):
      assert text in message, (text, message)


def test_the_function_form_clips_such_a_model_per_layer():
  params = _mlp_params()
  grads = jax.tree.map(lambda x: 3.0 * jnp.ones_like(x) + x, params)
  stacked = lambda path, leaf: 1 if "blocks" in clipx.stacking.path_name(path) else 0  # noqa: E731
  tx = clipx.clip_by_layer_norm(1.0, stacked=stacked)
  out, state = jax.jit(tx.update)(grads, tx.init(params))
  assert len(clipx.stats(state)["layer"].norm) == 4 + 2 * LAYERS
  for i in range(LAYERS):
    kernel = np.asarray(grads["blocks"]["kernel"][i], np.float64)
    np.testing.assert_allclose(
      out["blocks"]["kernel"][i], kernel / np.linalg.norm(kernel), rtol=2e-6
    )
  bias = np.asarray(grads["input"]["bias"], np.float64)
  np.testing.assert_allclose(out["input"]["bias"], bias / np.linalg.norm(bias), rtol=2e-6)


def test_stacks_of_different_depths_need_the_function_form():
  # Every leaf stacked, but an encoder of 2 layers and a decoder of 3: an int cannot tell
  # this from an unstacked leaf, so it refuses; a function saying so per leaf is taken.
  rng = np.random.default_rng(0)
  grads = {
    "encoder": jnp.asarray(rng.normal(size=(2, 4, 4)) * 3, jnp.float32),
    "decoder": jnp.asarray(rng.normal(size=(3, 4, 4)) * 3, jnp.float32),
  }
  with pytest.raises(ValueError, match=r"\(2,\).*encoder.*lambda path, leaf: 1"):
    clipx.clip_by_layer_norm(1.0, stacked=1).init(grads)
  tx = clipx.clip_by_layer_norm(1.0, stacked=lambda path, leaf: 1)
  out, _ = jax.jit(tx.update)(grads, tx.init(grads))
  for name, depth in (("encoder", 2), ("decoder", 3)):
    for i in range(depth):
      layer = np.asarray(grads[name][i], np.float64)
      np.testing.assert_allclose(out[name][i], layer / np.linalg.norm(layer), rtol=2e-6)


# stacked= edge cases: integer arrays, inject_hyperparams, per-layer scalars, owners' names.

ALL_STACKED = {
  "k": np.random.default_rng(0).normal(size=(LAYERS, 5, 3)) * 3,
  "b": np.random.default_rng(1).normal(size=(LAYERS, 3)),
  "s": np.random.default_rng(2).normal(size=(LAYERS,)) * 2,
}


def _all_stacked(scale=1.0):
  return {k: jnp.asarray(v * scale, jnp.float32) for k, v in ALL_STACKED.items()}


@pytest.mark.parametrize(
  "stacked",
  [np.array(1), jnp.array(1), np.int32(1), (np.array(0),), lambda path, leaf: np.array(1)],
  ids=["np.array", "jnp.array", "np.int32", "tuple of array", "function giving an array"],
)
def test_integer_scalar_arrays_are_ints(stacked):
  grads = _all_stacked(2.0)
  tx = clipx.clip_by_layer_norm(1.0, stacked=stacked)
  out, _ = jax.jit(tx.update)(grads, tx.init(grads))
  for name, g in grads.items():
    g = np.asarray(g, np.float64)
    norms = np.sqrt(np.sum(g.reshape(LAYERS, -1) ** 2, axis=1))
    scale = np.minimum(1.0, 1.0 / norms).reshape((LAYERS,) + (1,) * (g.ndim - 1))
    np.testing.assert_allclose(out[name], g * scale, rtol=2e-6)


@pytest.mark.slow
def test_agc_takes_a_per_layer_scalar_as_clip_by_layer_norm_does():
  # A (L,) leaf (a layer scale) under stacked=1: one scalar per layer, each one unit,
  # exactly as its L unstacked scalar leaves.
  grads, params = _all_stacked(3.0), _all_stacked(1.0)
  out = _agc(clipx.adaptive_grad_clip(0.05, stacked=1), grads, params)
  for i in range(LAYERS):
    twin = _agc(clipx.adaptive_grad_clip(0.05), _layer(grads, i), _layer(params, i))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-6), _layer(out, i), twin)
  g, p = np.asarray(grads["s"], np.float64), np.asarray(params["s"], np.float64)
  bound = 0.05 * np.maximum(np.abs(p), 1e-3)
  np.testing.assert_allclose(out["s"], np.where(np.abs(g) > bound, np.sign(g) * bound, g), 1e-6)


INJECTABLE = ["adagc", "adaptive_grad_clip", "clip_by_block_rms", "clip_by_layer_norm"]
INJECTABLE += ["stable_spam_clip"]


def _injected_run(owner, jit, **inject):
  tx = optax.inject_hyperparams(getattr(clipx, owner), **inject)(
    *{"adaptive_grad_clip": (0.1,), "clip_by_layer_norm": (1.0,)}.get(owner, ()), stacked=1
  )
  grads, params = _all_stacked(3.0), _all_stacked(1.0)
  update = jax.jit(tx.update) if jit else tx.update
  return update(grads, tx.init(params), params)[0]


@pytest.mark.slow
@pytest.mark.parametrize("owner", INJECTABLE)
def test_inject_hyperparams_takes_stacked(owner):
  plain = {"adaptive_grad_clip": (0.1,), "clip_by_layer_norm": (1.0,)}.get(owner, ())
  tx = getattr(clipx, owner)(*plain, stacked=1)
  grads, params = _all_stacked(3.0), _all_stacked(1.0)
  expected, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  # Eagerly the injected int is a concrete array: it works.
  eager = _injected_run(owner, jit=False)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), eager, expected)
  # Under jit it is traced, and layer axes fix shapes: the error says what to do.
  with pytest.raises(TypeError, match=rf"^clipx\.{owner}: stacked .*static_args=\(\"stacked\",\)"):
    _injected_run(owner, jit=True)
  static = _injected_run(owner, jit=True, static_args=("stacked",))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), static, expected)


@pytest.mark.parametrize("owner", ["adagc", "clip_by_global_then_layer_norm"])
def test_errors_name_the_function_called(owner):
  tree = {"w": jnp.ones((LAYERS, 4))}
  make = PER_LAYER[owner]
  for stacked in (3, (5,), lambda path, leaf: 9):
    with pytest.raises(ValueError, match=rf"^clipx\.{owner}: "):
      make(stacked).init(tree)
  tx = make(1)
  with pytest.raises(ValueError, match=rf"^clipx\.{owner}: updates have"):
    tx.update({"w": jnp.ones((2, 4))}, tx.init(tree))
