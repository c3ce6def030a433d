"""What clipping did: ``ClipStats`` in each transform's state, and ``stats``.

Every clipx transform keeps the statistics of its latest step in its optimizer
state, so they jit, checkpoint and shard with it; :func:`stats` finds them in
any optimizer state (through ``optax.chain``, ``inject_hyperparams``,
``MultiSteps``, ``masked``, ...) and turns them into floats for logging.
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax


class ClipStats(NamedTuple):
  """Statistics of the latest clipping step.

  Scalars for a global scope; one entry per group for per-layer clipping.

  Attributes:
    norm: the norm before clipping (for value clipping: the largest magnitude).
    clipped_norm: the norm after clipping.
    threshold: the bound the norm was held to.
    scale: the factor applied (1.0 when not clipped; for AGC and value
      clipping, ``clipped_norm / norm`` of the whole tree).
    clipped: whether the step was clipped.
    clip_count: number of steps clipped so far.
    source: where the norm came from (spike forensics): the index of the leaf
      (global, AGC) or group (per layer) with the largest share of the squared
      norm, in tree order; ``clipx.stats`` prints its path. None where a scope
      does not report it.
    share: that leaf's or group's fraction of the squared norm (0 for a zero
      norm; ``1 / k`` where ``k`` leaves or groups hold NaN/Inf, ``source``
      then the first of them: see :func:`clipx.norms.largest_share`; for value
      clipping, 1 where anything is non-zero).
  """

  norm: jax.Array
  clipped_norm: jax.Array
  threshold: jax.Array
  scale: jax.Array
  clipped: jax.Array
  clip_count: jax.Array
  source: Any = None
  share: Any = None


class SkipStats(NamedTuple):
  """Statistics of :func:`clipx.skip_spikes`, which skips whole optimizer steps.

  Attributes:
    skipped: whether the latest step was skipped.
    skip_count: number of steps skipped so far.
    norm: the global norm the decision was based on.
    threshold: the norm above which a step is skipped (inf during warm-up).
    source: the index of the leaf with the largest share of the squared norm.
    share: that leaf's fraction of the squared norm.
  """

  skipped: jax.Array
  skip_count: jax.Array
  norm: jax.Array
  threshold: jax.Array
  source: Any = None
  share: Any = None


class NonfiniteStats(NamedTuple):
  """Statistics of :func:`clipx.skip_nonfinite`.

  Attributes:
    skipped: whether the latest step was skipped (NaN/Inf in the gradients or
      in the inner optimizer's update).
    skip_count: number of steps skipped so far.
    nonfinite_leaf: index, in the gradients' leaf order
      (``jax.tree.leaves(grads)``), of the first leaf that held NaN/Inf in the
      latest step; -1 when every leaf was finite.
    nonfinite_device: with ``axis_name`` (``shard_map``/``pmap``), the index
      along that axis of the first device whose gradients held NaN/Inf; -1
      when none did or without ``axis_name``.
  """

  skipped: jax.Array
  skip_count: jax.Array
  nonfinite_leaf: jax.Array
  nonfinite_device: Any = None


def init_clip_stats(
  shape: tuple[int, ...] = (), dtype=jnp.float32, *, forensics: bool = False
) -> ClipStats:
  """All-zero ``ClipStats`` for a norm of the given shape (``source`` -1 with ``forensics``)."""
  # Separate buffers: a donated state must not hold one buffer twice.
  return ClipStats(
    norm=jnp.zeros(shape, dtype),
    clipped_norm=jnp.zeros(shape, dtype),
    threshold=jnp.zeros(shape, dtype),
    scale=jnp.ones(shape, dtype),
    clipped=jnp.zeros(shape, jnp.bool_),
    clip_count=jnp.zeros(shape, jnp.int32),
    source=jnp.full((), -1, jnp.int32) if forensics else None,
    share=jnp.zeros((), dtype) if forensics else None,
  )


# Groups a printed per-layer report shows, largest norm first; all are in ``as_dict()``.
SHOWN_GROUPS = 5


def _format(value: np.ndarray) -> str:
  """A scalar as a report prints it: 4 significant digits for floats."""
  return f"{value.item():.4g}" if value.dtype.kind == "f" else f"{value.item()}"


def _largest_first(norm: np.ndarray) -> np.ndarray:
  """Group indices by norm, largest first and NaN/Inf before all (ties in tree order)."""
  key = np.where(np.isfinite(norm), norm.astype(np.float64), np.inf)
  return np.argsort(-key, kind="stable")


def _kind_of(node: Any) -> str | None:
  return getattr(type(node), "clipx_kind", None)


class StatsReport(dict):
  """``{name: ClipStats | SkipStats | NonfiniteStats}`` for every clipx transform in a state.

  Names are the transform kind (``"global"``, ``"layer"``, ``"agc"``,
  ``"value"``, ``"skip_nonfinite"``, ``"skip_spikes"``), suffixed with
  ``.1``, ``.2``, ... when a kind occurs more than once, in state order.

  A registered pytree: a jitted step can return it, and ``jax.device_get``
  or ``jax.tree.map`` see its arrays. ``group_names`` maps an entry to the
  names of its groups (per-layer clipping), static like the dict's keys.
  """

  def __init__(self, *args: Any, group_names: dict[str, tuple[str, ...]] | None = None):
    super().__init__(*args)
    self.group_names: dict[str, tuple[str, ...]] = dict(group_names or {})

  def as_dict(self, prefix: str = "clip") -> dict[str, float]:
    """Flat ``{"clip/global/norm": 1.23, ...}`` of Python floats for logging.

    Per-group fields of per-layer clipping get one key per group, named by
    the group's path, and the layer of a stack: ``clip/layer/norm/conv/kernel``,
    ``clip/layer/norm/blocks/attn/kernel[3]``, in tree order (by index,
    ``clip/layer/norm/0``, where no names are known).
    """
    flat: dict[str, float] = {}
    for name, stats in self.items():
      names = self.group_names.get(name, ())
      for field, value in stats._asdict().items():
        if value is None:
          continue
        array = np.asarray(jax.device_get(value), dtype=np.float64)
        key = f"{prefix}/{name}/{field}"
        if array.ndim == 0:
          flat[key] = float(array)
          continue
        items = array.reshape(-1)
        labels = names if len(names) == items.size else range(items.size)
        for label, item in zip(labels, items):
          flat[f"{key}/{label}"] = float(item)
    return flat

  def source_paths(self) -> dict[str, str]:
    """``{name: path}`` of each entry's ``source`` (the leaf or group that held the
    largest share of the norm, or the first NaN/Inf leaf), where names are known."""
    paths = {}
    for name, stats in self.items():
      names = self.group_names.get(name, ())
      index = getattr(stats, "source", None)
      if index is None:
        index = getattr(stats, "nonfinite_leaf", None)
      if index is None or not names:
        continue
      position = int(np.asarray(jax.device_get(index)))
      if 0 <= position < len(names):
        paths[name] = names[position]
    return paths

  def __str__(self) -> str:
    """One line per scalar entry; a per-group entry (per-layer clipping) shows its
    :data:`SHOWN_GROUPS` largest norms by name, one line each (the rest are in
    :meth:`as_dict`), NaN and Inf first: where a reader looks for a spike."""
    lines = []
    paths = self.source_paths()
    for name, stats in self.items():
      scalars, per_group = [], {}
      for field, value in stats._asdict().items():
        if value is None:
          continue
        if field in ("source", "nonfinite_leaf") and name in paths:
          scalars.append(f"{field}={paths[name]}")
          continue
        array = np.asarray(jax.device_get(value))
        if array.ndim == 0:
          scalars.append(f"{field}={_format(array)}")
        else:
          per_group[field] = array.reshape(-1)
      if not per_group:
        lines.append(f"{name}: " + ", ".join(scalars))
        continue
      lines.extend(self._group_lines(name, scalars, per_group))
    return "\n".join(lines) if lines else "(no clipx transforms in this state)"

  def _group_lines(
    self, name: str, scalars: list[str], per_group: dict[str, np.ndarray]
  ) -> list[str]:
    """The lines of an entry with per-group fields: a header, then the largest groups."""
    norm = per_group.get("norm", next(iter(per_group.values())))
    count = norm.size
    fields = {f: v for f, v in per_group.items() if v.size == count}
    scalars = scalars + [f"{f}=[{v.size} values]" for f, v in per_group.items() if v.size != count]
    names = self.group_names.get(name, ())
    labels = names if len(names) == count else [str(i) for i in range(count)]
    head = ", ".join(scalars) + "; " if scalars else ""
    lines = [f"{name}: {head}{count} groups, largest norm first:"]
    for i in _largest_first(norm)[:SHOWN_GROUPS]:
      row = ", ".join(f"{f}={_format(v[i])}" for f, v in fields.items())
      lines.append(f"  {labels[i]}: {row}")
    if count > SHOWN_GROUPS:
      lines.append(f"  ... {count - SHOWN_GROUPS} more in .as_dict()")
    return lines

  __repr__ = __str__


def _report_aux(report: StatsReport) -> tuple:
  return tuple(report), tuple(sorted(report.group_names.items()))


def _report_unflatten(aux: tuple, values: Any) -> StatsReport:
  names, group_names = aux
  return StatsReport(zip(names, values), group_names=dict(group_names))


jax.tree_util.register_pytree_with_keys(
  StatsReport,
  lambda report: (
    [(jax.tree_util.DictKey(name), value) for name, value in report.items()],
    _report_aux(report),
  ),
  _report_unflatten,
  flatten_func=lambda report: (list(report.values()), _report_aux(report)),
)


def _find_clipx_states(tree: Any) -> list[Any]:
  """The clipx states in ``tree``, outer before inner, in leaf order.

  A response wrapper's state holds the inner optimizer's state (which may hold
  clipping states of its own), so the search goes on inside every state found.
  """
  found = []
  for node in jax.tree_util.tree_leaves(tree, is_leaf=lambda n: _kind_of(n) is not None):
    if _kind_of(node) is not None:
      found.append(node)
      found.extend(_find_clipx_states([v for v in node if v is not node.stats]))
  return found


def _warn_skip_inside_multisteps(opt_state: Any) -> None:
  """Warns when a skip wrapper's state sits inside ``optax.MultiSteps``' state."""
  for node in jax.tree_util.tree_leaves(
    opt_state, is_leaf=lambda n: isinstance(n, optax.MultiStepsState)
  ):
    if not isinstance(node, optax.MultiStepsState):
      continue
    inner = _find_clipx_states(node.inner_opt_state)
    if any(_kind_of(state) in ("skip_nonfinite", "skip_spikes") for state in inner):
      warnings.warn(
        "clipx: a skip wrapper is inside optax.MultiSteps, whose accumulator keeps a NaN"
        " mini-batch for good; wrap the accumulator instead:"
        " clipx.skip_nonfinite(optax.MultiSteps(inner, k).gradient_transformation()).",
        stacklevel=3,
      )
      return


def stats(opt_state: Any) -> StatsReport:
  """Finds the ``ClipStats``/``SkipStats`` of every clipx transform in a state.

  Args:
    opt_state: any optimizer state, e.g. of ``optax.chain(clipx..., optax.sgd(...))``
      or of ``flax.nnx.Optimizer(...).opt_state``.

  Returns:
    A :class:`StatsReport`: a dict from readable names to stats, that prints
    well and flattens to ``{name: float}`` with ``.as_dict()``.

  Example:
    >>> import jax.numpy as jnp, optax, clipx
    >>> tx = optax.chain(clipx.clip_by_global_norm(1.0), optax.sgd(0.1))
    >>> params = {"w": jnp.ones(4)}
    >>> state = tx.init(params)
    >>> _, state = tx.update({"w": jnp.full(4, 2.0)}, state, params)
    >>> clipx.stats(state).as_dict()["clip/global/norm"]
    4.0
  """
  found = _find_clipx_states(opt_state)
  _warn_skip_inside_multisteps(opt_state)
  counts: dict[str, int] = {}
  report = StatsReport()
  for node in found:
    kind = cast(str, _kind_of(node))  # not None: filtered above
    index = counts.get(kind, 0)
    counts[kind] = index + 1
    name = kind if index == 0 else f"{kind}.{index}"
    report[name] = node.stats
    group_names = getattr(getattr(node, "names", None), "names", None)
    if group_names:
      report.group_names[name] = tuple(group_names)
  return report
