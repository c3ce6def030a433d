"""Stacked ("scanned") layers: which leading axes of a leaf index layers.

JAX models stack repeated blocks into one array per parameter (``nnx.scan``,
``linen.scan``, MaxText's and levanter's scanned layers): a kernel of shape
``(L, in, out)`` holds ``L`` layers. A per-group scope then treats each layer
of a stack as its own group, so a scanned model is clipped exactly as its
unstacked twin, while the stack stays one array (one reduction over the
non-layer axes, so compile time does not grow with ``L``).

``stacked`` is an int (the number of leading layer axes of every leaf) or a
function ``(path, leaf) -> int``; ``None`` or 0 means no layer axes.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Hashable
from typing import Any, NamedTuple

import jax
import numpy as np

from clipx import validation

StackedFn = Callable[[tuple, Any], int]


def as_stacked_fn(owner: str, stacked: int | StackedFn | None) -> StackedFn:
  """``stacked`` as a function of ``(path, leaf)``; checked at construction."""
  if stacked is None:
    return lambda path, leaf: 0
  if callable(stacked) and not isinstance(stacked, type):
    return stacked
  validation.integer(owner, "stacked", stacked, 0)
  assert isinstance(stacked, int | np.integer)
  count = int(stacked)
  return lambda path, leaf: count


def layer_axes(owner: str, stacked_fn: StackedFn, path: tuple, leaf: Any) -> int:
  """How many leading axes of ``leaf`` index layers; ValueError naming the path if bad."""
  count = stacked_fn(path, leaf)
  where = path_name(path)
  if isinstance(count, bool) or not isinstance(count, int | np.integer) or count < 0:
    raise TypeError(
      f"clipx.{owner}: stacked must give an int >= 0 for every leaf, got {count!r} for {where}."
    )
  if count > np.ndim(leaf):
    raise ValueError(
      f"clipx.{owner}: stacked={int(count)} layer axes for the leaf at {where}, which has"
      f" shape {np.shape(leaf)} (rank {np.ndim(leaf)})."
    )
  return int(count)


def strip_variable_suffix(path: tuple) -> tuple:
  """Drops the trailing ``.value`` of a Flax NNX Variable from a key path.

  ``nnx.Optimizer`` initialises the state from Variables (paths end in
  ``.value``) but updates with plain arrays; both must give the same groups.
  """
  last = path[-1] if path else None
  if isinstance(last, jax.tree_util.GetAttrKey) and last.name == "value":
    return path[:-1]
  return path


def path_name(path: tuple) -> str:
  """A key path as ``blocks/attn/kernel``: readable in loggers and TensorBoard."""
  parts = []
  for key in path:
    if isinstance(key, jax.tree_util.DictKey):
      parts.append(str(key.key))
    elif isinstance(key, jax.tree_util.GetAttrKey):
      parts.append(key.name)
    elif isinstance(key, jax.tree_util.SequenceKey):
      parts.append(str(key.idx))
    elif isinstance(key, jax.tree_util.FlattenedIndexKey):
      parts.append(str(key.key))
    else:
      parts.append(str(key))
  return "/".join(parts) or "<root>"


class GroupNames:
  """Static names of a state's groups: a pytree node with no leaves.

  Kept in the transform's state (the names are aux data, so the state still
  jits, donates and checkpoints as arrays only), so :func:`clipx.stats` can
  name each group, e.g. ``clip/layer/norm/blocks/attn/kernel[3]``.
  """

  def __init__(self, names: tuple[str, ...] = ()):
    self.names = tuple(names)

  def __eq__(self, other: object) -> bool:
    return isinstance(other, GroupNames) and other.names == self.names

  def __hash__(self) -> int:
    return hash(self.names)

  def __repr__(self) -> str:
    return f"GroupNames({len(self.names)} groups)"


class _Label:
  """Names as pytree metadata that never makes two states' structures differ.

  The names label groups; they are not structure: utilities that map a state
  against a prefix built from placeholder params (``optax.tree_map_params``)
  or a restored checkpoint must see the same tree whatever the labels say.
  """

  def __init__(self, names: tuple[str, ...]):
    self.names = names

  def __eq__(self, other: object) -> bool:
    return isinstance(other, _Label)

  def __hash__(self) -> int:
    return 0


jax.tree_util.register_pytree_node(
  GroupNames, lambda n: ((), _Label(n.names)), lambda label, _: GroupNames(label.names)
)


def leaf_names(tree: Any) -> GroupNames:
  """The paths of ``tree``'s leaves (``blocks/attn/kernel``), for the stats' ``source``."""
  return GroupNames(
    tuple(
      path_name(strip_variable_suffix(path))
      for path, _ in jax.tree_util.tree_leaves_with_path(tree)
    )
  )


class LayerGroups(NamedTuple):
  """The groups of a tree for a per-group scope, each layer of a stack its own group.

  Attributes:
    bases: per leaf, the id of its first group; a leaf with layer shape
      ``(L,)`` has groups ``base .. base + L - 1``, consecutive.
    layer_shapes: per leaf, the shape of its leading layer axes (``()`` if none).
    names: one readable name per group (``path`` or ``path[layer]``).
    num_groups: the number of groups.
  """

  bases: list[int]
  layer_shapes: list[tuple[int, ...]]
  names: list[str]
  num_groups: int


def layer_groups(
  owner: str,
  tree: Any,
  key_fn: Callable[[tuple], Hashable],
  stacked_fn: StackedFn,
) -> LayerGroups:
  """Groups of ``tree``: one per group key and layer, numbered key by key.

  Leaves that share a key (``group="module"``) must have the same layer shape.
  """
  first: dict[Hashable, tuple[int, tuple[int, ...], str]] = {}
  names: list[str] = []
  bases, shapes = [], []
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    path = strip_variable_suffix(path)
    key = key_fn(path)
    shape = tuple(np.shape(leaf)[: layer_axes(owner, stacked_fn, path, leaf)])
    if key not in first:
      name = path_name(key) if isinstance(key, tuple) else str(key)
      first[key] = (len(names), shape, path_name(path))
      if shape:
        names.extend(
          f"{name}[{','.join(map(str, index))}]"
          for index in itertools.product(*(range(n) for n in shape))
        )
      else:
        names.append(name)
    base, group_shape, first_path = first[key]
    if shape != group_shape:
      raise ValueError(
        f"clipx.{owner}: leaves of one group must stack the same layers: {first_path} has"
        f" layer shape {group_shape}, {path_name(path)} has {shape}."
      )
    bases.append(base)
    shapes.append(shape)
  return LayerGroups(bases, shapes, names, len(names))
