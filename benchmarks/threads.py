"""One thread setting for every framework a benchmark compares, set before any is imported.

A ratio between frameworks means little at unequal thread counts: the clipx /
Opacus ratio went from 2.8x to 7.7x with thread settings alone (issue 16).
So each framework runs in a fresh process of its own, ``pin`` is the first
thing that process does (before jax or torch is imported), every process of
one comparison gets the same setting, and every ratio is printed beside
``label(setting)``. A setting is a number of cores (``1``) or ``None`` for all
the cores this process may use.

How, measured on XLA CPU (jax 0.10.2) and torch 2.14 on a 2-core machine:

- the CPU affinity (``os.sched_setaffinity``, what ``taskset`` does) bounds
  both: XLA sizes its thread pool from the schedulable CPUs, so pinned to one
  core its work ran on one thread (CPU ticks per thread in ``/proc``), where
  ``XLA_FLAGS=--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1``
  alone still spread it over five. Those flags are set too, for older XLA;
- torch is told with ``torch.set_num_threads`` and
  ``torch.set_num_interop_threads`` (``configure_torch``), right after import;
- ``OMP_NUM_THREADS`` and its kin cover the BLAS and OpenMP pools of either.
"""

from __future__ import annotations

import os
import sys

# The setting travels to worker processes in this variable ("1", "all", ...).
ENV = "CLIPX_BENCH_THREADS"
SETTINGS = ("1", "all")  # what the benchmarks compare by default: one core, every core
_XLA_FLAGS = ("--xla_cpu_multi_thread_eigen=false", "intra_op_parallelism_threads=1")
_POOL_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def available() -> list[int]:
  """The CPU cores this process may run on."""
  return sorted(os.sched_getaffinity(0))


def parse(text: str) -> int | None:
  """``"all"`` -> None, ``"1"`` -> 1; anything else is an error that names the choices."""
  if text == "all":
    return None
  try:
    threads = int(text)
  except ValueError:
    threads = 0
  if not 1 <= threads <= len(available()):
    raise ValueError(
      f"threads={text!r}: give 'all' or a number of cores from 1 to {len(available())}"
    )
  return threads


def label(threads: int | None, cores: int | None = None) -> str:
  """How the setting is printed beside each ratio: ``threads=1`` or ``threads=all (2)``."""
  if threads is not None:
    return f"threads={threads}"
  return f"threads=all ({cores or len(available())})"


def environment(threads: int | None, base: dict[str, str] | None = None) -> dict[str, str]:
  """The environment of a fresh process with this setting (``base`` defaults to ours)."""
  env = dict(os.environ if base is None else base)
  count = threads or len(available())
  env[ENV] = "all" if threads is None else str(threads)
  for name in _POOL_VARIABLES:
    env[name] = str(count)
  flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(_XLA_FLAGS)]
  if threads == 1:
    flags += _XLA_FLAGS
  env["XLA_FLAGS"] = " ".join(flags)
  return env


def pin(threads: int | None) -> None:
  """Applies the setting to this process; call it before jax or torch is imported.

  Raises:
    RuntimeError: jax or torch is imported already (their pools would keep their size).
  """
  imported = [name for name in ("jax", "torch") if name in sys.modules]
  if imported:
    raise RuntimeError(
      f"threads.pin after {' and '.join(imported)} was imported: its thread pool is sized"
      " already; pin first thing in a fresh process"
    )
  cores = available()
  os.environ.update(environment(threads))
  if threads is not None:
    os.sched_setaffinity(0, cores[:threads])


def from_environment() -> int | None:
  """The setting a parent passed in ``ENV`` (a worker's side of ``environment``)."""
  if ENV not in os.environ:
    raise RuntimeError(f"{ENV} is not set: start this worker with threads.environment(...)")
  return parse(os.environ[ENV])


def configure_torch(torch, threads: int | None) -> None:
  """Gives torch's intra- and inter-op pools the setting; call it right after ``import torch``."""
  count = threads or len(available())
  torch.set_num_threads(count)
  torch.set_num_interop_threads(count)
