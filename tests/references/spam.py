"""SPAM (Huang et al., ICLR 2025, arXiv:2501.06842): the authors' optimizer step, in numpy.

Not clipx code: a step-by-step port of the authors' ``AdamW`` (exported as
``SPAM``), for tests that compare clipx against it. Written from the source
below, not copied (the repository carries no license file); each line cites
the line it follows. float32 arrays throughout, as the reference's tensors;
the scalars (step size, warm-up factor) in double, as the reference's Python
floats.

Source: repo ``TianjinYellow/SPAM-Optimizer``, commit
``e8185fbe695fdc449953b4a1f96121df5bf0d268`` (2025-03-12), file
``galore_torch/SPAM.py``: ``CosineDecay`` L12-58, ``AdamW.__init__`` L90-140,
``step`` L177-297. The random sparse masks (``density`` groups, L216-219,
L264-270, L288-293) are left out: the README's SPAM has none.

Checked against the authors' file itself (torch 2.13.0, CPU): 300 steps with
spikes, two resets, weight decay 0.1, every parameter equal to 2e-7.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np


def death_rate(current_step: int, warmup_steps: int) -> float:
  """``CosineDecay(0.99, warmup_steps).get_dr(current_step)`` (L25-58).

  torch's ``CosineAnnealingLR(T_max=warmup_steps + 1, eta_min=0)`` stepped to
  epoch ``current_step`` takes its closed form (L43); 0 from ``warmup_steps`` on (L55-56).
  """
  if current_step >= warmup_steps:
    return 0.0
  return 0.99 * (1 + math.cos(math.pi * current_step / (warmup_steps + 1))) / 2


def _fused(x: np.ndarray, y: np.ndarray, alpha: float) -> np.ndarray:
  """torch's ``x.add_(y, alpha=alpha)`` on float32 CPU tensors: one rounding (a fused
  multiply-add) of ``x + float32(alpha) * y``, here in double then rounded."""
  return (x.astype(np.float64) + np.float64(np.float32(alpha)) * y).astype(np.float32)


def spam_steps(
  params: Sequence[np.ndarray],
  grads: Sequence[Sequence[np.ndarray]],
  *,
  lr: float = 1e-3,
  betas: tuple[float, float] = (0.9, 0.999),
  eps: float = 1e-6,
  weight_decay: float = 0.0,
  warmup_steps: int = 150,
  threshold: float = 5000,
  delta_t: int = 500,
  grad_accu_steps: int = 20,
) -> list[dict[str, Any]]:
  """Runs ``AdamW.step`` once per entry of ``grads``.

  Args:
    params: the initial parameter tensors.
    grads: per step, one gradient per parameter tensor.
    lr, betas, eps, weight_decay, warmup_steps, threshold, delta_t,
      grad_accu_steps: the constructor's arguments (L90-103); ``delta_t`` is
      ``DeltaT``.

  Returns:
    One dict per step: ``scale_factor`` (the warm-up factor, L194),
    ``clipped`` (the gradients after the spike clip, L235-246), ``spikes``
    (entries clipped), ``exp_avg`` and ``exp_avg_sq`` (after the update,
    L249-250) and ``params`` (after the step), each a list per tensor.
  """
  b1, b2 = betas
  p_state = [np.array(p, np.float32) for p in params]
  states: list[dict[str, Any]] = [{} for _ in p_state]
  total_step = 0  # L134
  current_step = warmup_steps + 1  # L135
  records = []
  for step_grads in grads:
    scale_factor = 1 - death_rate(current_step, warmup_steps)  # L194
    record: dict[str, Any] = {"scale_factor": scale_factor, "clipped": [], "spikes": []}
    record.update(exp_avg=[], exp_avg_sq=[], params=[])
    for i, g in enumerate(step_grads):
      grad = np.array(g, np.float32)  # L205 (a copy: the reference edits p.grad in place)
      state = states[i]
      state.setdefault("step", 0)  # L210-211
      if "exp_avg" not in state:  # L222-224
        state["exp_avg"] = np.zeros_like(grad)
        state["exp_avg_sq"] = np.zeros_like(grad)
      if (total_step + 1) % delta_t == 0:  # L227-229
        state["exp_avg"] = np.zeros_like(grad)
        state["exp_avg_sq"] = np.zeros_like(grad)
      exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]  # L231
      state["step"] += 1  # L233
      spikes = 0
      if threshold != 0:  # L236
        current = total_step + 1  # L237
        if current >= grad_accu_steps:  # L238
          mask = grad**2 > np.float32(threshold) * exp_avg_sq  # L240
          if delta_t != 0 and current % delta_t >= grad_accu_steps:  # L241-244
            grad[mask] = np.sign(grad[mask]) * np.sqrt(exp_avg_sq[mask] * np.float32(threshold))
            spikes = int(mask.sum())
          elif delta_t == 0:  # L245-246
            grad[mask] = np.sign(grad[mask]) * np.sqrt(exp_avg_sq[mask] * np.float32(threshold))
            spikes = int(mask.sum())
      # L249-250: mul_(beta).add_(grad, alpha=1 - beta), addcmul_(grad, grad, value=1 - beta)
      exp_avg[...] = _fused(exp_avg * np.float32(b1), grad, 1.0 - b1)
      exp_avg_sq[...] = _fused(
        exp_avg_sq * np.float32(b2), grad.astype(np.float64) * grad, 1.0 - b2
      )
      denom = np.sqrt(exp_avg_sq) + np.float32(eps)  # L252
      step_size = lr  # L254
      bias_correction1 = 1.0 - b1 ** state["step"]  # L257
      bias_correction2 = 1.0 - b2 ** state["step"]  # L258
      step_size *= math.sqrt(bias_correction2) / bias_correction1  # L259
      norm_grad = exp_avg / denom  # L262
      p = p_state[i]
      p[...] = _fused(p, norm_grad, -step_size * scale_factor)  # L272
      if weight_decay > 0:  # L275-282
        p[...] = _fused(p, p, -lr * weight_decay)
      record["clipped"].append(grad)
      record["spikes"].append(spikes)
      record["exp_avg"].append(exp_avg.copy())
      record["exp_avg_sq"].append(exp_avg_sq.copy())
      record["params"].append(p.copy())
    total_step += 1  # L285
    current_step += 1  # L286
    if total_step != 0 and (total_step + 1) % delta_t == 0:  # L289-295
      current_step = 0
    records.append(record)
  return records
