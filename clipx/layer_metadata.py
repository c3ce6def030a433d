"""Layer axes read from Flax's own metadata, so nobody counts axes by hand.

A scanned model already records where its layer axis is: the scan or vmap
that stacked the layers wrote the axis's name into each parameter's
partitioning metadata, at the axis's position. :func:`layer_axes_from_metadata`
reads it back as a ``stacked=`` function for every per-layer clipx scope:

- Flax NNX: ``nnx.vmap``/``nnx.scan`` with
  ``transform_metadata={nnx.PARTITION_NAME: "layers"}`` insert ``"layers"``
  into each Variable's ``out_sharding`` metadata (``sharding_names`` or
  ``sharding`` before flax 0.12) at its ``out_axes``, but only into a
  Variable created with such metadata (``nnx.with_partitioning`` or a
  layer's ``kernel_metadata``); the raw names are read, not
  ``nnx.get_partition_spec``, which maps logical names to mesh axes.
- Flax linen: ``nn.scan(..., metadata_params={nn.PARTITION_NAME: "layers"})``
  inserts ``"layers"`` into the ``names`` of ``nn.Partitioned`` boxes (and
  MaxText's ``nn.LogicallyPartitioned``), at ``variable_axes["params"]``.
- MaxText's NNX layers (``maxtext/layers/nnx_scan.py``,
  ``create_scanned_layers``) also mark a stacked Variable with
  ``partition_name`` and ``param_scan_axis`` metadata keys; where its
  sharding names do not hold the name, the axis is ``param_scan_axis`` (0 when
  the value has no such axis, as MaxText's ``nnx_add_and_sync_scan_axis``).

Nothing here imports Flax: Variables and boxes are recognised by their
methods, so clipx keeps Flax an optional dependency.
"""

from __future__ import annotations

import sys
from collections.abc import Collection
from typing import Any

import jax
import numpy as np

from clipx import stacking

OWNER = "layer_axes_from_metadata"

# Metadata keys of the sharding names, newest first (flax 0.12 renamed them to out_sharding).
_SHARDING_KEYS = ("out_sharding", "sharding_names", "sharding")


class MetadataLayerAxes:
  """A ``stacked=`` function ``(path, leaf) -> tuple[int, ...]`` read from metadata.

  Attributes:
    axes: each leaf's layer axes by path name (``blocks/linear/kernel``).
    ranks: each leaf's rank, checked against the leaf it is asked about.
  """

  def __init__(self, axes: dict[str, Any], ranks: dict[str, int]):
    self.axes = axes
    self.ranks = ranks

  def __call__(self, path: tuple, leaf: Any) -> Any:
    where = stacking.path_name(stacking.strip_variable_suffix(path))
    if where not in self.axes:
      known = ", ".join(list(self.axes)[:4])
      raise ValueError(
        f"clipx.{OWNER}: no layer axes for the leaf at {where}: it is not in the tree they"
        f" were read from ({len(self.axes)} leaves, e.g. {known}). Read them from the"
        " parameters the optimizer updates (for linen, the 'params' collection)."
      )
    if np.ndim(leaf) != self.ranks[where]:
      raise ValueError(
        f"clipx.{OWNER}: the leaf at {where} has shape {np.shape(leaf)}, but the one its"
        f" layer axes were read from has rank {self.ranks[where]}."
      )
    return self.axes[where]

  def __repr__(self) -> str:
    return f"MetadataLayerAxes({self.axes!r})"


def _is_variable(node: Any) -> bool:
  """An ``nnx.Variable`` (or the ``VariableState`` of older flax): metadata beside a value."""
  if not callable(getattr(node, "get_metadata", None)):
    return False
  return callable(getattr(node, "get_value", None)) or hasattr(node, "value")


def _is_box(node: Any) -> bool:
  """A linen ``nn.Partitioned`` box (``LogicallyPartitioned`` too): names beside a value."""
  return callable(getattr(node, "unbox", None)) and hasattr(node, "names")


def _positions(names: Any, wanted: frozenset[str]) -> tuple[int, ...]:
  """Where ``wanted`` appear in a sharding's names; an entry may be a tuple of names."""
  names = getattr(names, "spec", names)  # a NamedSharding
  if isinstance(names, str):
    names = (names,)
  found = []
  for i, entry in enumerate(names):
    entries = entry if isinstance(entry, tuple | list) else (entry,)
    if any(isinstance(e, str) and e in wanted for e in entries):
      found.append(i)
  return tuple(found)


def _variable_axes(variable: Any, wanted: frozenset[str]) -> tuple[tuple[int, ...] | None, int]:
  """An NNX Variable's layer axes (None if nothing marks it) and its rank."""
  metadata = variable.get_metadata()
  value = variable.get_value() if callable(getattr(variable, "get_value", None)) else variable.value
  rank = np.ndim(value)
  sharding = next((metadata[k] for k in _SHARDING_KEYS if metadata.get(k) is not None), None)
  if sharding is not None:
    found = _positions(sharding, wanted)
    if found:
      return found, rank
  marked_by = metadata.get("partition_name")
  if marked_by in wanted:
    axis = int(metadata.get("param_scan_axis", 0))
    return ((axis if rank > axis else 0),), rank
  if sharding is not None or marked_by is not None:
    return (), rank
  return None, rank


def _as_params(tree: Any) -> Any:
  """An ``nnx.Module`` as ``nnx.state(module, nnx.Param)``: what ``nnx.Optimizer`` updates."""
  nnx = sys.modules.get("flax.nnx")  # imported by whoever built the module, never here
  if nnx is not None and isinstance(tree, nnx.Module):
    return nnx.state(tree, nnx.Param)
  return tree


def layer_axes_from_metadata(
  tree: Any,
  *,
  name: str | Collection[str] = "layers",
  unmarked: int | tuple[int, ...] | None = None,
) -> MetadataLayerAxes:
  """The layer axes of a scanned Flax model's parameters, read from their metadata.

  Returns a ``stacked=`` function for every per-layer scope
  (:func:`clipx.clip_by_layer_norm`, :func:`clipx.adaptive_grad_clip`,
  :func:`clipx.adagc`, ...): each leaf's layer axes are the positions where
  ``name`` appears in its partitioning metadata, wherever the scan put them
  (``out_axes=1`` in ``nnx.vmap``, ``variable_axes={"params": 1}`` in
  ``nn.scan``, MaxText's ``param_scan_axis=1``). The function is keyed by path
  name, so one built from a model's Variables also serves its gradients as a
  pure dict, an ``nnx.State``, or ``nnx.Optimizer``'s Variables.

  How a model must be built for this to work: the stacking transform must
  name the axis, and every parameter must carry partitioning metadata.

  - NNX: ``nnx.vmap``/``nnx.scan`` with
    ``transform_metadata={nnx.PARTITION_NAME: "layers"}``, and each Variable
    created with sharding names, e.g. ``nnx.Linear(..., kernel_metadata=
    {"out_sharding": (None, None)}, bias_metadata={"out_sharding": (None,)})``
    or ``kernel_init=nnx.with_partitioning(init, (None, None))``. Flax 0.12
    shards such Variables on creation: build the model under a mesh
    (``jax.set_mesh``) or inside ``nnx.use_eager_sharding(False)``.
  - linen: ``nn.scan(..., metadata_params={nn.PARTITION_NAME: "layers"})``
    with ``nn.with_partitioning`` (or ``nn.with_logical_partitioning``) on
    the initializers; pass the boxed ``variables["params"]``, not unboxed ones.

  Args:
    tree: the parameters with their metadata: an ``nnx.Module`` (read as
      ``nnx.state(module, nnx.Param)``), an ``nnx.State`` of Variables, or a
      linen ``params`` tree of ``nn.Partitioned`` boxes.
    name: the partition name of the layer axis (``"layers"``), or several
      (MaxText's DeepSeek stacks ``"dense_layers"`` and ``"moe_layers"``).
    unmarked: what a leaf with no partitioning metadata at all gets: ``None``
      (the default) raises a ``ValueError`` listing such leaves, since their
      layer axes would be a guess; ``0`` treats them as unstacked (an explicit
      choice); an int or tuple is used as ``stacked=`` is. A leaf whose
      metadata exists but does not hold ``name`` has no layer axes.

  Returns:
    A :class:`MetadataLayerAxes`, callable as ``(path, leaf) -> tuple[int, ...]``;
    its ``axes`` attribute maps each path name to its layer axes. A path not
    in ``tree`` is a ``ValueError`` naming it when a transform asks for it.

  Example:
    >>> import jax, jax.numpy as jnp, clipx
    >>> from flax import nnx
    >>> meta = dict(kernel_metadata={"out_sharding": (None, None)},
    ...             bias_metadata={"out_sharding": (None,)})
    >>> class Model(nnx.Module):
    ...   def __init__(self, rngs):
    ...     @nnx.split_rngs(splits=3)
    ...     @nnx.vmap(out_axes=1, transform_metadata={nnx.PARTITION_NAME: "layers"})
    ...     def blocks(rngs):
    ...       return nnx.Linear(4, 4, **meta, rngs=rngs)
    ...     self.blocks = blocks(rngs)  # kernel (4, 3, 4), bias (4, 3): layers at axis 1
    ...     self.head = nnx.Linear(4, 2, **meta, rngs=rngs)
    >>> with nnx.use_eager_sharding(False):
    ...   model = Model(nnx.Rngs(0))
    >>> axes = clipx.layer_axes_from_metadata(model)
    >>> axes.axes
    {'blocks/bias': (1,), 'blocks/kernel': (1,), 'head/bias': (), 'head/kernel': ()}
    >>> tx = clipx.clip_by_layer_norm(1.0, stacked=axes)
    >>> grads = nnx.state(model, nnx.Param)  # stands in for nnx.grad's output
    >>> _, state = tx.update(grads, tx.init(grads))
    >>> names = [k for k in clipx.stats(state).as_dict() if k.startswith("clip/layer/norm/")]
    >>> len(names), names[0], names[5]  # each layer of each stack is a group
    (8, 'clip/layer/norm/blocks/bias[0]', 'clip/layer/norm/blocks/kernel[2]')
  """
  wanted = frozenset((name,) if isinstance(name, str) else name)
  if not wanted or not all(isinstance(n, str) for n in wanted):
    raise TypeError(f"clipx.{OWNER}: name must be a string or strings, got {name!r}.")
  if callable(unmarked):
    raise TypeError(f"clipx.{OWNER}: unmarked must be None, an int or a tuple, got a function.")
  if unmarked is not None:
    stacking.as_stacked_fn(OWNER, unmarked, "unmarked")  # an int >= 0 or a tuple of distinct ints
  entries, _ = jax.tree_util.tree_flatten_with_path(
    _as_params(tree), is_leaf=lambda node: _is_variable(node) or _is_box(node)
  )
  axes: dict[str, Any] = {}
  ranks: dict[str, int] = {}
  missing: list[str] = []
  for path, node in entries:
    where = stacking.path_name(stacking.strip_variable_suffix(path))
    found: Any
    if _is_variable(node):
      found, rank = _variable_axes(node, wanted)
    elif _is_box(node):
      found, rank = _positions(node.names, wanted), np.ndim(node.value)
    else:
      found, rank = None, np.ndim(node)
    if found is None:
      missing.append(where)
      found = unmarked
    axes[where], ranks[where] = found, rank
  if missing and unmarked is None:
    more = len(missing) - 10
    shown = ", ".join(missing[:10]) + (f" and {more} more" if more > 0 else "")
    raise ValueError(
      f"clipx.{OWNER}: nothing marks the layer axes of {len(missing)} leaves: {shown}. Give"
      " them partitioning metadata (NNX: kernel_metadata={'out_sharding': ...} or"
      " nnx.with_partitioning; linen: nn.with_partitioning), or pass unmarked=0 to treat"
      " them as unstacked."
    )
  return MetadataLayerAxes(axes, ranks)
