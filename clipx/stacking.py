"""Stacked ("scanned") layers: which axes of a leaf index layers.

JAX models stack repeated blocks into one array per parameter (``nnx.scan``,
``linen.scan``, MaxText's and levanter's scanned layers): a kernel of shape
``(L, in, out)`` holds ``L`` layers. A per-group scope then treats each layer
of a stack as its own group, so a scanned model is clipped exactly as its
unstacked twin, while the stack stays one array (one reduction over the
non-layer axes, so compile time does not grow with ``L``).

``stacked`` says where the layer axes are:

- ``None`` or 0: nowhere; an int ``k``: the ``k`` leading axes of every leaf;
- a tuple of ints: their positions in every leaf, negative ones counted from
  each leaf's end (``(1,)`` for MaxText's ``param_scan_axis=1``, where a
  kernel is ``[embed, layers, mlp]``; ``(-1,)`` for the last axis);
- a function ``(path, leaf) -> int | tuple[int, ...]``: either of the two, per
  leaf (:func:`clipx.layer_axes_from_metadata` builds one from Flax metadata).

Wherever they sit, the leaf is never moved: each per-layer statistic is one
reduction over the leaf's other axes (:func:`within_layer_axes`), and each
per-layer factor is reshaped to broadcast in place (:func:`scale_shape`). So
the groups, names and results are those of the leading layout (the layer index
follows the leaf's axis order), and leading axes compile to the program an int
``stacked`` always gave (the same jaxpr). Measured on XLA CPU (jax 0.10.2, a
(512, 8, 1024) float32 leaf, two loaded cores, so +-30%): with the layer axis
at 1 (MaxText's layout) every scope's step takes the leading layout's time;
last, 1.0x to 1.5x, but 2.9x for ``stable_spam_clip``, whose one-pass norm
then reduces around the minor axis. Moving the axes to the front with
``jnp.moveaxis`` and back, the simpler design, made XLA CPU write a transposed
copy of the leaf before its reductions and another for its output: 2x to 8x.
"""

from __future__ import annotations

import collections
import itertools
import math
from collections.abc import Callable, Hashable, Sequence
from typing import Any, NamedTuple, TypeAlias

import jax
import numpy as np

StackedFn: TypeAlias = Callable[[tuple, Any], int | tuple[int, ...]]
Stacked: TypeAlias = int | tuple[int, ...] | StackedFn | None

_ACCEPTS = (
  "None, an int >= 0 (leading layer axes), a tuple of distinct ints (the layer axes'"
  " positions) or a function (path, leaf) -> int | tuple[int, ...]"
)


class _Fixed:
  """``stacked`` given as an int or a tuple: the same answer for every leaf."""

  def __init__(self, spec: int | tuple[int, ...]):
    self.spec = spec

  def __call__(self, path: tuple, leaf: Any) -> int | tuple[int, ...]:
    return self.spec

  def __repr__(self) -> str:
    return f"stacked={self.spec!r}"


def _describe_fn(stacked_fn: StackedFn) -> str:
  if isinstance(stacked_fn, _Fixed):
    return repr(stacked_fn)
  name = getattr(stacked_fn, "__qualname__", None) or type(stacked_fn).__qualname__
  return f"the stacked function {name}"


def _as_int(value: Any) -> int | None:
  """``value`` as an int where it is one, else None.

  A Python or numpy int, or a concrete integer 0-d array (``np.array(1)``;
  ``optax.inject_hyperparams`` passes an int as ``jnp.asarray(1)``). Never a bool.
  """
  if isinstance(value, bool | np.bool_):
    return None
  if isinstance(value, int | np.integer):
    return int(value)
  if (
    isinstance(value, np.ndarray | jax.Array)
    and not isinstance(value, jax.core.Tracer)
    and value.ndim == 0
    and np.issubdtype(value.dtype, np.integer)
  ):
    return int(value)
  return None


def _traced_error(owner: str, name: str, value: Any) -> TypeError:
  return TypeError(
    f"clipx.{owner}: {name} is traced (a {value.dtype} array under jit): layer axes fix the"
    " program's shapes, so they cannot be run-time values. optax.inject_hyperparams makes"
    f' every number one: pass it static_args=("{name}",).'
  )


def as_stacked_fn(owner: str, stacked: Stacked, name: str = "stacked") -> StackedFn:
  """``stacked`` as a function of ``(path, leaf)``; an int or tuple is checked at construction.

  ``name`` is the argument's name in error messages.
  """
  if stacked is None:
    return _Fixed(0)
  if callable(stacked) and not isinstance(stacked, type):
    return stacked
  if isinstance(stacked, jax.core.Tracer):
    raise _traced_error(owner, name, stacked)
  if isinstance(stacked, tuple):
    items = [_as_int(a) for a in stacked]
    if any(isinstance(a, jax.core.Tracer) for a in stacked):
      raise _traced_error(owner, name, next(a for a in stacked if isinstance(a, jax.core.Tracer)))
    if any(a is None for a in items):
      raise TypeError(f"clipx.{owner}: {name} must be {_ACCEPTS}, got {stacked!r}.")
    positions = tuple(a for a in items if a is not None)
    if len(set(positions)) != len(positions):
      raise ValueError(f"clipx.{owner}: {name} names one layer axis twice: {stacked!r}.")
    return _Fixed(positions)
  count = _as_int(stacked)
  if count is None:
    raise TypeError(
      f"clipx.{owner}: {name} must be {_ACCEPTS}, got {stacked!r} ({type(stacked).__name__})."
    )
  if count < 0:
    raise ValueError(f"clipx.{owner}: {name} must be {_ACCEPTS}, got {stacked!r}.")
  return _Fixed(count)


def leaf_layer_axes(owner: str, stacked_fn: StackedFn, path: tuple, leaf: Any) -> tuple[int, ...]:
  """The positions of ``leaf``'s layer axes, ascending and >= 0; errors name the path and shape."""
  spec = stacked_fn(path, leaf)
  where = path_name(path)
  shape = np.shape(leaf)
  rank = len(shape)
  source = _describe_fn(stacked_fn)
  count = _as_int(spec)
  if count is not None:
    if count < 0:
      raise ValueError(f"clipx.{owner}: {source} gave {spec!r} for {where}; a count must be >= 0.")
    if count > rank:
      raise ValueError(
        f"clipx.{owner}: {source} gave {count} leading layer axes for the leaf at {where},"
        f" which has shape {shape} (rank {rank})."
      )
    return tuple(range(count))
  items = [_as_int(a) for a in spec] if isinstance(spec, tuple) else [None]
  if any(a is None for a in items):
    raise TypeError(
      f"clipx.{owner}: {source} must give an int >= 0 or a tuple of ints for every leaf,"
      f" got {spec!r} for {where}."
    )
  spec = tuple(a for a in items if a is not None)
  for a in spec:
    if not -rank <= a < rank:
      raise ValueError(
        f"clipx.{owner}: {source} gave layer axes {spec!r} for the leaf at {where}, which has"
        f" shape {shape} (rank {rank}): axis {int(a)} is out of range."
      )
  positions = sorted(int(a) % rank for a in spec)
  if len(set(positions)) != len(positions):
    raise ValueError(
      f"clipx.{owner}: {source} gave layer axes {spec!r} for the leaf at {where}, which has"
      f" shape {shape}: they name one axis twice."
    )
  return tuple(positions)


def check_stacked_alike(owner: str, stacked_fn: StackedFn, tree: Any) -> None:
  """An int or tuple ``stacked`` stacks every leaf alike: their layer sizes must agree.

  ``stacked=1`` on a model whose input and output layers are not scanned would
  read each row of the input kernel and each element of a bias as a layer, and
  clip them one by one, silently (51 groups for a 4-block MLP). Shapes cannot
  say which leaves are stacked, so where the layer sizes differ this refuses
  and asks for a function, which says it per leaf. It also refuses a model
  whose every leaf is stacked, in stacks of different depths (an encoder and a
  decoder): there the function ``lambda path, leaf: 1`` says so. An unstacked
  leaf whose leading size happens to equal the layer count is not caught.
  """
  if not isinstance(stacked_fn, _Fixed) or stacked_fn.spec in (0, ()):
    return
  by_shape: dict[tuple[int, ...], list[str]] = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    path = strip_variable_suffix(path)
    axes = leaf_layer_axes(owner, stacked_fn, path, leaf)
    by_shape.setdefault(tuple(np.shape(leaf)[a] for a in axes), []).append(path_name(path))
  if len(by_shape) <= 1:
    return
  # The most common layer shape first: likely the real layers, then the leaves that differ.
  ordered = sorted(by_shape.items(), key=lambda item: -len(item[1]))
  shown = "; ".join(
    f"{shape} for {', '.join(paths[:4])}"
    + (f" and {len(paths) - 4} more" if len(paths) > 4 else "")
    for shape, paths in ordered[:6]
  )
  more = f"; and {len(ordered) - 6} more layer shapes" if len(ordered) > 6 else ""
  raise ValueError(
    f"clipx.{owner}: {stacked_fn!r} stacks every leaf alike, but the leaves' layer sizes"
    f" differ: {shown}{more}. A leaf that is not stacked (an embedding, an unscanned input or"
    " output layer) would be split into one group per row or element. Say which leaves are"
    " stacked with a function: stacked=clipx.layer_axes_from_metadata(model) reads it from"
    " Flax's metadata, or stacked=lambda path, leaf: 1 if 'blocks' in"
    " clipx.stacking.path_name(path) else 0. If every leaf is stacked, in stacks of different"
    " depths, stacked=lambda path, leaf: 1 says so."
  )


def within_layer_axes(ndim: int, axes: tuple[int, ...]) -> tuple[int, ...]:
  """A leaf's axes that are not layer ``axes``: what a per-layer reduction reduces over.

  The result keeps the layer axes in their order, so it flattens in the groups' order.
  """
  return tuple(i for i in range(ndim) if i not in axes)


def scale_shape(ndim: int, axes: tuple[int, ...], layer_shape: tuple[int, ...]) -> tuple[int, ...]:
  """The shape of a leaf's per-layer factors: its layer sizes at ``axes``, 1 elsewhere.

  A vector of one factor per layer, reshaped to it, broadcasts against the leaf.
  """
  shape = [1] * ndim
  for axis, size in zip(axes, layer_shape):
    shape[axis] = size
  return tuple(shape)


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


def _unambiguous_name(key: Any) -> str:
  """A group key as JAX writes it (``['a/b']``, ``['a']['b']``, ``.kernel``): a path's
  keys stay apart even where :func:`path_name` reads alike; ``repr`` of any other key."""
  if isinstance(key, tuple):
    return jax.tree_util.keystr(key) or "<root>"
  return repr(key)


def _layer_suffixes(layer_shape: tuple[int, ...]) -> list[str]:
  """``[""]`` unstacked; a stack's layers ``["[0]", "[1]", ...]`` (``[i,j]`` for two axes)."""
  if not layer_shape:
    return [""]
  return [
    f"[{','.join(map(str, index))}]"
    for index in itertools.product(*(range(n) for n in layer_shape))
  ]


def distinct_names(keys: Sequence[tuple[str, str, tuple[int, ...]]]) -> list[str]:
  """One name per group, all distinct, from ``(name, unambiguous name, layer shape)`` per key.

  Stats keys must be distinct, or one group's statistics overwrite another's in
  ``as_dict()``. The readable names (``a/b``, ``k[0]``) are kept wherever they
  are unique. A key whose name clashes with another's (a dict key ``"a/b"``
  beside ``{"a": {"b": ...}}``, a leaf ``"k[0]"`` beside layer 0 of a stacked
  ``"k"``) is named as JAX writes its path instead, every layer of it:
  ``['a/b']`` and ``['a']['b']``, ``['k[0]']`` and ``['k'][0]``. A name that
  still clashes (keys that read like another's path) gets ``#`` and its
  group's index, until none does.
  """
  readable = [[name + s for s in _layer_suffixes(shape)] for name, _, shape in keys]
  counts = collections.Counter(n for names in readable for n in names)
  names = [
    [plain + s for s in _layer_suffixes(shape)] if any(counts[n] > 1 for n in group) else group
    for group, (_, plain, shape) in zip(readable, keys)
  ]
  flat = [n for group in names for n in group]
  while len(set(flat)) < len(flat):
    counts = collections.Counter(flat)
    flat = [f"{n}#{i}" if counts[n] > 1 else n for i, n in enumerate(flat)]
  return flat


def leaf_names(tree: Any) -> GroupNames:
  """The paths of ``tree``'s leaves (``blocks/attn/kernel``), for the stats' ``source``;
  distinct (see :func:`distinct_names`)."""
  paths = [strip_variable_suffix(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]
  keys = [(path_name(p), _unambiguous_name(p), ()) for p in paths]
  return GroupNames(tuple(distinct_names(keys)))


class LayerGroups(NamedTuple):
  """The groups of a tree for a per-group scope, each layer of a stack its own group.

  Attributes:
    bases: per leaf, the id of its first group; a leaf with layer shape
      ``(L,)`` has groups ``base .. base + L - 1``, consecutive.
    layer_shapes: per leaf, the sizes of its layer axes (``()`` if none), in
      the leaf's axis order.
    names: one readable name per group (``path`` or ``path[layer]``).
    num_groups: the number of groups.
    axes: per leaf, the positions of its layer axes (ascending).
  """

  bases: list[int]
  layer_shapes: list[tuple[int, ...]]
  names: list[str]
  num_groups: int
  axes: list[tuple[int, ...]]


def layer_groups(
  owner: str,
  tree: Any,
  key_fn: Callable[[tuple], Hashable],
  stacked_fn: StackedFn,
) -> LayerGroups:
  """Groups of ``tree``: one per group key and layer, numbered key by key.

  Leaves that share a key (``group="module"``) must have the same layer shape.
  The groups and names depend on the layer axes' sizes, not on where they sit.
  """
  check_stacked_alike(owner, stacked_fn, tree)
  first: dict[Hashable, tuple[int, tuple[int, ...], str]] = {}
  keys: list[tuple[str, str, tuple[int, ...]]] = []
  num_groups = 0
  bases, shapes, all_axes = [], [], []
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    path = strip_variable_suffix(path)
    key = key_fn(path)
    axes = leaf_layer_axes(owner, stacked_fn, path, leaf)
    shape = tuple(np.shape(leaf)[a] for a in axes)
    if key not in first:
      name = path_name(key) if isinstance(key, tuple) else str(key)
      first[key] = (num_groups, shape, path_name(path))
      keys.append((name, _unambiguous_name(key), shape))
      num_groups += math.prod(shape)
    base, group_shape, first_path = first[key]
    if shape != group_shape:
      raise ValueError(
        f"clipx.{owner}: leaves of one group must stack the same layers: {first_path} has"
        f" layer shape {group_shape}, {path_name(path)} has {shape}."
      )
    bases.append(base)
    shapes.append(shape)
    all_axes.append(axes)
  names = distinct_names(keys)
  return LayerGroups(bases, shapes, names, len(names), all_axes)
