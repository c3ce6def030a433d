"""The spike methods on 8 simulated devices with ``axis_name``: equal to one device.

Inside ``shard_map`` every leaf is split by rows over the ``d`` axis; the
methods that need a global statistic (AdaGC's global warm-up clip and
per-tensor norms, Stable-SPAM's per-tensor peaks and norms, the windowed
update-norm policy) then reduce over it, and a run of several steps with
spikes must give the single-device updates and thresholds.
"""

import os
import subprocess
import sys
import textwrap

import pytest

# Long (a fresh interpreter or several devices per case): run by .ci/run with -m slow.
pytestmark = pytest.mark.slow

CODE = textwrap.dedent(
  r"""
  from functools import partial
  import jax, jax.numpy as jnp, numpy as np, optax, clipx
  from jax.sharding import PartitionSpec as P

  assert jax.device_count() == 8
  mesh = jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))

  def methods(axis_name):
    return {
      "adagc": clipx.adagc(warmup_steps=3, axis_name=axis_name),
      "stable_spam": clipx.stable_spam_clip(axis_name=axis_name),
      # The update-norm policy on the stream itself (placed after an optimizer it
      # sees the update; its statistic is the global norm either way).
      "window_zscore": clipx.clip_by_global_norm(
        clipx.window_zscore(history=8), axis_name=axis_name
      ),
    }

  rng = np.random.default_rng(0)
  params = {"w": jnp.ones((16, 4)), "b": jnp.ones((8,))}
  stream = []
  for step in range(12):
    g = {"w": rng.normal(size=(16, 4)) * 0.1, "b": rng.normal(size=(8,)) * 0.1}
    if step in (6, 9):
      g["w"][3, 1] *= 500.0
    stream.append(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), g))

  for name in methods(None):
    single = methods(None)[name]
    sharded = methods("d")[name]
    state = single.init(params)
    expected = []
    for g in stream:
      u, state = jax.jit(single.update)(g, state, params)
      expected.append(u)

    spec = {"w": P("d"), "b": P("d")}

    @jax.jit
    @partial(jax.shard_map, mesh=mesh, in_specs=(spec, P(), spec), out_specs=(spec, P()))
    def step(g, s, p):
      return sharded.update(g, s, p)

    s = sharded.init(params)
    for g, want in zip(stream, expected):
      got, s = step(g, s, params)
      for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=1e-7, err_msg=name)
    print(name, "ok")
  print("all ok")
  """
)


def test_spike_methods_with_axis_name_match_one_device():
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  result = subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip().endswith("all ok"), result.stdout
