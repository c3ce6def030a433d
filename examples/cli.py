"""argparse types for the examples' numeric flags: nonsense is refused on the command line.

``--lr -1`` trains to chance and ``--epochs 0`` averages nothing into NaN; both used to
exit 0. With these types argparse rejects them before anything is built, with the flag's
name in the message (``argument --lr: must be > 0, got -1.0``).
"""

from __future__ import annotations

import argparse
import math


def _number(text: str, kind: type) -> float | int:
  try:
    value = kind(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None
  if isinstance(value, float) and not math.isfinite(value):
    raise argparse.ArgumentTypeError(f"must be finite, got {text!r}")
  return value


def positive_float(text: str) -> float:
  """A finite float > 0 (learning rates, thresholds)."""
  value = float(_number(text, float))
  if value <= 0:
    raise argparse.ArgumentTypeError(f"must be > 0, got {value:g}")
  return value


def fraction(text: str) -> float:
  """A float in [0, 1) (momentum, decay)."""
  value = float(_number(text, float))
  if not 0 <= value < 1:
    raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value:g}")
  return value


def positive_int(text: str) -> int:
  """An int >= 1 (steps, epochs, sizes)."""
  value = int(_number(text, int))
  if value < 1:
    raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
  return value


def nonnegative_int(text: str) -> int:
  """An int >= 0 (seeds; counts where 0 means off)."""
  value = int(_number(text, int))
  if value < 0:
    raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
  return value
