"""Clipping the update rather than the gradient: Adafactor's block-RMS clip.

Every clipx transform clips whatever reaches it: before the optimizer in an
``optax.chain`` it clips the gradient, after the optimizer's preconditioner
(``optax.scale_by_adam``, ``optax.scale_by_factored_rms``) and before the
learning rate it clips the update. This module holds the scope that is only
meaningful on an update: a bound on each block's root-mean-square, which is
scale free for a preconditioned update (Adam's and Adafactor's updates have
entries of order one whatever the gradient's scale).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from clipx import stacking, transforms, validation
from clipx.thresholds import ThresholdPolicy, as_policy


def group_sizes(
  tree: Any,
  *,
  group: str | transforms.GroupFn = "leaf",
  stacked: stacking.Stacked = None,
  owner: str = "clip_by_block_rms",
) -> np.ndarray:
  """The number of elements in each group of ``tree``, in :func:`clip_by_layer_norm`'s order.

  A leaf with layer shape ``(L,)`` (wherever its layer axis sits) adds
  ``leaf.size // L`` to each of its ``L`` groups; leaves sharing a group
  (``group="module"``) add up.

  Args:
    tree: a pytree of arrays (or anything with ``.shape``).
    group: as in :func:`clipx.clip_by_layer_norm`.
    stacked: as in :func:`clipx.clip_by_layer_norm`.
    owner: the public function, for error messages.

  Returns:
    An int64 array of shape ``(num_groups,)``.
  """
  groups = stacking.layer_groups(
    owner,
    tree,
    transforms._group_key_fn(group),
    stacking.as_stacked_fn(owner, stacked),
  )
  sizes = np.zeros(groups.num_groups, np.int64)
  leaves = jax.tree_util.tree_leaves(tree)
  for leaf, base, shape in zip(leaves, groups.bases, groups.layer_shapes):
    layers = math.prod(shape)
    if layers:
      sizes[base : base + layers] += math.prod(np.shape(leaf)) // layers
  return sizes


def _rms_policy(policy: ThresholdPolicy, root: np.ndarray) -> ThresholdPolicy:
  """``policy`` on RMS values, as a policy on L2 norms: ``||u|| <= t * sqrt(n)``."""

  def update(norm, state):
    scale = jnp.asarray(root, jnp.result_type(norm, jnp.float32))
    threshold, state = policy.update(norm / scale, state)
    return threshold * scale, state

  return ThresholdPolicy(policy.init, update)


def clip_by_block_rms(
  max_rms: float | jax.Array | optax.Schedule | ThresholdPolicy = 1.0,
  *,
  group: str | transforms.GroupFn = "leaf",
  stacked: stacking.Stacked = None,
) -> optax.GradientTransformation:
  """Holds each block's root-mean-square at or below ``max_rms``: Adafactor's update clip.

  Each group ``U`` (a leaf, a module, or one layer of a stack) becomes
  ``U / max(1, RMS(U) / max_rms)`` with ``RMS(U) = ||U||_2 / sqrt(n)``, ``n``
  its number of elements. Placed after a preconditioner and before the
  learning rate, it bounds the size of each block's step relative to its
  scale-free unit, so a bad second-moment estimate (an update far larger than
  ``m / sqrt(v)`` normally is, e.g. after a sudden rise of the gradient while
  ``v`` lags) cannot move the weights by more than ``lr * max_rms`` per
  element on average. This is the clip of Adafactor (``d`` in the paper) and
  of ``optax.adafactor`` (``clipping_threshold=1.0``)::

    optax.chain(optax.scale_by_adam(), clip_by_block_rms(1.0), optax.scale(-lr))

  It is :func:`clipx.clip_by_layer_norm` with the per-group threshold
  ``max_rms * sqrt(n)`` (``RMS(U) <= d`` is ``||U||_2 <= d * sqrt(n)``), so it
  shares that scope's numerics: float32 accumulation without overflow (optax
  squares in the leaf's dtype, which overflows in float16), exactly 1 as the
  scale below the bound, and ``stacked=`` for scanned layers. Where
  ``optax.clip_by_block_rms`` treats a stacked ``(L, ...)`` leaf as one block,
  here with ``stacked=1`` each layer is its own block, as levanter's
  ``scan_aware_clip_by_block_rms`` does: a scanned model is clipped exactly
  as its unstacked twin.

  Statistics: the state is :func:`clipx.clip_by_layer_norm`'s (kind
  ``"layer"`` in :func:`clipx.stats`), and reports L2 norms and the L2
  threshold ``max_rms * sqrt(n)``; the RMS is ``norm / sqrt(n)``.

  Args:
    max_rms: the bound on each group's RMS, > 0: a float (1.0 as Adafactor),
      an Optax schedule of the step count, or a threshold policy, which then
      sees each group's RMS rather than its L2 norm (``clipx.zclip()`` on the
      RMS). A float may be changed at run time inside
      ``optax.inject_hyperparams`` without recompiling.
    group: ``"leaf"`` (each array is a block, as optax and torch), ``"module"``
      (the arrays under one parent path form one block, of their total
      size), or a function from a leaf's key path to a group key.
    stacked: for scanned models, which axes of a leaf index layers (an int:
      that many leading axes; a tuple of positions such as ``(1,)``,
      MaxText's ``param_scan_axis=1``; or a function ``(path, leaf) -> int |
      tuple``, as for :func:`clipx.clip_by_layer_norm`); each layer is then
      its own block, of the per-layer size.

  Returns:
    An ``optax.GradientTransformation`` with :class:`clipx.transforms.LayerNormClipState`.

  References:
    Shazeer and Stern, `Adafactor: Adaptive Learning Rates with Sublinear
    Memory Cost <https://arxiv.org/abs/1804.04235>`_, ICML 2018, section 5
    ("update clipping"). Implementations it matches: optax
    ``optax/transforms/_clipping.py`` L48-74 (``clip_by_block_rms``, tag
    v0.2.8 = ``107e9ad20ca62bcbee1a8c016daab71c690a678c``); PyTorch 2.14.1
    ``torch/optim/_adafactor.py`` L419-420 (build commit
    ``5c4886908584029761b579af026dcfb627c84070``); levanter
    ``src/levanter/optim/util.py`` L62-77 (``scan_aware_clip_by_block_rms``,
    commit ``9263f81e8b453241332c2c0b2d2001bfb2d2241c``), per layer of a stack.
    Edge case: an empty (zero-size) block has norm 0 and passes through
    (torch's rule divides by zero there).

  Example:
    >>> import jax.numpy as jnp, optax
    >>> from clipx.update_clipping import clip_by_block_rms
    >>> tx = clip_by_block_rms(1.0)
    >>> updates = {"small": jnp.full(4, 0.5), "big": jnp.full(4, 3.0)}
    >>> clipped, _ = tx.update(updates, tx.init(updates))
    >>> clipped["small"].tolist(), clipped["big"].tolist()  # RMS 0.5 kept, RMS 3 -> 1
    ([0.5, 0.5, 0.5, 0.5], [1.0, 1.0, 1.0, 1.0])
  """
  owner = "clip_by_block_rms"
  policy = as_policy(max_rms, "max_rms", owner)
  validation.choice(owner, "group", group, transforms.GROUP_MODES, function=True)
  stacking.as_stacked_fn(owner, stacked)  # checks it at construction

  def inner(tree: Any) -> optax.GradientTransformation:
    # Shapes are static, so the threshold vector is a constant of the program.
    sizes = group_sizes(tree, group=group, stacked=stacked, owner=owner)
    # An empty group has norm 0 and passes through whatever its threshold.
    root = np.sqrt(np.maximum(sizes, 1)).astype(np.float32)
    # Built under this function's name: the errors it raises name clip_by_block_rms.
    return transforms._clip_by_layer_norm(owner, _rms_policy(policy, root), group, stacked, None)

  def init_fn(params):
    return inner(params).init(params)

  def update_fn(updates, state, params=None):
    return inner(updates).update(updates, state, params)

  return optax.GradientTransformation(init_fn, update_fn)
