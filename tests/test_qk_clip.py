"""QK-Clip (clipx/qk_clip.py) against the Kimi K2 report's formula in numpy, and on the LM."""

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from orbax_roundtrip import assert_resumes_identically

import clipx
from clipx.stacking import path_name

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples import lm  # noqa: E402

TAU = 5.0


def _is(suffix):
  return lambda path: path_name(path).endswith(suffix)


def _numpy_max_logits(x, wq, wk, heads, kv_heads):
  """The report's S_max per query head: max over the batch of q_i . k_j / sqrt(d), in float64."""
  q = (x @ wq).reshape(*x.shape[:-1], heads, -1)
  k = (x @ wk).reshape(*x.shape[:-1], kv_heads, -1)
  k = np.repeat(k, heads // kv_heads, axis=-2)  # query head h reads key head h // group
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  return logits.max(axis=(0, 2, 3))


def _problem(heads, kv_heads, seed=0, width=16, head_dim=4):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(3, 6, width))
  params = {
    "wq": rng.normal(size=(width, heads * head_dim))
    * np.linspace(0.3, 2.0, heads).repeat(head_dim),
    "wk": rng.normal(size=(width, kv_heads * head_dim)),
    "wv": rng.normal(size=(width, width)),
  }
  grads = {k: rng.normal(size=v.shape) for k, v in params.items()}
  return (
    x,
    {k: v.astype(np.float32) for k, v in params.items()},
    {k: v.astype(np.float32) for k, v in grads.items()},
  )


def _tx(heads, kv_heads=None, lr=0.01, tau=TAU, **kwargs):
  clip = clipx.qk_clip(
    tau, query=_is("wq"), key=_is("wk"), heads=heads, kv_heads=kv_heads, **kwargs
  )
  return optax.chain(optax.sgd(lr), clip)


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2), (4, 1)])
def test_new_weights_follow_the_report(heads, kv_heads):
  x, params, grads = _problem(heads, kv_heads)
  s = _numpy_max_logits(
    x, params["wq"].astype(np.float64), params["wk"].astype(np.float64), heads, kv_heads
  )
  tau = float(np.median(s))  # half the heads clipped
  tx = _tx(heads, kv_heads, tau=tau)
  updates, state = jax.jit(tx.update)(grads, tx.init(params), params, attention_logits=s)
  new = optax.apply_updates(params, updates)
  stepped = {k: params[k] - 0.01 * grads[k] for k in params}
  gamma = np.minimum(1.0, tau / s)
  head_dim = 4
  if heads == kv_heads:
    q_factor, k_factor = np.sqrt(gamma), np.sqrt(gamma)
  else:  # a shared key head is left alone; the query head takes all of gamma
    q_factor, k_factor = gamma, np.ones(kv_heads)
  np.testing.assert_allclose(
    new["wq"], stepped["wq"] * q_factor.repeat(head_dim), rtol=2e-6, atol=1e-6
  )
  np.testing.assert_allclose(
    new["wk"], stepped["wk"] * k_factor.repeat(head_dim), rtol=2e-6, atol=1e-6
  )
  np.testing.assert_array_equal(updates["wv"], -0.01 * grads["wv"])
  stats = state[1].stats
  np.testing.assert_allclose(stats.scale, gamma, rtol=1e-6)
  np.testing.assert_array_equal(stats.clipped, s > tau)
  # Each head's logits shrink by exactly gamma: on the stepped weights, the largest lands on tau.
  s_stepped = _numpy_max_logits(x, stepped["wq"], stepped["wk"], heads, kv_heads)
  s_new = _numpy_max_logits(
    x, np.asarray(new["wq"], np.float64), np.asarray(new["wk"], np.float64), heads, kv_heads
  )
  np.testing.assert_allclose(s_new, s_stepped * gamma, rtol=1e-5)


def test_rounding_against_scaling_the_new_weights_directly():
  """``p + (u f + p (f - 1))`` against ``(p + u) f``: a few ulp; unclipped heads bit for bit."""
  x, params, grads = _problem(4, 4, seed=3)
  s = _numpy_max_logits(x, params["wq"].astype(np.float64), params["wk"].astype(np.float64), 4, 4)
  tx = _tx(4)
  updates, state = jax.jit(tx.update)(grads, tx.init(params), params, attention_logits=s)
  sgd = jax.tree.map(lambda g: np.float32(-0.01) * g, grads)
  for name in ("wq", "wk"):
    f = np.asarray(jnp.sqrt(state[1].stats.scale)).repeat(4).astype(np.float32)
    direct = (params[name] + sgd[name]) * f
    got = params[name] + np.asarray(updates[name])
    scale = np.maximum(np.abs(params[name]), np.abs(params[name] + sgd[name]))
    ulp = np.spacing(scale.astype(np.float32))
    assert np.max(np.abs(got - direct) / ulp) <= 4
    untouched = f == 1
    np.testing.assert_array_equal(np.asarray(updates[name])[:, untouched], sgd[name][:, untouched])


@pytest.mark.slow
@pytest.mark.parametrize("layer_axis", [0, 1])
def test_stacked_transformer_heads_land_on_tau(layer_axis):
  """examples/lm.py, blocks stacked at axis 0 or 1: one factor per layer and head."""
  config = lm.LMConfig(layers=2, width=32, heads=4, seq_len=16, layer_axis=layer_axis)
  model = lm.init(config, seed=1)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (4, 16)), jnp.int32)
  _, logit_max = model.apply_fn(model.params, tokens)
  assert logit_max.shape == (2, 4)
  tau = float(np.median(logit_max))
  tx = optax.chain(
    optax.sgd(0.0),  # no step: what changes the logits is the clip alone
    clipx.qk_clip(
      tau,
      query=_is("attn/query/kernel"),
      key=_is("attn/key/kernel"),
      heads=config.heads,
      stacked=clipx.layer_axes_from_metadata(model.variables),
    ),
  )
  grads = jax.tree.map(jnp.ones_like, model.params)
  updates, state = jax.jit(tx.update)(
    grads, tx.init(model.params), model.params, attention_logits=logit_max
  )
  new = optax.apply_updates(model.params, updates)
  gamma = np.minimum(1.0, tau / np.asarray(logit_max))
  for name in ("query", "key"):
    old = np.moveaxis(np.asarray(model.params["blocks"]["attn"][name]["kernel"]), layer_axis, 0)
    got = np.moveaxis(np.asarray(new["blocks"]["attn"][name]["kernel"]), layer_axis, 0)
    factor = np.sqrt(gamma).repeat(config.width // config.heads, axis=-1)[:, None, :]
    np.testing.assert_allclose(got, old * factor, rtol=1e-6, atol=1e-7)
  # The first layer's input does not depend on the clip: its largest logits land on tau.
  _, after = model.apply_fn(new, tokens)
  np.testing.assert_allclose(after[0], np.minimum(logit_max[0], tau), rtol=2e-5)
  assert int(np.sum(state[1].stats.clipped)) == int(np.sum(logit_max > tau)) > 0
  report = clipx.stats(state).as_dict()
  assert report["clip/qk_clip/scale/0"] == pytest.approx(float(state[1].stats.scale[0, 0]))


def test_nonfinite_and_low_logits_leave_the_head_alone():
  x, params, grads = _problem(4, 4)
  s = np.array([np.inf, np.nan, -50.0, 2 * TAU])
  tx = _tx(4)
  updates, state = tx.update(grads, tx.init(params), params, attention_logits=s)
  np.testing.assert_array_equal(state[1].stats.scale, [1, 1, 1, 0.5])
  np.testing.assert_array_equal(np.asarray(updates["wq"])[:, :12], -0.01 * grads["wq"][:, :12])
  assert np.all(np.isfinite(updates["wq"]))


def test_inject_hyperparams_and_chain_pass_the_logits():
  x, params, grads = _problem(4, 4)
  s = np.full(4, 2 * TAU)
  clip = optax.inject_hyperparams(
    clipx.qk_clip, static_args=("query", "key", "heads", "head_axis")
  )(threshold=TAU, query=_is("wq"), key=_is("wk"), heads=4)
  tx = optax.chain(optax.sgd(0.0), clip)
  chex.clear_trace_counter()
  update = jax.jit(chex.assert_max_traces(tx.update, n=1))
  state = tx.init(params)
  _, state = update(grads, state, params, attention_logits=s)
  np.testing.assert_allclose(state[1].inner_state.stats.scale, 0.5)
  state[1].hyperparams["threshold"] = jnp.full_like(state[1].hyperparams["threshold"], 4 * TAU)
  _, state = update(grads, state, params, attention_logits=s)
  np.testing.assert_array_equal(state[1].inner_state.stats.scale, 1.0)
  assert list(state[1].inner_state.stats.clip_count) == [1, 1, 1, 1]


def test_orbax_round_trip(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint", reason="orbax-checkpoint is the `checkpoint` extra")
  x, params, grads = _problem(4, 2)
  s = _numpy_max_logits(x, params["wq"], params["wk"], 4, 2)
  assert_resumes_identically(ocp, _tx(4, 2), [grads, grads], params, tmp_path, attention_logits=s)


def test_axis_name_takes_the_largest_logit_over_the_batch_shards():
  x, params, grads = _problem(4, 4)
  tx = clipx.qk_clip(TAU, query=_is("wq"), key=_is("wk"), heads=4, axis_name="batch")
  shards = np.array([[1.0, 4 * TAU, 1.0, 1.0], [2 * TAU, 1.0, 1.0, 1.0]])
  stack = lambda t: jax.tree.map(lambda v: np.stack([v, v]), t)  # noqa: E731
  update = jax.vmap(lambda u, s, p, a: tx.update(u, s, p, attention_logits=a), axis_name="batch")
  _, state = update(stack(grads), stack(tx.init(params)), stack(params), shards)
  np.testing.assert_allclose(state.stats.scale, [[0.5, 0.25, 1, 1]] * 2)


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(threshold=0.0), "threshold"),
    (dict(threshold=float("inf")), "threshold"),
    (dict(heads=0), "heads"),
    (dict(kv_heads=3), "kv_heads"),
    (dict(query="wq"), "query"),
    (dict(logits_name="not a name"), "logits_name"),
  ],
)
def test_bad_arguments_fail_at_construction_naming_them(kwargs, match):
  base = dict(threshold=TAU, query=_is("wq"), key=_is("wk"), heads=4)
  with pytest.raises((ValueError, TypeError), match=f"clipx.qk_clip: {match}"):
    clipx.qk_clip(**{**base, **kwargs})


def test_missing_or_misshapen_logits_and_leaves_are_named():
  x, params, grads = _problem(4, 4)
  tx = _tx(4)
  state = tx.init(params)
  with pytest.raises(ValueError, match="attention_logits="):
    tx.update(grads, state, params)
  with pytest.raises(ValueError, match=r"shape \(3,\); expected \(4,\)"):
    tx.update(grads, state, params, attention_logits=np.ones(3))
  with pytest.raises(ValueError, match="no leaf is a key"):
    clipx.qk_clip(TAU, query=_is("wq"), key=_is("nothing"), heads=4).init(params)
  with pytest.raises(ValueError, match="does not split into 3 heads"):
    clipx.qk_clip(TAU, query=_is("wq"), key=_is("wk"), heads=3).init(params)
