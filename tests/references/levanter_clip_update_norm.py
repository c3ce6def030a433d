"""levanter's update-norm clipping (mean + k * std of a window of update norms), in NumPy.

Not clipx code: a step-by-step port of levanter's Optax transform, for tests
that compare clipx against it. Written from the source below, not copied; each
line cites the line it follows. The original is JAX; NumPy float32 keeps the
arithmetic of ``jnp`` (population std, float32 buffer).

Source: repo ``stanford-crfm/levanter`` (Apache-2.0), commit
``9263f81e8b453241332c2c0b2d2001bfb2d2241c`` (2025-09-26), file
``src/levanter/optim/clip_update_norm.py``: ``ClipUpdateNormConfig`` L25-33
(defaults ``rolling_interval_length=128``, ``sigma_factor=3.0``),
``clip_update_by_historical_norm`` L36-115. It is chained (``optim/config.py``
L479-482, ``AdamConfig.build``) after ``scale_by_adam`` and
``add_decayed_weights`` and before ``scale(-learning_rate)``: it clips the
*update*, globally (one norm for the whole tree).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def clip_update_by_historical_norm(
  steps: Sequence[Sequence[np.ndarray]],
  *,
  rolling_interval_length: int = 128,
  sigma_factor: float = 3.0,
) -> list[dict[str, Any]]:
  """Runs the transform over ``steps`` (each a sequence of update arrays).

  Returns one dict per step: ``norm`` (global norm before clipping),
  ``threshold`` (``mean + sigma * max(std, 1e-6)`` of the window, logged even
  when unused), ``max_norm`` (the bound in force: ``inf`` until
  ``max(2, L // 2)`` norms are in the window), ``clipped``, ``scale`` and
  ``updates`` (the clipped outputs).
  """
  buffer_size = rolling_interval_length
  # init_fn, L49-62: zeros, all invalid, index 0, count 0
  update_norms = np.zeros((buffer_size,), np.float32)
  valid_mask = np.zeros((buffer_size,), bool)
  current_idx = 0
  count = 0
  out = []
  for updates in steps:
    updates = [np.asarray(u, np.float32) for u in updates]
    # L66: optax.global_norm(updates)
    global_norm = np.float32(np.sqrt(sum(np.sum(np.square(u)) for u in updates)))
    # L68-69: clip only once max(2, L // 2) norms are in the buffer
    min_data_points = max(2, rolling_interval_length // 2)
    can_clip = count >= min_data_points
    # L71-73: mean and population std (ddof 0) of the valid entries; std floored at 1e-6
    if valid_mask.any():
      mean = np.float32(np.mean(update_norms, where=valid_mask))
      std = np.float32(np.std(update_norms, where=valid_mask))
    else:
      mean = std = np.float32(np.nan)  # jnp.mean over an empty selection
    std_safe = np.maximum(std, np.float32(1e-6))
    threshold = np.float32(mean + np.float32(sigma_factor) * std_safe)  # L75
    max_norm = threshold if can_clip else np.float32(np.inf)  # L78
    trigger = bool(global_norm > max_norm)  # L82 (strict >; False for a NaN norm)
    # L84: scale = max_norm / max(norm, 1e-6) where triggered, else 1
    scale = (
      np.float32(max_norm / np.maximum(global_norm, np.float32(1e-6))) if trigger else np.float32(1)
    )
    clipped = [u * scale for u in updates]  # L86
    # L100-104: record the *unclipped* norm ("to prevent collapse"); every step
    # is recorded, a NaN/inf norm included (it then poisons mean/std until it
    # leaves the window, and with a NaN bound nothing is clipped)
    update_norms[current_idx] = global_norm
    valid_mask[current_idx] = True
    current_idx = (current_idx + 1) % buffer_size
    count = min(count + 1, buffer_size)
    out.append(
      {
        "norm": float(global_norm),
        "threshold": float(threshold),
        "max_norm": float(max_norm),
        "clipped": trigger,
        "scale": float(scale),
        "updates": clipped,
        # L93: the logged post-clip norm is min(max_norm, norm)
        "post_clip_norm": float(min(max_norm, global_norm)),
      }
    )
  return out
