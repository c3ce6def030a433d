"""What clipping did: ``ClipStats`` in each transform's state, and ``stats``.

Every clipx transform keeps the statistics of its latest step in its optimizer
state, so they jit, checkpoint and shard with it; :func:`stats` finds them in
any optimizer state (through ``optax.chain``, ``inject_hyperparams``,
``MultiSteps``, ``masked``, ...) and turns them into floats for logging.
"""

from __future__ import annotations

from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np


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
  """

  norm: jax.Array
  clipped_norm: jax.Array
  threshold: jax.Array
  scale: jax.Array
  clipped: jax.Array
  clip_count: jax.Array


class SkipStats(NamedTuple):
  """Statistics of a response wrapper that skips whole optimizer steps.

  Attributes:
    skipped: whether the latest step was skipped.
    skip_count: number of steps skipped so far.
    norm: the global norm the decision was based on (NaN when not measured).
    threshold: the norm above which a step is skipped (inf when not used).
  """

  skipped: jax.Array
  skip_count: jax.Array
  norm: jax.Array
  threshold: jax.Array


def init_clip_stats(shape: tuple[int, ...] = (), dtype=jnp.float32) -> ClipStats:
  """All-zero ``ClipStats`` for a norm of the given shape."""
  # Separate buffers: a donated state must not hold one buffer twice.
  return ClipStats(
    norm=jnp.zeros(shape, dtype),
    clipped_norm=jnp.zeros(shape, dtype),
    threshold=jnp.zeros(shape, dtype),
    scale=jnp.ones(shape, dtype),
    clipped=jnp.zeros(shape, jnp.bool_),
    clip_count=jnp.zeros(shape, jnp.int32),
  )


def _kind_of(node: Any) -> str | None:
  return getattr(type(node), "clipx_kind", None)


class StatsReport(dict):
  """``{name: ClipStats | SkipStats}`` for every clipx transform in a state.

  Names are the transform kind (``"global"``, ``"layer"``, ``"agc"``,
  ``"value"``, ``"skip_nonfinite"``, ``"skip_spikes"``), suffixed with
  ``.1``, ``.2``, ... when a kind occurs more than once, in state order.
  """

  def as_dict(self, prefix: str = "clip") -> dict[str, float]:
    """Flat ``{"clip/global/norm": 1.23, ...}`` of Python floats for logging.

    Per-group fields of per-layer clipping get one key per group:
    ``clip/layer/norm/0``, ``clip/layer/norm/1``, ... in tree order.
    """
    flat: dict[str, float] = {}
    for name, stats in self.items():
      for field, value in stats._asdict().items():
        array = np.asarray(jax.device_get(value), dtype=np.float64)
        key = f"{prefix}/{name}/{field}"
        if array.ndim == 0:
          flat[key] = float(array)
        else:
          for index, item in enumerate(array.reshape(-1)):
            flat[f"{key}/{index}"] = float(item)
    return flat

  def __str__(self) -> str:
    lines = []
    for name, stats in self.items():
      fields = []
      for field, value in stats._asdict().items():
        array = np.asarray(jax.device_get(value))
        if array.ndim == 0:
          fields.append(
            f"{field}={array.item():.4g}" if array.dtype.kind == "f" else f"{field}={array.item()}"
          )
        else:
          fields.append(f"{field}=[{array.size} values]")
      lines.append(f"{name}: " + ", ".join(fields))
    return "\n".join(lines) if lines else "(no clipx transforms in this state)"

  __repr__ = __str__


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
  counts: dict[str, int] = {}
  report = StatsReport()
  for node in found:
    kind = cast(str, _kind_of(node))  # not None: filtered above
    index = counts.get(kind, 0)
    counts[kind] = index + 1
    report[kind if index == 0 else f"{kind}.{index}"] = node.stats
  return report
