"""Runs ``pytorch_optimizer``'s Fira itself and records its norm-growth limiter, step by step.

Not clipx code, and no port: the optimizer is the installed package
(``pytorch_optimizer`` 4.1.0 on PyPI, ``pytorch_optimizer/optimizer/fira.py``;
the limiter is L181-189, the same rule as the authors' repository
``xichen-fy/Fira``, ``optimizer_torch/fira_adamw.py`` L136-147, commit
``5c28b13408282b3ee65386b110318659412ddad9``). The limiter sits inside
``Fira.step``, so two of the names it calls are wrapped to watch it, without
changing what they compute:

- ``torch.norm`` as the module sees it: a call without ``dim`` is the norm of
  the compensation term ``scaling_grad`` (L182 or L189); a copy of its input
  is the term before limiting, and the tensor itself, divided in place by the
  limiter (L185), is the term after;
- ``GaLoreProjector.project_back``: its second call per step (L191) returns
  the low-rank part of the update, to which the limited term is added.

torch and pytorch_optimizer are imported lazily, so this module imports
(pytest collects it) where they are not installed.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class _WatchedTorch:
  """``torch``, with ``norm`` recording its dim-less calls (the limiter's input)."""

  def __init__(self, torch: Any, record: list):
    self._torch, self._record = torch, record

  def __getattr__(self, name: str) -> Any:
    return getattr(self._torch, name)

  def norm(self, *args: Any, **kwargs: Any) -> Any:
    if len(args) == 1 and "dim" not in kwargs:
      self._record.append((args[0].detach().clone(), args[0]))
    return self._torch.norm(*args, **kwargs)


def run_fira(
  weight: np.ndarray, grads: list[np.ndarray], *, lr: float, rank: int, update_proj_gap: int
) -> list[dict[str, Any]]:
  """Fira on one matrix parameter with the given gradients; per step what the limiter did.

  Returns:
    One dict per step: ``before`` and ``after`` (the compensation term before
    and after limiting), ``previous`` (``state["scaling_grad"]`` after the
    step: the limited norm), ``low_rank`` (the projected-back Adam update),
    ``step_size`` (Fira's ``lr * sqrt(1 - b2**t) / (1 - b1**t)``), ``param``
    (the weights after the step).
  """
  import torch
  from pytorch_optimizer.optimizer import fira
  from pytorch_optimizer.optimizer.utils.galore import GaLoreProjector

  records: list = []
  backs: list = []
  original_back = GaLoreProjector.project_back

  def watched_back(self: Any, low_rank_grad: Any) -> Any:
    out = original_back(self, low_rank_grad)
    backs.append(out.detach().clone())
    return out

  p = torch.nn.Parameter(torch.from_numpy(weight.copy()))
  group = {
    "params": [p],
    "rank": rank,
    "update_proj_gap": update_proj_gap,
    "scale": 1.0,
    "projection_type": "std",
  }
  optimizer = fira.Fira([group], lr=lr, weight_decay=0.0, foreach=False)
  steps = []
  saved_torch = fira.torch
  fira.torch = _WatchedTorch(torch, records)
  GaLoreProjector.project_back = watched_back
  try:
    for t, g in enumerate(grads, start=1):
      del records[:], backs[:]
      p.grad = torch.from_numpy(g.copy())
      optimizer.step()
      ((before, after),) = records
      beta1, beta2 = optimizer.param_groups[0]["betas"]
      steps.append(
        {
          "before": before.numpy().copy(),
          "after": after.detach().numpy().copy(),
          "previous": float(optimizer.state[p]["scaling_grad"]),
          "low_rank": backs[1].numpy().copy(),
          "step_size": lr * np.sqrt(1 - beta2**t) / (1 - beta1**t),
          "param": p.detach().numpy().copy(),
        }
      )
  finally:
    fira.torch = saved_torch
    GaLoreProjector.project_back = original_back
  return steps
