"""Argument checks shared by every public constructor: one helper per kind of argument.

Each helper raises at construction, with a message that names the function,
the argument, what it accepts and what it got: ``TypeError`` for a value of
the wrong kind (``None``, a string, a list, a complex or boolean number, a
function where a number goes), ``ValueError`` for a number out of range.

A value that is traced (``optax.inject_hyperparams`` under ``jit`` calls the
constructor with tracers) cannot be checked: its kind (a real number) is,
and its value was checked when the state was initialised with concrete values.
Strings are never parsed: ``"0.5"`` is a ``TypeError``, not 0.5.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np


def _describe(value: Any) -> str:
  kind = type(value).__name__
  if isinstance(value, jax.Array | np.ndarray) and not isinstance(value, jax.core.Tracer):
    return f"an array of dtype {value.dtype} and shape {value.shape}"
  return f"{value!r} ({kind})"


def _real_values(owner: str, name: str, value: Any, accepts: str, array: bool) -> np.ndarray | None:
  """``value`` as a float64 numpy array, None when traced; TypeError unless real numbers."""
  where = f"clipx.{owner}: {name} must be {accepts}"
  if isinstance(value, bool | np.bool_):
    raise TypeError(f"{where}, got {value!r} (a bool).")
  if isinstance(value, jax.core.Tracer):
    dtype = value.dtype
  elif isinstance(value, int | float | np.integer | np.floating):
    return np.asarray(float(value))
  elif isinstance(value, jax.Array | np.ndarray):
    dtype = value.dtype
  else:
    raise TypeError(f"{where}, got {_describe(value)}.")
  if not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)):
    # jnp dtypes (bfloat16) are floating to numpy through ml_dtypes.
    if not str(dtype).startswith(("bfloat", "float")):
      raise TypeError(f"{where}, got {_describe(value)}.")
  if not array and np.ndim(value) != 0:
    raise TypeError(f"{where} (a scalar), got {_describe(value)}.")
  if isinstance(value, jax.core.Tracer):
    return None
  return np.asarray(value, np.float64)


def number(
  owner: str,
  name: str,
  value: Any,
  *,
  low: float = -math.inf,
  high: float = math.inf,
  low_open: bool = True,
  high_open: bool = False,
  array: bool = False,
) -> None:
  """Checks a real number (or, with ``array``, an array of them) in an interval.

  ``low_open``/``high_open`` say whether the ends are excluded. NaN is never in range.
  """
  left = "(" if low_open else "["
  right = ")" if high_open else "]"
  interval = f"{left}{low:g}, {high:g}{right}"
  accepts = f"a real number in {interval}"
  values = _real_values(owner, name, value, accepts, array)
  if values is None:
    return
  above = values > low if low_open else values >= low
  below = values < high if high_open else values <= high
  if values.size and not np.all(above & below):  # NaN fails both
    raise ValueError(f"clipx.{owner}: {name} must be {accepts}, got {value!r}.")


def positive(owner: str, name: str, value: Any, *, finite: bool = False, array: bool = False):
  """A number > 0: ``(0, inf]``, or ``(0, inf)`` when ``finite``."""
  number(owner, name, value, low=0.0, high=math.inf, high_open=finite, array=array)


def nonnegative(owner: str, name: str, value: Any, *, finite: bool = False) -> None:
  """A number >= 0: ``[0, inf]``, or ``[0, inf)`` when ``finite``."""
  number(owner, name, value, low=0.0, low_open=False, high=math.inf, high_open=finite)


def integer(owner: str, name: str, value: Any, minimum: int) -> None:
  """A Python or numpy integer (or an integer-dtype scalar array) >= ``minimum``.

  Floats are refused even when integral (``10.0``), and so are NaN, inf and bools:
  these arguments count steps or set shapes.
  """
  accepts = f"an int >= {minimum}"
  if isinstance(value, bool | np.bool_):
    raise TypeError(f"clipx.{owner}: {name} must be {accepts}, got {value!r} (a bool).")
  if isinstance(value, int | np.integer):
    count = int(value)
  elif isinstance(value, jax.Array | np.ndarray) and np.ndim(value) == 0:
    if not np.issubdtype(value.dtype, np.integer):
      raise TypeError(f"clipx.{owner}: {name} must be {accepts}, got {_describe(value)}.")
    if isinstance(value, jax.core.Tracer):
      return
    count = int(np.asarray(value))
  else:
    raise TypeError(f"clipx.{owner}: {name} must be {accepts}, got {_describe(value)}.")
  if count < minimum:
    raise ValueError(f"clipx.{owner}: {name} must be {accepts}, got {value!r}.")


def choice(owner: str, name: str, value: Any, options: Sequence[str], *, function: bool = False):
  """One of the strings ``options`` (or, with ``function``, any callable)."""
  if isinstance(value, str) and value in options:
    return
  if function and callable(value) and not isinstance(value, str):
    return
  accepts = " or ".join(repr(option) for option in options)
  if function:
    accepts += " or a function"
  error = ValueError if isinstance(value, str) else TypeError
  raise error(f"clipx.{owner}: {name} must be {accepts}, got {_describe(value)}.")


def transformation(owner: str, name: str, value: Any) -> None:
  """An Optax ``GradientTransformation`` (anything with callable ``init`` and ``update``)."""
  init, update = getattr(value, "init", None), getattr(value, "update", None)
  if not (callable(init) and callable(update)) or isinstance(value, type):
    raise TypeError(
      f"clipx.{owner}: {name} must be an optax.GradientTransformation (e.g."
      f" optax.sgd(0.1)), got {_describe(value)}."
    )


def axes(owner: str, name: str, value: Any) -> tuple[int, ...] | None:
  """None, an int or a tuple of distinct ints: the axes as a tuple (None stays None).

  Their range depends on each leaf's rank and is checked per leaf with :func:`axes_of`.
  """
  if value is None:
    return None
  items = (value,) if not isinstance(value, tuple | list) else tuple(value)
  for item in items:
    if isinstance(item, bool | np.bool_) or not isinstance(item, int | np.integer):
      raise TypeError(
        f"clipx.{owner}: {name} must be None, an int or a tuple of ints, got {_describe(value)}."
      )
  if not items:
    raise ValueError(f"clipx.{owner}: {name} must name at least one axis, got {value!r}.")
  as_ints = tuple(int(item) for item in items)
  if len(set(as_ints)) != len(as_ints):
    raise ValueError(f"clipx.{owner}: {name} has a repeated axis: {value!r}.")
  return as_ints


def axes_of(owner: str, name: str, value: tuple[int, ...], rank: int, path: str) -> tuple[int, ...]:
  """``value``'s axes for a leaf of rank ``rank``, normalised to >= 0; errors name ``path``."""
  for item in value:
    if not -rank <= item < rank:
      raise ValueError(
        f"clipx.{owner}: {name}={value!r} is out of range for the leaf at {path}, of rank {rank}"
        f" (axes run from {-rank} to {rank - 1})."
      )
  normalised = tuple(item % rank for item in value)
  if len(set(normalised)) != len(normalised):
    raise ValueError(
      f"clipx.{owner}: {name}={value!r} names one axis twice for the leaf at {path}, of rank"
      f" {rank}."
    )
  return normalised
