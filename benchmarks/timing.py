"""Interleaved timing and the ratio statistics every benchmark table reports.

Cases of one table run interleaved, round after round, so load from other
processes on a shared machine hits them alike; a ratio is taken round by round
(paired) and over the fastest rounds. Absolute times are noise on a shared CPU.
"""

from __future__ import annotations

import statistics
import time
from typing import Protocol


class Timed(Protocol):
  def run(self, iters: int) -> float:
    """Runs ``iters`` steps; returns seconds per step, the last step finished."""
    ...


class Case:
  """A compiled JAX step that runs in place: its outputs are its next inputs (donated)."""

  def __init__(self, compiled, state: tuple, extra: tuple):
    self.compiled, self.state, self.extra = compiled, state, extra

  def run(self, iters: int) -> float:
    import jax

    start = time.perf_counter()
    for _ in range(iters):
      self.state = self.compiled(*self.state, *self.extra)
    jax.block_until_ready(self.state)
    return (time.perf_counter() - start) / iters


def time_cases(cases: dict[str, Timed], rounds: int, iters: int) -> dict[str, list[float]]:
  """Seconds per step of every case in every round; cases interleaved within a round."""
  for case in cases.values():  # warm up (first call after compile, allocator)
    case.run(1)
  times: dict[str, list[float]] = {name: [] for name in cases}
  for r in range(rounds):
    names = list(cases)
    if r % 2:
      names.reverse()  # neither end of a round is always first
    for name in names:
      times[name].append(cases[name].run(iters))
  return times


def ratio(times: dict[str, list[float]], name: str, base: str) -> tuple[float, float]:
  """(median of the per-round ratios, min over min) of ``name`` over ``base``.

  Every round times all cases back to back, so a round's ratio compares them
  under the same load; the load of this shared machine drifts by 10-20% between
  rounds, which a median over median would carry into the ratio.
  """
  paired = [t / b for t, b in zip(times[name], times[base], strict=True)]
  return statistics.median(paired), min(times[name]) / min(times[base])


def temp_bytes(compiled) -> int | None:
  """XLA's temporary buffer size of a compiled function, where the backend reports it."""
  try:
    return int(compiled.memory_analysis().temp_size_in_bytes)
  except Exception:  # some backends return no analysis
    return None
