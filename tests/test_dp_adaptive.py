"""Private adaptive clipping (clipx.private_quantile, clipx.gradient_noise_multiplier).

Checked against the formula of Andrew et al. 2021 in numpy, step by step
against Opacus' AdaClipDPOptimizer fed the same noise draws, and the privacy
split against dp-accounting.
"""

import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import clipx

# The examples package of this repository (not Opacus' top-level "examples").
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _count_draw(key_data: jax.Array) -> float:
  """The standard normal a step draws for its count, replayed from the state's key.

  PrivateQuantileState documents it: the key splits into (next key, step key)
  and the draw is jax.random.normal(step key).
  """
  _, step_key = jax.random.split(jax.random.wrap_key_data(key_data))
  return float(jax.random.normal(step_key, (), jnp.float32))


def _dot(w, x):
  return jnp.dot(w, x)  # gradient: the example itself, so its norm is |x|


def _examples(rng, size, real):
  """``size`` rows, the first ``real`` with norms spread over a decade, the rest zero (padding)."""
  x = rng.normal(size=(size, 3)) * np.exp(rng.uniform(-1.2, 1.2, size=(size, 1)))
  x[real:] = 0
  return x.astype(np.float32)


def test_threshold_moves_by_the_noisy_centred_count():
  target, rate, sigma_b, expected, initial = 0.4, 0.3, 1.5, 12.0, 1.0
  policy = clipx.private_quantile(
    target, rate, initial, count_noise=sigma_b, batch_size=expected, key=3
  )
  grad_fn = clipx.clipped_grad(_dot, policy)
  step = jax.jit(grad_fn)
  params = jnp.zeros(3)
  state = grad_fn.init(params)
  rng = np.random.default_rng(0)
  threshold = initial
  for real in [12, 9, 14, 12, 0, 11]:  # rows present vary, as under Poisson sampling
    x = _examples(rng, 16, real)
    z = _count_draw(state.threshold_state.key)
    _, stats, state = step(params, jnp.asarray(x), state)
    norms = np.linalg.norm(x.astype(np.float64), axis=1)[:real]
    # Andrew et al. with the centred count of TF Privacy: each present example
    # adds +1/2 if unclipped, -1/2 if clipped; the denominator is the public
    # expected batch size; padding rows (norm 0) do not count.
    centred = np.sum(np.where(norms <= threshold, 0.5, -0.5))
    noisy_count = centred + sigma_b * z + expected / 2
    assert float(stats.threshold) == pytest.approx(threshold, rel=1e-6)
    assert float(state.threshold_state.noisy_count) == pytest.approx(noisy_count, rel=1e-5)
    threshold *= math.exp(-rate * (noisy_count / expected - target))
    assert float(state.threshold_state.threshold) == pytest.approx(threshold, rel=1e-5)


def test_count_noise_has_std_count_noise_and_is_fresh_every_step():
  sigma_b, steps = 2.0, 4000
  policy = clipx.private_quantile(
    0.5, count_noise=sigma_b, batch_size=10, key=11, max_threshold=1.0
  )
  norms = jnp.full((10,), 10.0)  # always above the capped bound: the exact count is 0

  def step(state, _):
    _, new = policy.update(norms, state)
    return new, new.noisy_count

  _, counts = jax.lax.scan(step, policy.init(jnp.zeros(())), None, length=steps)
  noise = np.asarray(counts, np.float64)  # all 10 clipped
  # Sample std within 5 standard errors (std / sqrt(2 n)); mean within 5 of std / sqrt(n).
  assert abs(noise.std() / sigma_b - 1) < 5 / math.sqrt(2 * steps)
  assert abs(noise.mean()) < 5 * sigma_b / math.sqrt(steps)
  assert abs(np.corrcoef(noise[:-1], noise[1:])[0, 1]) < 5 / math.sqrt(steps)


@pytest.mark.slow
def test_same_seed_same_thresholds_and_the_key_is_checkpointable():
  def run(seed):
    policy = clipx.private_quantile(0.5, count_noise=1.0, batch_size=8, key=seed)
    grad_fn = clipx.clipped_grad(_dot, policy)
    state = grad_fn.init(jnp.zeros(3))
    rng = np.random.default_rng(1)
    thresholds = []
    for _ in range(5):
      _, stats, state = grad_fn(jnp.zeros(3), jnp.asarray(_examples(rng, 8, 8)), state)
      thresholds.append(float(stats.threshold))
    return thresholds, state

  a, state = run(0)
  b, _ = run(0)
  c, _ = run(1)
  assert a == b
  assert a[1:] != c[1:]
  assert state.threshold_state.key.dtype == jnp.uint32


# ------------------------------------------------------------ the privacy split


def test_gradient_noise_multiplier_is_theorem_1():
  sigma, sigma_b = 1.1, 0.9
  expected = (sigma**-2 - (2 * sigma_b) ** -2) ** -0.5
  assert clipx.gradient_noise_multiplier(sigma, sigma_b) == pytest.approx(expected, rel=1e-12)
  assert clipx.gradient_noise_multiplier(0.0, sigma_b) == 0.0


@pytest.mark.parametrize("sigma", [0.7, 1.0, 2.0])
def test_split_costs_what_one_gaussian_costs_in_dp_accounting(sigma):
  pytest.importorskip("dp_accounting", reason="dp-accounting (the dp extra) checks the split")
  import dp_accounting
  from dp_accounting import rdp

  # The two releases of a step, as dp-accounting composes them: the gradient
  # sum (sensitivity 1, noise sigma_grad) and the centred count (sensitivity
  # 1/2, noise sigma_b, i.e. multiplier 2 sigma_b), under one Poisson sample.
  q, steps, delta, sigma_b = 0.01, 500, 1e-5, 3.2
  sigma_grad = clipx.gradient_noise_multiplier(sigma, sigma_b)
  pair = dp_accounting.PoissonSampledDpEvent(
    q,
    dp_accounting.ComposedDpEvent(
      [dp_accounting.GaussianDpEvent(sigma_grad), dp_accounting.GaussianDpEvent(2 * sigma_b)]
    ),
  )
  single = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
  epsilons = []
  for event in (pair, single):
    accountant = rdp.RdpAccountant()
    accountant.compose(event, steps)
    epsilons.append(accountant.get_epsilon(delta))
  assert epsilons[0] == pytest.approx(epsilons[1], rel=1e-9)
  # The count's noise is not free: with sigma_grad alone the run would look cheaper.
  alone = rdp.RdpAccountant()
  alone.compose(
    dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma_grad)), steps
  )
  assert alone.get_epsilon(delta) < epsilons[1]


# ------------------------------------------------------------ against Opacus


IN, HIDDEN = 3, 4


def _jax_to_torch(name, value):
  """clipx's leaf (Flax layout) as the torch parameter of the same name."""
  value = np.asarray(value, np.float32)
  if name == "hidden.weight":
    return value.T
  return value.reshape(
    {"hidden.bias": (HIDDEN,), "out.weight": (1, HIDDEN), "out.bias": (1,)}[name]
  )


# jax.tree order of the params dict -> torch parameter names
LEAF_NAMES = {
  ("hidden", "bias"): "hidden.bias",
  ("hidden", "kernel"): "hidden.weight",
  ("out", "bias"): "out.bias",
  ("out", "kernel"): "out.weight",
}


def _mlp_loss(params, example):
  x, y = example
  h = x @ params["hidden"]["kernel"] + params["hidden"]["bias"]
  f = h @ params["out"]["kernel"] + params["out"]["bias"]
  return 0.5 * (f - y) ** 2


def _by_torch_name(tree):
  return {
    LEAF_NAMES[tuple(k.key for k in path)]: _jax_to_torch(LEAF_NAMES[tuple(k.key for k in path)], v)
    for path, v in jax.tree.leaves_with_path(tree)
  }


def test_matches_opacus_adaclip_step_by_step(monkeypatch):
  torch = pytest.importorskip("torch", reason="Opacus' AdaClipDPOptimizer is the reference")
  pytest.importorskip("opacus", reason="Opacus' AdaClipDPOptimizer is the reference")
  from opacus import GradSampleModule
  from opacus.optimizers import AdaClipDPOptimizer, adaclipoptimizer

  batch, steps, lr = 16, 30, 0.05
  sigma, sigma_b, target, rate, initial = 1.0, batch / 20, 0.5, 0.2, 0.5
  rng = np.random.default_rng(0)
  params = {
    "hidden": {
      "kernel": jnp.asarray(rng.normal(size=(IN, HIDDEN)), jnp.float32),
      "bias": jnp.asarray(rng.normal(size=HIDDEN), jnp.float32),
    },
    "out": {
      "kernel": jnp.asarray(rng.normal(size=HIDDEN), jnp.float32),
      "bias": jnp.asarray(rng.normal(), jnp.float32),
    },
  }

  # clipx: the private bound, and gradient noise split by Theorem 1.
  policy = clipx.private_quantile(
    target, rate, initial, count_noise=sigma_b, batch_size=batch, key=1
  )
  grad_fn = clipx.clipped_grad(_mlp_loss, policy)
  sigma_grad = clipx.gradient_noise_multiplier(sigma, sigma_b)
  noise_tx = clipx.add_noise(sigma_grad, initial, batch, key=0)
  tx = optax.chain(noise_tx, optax.sgd(lr))

  @jax.jit
  def clipx_step(params, clip_state, opt_state, examples):
    grads, stats, clip_state = grad_fn(params, examples, clip_state)
    # The noise this step adds, read by adding it to zeros from the same state.
    zeros = jax.tree.map(jnp.zeros_like, grads)
    noise, _ = noise_tx.update(zeros, opt_state[0], max_norm=stats.threshold)
    noisy = jax.tree.map(jnp.add, grads, noise)
    updates, opt_state = tx.update(grads, opt_state, params, max_norm=stats.threshold)
    return (
      optax.apply_updates(params, updates),
      clip_state,
      opt_state,
      stats.threshold,
      noise,
      noisy,
    )

  # Opacus: the same model and start, its noise replaced by clipx's draws.
  class TwoLayer(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.hidden = torch.nn.Linear(IN, HIDDEN)
      self.out = torch.nn.Linear(HIDDEN, 1)

    def forward(self, x):
      return self.out(self.hidden(x)).squeeze(-1)

  model = TwoLayer()
  with torch.no_grad():
    for name, value in _by_torch_name(params).items():
      model.get_parameter(name).copy_(torch.from_numpy(np.array(value)))
  module = GradSampleModule(model)
  optimizer = AdaClipDPOptimizer(
    torch.optim.SGD(model.parameters(), lr=lr),
    noise_multiplier=sigma,
    target_unclipped_quantile=target,
    clipbound_learning_rate=rate,
    max_clipbound=1e6,
    min_clipbound=1e-6,
    unclipped_num_std=sigma_b,
    max_grad_norm=initial,
    expected_batch_size=batch,
  )
  draws: list = []

  def same_draws(std, reference, generator=None, secure_mode=False):
    z = draws.pop(0)  # a standard normal clipx drew, shaped like the torch tensor
    return std * torch.as_tensor(z, dtype=reference.dtype).reshape(reference.shape)

  monkeypatch.setattr(adaclipoptimizer, "_generate_noise", same_draws)

  clip_state, opt_state = grad_fn.init(params), tx.init(params)
  thresholds = []
  for _ in range(steps):
    x = rng.normal(size=(batch, IN)) * np.exp(rng.uniform(-1.5, 1.5, size=(batch, 1)))
    y = rng.normal(size=batch)
    x, y = x.astype(np.float32), y.astype(np.float32)
    count_z = _count_draw(clip_state.threshold_state.key)
    params, clip_state, opt_state, threshold, noise, noisy = clipx_step(
      params, clip_state, opt_state, (jnp.asarray(x), jnp.asarray(y))
    )
    # clipx's gradient noise on the mean has std sigma_grad * bound / batch: its draws.
    std = sigma_grad * float(threshold) / batch
    grad_z = {k: v.astype(np.float64) / std for k, v in _by_torch_name(noise).items()}
    draws[:] = [grad_z[name] for name, _ in model.named_parameters()] + [np.float32(count_z)]

    opacus_threshold = float(optimizer.max_grad_norm)
    optimizer.zero_grad()
    loss = 0.5 * ((module(torch.from_numpy(x)) - torch.from_numpy(y)) ** 2).mean()
    loss.backward()
    optimizer.step()
    assert not draws  # Opacus used every draw: one per parameter, one for the count

    np.testing.assert_allclose(float(threshold), opacus_threshold, rtol=1e-5)
    np.testing.assert_allclose(
      float(clip_state.threshold_state.noisy_count), float(optimizer.unclipped_num), rtol=1e-5
    )
    for name, value in _by_torch_name(noisy).items():
      got = model.get_parameter(name).grad.numpy()
      np.testing.assert_allclose(value, got, rtol=1e-4, atol=1e-6, err_msg=name)
    for name, value in _by_torch_name(params).items():
      got = model.get_parameter(name).detach().numpy()
      np.testing.assert_allclose(value, got, rtol=1e-4, atol=1e-6, err_msg=name)
    thresholds.append(opacus_threshold)
  # The bound did move, both ways: the comparison is not of two constants.
  assert max(thresholds) > 1.2 * initial and min(np.diff(thresholds)) < 0 < max(np.diff(thresholds))


# ------------------------------------------------------------ bad arguments


@pytest.mark.parametrize(
  ("kwargs", "error", "name"),
  [
    ({"count_noise": 0.0}, ValueError, "count_noise"),
    ({"count_noise": -1.0}, ValueError, "count_noise"),
    ({"count_noise": float("inf")}, ValueError, "count_noise"),
    ({"count_noise": None}, TypeError, "count_noise"),
    ({"batch_size": 0}, ValueError, "batch_size"),
    ({"batch_size": float("nan")}, ValueError, "batch_size"),
    ({"key": "seed"}, TypeError, "key"),
    ({"key": None}, TypeError, "key"),
    ({"target_quantile": 1.0}, ValueError, "target_quantile"),
    ({"learning_rate": 0.0}, ValueError, "learning_rate"),
    ({"initial": float("inf")}, ValueError, "initial"),
    ({"max_threshold": 0.0}, ValueError, "max_threshold"),
  ],
)
def test_private_quantile_rejects_bad_arguments(kwargs, error, name):
  kwargs = {"count_noise": 1.0, "batch_size": 32, "key": 0, **kwargs}
  with pytest.raises(error, match=rf"clipx\.private_quantile: {name} must"):
    clipx.private_quantile(**kwargs)


def test_private_quantile_is_for_one_global_bound():
  policy = clipx.private_quantile(count_noise=1.0, batch_size=8, key=0)
  with pytest.raises(ValueError, match="group must be None"):
    clipx.clipped_grad(_dot, policy, group="leaf")


@pytest.mark.parametrize(
  ("args", "error", "name"),
  [
    ((2.0, 1.0), ValueError, "count_noise"),  # sigma >= 2 sigma_b: the count spends it all
    ((1.0, 0.0), ValueError, "count_noise"),
    ((-1.0, 1.0), ValueError, "noise_multiplier"),
    ((float("inf"), 1.0), ValueError, "noise_multiplier"),
    (("1", 1.0), TypeError, "noise_multiplier"),
  ],
)
def test_gradient_noise_multiplier_rejects_bad_arguments(args, error, name):
  with pytest.raises(error, match=rf"clipx\.gradient_noise_multiplier: {name} must"):
    clipx.gradient_noise_multiplier(*args)


# ------------------------------------------------------------ the DP-SGD example


@pytest.mark.slow
def test_example_adaptive_run_is_accounted_for_both_releases(capsys):
  pytest.importorskip("dp_accounting", reason="dp-accounting (the dp extra) gives epsilon")
  import dp_accounting
  from dp_accounting import pld

  from examples import data, dp_train_cnn

  sigma, sigma_b, batch, delta = 1.0, 0.6, 48, 1e-5
  report = dp_train_cnn.main(
    ["--epochs", "0.5", "--batch-size", str(batch), "--quiet", "--adaptive"]
    + ["--noise-multiplier", str(sigma), "--count-noise", str(sigma_b)]
  )
  assert "gradient noise multiplier" in capsys.readouterr().out
  sigma_grad = report["gradient_noise_multiplier"]
  assert sigma_grad == pytest.approx((sigma**-2 - (2 * sigma_b) ** -2) ** -0.5, rel=1e-12)
  assert report["final_bound"] != pytest.approx(1.0, rel=0.05)  # the bound was learned

  # Independently: a step releases the gradient sum (sensitivity 1, noise
  # sigma_grad) and the centred count (sensitivity 1/2, noise sigma_b): one
  # Gaussian of unit noise whose sensitivity is the norm of the two ratios.
  combined = 1 / math.hypot(1 / sigma_grad, 1 / (2 * sigma_b))
  n = len(data.load_or_exit("digits")[0])
  max_batch = math.ceil(batch + dp_train_cnn.MARGIN_STDS * math.sqrt(batch))
  steps, q = report["steps"], batch / n

  def truncated(noise_multiplier):
    accountant = pld.PLDAccountant()
    event = dp_accounting.TruncatedSubsampledGaussianDpEvent(n, q, max_batch, noise_multiplier)
    accountant.compose(event, steps)
    return accountant.get_epsilon(delta)

  # The run as it ran (truncated Poisson batches), accounted for both releases.
  assert report["epsilon"] == pytest.approx(truncated(combined), rel=1e-6)
  # Accounting for the gradient's noise alone would claim far more privacy.
  assert truncated(sigma_grad) < 0.7 * report["epsilon"]
  # The example's accountant against a privacy loss distribution of the pair
  # built from the mechanism, untruncated (room for the whole dataset).
  pair = pld.privacy_loss_distribution.from_gaussian_mechanism(
    1.0, sensitivity=math.hypot(1 / sigma_grad, 1 / (2 * sigma_b)), sampling_prob=q
  )
  untruncated = dp_train_cnn.privacy_epsilon(
    dataset_size=n, batch_size=batch, max_batch=n, noise_multiplier=sigma, steps=steps, delta=delta
  )
  assert untruncated == pytest.approx(
    pair.self_compose(steps).get_epsilon_for_delta(delta), rel=1e-6
  )
