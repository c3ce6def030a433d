"""Stable-SPAM's AdaClip and AdaGN (Huang et al. 2025, arXiv:2502.17055), in PyTorch.

Not clipx code: a step-by-step port of the gradient-side part of the authors'
optimizer, for tests that compare clipx against it. Written from the source
below, not copied (the repository carries no license file); each line cites
the line it follows.

Source: repo ``TianjinYellow/StableSPAM``, commit
``6a66da1ea7005f7fe7bc570b7968144b42163bed`` (2025-03-29), file
``galore_torch/stablespam.py``: ``StableSPAM.__init__`` L26-49, ``step`` L56-189.
Both transforms run *inside* the optimizer's step, per parameter tensor, after
the decoupled weight decay (L78) and before Adam's moment updates (L162-188).

torch is imported lazily so that this module imports (pytest collects it with
``--doctest-modules``) where torch is not installed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def cosine_scale(total_steps: int, total_t: int | None, eta_min: float = 0.5) -> float:
  """The ``scale`` of L63-66: ``CosineDecay(1.0, total_T, eta_min).get_dr(step)``.

  ``CosineDecay`` (L11-22) steps a ``CosineAnnealingLR(T_max=total_T + 1,
  eta_min)`` to epoch ``step``; torch then uses the closed form
  ``eta_min + (1 - eta_min) * (1 + cos(pi * step / (total_T + 1))) / 2``
  (periodic: it rises again past ``total_T + 1``). ``None`` -> 1.0 (L65-66).
  """
  if total_t is None:
    return 1.0
  return eta_min + (1.0 - eta_min) * (1 + math.cos(math.pi * total_steps / (total_t + 1))) / 2


def stable_spam_clip(
  steps: Sequence[Sequence[Any]],
  *,
  gamma1: float = 0.7,
  gamma2: float = 0.9,
  gamma3: float = 0.999,
  eps: float = 1e-8,
  total_t: int | None = None,
  eta_min: float = 0.5,
  update_proj_gap: int = 1000,
  betas: tuple[float, float] = (0.9, 0.999),
) -> list[dict[str, Any]]:
  """AdaClip then AdaGN on each tensor, as ``StableSPAM.step`` applies them.

  Args:
    steps: one entry per optimizer step; each a sequence of gradient tensors
      (torch tensors or arrays), one per parameter tensor.
    gamma1, gamma2, gamma3, eps, total_t, eta_min, update_proj_gap: the
      constructor's defaults (L26-27). ``gamma3`` is the reference's ``theta``
      (L41); ``gamma1 == -1`` means ``betas[0]`` (L46-47).

  Returns:
    One dict per step with per-tensor lists: ``max_abs`` (max |g| before
    clipping), ``bound`` (``m_max_hat``, the AdaClip threshold), ``n_clipped``
    (entries above it), ``clipped_grad`` (after AdaClip), ``norm`` (its L2
    norm), ``target_norm`` (``c_norm_t``, AdaGN's output norm), ``grads`` (the
    AdaGN output, what Adam receives), ``step`` (the per-tensor step counter
    used in the bias corrections), and the step's ``scale``.
  """
  import torch

  theta = gamma3  # L41: self.theta = gamma3
  if gamma1 == -1:  # L46-47
    gamma1 = betas[0]
  states: list[dict[str, Any]] = []
  total_steps = 0  # L45
  out = []
  for grads_in in steps:
    total_steps += 1  # L62
    scale = cosine_scale(total_steps, total_t, eta_min)  # L63-66
    record: dict[str, Any] = {
      "scale": scale,
      "max_abs": [],
      "bound": [],
      "n_clipped": [],
      "clipped_grad": [],
      "norm": [],
      "target_norm": [],
      "grads": [],
      "step": [],
    }
    for i, g in enumerate(grads_in):
      grad = torch.as_tensor(g).clone()  # L81: grad = p.grad (the reference edits it in place)
      if i == len(states):  # L91-100: state initialisation
        states.append({"step": 0, "m_norm_t": 0, "v_norm_t": 0, "m_max_t": 0})
      state = states[i]

      # ---- AdaClip (L110-129) ----
      max_gradient = torch.max(grad.abs())  # L110
      m_max_t = state["m_max_t"]  # L112
      state["step"] += 1  # L115
      # L118: the EMA takes this step's (raw) max *before* the bound is formed
      m_max_t = theta * m_max_t + (1 - theta) * max_gradient
      m_max_hat = m_max_t / (1 - theta ** state["step"])  # L121: bias-corrected
      mask = grad.abs() > m_max_hat  # L124: strict >
      n_clipped = int(mask.sum())
      if mask.sum() > 0:  # L126-127: entries above the bound are scaled by
        # bound / max|g| (the largest lands on the bound, the others below it)
        grad[mask] = grad[mask] / max_gradient * m_max_hat
      state["m_max_t"] = m_max_t  # L129

      # ---- AdaGN (L132-150) ----
      grad_norm = torch.norm(grad)  # L132: norm *after* AdaClip
      m_norm_t, v_norm_t = state["m_norm_t"], state["v_norm_t"]  # L134
      m_norm_t = gamma1 * scale * m_norm_t + (1 - gamma1 * scale) * grad_norm  # L136
      v_norm_t = gamma2 * v_norm_t + (1 - gamma2) * grad_norm**2  # L138
      m_norm_hat = m_norm_t / (1 - (gamma1 * scale) ** state["step"])  # L140
      v_norm_hat = v_norm_t / (1 - gamma2 ** state["step"])  # L141
      c_norm_t = m_norm_hat / (torch.sqrt(v_norm_hat) + eps)  # L143
      clipped_grad = grad.clone()
      if grad_norm > 0:  # L145-146 (commit deaa66c added this guard)
        grad = grad / grad_norm * c_norm_t
      state["m_norm_t"], state["v_norm_t"] = m_norm_t, v_norm_t  # L150

      record["step"].append(state["step"])
      # L154-159: momentum reset every update_proj_gap optimizer steps; it also
      # sets state['step'] = 1, which restarts the bias corrections of L121 and
      # L140-141 although m_max_t, m_norm_t and v_norm_t are NOT reset.
      # (It rebinds state['exp_avg'] / ['exp_avg_sq'] to zeros while L171-172 still
      # update the old tensors bound at L108: the reset step itself uses the old
      # moments with step-1 bias corrections; the zeroed moments start next step.)
      if update_proj_gap != 0 and total_steps % update_proj_gap == 0:
        state["step"] = 1

      record["max_abs"].append(max_gradient)
      record["bound"].append(m_max_hat)
      record["n_clipped"].append(n_clipped)
      record["clipped_grad"].append(clipped_grad)
      record["norm"].append(grad_norm)
      record["target_norm"].append(c_norm_t)
      record["grads"].append(grad)
    out.append(record)
  return out
