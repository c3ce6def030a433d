"""Adafactor's update clipping, ``U / max(1, RMS(U) / d)``, as Optax and PyTorch implement it.

Not clipx code: step-by-step ports for tests that compare clipx against them.
Written from the sources below, not copied; each line cites the line it follows.

Sources:

- [O] Optax 0.2.8 (Apache-2.0), tag ``v0.2.8`` = commit
  ``107e9ad20ca62bcbee1a8c016daab71c690a678c``, ``optax/transforms/_clipping.py``
  L48-74 (``clip_by_block_rms``; the formula is L67-70). ``optax.adafactor``
  (``optax/_src/alias.py`` L304-311) applies it right after
  ``scale_by_factored_rms``, before the learning rate, parameter scaling and
  momentum, with ``clipping_threshold=1.0``.
- [T] PyTorch 2.14.1 (BSD-3-Clause), build commit
  ``5c4886908584029761b579af026dcfb627c84070``, ``torch/optim/_adafactor.py``:
  documented at L216 and implemented in ``_single_tensor_adafactor`` L366-420
  (the clip is L419-420) and ``_multi_tensor_adafactor`` L592-601.

torch is imported lazily so that this module imports (pytest collects it with
``--doctest-modules``) where torch is not installed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def clip_by_block_rms(updates: Sequence[np.ndarray], threshold: float) -> list[np.ndarray]:
  """[O] L66-72: each leaf ``u`` becomes ``u / max(1, sqrt(mean(|u|^2)) / threshold)``.

  One block per leaf (a stacked ``(layers, ...)`` leaf is one block). No
  epsilon: an all-zero leaf has RMS 0 and denominator 1. Computed in the
  leaf's dtype.
  """
  out = []
  for u in updates:
    u = np.asarray(u)
    rms = np.sqrt(np.mean(np.abs(u) ** 2))  # numerics.abs_sq(u), mean, sqrt (L68)
    clip_denom = np.maximum(np.asarray(1.0, u.dtype), rms / np.asarray(threshold, u.dtype))
    out.append(u / clip_denom)  # L70
  return out


def torch_adafactor(
  steps: Sequence[Sequence[Any]],
  params: Sequence[Any],
  *,
  lr: float = 1e-2,
  beta2_decay: float = -0.8,
  eps: tuple[float | None, float] = (None, 1e-3),
  d: float = 1.0,
) -> list[dict[str, Any]]:
  """[T]'s single-tensor Adafactor (weight_decay 0, maximize False) over ``steps``.

  Returns one dict per step with per-tensor lists: ``update`` (``U_t``, the
  preconditioned gradient before clipping), ``rms`` (``||U||_2 / sqrt(numel)``),
  ``denom`` (``max(1, rms / d)``, a Python float), ``clipped_update``
  (``U / denom``), ``alpha`` and ``params`` after the step. torch's Adafactor
  has no first moment, so ``U`` is ``G / sqrt(V_hat)``; the clip is folded
  into the step size (``param.add_(U, alpha=-alpha / denom)``).
  """
  import torch

  eps1_arg, eps2 = eps
  params = [torch.as_tensor(p).clone() for p in params]
  state: list[dict[str, Any]] = []
  for p in params:  # Adafactor._init_group: factors of the last two dims, or a full variance
    if p.dim() > 1:
      row_shape, col_shape = list(p.shape), list(p.shape)
      row_shape[-1] = 1
      col_shape[-2] = 1
      state.append({"row_var": p.new_zeros(row_shape), "col_var": p.new_zeros(col_shape)})
    else:
      state.append({"variance": torch.zeros_like(p)})
  step = 0
  out = []
  for grads in steps:
    step += 1  # L376-377 (step_t += 1; step_float = step_t.item())
    record: dict[str, Any] = {
      "update": [],
      "rms": [],
      "denom": [],
      "clipped_update": [],
      "alpha": [],
      "params": [],
    }
    for i, g in enumerate(grads):
      grad, param, s = torch.as_tensor(g), params[i], state[i]
      eps1 = torch.finfo(param.dtype).eps if eps1_arg is None else eps1_arg  # L372-373
      one_minus_beta2_t = step**beta2_decay  # L379
      rho_t = min(lr, 1 / (step**0.5))  # L380
      alpha = max(eps2, param.norm(2).item() / (param.numel() ** 0.5)) * rho_t  # L381
      if grad.dim() > 1:  # L387-407: factored second moment
        row_mean = (
          torch.linalg.vector_norm(grad, dim=-1, keepdim=True).square_().div_(grad.size(-1))
        )
        s["row_var"].lerp_(row_mean, one_minus_beta2_t)
        col_mean = (
          torch.linalg.vector_norm(grad, dim=-2, keepdim=True).square_().div_(grad.size(-2))
        )
        s["col_var"].lerp_(col_mean, one_minus_beta2_t)
        var_estimate = s["row_var"] @ s["col_var"]
        var_estimate.div_(s["row_var"].mean(dim=-2, keepdim=True).clamp_(min=eps1))
      else:  # L408-414
        s["variance"].lerp_(grad * grad, one_minus_beta2_t)
        var_estimate = s["variance"].clone()
      update = var_estimate.clamp_(min=eps1 * eps1).rsqrt_()  # L417
      update.mul_(grad)  # L418
      rms = update.norm(2).item() / (update.numel() ** 0.5)
      denom = max(1.0, update.norm(2).item() / ((update.numel() ** 0.5) * d))  # L419: no eps
      param.add_(update, alpha=-alpha / denom)  # L420
      record["update"].append(update)
      record["rms"].append(rms)
      record["denom"].append(denom)
      record["clipped_update"].append(update / denom)
      record["alpha"].append(alpha)
      record["params"].append(param.clone())
    out.append(record)
  return out
