"""Cases timed in a worker process of their own, so that each framework has a clean process.

The measuring process stays the one that interleaves: round after round it asks
the worker to time a case, between its own cases, so load from other processes
on a shared machine hits both frameworks alike. The worker times the case
itself (``time.perf_counter`` around the steps), so the pipe is not timed.
Protocol: one JSON object a line; the worker first announces its cases (or an
``error``), then answers each ``{"case": name, "iters": n}`` with ``{"seconds": s}``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import threads


class WorkerError(RuntimeError):
  """The worker could not start its cases (e.g. its framework is not installed)."""


class Worker:
  """A worker script started with one thread setting; ``case(name)`` gives a timed case."""

  def __init__(self, script: Path, args: list[str], setting: int | None):
    self.process = subprocess.Popen(
      [sys.executable, str(script), *args],
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
      text=True,
      env=threads.environment(setting),
    )
    hello = self._receive()
    if "error" in hello:
      self.close()
      raise WorkerError(hello["error"])
    self.cases: list[str] = hello["cases"]
    self.info: str = hello.get("info", "")

  def _receive(self) -> dict:
    line = self.process.stdout.readline()
    if not line:
      raise WorkerError(f"worker exited with status {self.process.wait()}")
    return json.loads(line)

  def seconds(self, name: str, iters: int) -> float:
    self.process.stdin.write(json.dumps({"case": name, "iters": iters}) + "\n")
    self.process.stdin.flush()
    return float(self._receive()["seconds"])

  def case(self, name: str) -> RemoteCase:
    return RemoteCase(self, name)

  def close(self) -> None:
    if self.process.poll() is None:
      self.process.stdin.close()
      self.process.wait(timeout=60)


class RemoteCase:
  """A case of a worker, with the ``run(iters) -> seconds`` of ``timing.Case``."""

  def __init__(self, worker: Worker, name: str):
    self.worker, self.name = worker, name

  def run(self, iters: int) -> float:
    return self.worker.seconds(self.name, iters)


def serve(make_cases: Callable[[], tuple[dict[str, Callable[[], None]], str]]) -> None:
  """A worker's main loop: build the cases, announce them, time them on request.

  ``make_cases`` returns the cases (each a call that has finished its step when it
  returns) and a line of versions; an ``ImportError`` is announced as an error.
  """
  out = sys.stdout
  sys.stdout = sys.stderr  # the protocol owns stdout; anything printed goes to stderr
  try:
    cases, info = make_cases()
  except ImportError as e:
    out.write(json.dumps({"error": f"not installed ({e.name})"}) + "\n")
    out.flush()
    return
  out.write(json.dumps({"cases": list(cases), "info": info}) + "\n")
  out.flush()
  for line in sys.stdin:
    request = json.loads(line)
    case = cases[request["case"]]
    start = time.perf_counter()
    for _ in range(request["iters"]):
      case()
    out.write(json.dumps({"seconds": (time.perf_counter() - start) / request["iters"]}) + "\n")
    out.flush()
