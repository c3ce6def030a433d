"""clipx on 8 simulated CPU devices: sharded runs equal unsharded ones, and
clipping adds only scalar (or unit-sized) all-reduces, never a gathered gradient.

The checks run in one subprocess, ``tests/distributed_checks.py``, with its own
JAX started with 8 CPU devices (the device count is fixed when a backend
starts, and the rest of the suite must keep seeing one device). It prints its
measurements as JSON; the assertions are here. The HLO parser it uses is
tested here on literal HLO lines and, through the subprocess, on programs that
do move gradient-sized data, so a check that reads "no big collective" could
not pass because the parser saw nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import distributed_checks as checks
import pytest

RTOL = 1e-6  # sharded vs. unsharded; see checks.max_rel_err for the exact criterion
HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def results() -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu")  # the simulated devices are CPU devices
  proc = subprocess.run(
    [sys.executable, str(HERE / "distributed_checks.py")],
    capture_output=True,
    text=True,
    timeout=600,
    env=env,
    cwd=HERE.parent,
  )
  assert proc.returncode == 0, proc.stderr[-5000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def ops(found: list[dict]) -> set[str]:
  return {c["op"] for c in found}


def largest(found: list[dict]) -> int:
  """Elements in the largest array any collective moves (0 when there is none)."""
  return max((max(c["sizes"]) for c in found), default=0)


def all_reduces(found: list[dict]) -> list[dict]:
  return [c for c in found if c["op"] == "all-reduce"]


def added_by_clipping(with_clip: list[dict], without_clip: list[dict]) -> tuple[Counter, Counter]:
  """Collectives only in the program with clipping, and those only in the one without.

  Compared as multisets of (op, sorted operand sizes): XLA orders the operands
  of a combined all-reduce differently from one compile to the next.
  """
  key = lambda c: (c["op"], tuple(sorted(c["sizes"])))  # noqa: E731
  with_counts = Counter(map(key, with_clip))
  without_counts = Counter(map(key, without_clip))
  return with_counts - without_counts, without_counts - with_counts


# --- The parser, on literal HLO lines (no devices needed). ---

HLO_SAMPLE = """
HloModule jit_step, entry_computation_layout={(f32[64]{0})->f32[]}
  %all-reduce.12 = (f32[1]{0}, f32[1]{0}) all-reduce(%a, %b), channel_id=7, to_apply=%region_14
  %get-tuple-element.21 = f32[1]{0} get-tuple-element(%all-reduce.12), index=0
  %add.3 = f32[] add(f32[] %x, f32[] %y), metadata={op_name="jit(f)/all-gather"}
  %all-gather-start = (f32[8]{0}, f32[64]{0}) all-gather-start(f32[8]{0} %p), dimensions={0}
  %all-gather-done = f32[64]{0} all-gather-done(%all-gather-start)
  ROOT %reduce-scatter.1 = bf16[4,2]{1,0} reduce-scatter(bf16[32,2]{1,0} %g), dimensions={0}
  %all-to-all = (f8e4m3fn[2,3]{1,0}) all-to-all(%q), replica_groups={{0,1}}
  %fusion.2 = f32[512]{0} fusion(%all-reduce.12), kind=kLoop, calls=%fused_computation
"""


def test_parser_reads_every_collective_and_only_those():
  assert checks.collectives(HLO_SAMPLE) == [
    {"op": "all-reduce", "sizes": [1, 1]},
    {"op": "all-gather", "sizes": [8, 64]},  # the async pair counted once
    {"op": "reduce-scatter", "sizes": [8]},
    {"op": "all-to-all", "sizes": [6]},
  ]


def test_parser_refuses_a_collective_it_cannot_read():
  with pytest.raises(ValueError, match="unreadable"):
    checks.collectives("  %all-reduce.1 = token all-reduce(%a), to_apply=%add")


@pytest.mark.slow
def test_parser_sees_gradient_sized_collectives_in_compiled_programs(results):
  bad = results["parser"]
  assert ops(bad["psum_vector"]) == {"all-reduce"}
  assert largest(bad["psum_vector"]) == 1024  # psum of a 1024-element vector
  assert ops(bad["replicate_output"]) == {"all-gather"}
  assert largest(bad["replicate_output"]) == 8 * 1024
  good = bad["global_norm"]  # the norm of a split tree: scalars only, but not nothing
  assert ops(good) == {"all-reduce"} and largest(good) == 1


# --- jit over a Mesh with NamedSharding (FSDP). ---


@pytest.mark.parametrize("name", ["global", "layer_module"])
@pytest.mark.slow
@pytest.mark.slow
def test_fsdp_norm_clipping_equals_one_device_with_scalar_all_reduces(results, name):
  run = results["jit_fsdp"][name]
  assert run["params_err"] <= RTOL and run["state_err"] <= RTOL, run
  assert run["events"] >= 1  # clipping happened, so equality says something
  assert run["output_sharding_kept"]
  found = run["collectives"]
  # No gradient is gathered or exchanged: only all-reduces, and of scalars (one
  # per leaf, combined by XLA into one instruction per reduction: the common
  # pass and the two of the overflow fallback).
  assert ops(found) == {"all-reduce"}, found
  assert largest(found) == 1, found
  assert 1 <= len(found) <= 3, found
  assert sum(len(c["sizes"]) for c in found) <= 3 * run["leaves"], found


@pytest.mark.slow
def test_fsdp_agc_moves_at_most_unit_sized_vectors(results):
  run = results["jit_fsdp"]["agc"]
  assert run["params_err"] <= RTOL and run["state_err"] <= RTOL, run
  assert run["events"] >= 1
  found = run["collectives"]
  # Per-unit sums of squares of kernels split on their input axis are
  # all-reduced; unit norms of kernels split on their output axis are gathered
  # into the vector of all units (the decision and stats work on one vector),
  # and each leaf reads its scales from a table of that vector's two scale
  # factors (hi, lo; clipx.scaling.decide), each padded with one unit count of
  # ones (clipx.scaling.gated_slices), which XLA rounds up to split evenly over
  # the devices: numbers counted in units, never in gradient elements.
  assert ops(found) <= {"all-reduce", "all-gather"}, found
  padded = 2 * (run["unit_count"] + run["largest_unit_count"])
  bound = -(-padded // checks.DEVICES) * checks.DEVICES
  assert largest(found) <= bound, found


# --- shard_map with axis_name. ---

SHARD_MAP_TRANSFORMS = tuple(checks.shard_map_transforms("d"))


@pytest.mark.parametrize("name", SHARD_MAP_TRANSFORMS)
@pytest.mark.slow
@pytest.mark.slow
def test_shard_map_axis_name_equals_unsharded(results, name):
  run = results["shard_map"][name]
  assert run["update_err"] <= RTOL and run["state_err"] <= RTOL, run
  # Every shard holds the same threshold state and stats, bit for bit.
  assert run["state_identical_on_shards"], run
  assert run["events"] >= 1, run  # clipped or skipped at least once


@pytest.mark.slow
def test_shard_map_collectives_are_unit_sized_all_reduces(results):
  program = results["shard_map"]["program"]
  found = program["collectives"]
  assert ops(found) == {"all-reduce"}, found
  # Scalars, group-norm vectors and AGC's vector of all units (one psum of the
  # whole tree's unit sums of squares); a kernel's shard is at least 288 elements.
  assert largest(found) <= program["unit_count"], found
  assert program["unit_count"] * 5 < program["smallest_leaf_shard_of_kernels"]


@pytest.mark.slow
def test_zero_data_parallel_step_equals_one_device_and_clipping_adds_scalars(results):
  run = results["zero_data_parallel"]
  assert run["params_err"] <= RTOL and run["state_err"] <= RTOL, run
  assert run["events"] >= 1
  added, removed = added_by_clipping(run["with_clip"], run["without_clip"])
  assert not removed, removed
  # With axis_name the global norm's all-reduce carries one sum of squares per
  # leaf (4 here; spike forensics needs each leaf's share), never gradients.
  assert added and all(op == "all-reduce" and max(sizes) <= 4 for op, sizes in added), added


@pytest.mark.slow
def test_tensor_parallel_2d_mesh_equals_one_device_and_clipping_adds_scalars(results):
  run = results["tensor_parallel_2d"]
  assert run["params_err"] <= RTOL and run["state_err"] <= RTOL, run
  assert run["events"] >= 1
  added, removed = added_by_clipping(run["with_clip"], run["without_clip"])
  assert not removed, removed
  assert added and all(op == "all-reduce" and max(sizes) == 1 for op, sizes in added), added


@pytest.mark.slow
def test_pmap_axis_name_equals_the_formula(results):
  run = results["pmap"]
  assert run["norm"] > 1  # clipped
  assert run["update_err"] <= RTOL and run["norm_err"] <= RTOL, run


# --- examples/train_cnn.py: its data-parallel mesh on 8 devices vs. one device. ---


@pytest.mark.slow
def test_cnn_example_on_8_devices_trains_as_on_one(results):
  runs = results["cnn_example"]
  eight, one = runs["eight"], runs["one"]
  assert eight["devices"].startswith("8 devices") and one["devices"].startswith("1 device")
  assert eight["steps"] == one["steps"] == 30
  assert eight["clip_rate"] > 0  # the clipping norm is part of what is compared
  # The same batches; only the order of the batch-mean reduction differs.
  for key in ("step_loss", "grad_norm"):
    worst = max(abs(a - b) / abs(b) for a, b in zip(eight[key], one[key], strict=True))
    assert worst <= 1e-5, (key, worst)
  assert abs(eight["test_accuracy"] - one["test_accuracy"]) <= 0.01


@pytest.mark.slow
@pytest.mark.skipif(
  not os.environ.get("CLIPX_SLOW"),
  reason="two CNN trainings of 3 epochs (about 1 minute of CPU each); CLIPX_SLOW=1 runs it",
)
def test_cnn_example_full_run_same_test_accuracy_on_8_devices_and_1(tmp_path):
  accuracy = {}
  for devices in (8, 1):
    env = dict(
      os.environ,
      JAX_PLATFORMS="cpu",
      XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
    )
    out = tmp_path / str(devices)
    subprocess.run(
      [sys.executable, "examples/train_cnn.py", "--epochs", "3", "--quiet", "--out", str(out)],
      check=True,
      env=env,
      cwd=HERE.parent,
      timeout=900,
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["devices"].startswith(f"{devices} device")
    accuracy[devices] = metrics["test_accuracy"]
  assert accuracy[8] > 0.9, accuracy
  assert abs(accuracy[8] - accuracy[1]) <= 0.01, accuracy
