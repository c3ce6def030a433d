"""Layer axes anywhere in a leaf: ``stacked=`` positions, and reading them from Flax metadata.

Every per-layer scope runs on one tree with its layers stacked at axis 0, at
axis 1 (MaxText's ``param_scan_axis=1``: a kernel is ``[in, layers, out]``)
and last, and on the unstacked twin (one leaf per layer); updates and the
per-group statistics must agree over a few jitted steps, and the stats of
every layout carry the same names. Then the errors, the zero-cost common
path (the same program as an int ``stacked``), 8 simulated devices, and
:func:`clipx.layer_axes_from_metadata` on NNX and linen models.
"""

import functools
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
from clipx import stacking

LAYERS = 3
POSITIONS = {"first": 0, "second": 1, "last": -1}


def _tree(seed: int, scale: float = 1.0, spike: float = 1.0):
  """A small tree in the leading layout; ``spike`` scales layer 1 of the dense kernel."""
  rng = np.random.default_rng(seed)
  draw = lambda *shape: rng.normal(size=shape) * scale  # noqa: E731
  kernel = draw(LAYERS, 5, 4)
  kernel[1] *= spike
  tree = {
    "embed": draw(6, 5),
    "blocks": {
      "dense": {"kernel": kernel, "bias": draw(LAYERS, 4)},
      "norm": {"scale": draw(LAYERS, 5)},
    },
  }
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


def _is_block(path) -> bool:
  return stacking.path_name(path).startswith("blocks")


def _move_blocks(tree, source: int, destination: int):
  return jax.tree_util.tree_map_with_path(
    lambda path, x: jnp.moveaxis(x, source, destination) if _is_block(path) else x, tree
  )


def _place(tree, position: int):
  """The leading-layout tree with each stack's layer axis moved to ``position``."""
  return _move_blocks(tree, 0, position)


def _lead(tree, position: int):
  return _move_blocks(tree, position, 0)


def _stacked_at(position: int):
  return lambda path, leaf: (position,) if _is_block(path) else ()


def _unstack(tree):
  """The twin: layer i of every stack as its own leaf, under blocks/i."""
  blocks = tree["blocks"]
  return {
    "embed": tree["embed"],
    "blocks": {str(i): jax.tree.map(lambda x, i=i: x[i], blocks) for i in range(LAYERS)},
  }


# A spike in one layer of one stack, so per-layer and per-leaf clipping differ.
STREAM = [(0, 1.0, 1.0), (1, 3.0, 1.0), (2, 1.0, 30.0)]
PARAMS_SEED = 7

SCOPES = {
  "layer_norm": lambda s: clipx.clip_by_layer_norm(1.5, stacked=s),
  "layer_norm_zclip": lambda s: clipx.clip_by_layer_norm(
    clipx.zclip(z_threshold=1.0, warmup_steps=1), stacked=s
  ),
  "agc": lambda s: clipx.adaptive_grad_clip(0.1, stacked=s),
  "adagc": lambda s: clipx.adagc(warmup_steps=1, warmup_max_norm=8.0, stacked=s),
  "stable_spam": lambda s: clipx.stable_spam_clip(theta=0.5, stacked=s),
  "rescale_outliers": lambda s: clipx.rescale_outliers(clipx.ema_peak(0.5), stacked=s),
  "normalize": lambda s: clipx.normalize_by_layer_norm(stacked=s),
  "block_rms": lambda s: clipx.clip_by_block_rms(0.3, stacked=s),
}


def _run(tx, grads_list, params):
  state = tx.init(params)
  step = jax.jit(tx.update)
  outs, logged = [], []
  for grads in grads_list:
    out, state = step(grads, state, params)
    outs.append(out)
    logged.append(clipx.stats(state).as_dict())
  return outs, logged


@functools.cache
def _twin_run(scope: str):
  grads = [_unstack(_tree(*args)) for args in STREAM]
  return _run(SCOPES[scope](None), grads, _unstack(_tree(PARAMS_SEED)))


@functools.cache
def _layout_run(scope: str, position: int):
  grads = [_place(_tree(*args), position) for args in STREAM]
  return _run(SCOPES[scope](_stacked_at(position)), grads, _place(_tree(PARAMS_SEED), position))


def _stacked_name(twin_key: str) -> str:
  """``clip/layer/norm/blocks/2/dense/kernel`` -> ``clip/layer/norm/blocks/dense/kernel[2]``."""
  parts = twin_key.split("/")
  if len(parts) > 4 and parts[3] == "blocks" and parts[4].isdigit():
    return "/".join(parts[:4] + parts[5:]) + f"[{parts[4]}]"
  return twin_key


@pytest.mark.slow
@pytest.mark.parametrize("where", sorted(POSITIONS))
@pytest.mark.parametrize("scope", sorted(SCOPES))
def test_each_layout_equals_the_unstacked_twin(scope, where):
  position = POSITIONS[where]
  outs, logged = _layout_run(scope, position)
  twin_outs, twin_logged = _twin_run(scope)
  for step in range(len(STREAM)):
    out, twin = outs[step], twin_outs[step]
    assert jax.tree.map(jnp.shape, out) == jax.tree.map(jnp.shape, _place(_tree(0), position))
    jax.tree.map(
      lambda a, b, step=step: np.testing.assert_allclose(
        a, b, rtol=3e-6, atol=1e-7, err_msg=f"step {step}"
      ),
      _unstack(_lead(out, position)),
      twin,
    )
    assert sorted(logged[step]) == sorted(_stacked_name(k) for k in twin_logged[step])
    for key, value in twin_logged[step].items():
      # source is an index, and the twin numbers its groups in another order; AGC's
      # source and share are of a leaf, and a stack holds several of the twin's.
      if key.endswith("/source") or (scope == "agc" and key.endswith("/share")):
        continue
      got = logged[step][_stacked_name(key)]
      np.testing.assert_allclose(got, value, rtol=3e-6, atol=1e-7, err_msg=f"{key}, step {step}")
  # Something was clipped or rescaled, or the comparison would prove little.
  assert any(v > 0 for k, v in logged[-1].items() if "/clip_count" in k), scope


@pytest.mark.slow
@pytest.mark.parametrize("where", ["second", "last"])
def test_stats_of_every_layout_are_the_leading_layouts(where):
  for scope in ("layer_norm_zclip", "adagc", "stable_spam"):
    leading = _layout_run(scope, 0)[1][-1]
    moved = _layout_run(scope, POSITIONS[where])[1][-1]
    assert list(moved) == list(leading)
    np.testing.assert_allclose(list(moved.values()), list(leading.values()), rtol=1e-6, atol=0)


def test_a_tuple_applies_to_every_leaf_and_counts_from_the_end():
  rng = np.random.default_rng(0)
  draw = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)  # noqa: E731
  leading = {"k": draw(LAYERS, 5, 4), "s": draw(LAYERS, 2)}
  ref_tx = clipx.clip_by_layer_norm(1.0, stacked=1)
  ref, ref_state = jax.jit(ref_tx.update)(leading, ref_tx.init(leading))
  for stacked, position in [((1,), 1), ((-1,), -1)]:
    tree = jax.tree.map(lambda x, p=position: jnp.moveaxis(x, 0, p), leading)
    tx = clipx.clip_by_layer_norm(1.0, stacked=stacked)
    out, state = jax.jit(tx.update)(tree, tx.init(tree))
    jax.tree.map(
      lambda a, b, p=position: np.testing.assert_array_equal(jnp.moveaxis(a, p, 0), b), out, ref
    )
    assert clipx.stats(state).as_dict() == clipx.stats(ref_state).as_dict()
  # Two layer axes (a scan in a scan), given in any order: groups [i,j] in the leaf's axis order.
  two = draw(2, 5, 3)
  tx = clipx.clip_by_layer_norm(1.0, stacked=(2, 0))
  _, state = jax.jit(tx.update)({"w": two}, tx.init({"w": two}))
  logged = clipx.stats(state).as_dict()
  assert [k for k in logged if k.startswith("clip/layer/norm/")] == [
    f"clip/layer/norm/w[{i},{j}]" for i in range(2) for j in range(3)
  ]
  np.testing.assert_allclose(
    logged["clip/layer/norm/w[1,2]"], np.linalg.norm(np.asarray(two)[1, :, 2]), rtol=1e-6
  )


def test_nnx_value_paths_give_the_same_groups():
  # nnx.Optimizer initialises from Variables (paths end in .value), then updates plain arrays.
  from flax import nnx

  layers = nnx.Param(jnp.ones((5, LAYERS, 4)))
  tx = clipx.clip_by_layer_norm(1.0, stacked=(1,))
  state = tx.init({"w": layers})
  out, state = tx.update({"w": jnp.full((5, LAYERS, 4), 2.0)}, state)
  assert [k for k in clipx.stats(state).as_dict() if "/norm/" in k] == [
    f"clip/layer/norm/w[{i}]" for i in range(LAYERS)
  ]


def test_leading_layers_cost_nothing_and_no_leaf_is_moved():
  # The same program whether the layer axis is given as an int, a tuple or a
  # function, when it leads: no transposes, nothing added.
  tree = _tree(0, spike=30.0)
  for scope in ("layer_norm", "agc", "stable_spam"):
    programs = set()
    for stacked in (
      lambda p, x: 1 if _is_block(p) else 0,
      lambda p, x: (0,) if _is_block(p) else (),
      lambda p, x: (-x.ndim,) if _is_block(p) else 0,
    ):
      tx = SCOPES[scope](stacked)
      programs.add(str(jax.make_jaxpr(tx.update)(tree, tx.init(tree), tree)))
    assert len(programs) == 1, scope
    assert "transpose" not in programs.pop()
  # Elsewhere nothing is moved either: each reduction and scale works in place.
  moved = _place(tree, 1)
  for scope in ("layer_norm", "agc", "stable_spam"):
    tx = SCOPES[scope](_stacked_at(1))
    assert "transpose" not in str(jax.make_jaxpr(tx.update)(moved, tx.init(moved), moved))


OWNERS = {
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


@pytest.mark.parametrize("owner", sorted(OWNERS))
def test_bad_stacked_fails_at_construction(owner):
  for bad, error in [
    ((1, 1), ValueError),
    ((1, -1, 1), ValueError),
    ((1.0,), TypeError),
    ((True,), TypeError),
    ([1], TypeError),
    ("1", TypeError),
    (-1, ValueError),
    (1.5, TypeError),
    # Concrete integer 0-d arrays are ints (test_stacked.py); no other array is.
    (np.array(1.0), TypeError),
    (np.array(True), TypeError),
    (np.array([1]), TypeError),
    (np.array(-1), ValueError),
    ((np.array(1), 1), ValueError),
  ]:
    with pytest.raises(error, match=rf"^clipx\.{owner}: stacked"):
      OWNERS[owner](bad)


def test_positions_out_of_range_name_the_leaf():
  tree = {"blocks": {"bias": jnp.ones((4, 3))}}
  for stacked in [(2,), (-3,)]:
    with pytest.raises(ValueError, match=r"blocks/bias, which has shape \(4, 3\).*out of range"):
      clipx.clip_by_layer_norm(1.0, stacked=stacked).init(tree)

  def my_axes(path, leaf):
    return (1, -2)

  three = {"w": jnp.ones((2, 3, 4))}
  with pytest.raises(
    ValueError, match=r"my_axes gave layer axes \(1, -2\) for the leaf at w.*twice"
  ):
    clipx.rescale_outliers(1.0, stacked=my_axes).init(three)

  def wrong(path, leaf):
    return [1]

  with pytest.raises(TypeError, match=r"clipx\.\w+: the stacked function .*wrong must give"):
    tx = clipx.adagc(stacked=wrong)
    tx.update(three, tx.init(three))


def test_agc_axis_counts_in_one_layer():
  # axis= names axes of one layer: the leaf without its layer axes.
  rng = np.random.default_rng(3)
  g = jnp.asarray(rng.normal(size=(5, LAYERS, 4)), jnp.float32)
  p = jnp.asarray(rng.normal(size=(5, LAYERS, 4)), jnp.float32)
  tx = clipx.adaptive_grad_clip(0.01, axis=1, stacked=(1,))
  out, _ = jax.jit(tx.update)({"w": g}, tx.init({"w": p}), {"w": p})
  one = clipx.adaptive_grad_clip(0.01, axis=1)
  twin = {str(i): g[:, i] for i in range(LAYERS)}
  twin_params = {str(i): p[:, i] for i in range(LAYERS)}
  ref, _ = jax.jit(one.update)(twin, one.init(twin_params), twin_params)
  for i in range(LAYERS):
    np.testing.assert_allclose(out["w"][:, i], ref[str(i)], rtol=2e-6)


@pytest.mark.slow
def test_layer_axes_on_eight_devices_match_one_device():
  code = textwrap.dedent(
    r"""
    import re
    import jax, jax.numpy as jnp, numpy as np, clipx
    from jax.sharding import NamedSharding, PartitionSpec as P
    assert jax.device_count() == 8
    mesh = jax.make_mesh((2, 4), ("layer", "unit"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    rng = np.random.default_rng(0)
    L = 4
    base = {"k": rng.normal(size=(L, 16, 8)) * 3, "b": rng.normal(size=(L, 8)),
            "e": rng.normal(size=(8, 4))}
    base["k"][2] *= 40.0
    for position in (1, -1):  # 0: test_stacked.py's test_stacked_on_eight_devices_match_one_device
      def place(t):
        moved = lambda n, x: x if n == "e" else np.moveaxis(x, 0, position)
        return {n: jnp.asarray(moved(n, x), jnp.float32) for n, x in t.items()}
      grads = place(base)
      params = jax.tree.map(lambda x: x * 0.5 + 1, grads)
      at = position % 3
      k_spec = [None, None, None]
      k_spec[at] = "layer"
      k_spec[(at + 1) % 3 if at != 1 else 2] = "unit"
      b_spec = [None, None]
      b_spec[position % 2] = "layer"
      specs = {"k": P(*k_spec), "b": P(*b_spec), "e": P("unit")}
      shard = lambda t: jax.device_put(t, {n: NamedSharding(mesh, s) for n, s in specs.items()})
      stacked = lambda path, leaf: () if path[0].key == "e" else (position,)
      txs = (clipx.clip_by_layer_norm(clipx.zclip(warmup_steps=1), stacked=stacked),
             clipx.adaptive_grad_clip(0.05, stacked=stacked),
             clipx.adagc(warmup_steps=1, stacked=stacked),
             clipx.stable_spam_clip(stacked=stacked))
      # One program for the four: one compile per layout and device count.
      step = jax.jit(lambda g, states, p: [tx.update(g, s, p) for tx, s in zip(txs, states)])
      s1 = [tx.init(params) for tx in txs]
      s8 = jax.device_put(s1, NamedSharding(mesh, P()))  # as the step returns it: no recompile
      for scale in (1.0, 2.0):
        g = jax.tree.map(lambda x: x * scale, grads)
        want = step(g, s1, params)
        got = step(shard(g), s8, shard(params))
        s1, s8 = [s for _, s in want], [s for _, s in got]
        for (a, a_state), (b, b_state) in zip(got, want):
          for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2e-6, atol=1e-7)
          np.testing.assert_allclose(list(clipx.stats(a_state).as_dict().values()),
                                     list(clipx.stats(b_state).as_dict().values()), rtol=2e-6)
      # Moving the layer axis moves no data between devices: only per-layer or
      # per-unit vectors are reduced (the gradient has 512 elements).
      hlo = step.lower(shard(g), s8, shard(params)).compile().as_text()
      for line in hlo.splitlines():
        if re.search(r"= \S+ (all-gather|all-to-all|all-reduce|collective-permute)\(", line):
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


# Reading the layer axes from Flax's metadata.


def _nnx_model(out_axes: int, *, marked_head: bool = True):
  from flax import nnx

  meta = {
    "kernel_metadata": {"out_sharding": (None, None)},
    "bias_metadata": {"out_sharding": (None,)},
  }

  class Block(nnx.Module):
    def __init__(self, rngs):
      self.dense = nnx.Linear(4, 5, **meta, rngs=rngs)
      self.norm = nnx.LayerNorm(
        5, scale_metadata={"out_sharding": (None,)}, use_bias=False, rngs=rngs
      )

  class Model(nnx.Module):
    def __init__(self, rngs):
      @nnx.split_rngs(splits=LAYERS)
      @nnx.vmap(out_axes=out_axes, transform_metadata={nnx.PARTITION_NAME: "layers"})
      def blocks(rngs):
        return Block(rngs)

      self.blocks = blocks(rngs)
      self.head = nnx.Linear(5, 2, **(meta if marked_head else {}), rngs=rngs)

  with nnx.use_eager_sharding(False):
    return Model(nnx.Rngs(0))


@pytest.mark.slow
@pytest.mark.parametrize("out_axes", [0, 1])
def test_metadata_of_an_nnx_vmap_model(out_axes):
  from flax import nnx

  model = _nnx_model(out_axes)
  axes = clipx.layer_axes_from_metadata(model)
  kernel = nnx.state(model, nnx.Param)["blocks"]["dense"]["kernel"]
  assert kernel.get_value().shape[out_axes] == LAYERS
  assert axes.axes == {
    "blocks/dense/bias": (out_axes,),
    "blocks/dense/kernel": (out_axes,),
    "blocks/norm/scale": (out_axes,),
    "head/bias": (),
    "head/kernel": (),
  }
  if out_axes == 0:
    return  # test_stacked.py clips leading layers; here the layout MaxText uses
  # The same function serves nnx.grad's State, a pure dict and nnx.Optimizer's Variables.
  grads = nnx.grad(lambda m: sum(jnp.sum(x**3) for x in jax.tree.leaves(nnx.state(m, nnx.Param))))(
    model
  )
  pure = nnx.to_pure_dict(grads)
  explicit = lambda path, leaf: (out_axes,) if _is_block(path) else ()  # noqa: E731
  want, want_state = jax.jit(clipx.clip_by_layer_norm(1.0, stacked=explicit).update)(
    pure, clipx.clip_by_layer_norm(1.0, stacked=explicit).init(pure)
  )
  for tree in (grads, pure):
    tx = clipx.clip_by_layer_norm(1.0, stacked=axes)
    got, state = jax.jit(tx.update)(tree, tx.init(tree))
    jax.tree.map(
      np.testing.assert_array_equal, nnx.to_pure_dict(got) if tree is grads else got, want
    )
    assert clipx.stats(state).as_dict() == clipx.stats(want_state).as_dict()
  optimizer = nnx.Optimizer(
    model, optax.chain(clipx.clip_by_layer_norm(1.0, stacked=axes), optax.sgd(0.1)), wrt=nnx.Param
  )
  optimizer.update(model, grads)
  names = [
    k for k in clipx.stats(optimizer.opt_state).as_dict() if k.startswith("clip/layer/norm/")
  ]
  assert f"clip/layer/norm/blocks/dense/kernel[{LAYERS - 1}]" in names


@pytest.mark.slow
def test_metadata_of_a_linen_scan_model():
  from flax import linen as nn

  class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
      init = nn.with_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp"))
      bias = nn.with_partitioning(nn.initializers.zeros_init(), ("mlp",))
      return nn.Dense(4, kernel_init=init, bias_init=bias)(x), None

  for axis in (0, 1):

    class Model(nn.Module):
      @nn.compact
      def __call__(self, x, axis=axis):
        scan = nn.scan(
          Block,
          variable_axes={"params": axis},
          split_rngs={"params": True},
          length=LAYERS,
          metadata_params={nn.PARTITION_NAME: "layers"},
        )
        x, _ = scan(name="layers")(x, None)
        init = nn.with_partitioning(nn.initializers.lecun_normal(), (None, None))
        return nn.Dense(2, kernel_init=init, use_bias=False, name="head")(x)

    params = Model().init(jax.random.key(0), jnp.ones((1, 4)))["params"]
    axes = clipx.layer_axes_from_metadata(params)
    assert axes.axes == {
      "head/kernel": (),
      "layers/Dense_0/bias": (axis,),
      "layers/Dense_0/kernel": (axis,),
    }
    plain = nn.unbox(params)
    assert plain["layers"]["Dense_0"]["kernel"].shape[axis] == LAYERS
    if axis == 0:
      continue
    tx = clipx.adaptive_grad_clip(0.01, stacked=axes)
    out, _ = jax.jit(tx.update)(plain, tx.init(plain), plain)
    one = clipx.adaptive_grad_clip(0.01)
    layer = lambda t, i, a=axis: jax.tree.map(lambda x: jnp.take(x, i, a), t["layers"])  # noqa: E731
    twin = {str(i): layer(plain, i) for i in range(LAYERS)}
    ref, _ = jax.jit(one.update)(twin, one.init(twin), twin)
    for i in range(LAYERS):
      jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-6), layer(out, i), ref[str(i)]
      )


def test_unmarked_leaves_are_reported_not_guessed():
  model = _nnx_model(1, marked_head=False)
  with pytest.raises(
    ValueError,
    match=r"nothing marks the layer axes of 2 leaves: head/bias, head/kernel.*unmarked=0",
  ):
    clipx.layer_axes_from_metadata(model)
  axes = clipx.layer_axes_from_metadata(model, unmarked=0)
  assert axes.axes["head/kernel"] == 0 and axes.axes["blocks/dense/kernel"] == (1,)
  # A plain array tree carries no metadata at all.
  with pytest.raises(ValueError, match="nothing marks"):
    clipx.layer_axes_from_metadata({"w": jnp.ones((3, 2))})
  for bad in (lambda p, x: 0, "0"):
    with pytest.raises(TypeError, match="unmarked"):
      clipx.layer_axes_from_metadata(model, unmarked=bad)


def test_metadata_lookups_name_what_is_missing():
  axes = clipx.layer_axes_from_metadata(_nnx_model(0))
  tx = clipx.clip_by_layer_norm(1.0, stacked=axes)
  with pytest.raises(ValueError, match=r"no layer axes for the leaf at blocks/other"):
    tx.init({"blocks": {"other": jnp.ones((3, 2))}})
  with pytest.raises(ValueError, match=r"head/bias has shape \(2, 1\).*rank 1"):
    tx.init({"head": {"bias": jnp.ones((2, 1))}})


def test_maxtext_param_scan_axis_and_names():
  from flax import nnx

  with nnx.use_eager_sharding(False):
    tree = nnx.State(
      {
        # MaxText's create_scanned_layers: partition_name and param_scan_axis keys.
        "decoder": {
          "mlp": nnx.Param(jnp.ones((4, 3, 5)), partition_name="layers", param_scan_axis=1)
        },
        # DeepSeek stacks two scans under two names.
        "moe": {"w": nnx.Param(jnp.ones((4, 5, 2)), out_sharding=("embed", "mlp", "moe_layers"))},
        "final": {"scale": nnx.Param(jnp.ones((4,)), out_sharding=("embed",))},
      }
    )
  axes = clipx.layer_axes_from_metadata(tree, name=("layers", "moe_layers"))
  assert axes.axes == {"decoder/mlp": (1,), "final/scale": (), "moe/w": (2,)}
  assert clipx.layer_axes_from_metadata(tree, name="layers").axes["moe/w"] == ()
