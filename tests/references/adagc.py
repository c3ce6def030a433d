"""AdaGC reference (Wang et al. 2025, arXiv:2502.11034), ported to NumPy.

Not clipx code: a step-by-step port of the authors' implementations, for tests
that compare clipx presets against them. Written from the sources below, not
copied; every rule cites the lines it follows.

Sources read:

- [M] PyTorch / Megatron: repo ``lishuai-97/AdaGC`` (the authors' release),
  commit ``32c249fa365e08169779d63d416bfa76c2be31fc``, file ``megatron-gpt2.patch``
  (Apache-2.0). It patches Megatron-LLaMA's ``megatron/optimizer/clip_grads.py``;
  line numbers below are lines of the patch file (``P``) and of the patched
  ``clip_grads.py`` (``F``). Class ``AdaGC``: P50386-50563 / F287-464; class
  ``GlobalAdaGC``: P50227-50382 / F128-283; defaults: ``--clip-ratio 1.04``,
  ``--clip-beta 0.99`` (``megatron/arguments.py`` hunk, P50176-50182); the run
  script uses ``--clip-grad 1.0`` (P50677, P50689).
  The later commit ``c9c23db0a53d22542aebb152b9f46c1bdfd67fb1`` folds this into
  ``megatron-llama.patch`` (not readable in the stored snapshot).
- [P] Paddle: ``PaddlePaddle/Paddle``,
  ``python/paddle/distributed/fleet/meta_optimizers/dygraph_optimizer/hybrid_parallel_optimizer.py``,
  class ``ClipGradByAdaptiveNorm`` (docstring "AdaGC: https://arxiv.org/abs/2502.11034",
  Paddle PR #79041; the index that served it shows no commit), methods
  ``_clip_by_norm`` and ``_dygraph_clip``.

The two differ in the warm-up (see :func:`adagc_paddle`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def _norm32(g: np.ndarray) -> np.float32:
  """``torch.norm(grad, 2)`` of a float32 tensor: a float32 scalar."""
  g = np.asarray(g, np.float32)
  return np.float32(np.sqrt(np.sum(np.square(g.astype(np.float64)))))


def adagc_megatron(
  steps: Sequence[Sequence[np.ndarray]],
  *,
  max_norm: float = 1.0,
  clip_ratio: float = 1.04,
  beta: float = 0.99,
  eps: float = 1.0e-6,
  start_clip_steps: int = 100,
) -> list[dict[str, Any]]:
  """Tensor-wise AdaGC as in [M] class ``AdaGC`` (``--clip-mode AdaGC``).

  Args:
    steps: one entry per optimizer step; each a sequence of gradient arrays,
      one per parameter tensor (the same tensors, in the same order, every step).
    max_norm: Megatron's ``--clip-grad``; used only during warm-up.
    clip_ratio, beta, eps, start_clip_steps: the constructor defaults of [M]
      (F287-289: ``clip_ratio=1.04, beta=0.99, eps=1.0e-6, start_clip_steps=100``).

  Returns:
    One dict per step: ``phase`` ("global" during warm-up, "adaptive" after),
    ``global_norm`` (pre-clip, what [M] returns), ``norms`` (per-tensor norms
    before the adaptive clip; in warm-up, after the global clip: [M] measures
    them then), ``threshold`` (per tensor: ``clip_ratio * ema`` after warm-up,
    ``nan`` during it), ``global_threshold`` (``max_norm`` in warm-up, ``nan``
    after), ``clipped`` (per tensor), ``scale`` (per tensor, the factor applied),
    ``grads`` (the clipped outputs, float32), ``ema`` (state after the step).
  """
  state: list[np.float32 | None] = [None] * len(steps[0]) if steps else []
  out = []
  for step_index, grads_in in enumerate(steps):
    # F324 (P50423): self.steps += 1  -> the counter is 1 on the first call.
    count = step_index + 1
    grads = [np.array(g, np.float32, copy=True) for g in grads_in]
    n = len(grads)
    # F374-393: total_norm = (sum of squared L2 norms) ** 0.5, then .item():
    # a Python float from here on.
    total_norm = float(np.sqrt(sum(float(_norm32(g)) ** 2 for g in grads)))
    record: dict[str, Any] = {"global_norm": total_norm}
    scale = np.ones(n, np.float64)
    if count <= start_clip_steps:  # F396 (P50495): warm-up = steps 1..start_clip_steps
      # F400 (P50499): clip_coeff = max_norm / (total_norm + eps); applied only if < 1
      clip_coeff = max_norm / (total_norm + eps)
      if clip_coeff < 1.0:  # F401-406: multi_tensor_scale of every grad, in place
        grads = [(g * np.float32(clip_coeff)).astype(np.float32) for g in grads]
        scale[:] = clip_coeff
      norms = np.zeros(n, np.float32)
      for i, g in enumerate(grads):
        # F408-429: the tensor norm of the *globally clipped* grad (param.grad was
        # scaled in place above); the state is seeded with it and then keeps
        # the MINIMUM over the warm-up (not an EMA, not a mean).
        norm_value = _norm32(g)
        norms[i] = norm_value
        if state[i] is None:  # F425-426
          state[i] = norm_value
        if norm_value < state[i]:  # F428-429
          state[i] = norm_value
      record.update(
        phase="global",
        global_threshold=max_norm,
        threshold=np.full(n, np.nan, np.float32),
        clipped=np.full(n, clip_coeff < 1.0),
      )
    else:
      norms = np.zeros(n, np.float32)
      thresholds = np.zeros(n, np.float32)
      clipped = np.zeros(n, bool)
      for i, g in enumerate(grads):
        norm_value = _norm32(g)  # F441 (P50540)
        norms[i] = norm_value
        if state[i] is None:  # F450-451: a tensor first seen after warm-up
          state[i] = norm_value
        avg = np.float32(state[i])  # F453
        bound = np.float32(np.float32(clip_ratio) * avg)
        thresholds[i] = bound
        if norm_value > bound:  # F455 (P50554): strict >
          # F457-458: clip_coef = (clip_ratio * avg) / (norm + eps); grad *= clip_coef
          coef = np.float32(bound / np.float32(norm_value + np.float32(eps)))
          grads[i] = (g * coef).astype(np.float32)
          scale[i] = coef
          clipped[i] = True
          # F460: the EMA sees the bound itself, not the post-clip norm
          # (which is bound * norm / (norm + eps)).
          norm_value = bound
        # F462 (P50561): ema <- beta * ema + (1 - beta) * min(norm, clip_ratio * ema)
        state[i] = np.float32(avg * np.float32(beta) + norm_value * np.float32(1.0 - beta))
      record.update(
        phase="adaptive", global_threshold=np.nan, threshold=thresholds, clipped=clipped
      )
    record.update(
      norms=norms, scale=scale, grads=grads, ema=np.array(state, np.float32), step=count
    )
    out.append(record)
  return out


def global_adagc_megatron(
  steps: Sequence[Sequence[np.ndarray]],
  *,
  max_norm: float = 1.0,
  clip_ratio: float = 1.04,
  beta: float = 0.99,
  eps: float = 1.0e-6,
  start_clip_steps: int = 100,
) -> list[dict[str, Any]]:
  """Global-norm AdaGC as in [M] class ``GlobalAdaGC`` (``--clip-mode AdaGC-Global``).

  Same rule on the single global norm, in Python floats (F128-283). Warm-up
  seed: the minimum of ``min(total_norm, max_norm)`` (F250-259,
  ``_warmup_clipped_total_norm``), i.e. the clipped global norm computed
  arithmetically rather than re-measured.
  """
  ema: float | None = None
  out = []
  for step_index, grads_in in enumerate(steps):
    count = step_index + 1  # F167: self.steps += 1
    grads = [np.array(g, np.float32, copy=True) for g in grads_in]
    total_norm = float(np.sqrt(sum(float(_norm32(g)) ** 2 for g in grads)))  # F214-236
    pre = total_norm
    record: dict[str, Any] = {"global_norm": pre, "step": count}
    if count <= start_clip_steps:  # F239
      clip_coeff = max_norm / (total_norm + eps)  # F243
      scale = clip_coeff if clip_coeff < 1.0 else 1.0
      if clip_coeff < 1.0:
        grads = [(g * np.float32(clip_coeff)).astype(np.float32) for g in grads]
      clipped_total = min(total_norm, max_norm)  # F252-253
      if ema is None or clipped_total < ema:  # F255-259
        ema = clipped_total
      record.update(phase="global", threshold=max_norm, clipped=clip_coeff < 1.0, scale=scale)
    else:
      if ema is None:  # F265-266
        ema = total_norm
      avg = ema
      bound = clip_ratio * avg
      clipped = total_norm > bound  # F270
      scale = 1.0
      if clipped:
        scale = bound / (total_norm + eps)  # F272
        grads = [(g * np.float32(scale)).astype(np.float32) for g in grads]
        total_norm = bound  # F279
      ema = avg * beta + total_norm * (1.0 - beta)  # F281
      record.update(phase="adaptive", threshold=bound, clipped=clipped, scale=scale)
    record.update(grads=grads, ema=ema)
    out.append(record)
  return out


def adagc_paddle(
  steps: Sequence[Sequence[np.ndarray]],
  *,
  clip_ratio: float = 1.04,
  beta: float = 0.99,
  epsilon: float = 1e-8,
  start_clip_steps: int = 100,
) -> list[dict[str, Any]]:
  """Tensor-wise AdaGC as in [P] ``ClipGradByAdaptiveNorm`` (Paddle).

  Differences from [M], all in the warm-up:

  - the step counter starts at 0 and is incremented at the *end* of
    ``_dygraph_clip``, with the test ``self.steps <= self.start_clip_steps``:
    warm-up is ``start_clip_steps + 1`` steps (0..100), not 100;
  - the warm-up global clip is ``1.0 / (global_norm + epsilon)``: max norm 1.0 is
    hard-coded (there is no ``max_norm`` argument);
  - the per-tensor norms are all computed *before* any clipping (Step 2&3 of
    ``_dygraph_clip``), so the warm-up minimum is of the *raw* tensor norms;
  - the global clip is applied tensor by tensor inside ``_clip_by_norm``, each
    with the same coefficient (same result).

  After warm-up the rule is [M]'s (same ``coef``, same EMA of the bound,
  ``epsilon=1e-8`` instead of 1e-6). Returns records as :func:`adagc_megatron`.
  """
  state: list[np.float32 | None] = [None] * len(steps[0]) if steps else []
  out = []
  counter = 0  # __init__: self.steps = 0
  for grads_in in steps:
    grads = [np.array(g, np.float32, copy=True) for g in grads_in]
    n = len(grads)
    # _collect_norm: global norm (float32) of the raw grads
    global_norm = np.float32(np.sqrt(sum(float(_norm32(g)) ** 2 for g in grads)))
    # Step 2&3/4: per-tensor norms of the raw grads, before any clip
    norms = np.array([_norm32(g) for g in grads], np.float32)
    thresholds = np.full(n, np.nan, np.float32)
    clipped = np.zeros(n, bool)
    scale = np.ones(n, np.float64)
    warm_up = counter <= start_clip_steps
    for i, g in enumerate(grads):
      norm_value = norms[i]
      if state[i] is None:  # _clip_by_norm: if "norm_value" not in state
        state[i] = norm_value
      avg = np.float32(state[i])  # avg_norm_value = state["norm_value"]
      if warm_up:  # if self.steps <= self.start_clip_steps
        clip_coeff = np.float32(1.0) / np.float32(global_norm + np.float32(epsilon))
        if clip_coeff < 1.0:
          grads[i] = (g * clip_coeff).astype(np.float32)
          scale[i] = clip_coeff
          clipped[i] = True
        if norm_value < state[i]:  # minimum of the raw norms
          state[i] = norm_value
      else:
        bound = np.float32(np.float32(clip_ratio) * avg)
        thresholds[i] = bound
        if norm_value > bound:
          coef = np.float32(bound / np.float32(norm_value + np.float32(epsilon)))
          grads[i] = (g * coef).astype(np.float32)
          scale[i] = coef
          clipped[i] = True
          norm_value = bound
        state[i] = np.float32(avg * np.float32(beta) + norm_value * np.float32(1.0 - beta))
    out.append(
      {
        "phase": "global" if warm_up else "adaptive",
        "global_norm": float(global_norm),
        "global_threshold": 1.0 if warm_up else np.nan,
        "norms": norms,
        "threshold": thresholds,
        "clipped": clipped,
        "scale": scale,
        "grads": grads,
        "ema": np.array(state, np.float32),
        "step": counter,
      }
    )
    counter += 1  # end of _dygraph_clip: self.steps += 1
  return out
