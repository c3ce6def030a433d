"""Smoke test of the benchmark harness (``benchmarks/run.py --quick``), so it cannot rot."""

import importlib.util
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def _load_run():
  spec = importlib.util.spec_from_file_location("bench_run", ROOT / "benchmarks" / "run.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_resnet50_tree_has_the_published_size():
  shapes = _load_run().resnet50_shapes()
  assert len(shapes) == 161
  # torchvision's resnet50 has 25,557,032 parameters (BN running stats are not parameters).
  assert sum(int(np.prod(s)) for s in shapes.values()) == 25_557_032


def test_quick_run_prints_every_table_and_target():
  run = _load_run()
  report = run.main(["--quick", "--no-readme", "--no-torch"])
  for row in (
    "sgd-momentum alone",
    "clipx.clip_by_global_norm + sgd",
    "clipx.adaptive_grad_clip + sgd",
    "clipx.clip_by_value + sgd",
    "cnn step, clipx global clip",
    "Compile time",
    "Targets (issue 6)",
  ):
    assert row in report, row
  assert "nan" not in report.lower()


def test_ratio_is_the_median_of_paired_rounds_and_min_over_min():
  run = _load_run()
  # Round 2 ran under load for both cases. Paired: ratios 2, 1, 3 (median 2); medians: 6 / 2 = 3.
  times = {"clip": [2.0, 12.0, 6.0], "base": [1.0, 12.0, 2.0]}
  rounds = np.array(times["clip"]) / np.array(times["base"])
  med, low = run.ratio(times, "clip", "base")
  assert med == np.median(rounds) == 2.0
  assert low == min(times["clip"]) / min(times["base"]) == 2.0
