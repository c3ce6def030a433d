"""zclip against the authors' ZClip, with the ``max_threshold`` cap binding.

The reference is ``zclip/zclip.py`` of `bluorion-com/ZClip
<https://github.com/bluorion-com/ZClip>`_ (last changed in commit
``e42cdd1ce92cd5da5148d184819f4b13c7fe5b1a``; PyPI ``zclip`` 1.0.0 ships the
same file). Its ``max_grad_norm`` caps only the clip it applies,
``min(adaptive_clip, max_grad_norm)``, while its EMA is fed the *uncapped*
value: the spike's adaptive threshold, or the raw norm. So the norms here rise
from 0.8 to 1.6 with spikes, the cap of 1.0 binds on most steps after warm-up,
and a policy whose statistics saw the capped norm drifts far from the authors'.

Two checks: a transcription of the authors' update rule in float64 (runs in CI),
and the PyPI package itself driving a torch model's gradients (skipped without
torch and zclip).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import clipx

# clipx's mode for each of the authors' (mode, clip_option) pairs.
MODES = {"reciprocal": ("zscore", "adaptive_scaling"), "clip_to_max": ("percentile", None)}


def _rising_norms(steps, seed=0):
  """Norms rising from 0.8 to 1.6 with log-normal noise and 2x-12x spikes after warm-up."""
  rng = np.random.default_rng(seed)
  norms = np.linspace(0.8, 1.6, steps) * np.exp(rng.normal(0.0, 0.08, steps))
  spikes = rng.choice(np.arange(30, steps), size=steps // 25, replace=False)
  norms[spikes] *= rng.uniform(2.0, 12.0, spikes.size)
  return norms.astype(np.float32)


def _authors_zclip(norms, alpha, z_thresh, max_grad_norm, warmup_steps, mode, clip_option):
  """``ZClip.step`` on a stream of norms, in float64: (applied clip, mean, var) per step.

  A line-by-line transcription of ``ZClip.step``, ``_compute_clip_val``,
  ``_apply_clipping`` and ``_update_ema`` (eps = 1e-6 as there); mean and var
  are NaN until the warm-up buffer is full.
  """
  eps = 1e-6
  buffer, mean, var = [], None, None
  rows = []
  for total_norm in np.asarray(norms, np.float64):
    if mean is None:
      buffer.append(total_norm)
      if len(buffer) >= warmup_steps:
        mean = sum(buffer) / len(buffer)
        var = sum((x - mean) ** 2 for x in buffer) / len(buffer)
      applied = max_grad_norm
    else:
      std = math.sqrt(var)
      clip_val = None
      if mode == "percentile":
        if total_norm > mean + z_thresh * std:
          clip_val = mean + z_thresh * std
      else:
        z = (total_norm - mean) / (std + eps)
        if z > z_thresh:
          clip_val = (
            mean + z_thresh * std / (z / z_thresh) if clip_option == "adaptive_scaling" else mean
          )
      adaptive_clip = clip_val if clip_val is not None else total_norm
      applied = min(adaptive_clip, max_grad_norm)
      fed = clip_val if clip_val is not None else total_norm  # uncapped
      mean = alpha * mean + (1 - alpha) * fed
      var = alpha * var + (1 - alpha) * (fed - mean) ** 2
    rows.append(
      (min(total_norm, applied), np.nan if mean is None else mean, np.nan if var is None else var)
    )
  return np.asarray(rows)


def _policy_run(policy, norms):
  """Each step's norm after clipping, ``min(norm, threshold)``, and the state, from one scan."""

  def body(state, norm):
    threshold, state = policy.update(norm, state)
    return state, (jnp.minimum(norm, threshold), state)

  _, (clipped, states) = jax.lax.scan(body, policy.init(jnp.zeros(())), jnp.asarray(norms))
  return np.asarray(clipped, np.float64), jax.tree.map(np.asarray, states)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_zclip_with_a_binding_cap_follows_the_authors_update_rule(mode):
  alpha, z_thresh, cap, warmup = 0.97, 2.5, 1.0, 25
  norms = _rising_norms(120)
  clipped, states = _policy_run(
    clipx.zclip(z_thresh, alpha, warmup, mode, max_threshold=cap), norms
  )
  reference = _authors_zclip(norms, alpha, z_thresh, cap, warmup, *MODES[mode])
  # The case under test: after warm-up the cap binds on most steps.
  assert np.mean(norms[warmup:] > cap) > 0.7
  np.testing.assert_allclose(clipped, reference[:, 0], rtol=1e-5)
  warm = slice(warmup - 1, None)  # the buffer fills at step warmup - 1
  np.testing.assert_allclose(states.mean[warm], reference[warm, 1], rtol=1e-5)
  np.testing.assert_allclose(np.sqrt(states.var[warm]), np.sqrt(reference[warm, 2]), rtol=2e-5)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_zclip_matches_the_pypi_zclip_package_on_a_torch_model(mode):
  torch = pytest.importorskip("torch", reason="the ZClip reference is a torch package; not in CI")
  zclip_reference = pytest.importorskip(
    "zclip", reason="the authors' ZClip (PyPI zclip); not in CI"
  )
  steps, cap = 300, 1.0
  norms = _rising_norms(steps, seed=1)
  rng = np.random.default_rng(2)
  model = torch.nn.Linear(4, 3)
  reference = zclip_reference.ZClip(max_grad_norm=cap, mode=MODES[mode][0])  # authors' defaults
  applied_clips = []
  apply_clipping = reference._apply_clipping

  def recording_apply_clipping(*args):
    applied_clips.append(apply_clipping(*args))
    return applied_clips[-1]

  reference._apply_clipping = recording_apply_clipping

  tx = clipx.clip_by_global_norm(clipx.zclip(mode=mode, max_threshold=cap))  # clipx's defaults
  update = jax.jit(tx.update)
  state = tx.init({"weight": jnp.zeros((3, 4)), "bias": jnp.zeros(3)})
  warmup = 25
  for step, norm in enumerate(norms):
    direction = {"weight": rng.normal(size=(3, 4)), "bias": rng.normal(size=3)}
    total = math.sqrt(sum(np.sum(np.square(g)) for g in direction.values()))
    grads = {name: (g * (norm / total)).astype(np.float32) for name, g in direction.items()}

    model.weight.grad = torch.from_numpy(grads["weight"].copy())
    model.bias.grad = torch.from_numpy(grads["bias"].copy())
    reference.step(model)
    clipped, state = update(jax.tree.map(jnp.asarray, grads), state)

    message = f"step {step}, norm {norm}"
    expected = {"weight": model.weight.grad.numpy(), "bias": model.bias.grad.numpy()}
    for name in expected:
      np.testing.assert_allclose(
        clipped[name], expected[name], rtol=1e-5, atol=1e-7, err_msg=message
      )
    stats = state.stats
    applied = cap if step < warmup else applied_clips[-1]  # warm-up clips to max_grad_norm
    # Where ZClip does not clip, its clip is the norm itself: compare the clipped norms.
    np.testing.assert_allclose(
      float(stats.clipped_norm), min(float(stats.norm), applied), rtol=1e-5, err_msg=message
    )
    if step >= warmup - 1:
      moments = state.threshold_state
      np.testing.assert_allclose(float(moments.mean), reference.mean, rtol=1e-5, err_msg=message)
      np.testing.assert_allclose(
        math.sqrt(float(moments.var)), math.sqrt(reference.var), rtol=2e-5, err_msg=message
      )
  assert np.mean(norms[warmup:] > cap) > 0.7  # the cap binds after warm-up
