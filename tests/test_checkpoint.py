"""Orbax round-trip of an optimizer state holding every kind of clipx state.

The adaptive histories (ring buffer, EMAs, counts), the stats and the skip
counts live in the optimizer state, so a checkpoint of the state must bring
clipping back exactly: after a restore the next update is bit for bit the one
the uninterrupted run makes.
"""

import chex
import jax
import numpy as np
import optax
import pytest
from orbax_roundtrip import save_and_restore

import clipx

ocp = pytest.importorskip("orbax.checkpoint", reason="orbax-checkpoint is the `checkpoint` extra")


def _optimizer() -> optax.GradientTransformation:
  """Every adaptive policy's history and both response wrappers' counts.

  (AGC is left out: its state is only ``ClipStats``, which every scope here
  has, and its compilation would double this test's time.)
  """
  return clipx.skip_spikes(
    clipx.skip_nonfinite(
      optax.chain(
        clipx.clip_by_value(clipx.quantile(initial=2.0)),
        clipx.clip_by_global_norm(clipx.autoclip(percentile=50, history=4, warmup_steps=2)),
        clipx.clip_by_layer_norm(clipx.zclip(warmup_steps=2), group="module"),
        clipx.clip_by_global_norm(clipx.ema_ratio(warmup_steps=2)),
        optax.sgd(1e-2, momentum=0.9),
      )
    ),
    warmup_steps=2,
  )


def _grads(step: int, params):
  # Norms that vary from step to step, so every history holds distinct values.
  # numpy, not jnp: each eager jnp op on a new shape compiles a program.
  rng = np.random.default_rng(step)
  return jax.tree.map(
    lambda p: ((1 + step % 3) * rng.standard_normal(p.shape)).astype(np.float32), params
  )


def test_orbax_round_trip_then_identical_next_update(tmp_path):
  shapes = {"dense": {"kernel": (3, 4), "bias": (4,)}, "out": {"kernel": (4, 2), "bias": (2,)}}
  params = jax.tree.map(
    lambda shape: np.full(shape, 0.5, np.float32), shapes, is_leaf=lambda x: isinstance(x, tuple)
  )
  tx = _optimizer()
  chex.clear_trace_counter()
  # One trace in all: the restored state has the types of the live one.
  update = jax.jit(chex.assert_max_traces(tx.update, n=1))
  # Orbax restores arrays committed to a device; commit the live state too, or the
  # restored one would compile the step again (same trace, new argument placement).
  state = jax.device_put(jax.jit(tx.init)(params), jax.devices()[0])
  for step in range(5):
    grads = _grads(step, params)
    if step == 3:  # one skipped step, so the skip counts are not zero
      grads["out"]["bias"][0] = np.nan
    _, state = update(grads, state, params)
  logged = clipx.stats(state).as_dict()
  assert logged["clip/skip_spikes/skip_count"] == 1.0
  assert logged["clip/global/clip_count"] > 0  # the adaptive history is in use

  restored = save_and_restore(ocp, state, tmp_path)

  # The same NamedTuples (so clipx.stats finds them) holding the same bits.
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)
  np.testing.assert_equal(clipx.stats(restored).as_dict(), logged)  # NaN == NaN here

  grads = _grads(5, params)
  expected_updates, expected_state = update(grads, state, params)
  updates, new_state = update(grads, restored, params)
  for a, b in zip(
    jax.tree.leaves((updates, new_state)), jax.tree.leaves((expected_updates, expected_state))
  ):
    np.testing.assert_array_equal(a, b)
  assert np.any(np.asarray(jax.tree.leaves(updates)[0]) != 0)  # a real step, not a skipped one
