"""The benchmark harness (``benchmarks/``): its statistics, thread settings and outputs.

A quick run of ``benchmarks/run.py`` (scaled down, one thread setting) keeps the
harness from rotting; it must leave every tracked file alone and write its
report under ``runs/``.
"""

import importlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"
README = BENCHMARKS / "README.md"


def _load(name: str):
  """A module of benchmarks/ (they import each other by plain name, as scripts do)."""
  if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))
  return importlib.import_module(name)


def _has_torch() -> bool:
  return importlib.util.find_spec("torch") is not None


def test_resnet50_tree_has_the_published_size():
  shapes = _load("trees").resnet50_shapes()
  assert len(shapes) == 161
  # torchvision's resnet50 has 25,557,032 parameters (BN running stats are not parameters).
  assert sum(int(np.prod(s)) for s in shapes.values()) == 25_557_032


def test_ratio_is_the_median_of_paired_rounds_and_min_over_min():
  timing = _load("timing")
  # Round 2 ran under load for both cases. Paired: ratios 2, 1, 3 (median 2); medians: 6 / 2 = 3.
  times = {"clip": [2.0, 12.0, 6.0], "base": [1.0, 12.0, 2.0]}
  rounds = np.array(times["clip"]) / np.array(times["base"])
  med, low = timing.ratio(times, "clip", "base")
  assert med == np.median(rounds) == 2.0
  assert low == min(times["clip"]) / min(times["base"]) == 2.0


@pytest.fixture(scope="module")
def quick_run():
  """``run.py --quick --threads 1`` with its default output, README restored whatever happens."""
  before = README.read_bytes()
  command = [sys.executable, str(BENCHMARKS / "run.py"), "--quick", "--threads", "1"]
  if not _has_torch():
    command.append("--no-torch")
  try:
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    after = README.read_bytes()
  finally:
    README.write_bytes(before)
  assert done.returncode == 0, done.stderr[-3000:]
  (wrote,) = [line for line in done.stdout.splitlines() if line.startswith("wrote ")]
  out = Path(wrote.removeprefix("wrote "))
  yield done.stdout, out, before == after
  out.unlink(missing_ok=True)
  shutil.rmtree(out.parent / f"{out.stem}-raw", ignore_errors=True)


@pytest.mark.slow
def test_quick_run_prints_every_table_and_target_beside_its_setting(quick_run):
  stdout, out, _ = quick_run
  report = out.read_text()
  for row in (
    "sgd-momentum alone",
    "clipx.clip_by_global_norm + sgd",
    "clipx.adaptive_grad_clip + sgd",
    "clipx.clip_by_value + sgd",
    "cnn step, clipx global clip",
    "Compile time",
    "Targets (issue 6), threads=1",
  ):
    assert row in report, row
  assert "nan" not in report.lower()
  # Every table row that has a ratio names its thread setting in its table's threads column.
  ratio_rows, column = 0, None
  for line in report.splitlines():
    cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
    if not line.startswith("|"):
      column = None
    elif column is None:  # a table's header
      column = cells.index("threads") if "threads" in cells else -1
    elif "x / " in line:
      ratio_rows += 1
      assert column >= 0 and cells[column] == "1", line
  assert ratio_rows
  if _has_torch():  # torch's rows, from its own process, at the same setting
    assert "torch clip_grad_norm_ + SGD" in report
    assert "(1 intra-op threads)" in report


@pytest.mark.slow
def test_default_output_is_under_runs_and_no_tracked_file_is_written(quick_run):
  _, out, readme_unchanged = quick_run
  assert readme_unchanged, "run.py rewrote benchmarks/README.md without --write-readme"
  assert out.is_file()
  assert out.resolve().is_relative_to(ROOT / "runs"), out
  if shutil.which("git") and (ROOT / ".git").exists():
    ignored = subprocess.run(["git", "check-ignore", "-q", str(out)], cwd=ROOT)
    assert ignored.returncode == 0, f"{out} is not ignored by git"
    tracked = subprocess.run(["git", "ls-files", str(out)], cwd=ROOT, capture_output=True)
    assert tracked.stdout == b""


def test_default_out_and_thread_settings_of_both_scripts():
  outputs = _load("outputs")
  for script in ("run", "per_example"):
    assert outputs.default_out(script).is_relative_to(ROOT / "runs")
    args = _load(script).parse_args([])
    assert args.out is None and not args.write_readme
    assert args.settings == [1, None]  # single-threaded and all cores, both reported


def test_per_example_report_puts_each_ratio_beside_its_setting():
  per_example = _load("per_example")
  args = per_example.parse_args([])
  result = {
    "rates": {
      "clipx chunk_size=32": 300.0,
      "clipx unchunked (vmap)": 100.0,
      "Opacus (PyTorch)": 150.0,
    },
    "versions": "jax",
    "norm_times": {"batched": 0.001},
  }
  report = per_example.markdown(args, {"threads=1": result, "threads=all (2)": result})
  assert "| clipx chunk_size=32 | 1 | 300 | 2.00x |" in report
  assert "| clipx chunk_size=32 | all (2) | 300 | 2.00x |" in report
  assert "at threads=1: met, 2.00x" in report and "at threads=all (2): met, 2.00x" in report
  assert 'pip install -e ".[bench]"' in report


def _pinned(setting: str, code: str) -> dict:
  """What a fresh process started with ``threads.environment`` sees after pinning itself."""
  threads = _load("threads")
  script = (
    textwrap.dedent(f"""
    import json, os, sys
    sys.path.insert(0, {str(BENCHMARKS)!r})
    import threads
    setting = threads.from_environment()
    threads.pin(setting)
    seen = {{"cores": len(os.sched_getaffinity(0)), "xla_flags": os.environ["XLA_FLAGS"]}}
  """)
    + textwrap.dedent(code)
    + "\nprint(json.dumps(seen))\n"
  )
  env = threads.environment(threads.parse(setting))
  done = subprocess.run(
    [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
  )
  assert done.returncode == 0, done.stderr[-3000:]
  return json.loads(done.stdout.splitlines()[-1])


def test_one_thread_pins_xla_to_one_core():
  seen = _pinned("1", "import jax\nseen['sum'] = float(jax.numpy.ones(8).sum())")
  assert seen["cores"] == 1
  assert "--xla_cpu_multi_thread_eigen=false" in seen["xla_flags"]
  assert "intra_op_parallelism_threads=1" in seen["xla_flags"]
  assert seen["sum"] == 8.0


@pytest.mark.slow
@pytest.mark.skipif(not _has_torch(), reason='torch not installed (pip install -e ".[bench]")')
@pytest.mark.parametrize("setting", ["1", "all"])
def test_torch_gets_the_same_setting_as_xla(setting):
  seen = _pinned(
    setting,
    """
    import torch
    threads.configure_torch(torch, setting)
    seen["torch"] = torch.get_num_threads()
    seen["interop"] = torch.get_num_interop_threads()
    """,
  )
  cores = 1 if setting == "1" else len(os.sched_getaffinity(0))
  assert seen["cores"] == seen["torch"] == seen["interop"] == cores
  assert ("intra_op_parallelism_threads=1" in seen["xla_flags"]) == (setting == "1")


def test_pin_refuses_once_jax_is_imported():
  import jax  # noqa: F401

  threads = _load("threads")
  cores = os.sched_getaffinity(0)
  with pytest.raises(RuntimeError, match="fresh process"):
    threads.pin(1)
  assert os.sched_getaffinity(0) == cores


def test_thread_labels_and_bad_settings():
  threads = _load("threads")
  assert threads.label(1) == "threads=1"
  assert threads.label(None, cores=2) == "threads=all (2)"
  with pytest.raises(ValueError, match="'all' or a number of cores"):
    threads.parse("0")


@pytest.mark.slow
def test_spike_methods_quick_run_reports_every_case_and_its_malloc_settings(tmp_path):
  out = tmp_path / "spike.md"
  env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
  env["MALLOC_ARENA_MAX"] = "1"
  done = subprocess.run(
    [sys.executable, str(BENCHMARKS / "spike_methods.py"), "--quick", "--rounds", "1"]
    + ["--iters", "1", "--out", str(out)],
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  text = out.read_text()
  assert "glibc malloc settings: MALLOC_ARENA_MAX=1." in text
  rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
  names = [row.split("|")[1].strip() for row in rows[1:]]
  cases = ("zclip + adam", "adagc + adam", "adagc as a chain + adam", "stable_spam_clip + adam")
  assert set(cases) <= set(names)
  # Targets sit beside the methods, not beside the reference chains.
  targets = {row.split("|")[1].strip(): row.split("|")[5].strip() for row in rows[1:]}
  assert all(float(row.split("|")[4]) >= 0 for row in rows[1:])  # page faults per step
  assert targets["adagc + adam"] == "<= 1.05x" and targets["adagc as a chain + adam"] == ""


@pytest.mark.slow
def test_compile_time_quick_run_puts_each_bar_beside_its_ratio(tmp_path):
  out = tmp_path / "compile.md"
  done = subprocess.run(
    [sys.executable, str(BENCHMARKS / "compile_time.py"), "--leaves", "20", "--rounds", "1"]
    + ["--out", str(out)],
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  rows = [line.split("|") for line in out.read_text().splitlines() if line.startswith("| ")]
  by_name = {row[1].strip(): row for row in rows[1:]}
  assert by_name["sgd-momentum alone"][6].strip() == "1.00x"
  total = sum(float(by_name["clipx.clip_by_global_norm + sgd"][i]) for i in (2, 3, 4))
  assert abs(total - float(by_name["clipx.clip_by_global_norm + sgd"][5])) < 0.02
  assert by_name["clipx.clip_by_global_norm + sgd"][7].strip() == "<= 1.6x"
  assert by_name["clipx.adaptive_grad_clip + sgd"][7].strip() == "<= 2.5x"
  assert by_name["clipx.adaptive_grad_clip + sgd"][8].strip() in ("yes", "no")
