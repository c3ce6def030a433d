"""SPAM (clipx/spam.py) against the authors' optimizer step by step, and its Optax conventions."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from orbax_roundtrip import assert_resumes_identically
from references import spam as reference

import clipx
from clipx.spam import warmup_factor

SHAPES = {"w": (8, 5), "b": (7,)}
# Small enough that 300 steps hold two resets, two warm-ups and many spikes.
CONFIG = dict(threshold=50.0, interval=120, warmup=15, delay=10)
REFERENCE_CONFIG = dict(threshold=50.0, delta_t=120, warmup_steps=15, grad_accu_steps=10)


def _stream(steps: int = 300, seed: int = 0) -> list[dict[str, np.ndarray]]:
  """Gaussian gradients with a spike (10^4 times an entry) every 37 steps."""
  rng = np.random.default_rng(seed)
  stream = []
  for t in range(steps):
    grads = {k: (0.1 * rng.normal(size=s)).astype(np.float32) for k, s in SHAPES.items()}
    if t % 37 == 30:
      grads["w"][1, 2] *= 1e4
    stream.append(grads)
  return stream


def _params(seed: int = 1) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}


def _run(tx, params, stream):
  """Per step: (params, state), with one jitted update for the whole stream."""
  chex.clear_trace_counter()
  update = jax.jit(chex.assert_max_traces(tx.update, n=1))
  state = tx.init(params)
  out = []
  for grads in stream:
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
    out.append((params, state))
  return out


def _spam_state(state) -> clipx.SpamState:
  return next(
    s
    for s in jax.tree.leaves(state, is_leaf=lambda n: isinstance(n, clipx.SpamState))
    if isinstance(s, clipx.SpamState)
  )


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_matches_the_authors_step_by_step(weight_decay):
  stream, params = _stream(), _params()
  keys = list(SHAPES)
  records = reference.spam_steps(
    [params[k] for k in keys],
    [[g[k] for k in keys] for g in stream],
    lr=1e-2,
    weight_decay=weight_decay,
    **REFERENCE_CONFIG,
  )
  got = _run(clipx.spam(1e-2, weight_decay=weight_decay, **CONFIG), params, stream)
  total_spikes = resets = 0
  for t, (record, (new_params, state)) in enumerate(zip(records, got)):
    spam_state = _spam_state(state)
    assert int(spam_state.spikes) == sum(record["spikes"]), t
    np.testing.assert_allclose(float(spam_state.warmup), record["scale_factor"], rtol=1e-6)
    for i, k in enumerate(keys):
      np.testing.assert_allclose(spam_state.mu[k], record["exp_avg"][i], rtol=2e-5, atol=1e-8)
      np.testing.assert_allclose(spam_state.nu[k], record["exp_avg_sq"][i], rtol=2e-5, atol=1e-10)
      np.testing.assert_allclose(new_params[k], record["params"][i], rtol=2e-6, atol=2e-6)
    total_spikes += sum(record["spikes"])
    resets += abs(record["scale_factor"] - 0.01) < 1e-12
  assert resets == 2 and total_spikes > 1000  # the run exercised what it checks


def test_clipped_values_match_the_authors():
  """With b1 = 0 the first moment is the clipped gradient itself."""
  stream, params = _stream(150, seed=4), _params()
  keys = list(SHAPES)
  records = reference.spam_steps(
    [params[k] for k in keys],
    [[g[k] for k in keys] for g in stream],
    betas=(0.0, 0.999),
    **REFERENCE_CONFIG,
  )
  got = _run(clipx.spam(1e-3, b1=0.0, **CONFIG), params, stream)
  for record, (_, state) in zip(records, got):
    mu = _spam_state(state).mu
    for i, k in enumerate(keys):
      np.testing.assert_allclose(mu[k], record["clipped"][i], rtol=1e-6, atol=0)
    assert sum(record["spikes"]) == int(_spam_state(state).spikes)


def test_matches_pytorch_optimizer_spam():
  torch = pytest.importorskip(
    "torch", reason="pytorch_optimizer's SPAM is a reference run; not in CI"
  )
  po = pytest.importorskip(
    "pytorch_optimizer", reason="pytorch_optimizer is a reference; not in CI"
  )
  stream, params = _stream(250, seed=2), _params()
  keys = list(SHAPES)
  tensors = [torch.nn.Parameter(torch.tensor(params[k])) for k in keys]
  # warmup 0: pytorch_optimizer's warm-up runs one step ahead of the authors' (see
  # scale_by_spam). weight_decay 0: it multiplies by float32(1 - lr * wd), 1.3e-8 off for
  # 0.999, a drift of 3e-6 relative over 250 steps (the authors' form is checked above).
  opt = po.SPAM(
    tensors,
    lr=1e-2,
    warmup_epoch=0,
    threshold=50,
    grad_accu_steps=10,
    update_proj_gap=120,
    eps=1e-6,
    foreach=False,
  )
  tx = clipx.spam(1e-2, threshold=50.0, interval=120, warmup=0, delay=10)
  got = _run(tx, params, stream)
  for grads, (new_params, _) in zip(stream, got):
    for p, k in zip(tensors, keys):
      p.grad = torch.tensor(grads[k])
    opt.step()
    for p, k in zip(tensors, keys):
      np.testing.assert_allclose(new_params[k], p.detach().numpy(), rtol=2e-6, atol=2e-6)


def test_warmup_factor_is_the_reference_cosine():
  interval, warmup = 50, 7
  steps = np.arange(1, 200)
  got = np.asarray(jax.vmap(lambda s: warmup_factor(s, interval, warmup))(steps))
  expected = []
  for step in steps:  # current_step of the reference's step ``step`` (SPAM.py L135, L286-295)
    since = step % interval if step >= interval else warmup + step
    expected.append(1 - reference.death_rate(since, warmup))
  np.testing.assert_allclose(got, expected, rtol=1e-6)
  assert got[interval - 1] == pytest.approx(0.01, rel=1e-5)  # the reset step itself


def test_spike_is_clipped_to_sqrt_threshold_times_v():
  """Formula check on two steps against numpy, independent of the reference port."""
  tx = clipx.scale_by_spam(b1=0.9, b2=0.99, eps=0.0, threshold=4.0, interval=None, delay=1)
  g1 = {"w": jnp.array([1.0, -2.0, 3.0])}
  g2 = {"w": jnp.array([0.1, -1e3, 0.5])}
  state = tx.init(g1)
  _, state = tx.update(g1, state)
  out, state = tx.update(g2, state)
  v1 = 0.01 * np.array([1.0, 4.0, 9.0])
  limit = np.sqrt(4.0 * v1)
  clipped = np.where(
    np.abs([0.1, -1e3, 0.5]) > limit, np.sign([0.1, -1e3, 0.5]) * limit, [0.1, -1e3, 0.5]
  )
  m = 0.9 * 0.1 * np.array([1.0, -2.0, 3.0]) + 0.1 * clipped
  v = 0.99 * v1 + 0.01 * clipped**2
  expected = math.sqrt(1 - 0.99**2) / (1 - 0.9**2) * m / np.sqrt(v)
  np.testing.assert_allclose(out["w"], expected, rtol=1e-6)
  assert int(state.spikes) == 1 and bool(state.stats.clipped)
  np.testing.assert_allclose(state.stats.norm, np.linalg.norm([0.1, -1e3, 0.5]), rtol=1e-6)
  np.testing.assert_allclose(state.stats.clipped_norm, np.linalg.norm(clipped), rtol=1e-6)


def test_reset_zeroes_the_moments_but_not_the_count():
  tx = clipx.scale_by_spam(interval=3, warmup=2, delay=0)
  g = {"w": jnp.ones(2)}
  state = tx.init(g)
  for _ in range(3):
    _, state = tx.update(g, state)
  # Step 3 reset, then recorded g once: m = (1 - b1) g, v = (1 - b2) g^2.
  np.testing.assert_allclose(state.mu["w"], 0.1, rtol=1e-6)
  np.testing.assert_allclose(state.nu["w"], 0.001, rtol=1e-5)
  assert int(state.count) == 3


def test_entry_with_no_history_is_not_zeroed():
  """The reference zeroes a gradient entry whose v is 0 (first reached after `delay`)."""
  tx = clipx.scale_by_spam(interval=None, delay=1)
  zero, hit = {"w": jnp.array([1.0, 0.0])}, {"w": jnp.array([1.0, 0.5])}
  state = tx.init(zero)
  _, state = tx.update(zero, state)
  out, state = tx.update(hit, state)
  assert float(out["w"][1]) > 0 and int(state.spikes) == 0
  records = reference.spam_steps(
    [np.zeros(2, np.float32)], [[zero["w"]], [hit["w"]]], grad_accu_steps=1
  )
  assert records[1]["clipped"][0][1] == 0  # what the deviation avoids


def test_finite_extremes_are_clipped_not_nan():
  tx = clipx.scale_by_spam(interval=None, delay=1)
  state = tx.init({"w": jnp.zeros(2)})
  _, state = tx.update({"w": jnp.array([1.0, 1.0])}, state)
  out, state = tx.update({"w": jnp.array([3e38, -1.0])}, state)
  assert np.all(np.isfinite(out["w"])) and int(state.spikes) == 1


@pytest.mark.parametrize(
  "kwargs, name",
  [
    (dict(threshold=0.0), "threshold"),
    (dict(threshold=float("nan")), "threshold"),
    (dict(b1=1.0), "b1"),
    (dict(b2=-0.1), "b2"),
    (dict(eps=-1.0), "eps"),
    (dict(interval=0), "interval"),
    (dict(warmup=-1), "warmup"),
    (dict(delay=2.5), "delay"),
  ],
)
def test_bad_arguments_fail_at_construction_naming_them(kwargs, name):
  with pytest.raises((ValueError, TypeError), match=f"clipx.scale_by_spam: {name}"):
    clipx.scale_by_spam(**kwargs)
  with pytest.raises((ValueError, TypeError), match=name):
    clipx.spam(1e-3, **kwargs)
  with pytest.raises(ValueError, match="weight_decay"):
    clipx.spam(1e-3, weight_decay=-1.0)


@pytest.mark.slow
def test_inject_hyperparams_threshold_changes_without_retracing():
  stream, params = _stream(40, seed=5), _params()
  # The decays static: traced, 1 - b2 is formed in float32, 1.3e-5 off the double's.
  static = ("b1", "b2", "interval", "warmup", "delay")
  tx = optax.inject_hyperparams(clipx.spam, static_args=static)(learning_rate=1e-2, **CONFIG)
  plain = clipx.spam(1e-2, **CONFIG)
  chex.clear_trace_counter()
  update = jax.jit(chex.assert_max_traces(tx.update, n=1))
  a, b = tx.init(params), plain.init(params)
  for grads in stream[:30]:
    ua, a = update(grads, a, params)
    ub, b = plain.update(grads, b, params)
    chex.assert_trees_all_close(ua, ub, rtol=1e-6, atol=1e-8)  # eager against jit: fusions
  a.hyperparams["threshold"] = jnp.asarray(1e9, jnp.float32)  # no entry is a spike now
  _, a = update(stream[30], a, params)
  assert int(_spam_state(a).spikes) == 0
  _, b = plain.update(stream[30], b, params)
  assert int(_spam_state(b).spikes) > 0


def test_stats_report_and_orbax_round_trip(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint", reason="orbax-checkpoint is the `checkpoint` extra")
  stream, params = _stream(40), _params()
  tx = clipx.spam(1e-2, **CONFIG)
  state = assert_resumes_identically(ocp, tx, stream[:36], params, tmp_path)
  flat = clipx.stats(state).as_dict()
  assert flat["clip/spam/clip_count"] > 0 and flat["clip/spam/threshold"] == 50.0


@pytest.mark.slow
def test_axis_name_makes_the_statistics_global():
  """Two shards of one kernel under vmap's named axis: the spike count and norms of the whole."""
  grads = [{"w": g["w"]} for g in _stream(25, seed=6)]
  tx = clipx.scale_by_spam(axis_name="shard", **CONFIG)
  whole = clipx.scale_by_spam(**CONFIG)
  split = lambda g: {"w": np.stack(np.split(g["w"], 2))}  # noqa: E731
  state = jax.vmap(tx.init)(split(grads[0]))
  reference_state = whole.init(grads[0])
  update = jax.jit(jax.vmap(tx.update, axis_name="shard"))
  spikes = 0
  for g in grads:
    _, state = update(split(g), state)
    _, reference_state = whole.update(g, reference_state)
    np.testing.assert_array_equal(state.spikes, [reference_state.spikes] * 2)
    np.testing.assert_allclose(state.stats.norm, [reference_state.stats.norm] * 2, rtol=1e-6)
    spikes += int(reference_state.spikes)
  assert spikes > 0
