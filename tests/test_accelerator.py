"""benchmarks/accelerator.py: its ``--tiny`` run on CPU, so the device-machine command never rots.

The whole command runs once (about 50 s on 2 CPU cores: seven small parts,
each compiling its programs), and its report is checked against its own raw
numbers: the headline ratios are recomputed from the raw per-round times as
the paired median and min over min (the definition in ``benchmarks/timing.py``,
written out again here with numpy). A part that fails must be reported while
the others still run: checked in-process with stand-in parts.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "accelerator.py"


def load_script():
  spec = importlib.util.spec_from_file_location("accelerator", SCRIPT)
  assert spec is not None and spec.loader is not None
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up
  path = list(sys.path)
  spec.loader.exec_module(module)
  sys.path[:] = path  # the script puts benchmarks/ first: keep it from shadowing other modules
  return module


def test_a_failing_part_is_reported_and_the_rest_run(capsys):
  accelerator = load_script()

  def broken():
    raise RuntimeError("no device\nsecond line")

  def failing_command():
    accelerator.run_command([sys.executable, "-c", "print('tail'); raise SystemExit(3)"], 60)
    return "", {}

  parts = accelerator.run_parts(
    [
      ("first", lambda: ("one", {"x": 1})),
      ("broken", broken),
      ("command", failing_command),
      ("last", lambda: ("two", {})),
    ]
  )
  assert [p.status for p in parts] == [
    "ok",
    "failed: RuntimeError: no device",
    "failed: PartFailed: exit status 3",
    "ok",
  ]
  assert parts[0].data == {"x": 1} and parts[3].text == "two"
  assert "RuntimeError: no device" in parts[1].text  # the traceback goes into the report
  assert "tail" in parts[2].text  # the command's output does
  progress = [line for line in capsys.readouterr().err.splitlines() if "[accelerator" in line]
  assert len(progress) == 2 * len(parts)


def test_unknown_part_is_an_error():
  accelerator = load_script()
  with pytest.raises(SystemExit):
    accelerator.parse_args(["--parts", "tests,gpu"])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("accelerator") / "report.md"
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  result = subprocess.run(
    [sys.executable, str(SCRIPT), "--tiny", "--out", str(out)],
    capture_output=True,
    text=True,
    env=env,
    cwd=ROOT,
    timeout=600,
  )
  return result, out.read_text(), json.loads(out.with_suffix(".json").read_text())


@pytest.mark.slow
def test_tiny_run_passes_every_part(tiny_run):
  result, report, raw = tiny_run
  parts = {part["name"]: part for part in raw["parts"]}
  failed = {name: part["status"] for name, part in parts.items() if part["status"] != "ok"}
  assert not failed, (failed, result.stderr[-3000:])
  assert result.returncode == 0
  assert list(parts) == ["tests", "cnn", "lm", "spike_methods", "ratios", "dp", "memory"]
  for name in parts:
    assert f"#### {name}\n" in report
    assert re.search(rf"^\| {name} \| ok \| \d+\.\d \|$", report, re.M)
  progress = [line for line in result.stderr.splitlines() if line.startswith("[accelerator")]
  assert len(progress) == 2 * len(parts)
  assert parts["tests"]["data"]["counts"]["passed"] >= 1
  assert parts["cnn"]["data"]["steps"] == 3 and parts["lm"]["data"]["steps"] == 2
  assert parts["memory"]["data"]["peak"] is None  # CPU reports no memory statistics
  assert "Peak device memory: n/a" in report


@pytest.mark.slow
def test_tiny_run_ratios_follow_from_its_times(tiny_run):
  _, report, raw = tiny_run
  (ratios,) = [part["data"] for part in raw["parts"] if part["name"] == "ratios"]
  times = ratios["times"]
  expected = {
    "clipx global clip / optax global clip, float32": (
      "float32",
      "clipx.clip_by_global_norm + sgd",
      "optax.clip_by_global_norm + sgd",
    ),
    "clipx AGC / optax AGC, bfloat16": (
      "bfloat16",
      "clipx.adaptive_grad_clip + sgd",
      "optax.adaptive_grad_clip + sgd",
    ),
    "CNN step with clipx global clip / without": (
      "cnn",
      "cnn step, clipx global clip",
      "cnn step, no clipping",
    ),
  }
  for label, (table, case, base) in expected.items():
    case_times, base_times = np.asarray(times[table][case]), np.asarray(times[table][base])
    paired = float(np.median(case_times / base_times))
    best = float(case_times.min() / base_times.min())
    np.testing.assert_allclose(ratios["headlines"][label], [paired, best], rtol=1e-12)
    assert f"| {label} | {paired:.3f}x / {best:.3f}x |" in report
  (dp,) = [part["data"] for part in raw["parts"] if part["name"] == "dp"]
  seconds = dp["seconds"]
  reference = seconds["non-private step, XLA convs (reference)"]
  for name, s in seconds.items():
    assert f"| {name} | {s * 1e3:.2f} | {4 / s:,.0f} | {s / reference:.2f}x |" in report
