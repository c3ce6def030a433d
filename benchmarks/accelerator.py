"""One command for a lent accelerator: ``python benchmarks/accelerator.py`` (``--tiny``: CPU smoke).

A device machine is lent for minutes at a time, so everything a GPU or TPU
should check runs from this one prepared command, on whatever backend JAX
sees, and writes one Markdown report (and its raw numbers as JSON) under
``runs/accelerator/`` that can be pasted into ``benchmarks/README.md``:

1. ``tests``: the device-sensitive test files (norms and scaling numerics,
   the numerical contract, temporary memory, the scopes), without the slow
   ones (about 150 s on 2 CPU cores);
2. ``cnn``, ``lm``: ``examples/train_cnn.py`` and ``examples/train_lm.py`` at
   short settings, through their own command lines;
3. ``spike_methods``: ``benchmarks/spike_methods.py`` (the spike methods and
   the update clips against a fixed global clip);
4. ``ratios``: ``clipping_cases.py``'s optimizer steps on the ResNet-50-shaped
   tree in float32 and bfloat16 (global clip and AGC against Optax's, against
   SGD alone, the memory floors) and the CNN train step, timed by
   ``timing.py``, tabled by ``report.py``;
5. ``dp``: ``dp_cases.py``'s DP-SGD steps against the non-private step;
6. ``memory``: the device's peak memory in this process
   (``jax.devices()[0].memory_stats()``; n/a where the backend has none, as
   on CPU).

Each part is wrapped: a failure is reported with its output and the rest
still run, with a progress line per part on stderr; the exit status is 1 if
any part failed. The parts that start their own process (1-3) run before
this process first touches the device: XLA's GPU client preallocates most of
the device's memory in the first process that uses it, so a child started
after would run short. At full settings it is sized to finish in about 8
minutes on one H100; ``--tiny`` runs every part in seconds on CPU (the test
suite runs it, so the script cannot rot).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))  # the benchmark modules, also when imported by path
sys.path.insert(1, str(ROOT))  # examples/ (not installed)
RUNS = ROOT / "runs" / "accelerator"

# Numerics, memory and the scopes: what can differ between backends.
DEVICE_TESTS = (
  "tests/test_norms.py",
  "tests/test_scaling.py",
  "tests/test_contract.py",
  "tests/test_memory.py",
  "tests/test_transforms.py",
  "tests/test_global_then_layer.py",
)


NONPRIVATE = "non-private step, XLA convs (reference)"  # dp_cases' reference step


@dataclass(frozen=True)
class Settings:
  """How much each part does; seconds of each subprocess part before it is stopped."""

  tests: tuple[str, ...]
  test_filter: str
  cnn_flags: tuple[str, ...]
  lm_flags: tuple[str, ...]
  spike_flags: tuple[str, ...]
  quick_trees: bool  # trees.benchmark_shapes(quick)
  rounds: int
  iters: int
  cnn_batch: int
  dp_batch: int
  dp_steps: int
  dp_rounds: int
  dp_variants: tuple[str, ...]  # dp_cases.jax_steps' names; () for all
  timeouts: dict[str, int]


FULL = Settings(
  tests=DEVICE_TESTS,
  test_filter="",
  cnn_flags=("--epochs", "1"),
  lm_flags=("--steps", "300", "--sample-bytes", "64"),
  spike_flags=("--rounds", "7", "--iters", "20"),
  quick_trees=False,
  rounds=9,
  iters=20,
  cnn_batch=128,
  dp_batch=256,
  dp_steps=10,
  dp_rounds=5,
  dp_variants=(),
  timeouts={"tests": 210, "cnn": 120, "lm": 150, "spike_methods": 150},
)
TINY = Settings(
  tests=("tests/test_scaling.py",),
  test_filter="keeps_every_bit or matches_scale_leaf",
  cnn_flags=("--epochs", "1", "--max-steps", "3"),
  lm_flags=(
    *("--steps", "2", "--layers", "1", "--width", "16", "--heads", "2"),
    *("--seq-len", "16", "--batch-size", "2", "--sample-bytes", "4"),
  ),
  spike_flags=("--quick", "--rounds", "1", "--iters", "1", "--only", "zclip"),
  quick_trees=True,
  rounds=2,
  iters=1,
  cnn_batch=8,
  dp_batch=4,
  dp_steps=1,
  dp_rounds=2,
  dp_variants=("clipx chunk_size=32", NONPRIVATE),
  timeouts={"tests": 120, "cnn": 120, "lm": 120, "spike_methods": 120},
)

# The headline ratios of the optimizer tables: (label, case, baseline).
HEADLINES = (
  (
    "clipx global clip / optax global clip",
    "clipx.clip_by_global_norm + sgd",
    "optax.clip_by_global_norm + sgd",
  ),
  ("clipx global clip / sgd alone", "clipx.clip_by_global_norm + sgd", "sgd-momentum alone"),
  ("clipx AGC / optax AGC", "clipx.adaptive_grad_clip + sgd", "optax.adaptive_grad_clip + sgd"),
)


class PartFailed(Exception):
  """A part's failure, with the Markdown (its output) that goes into the report."""

  def __init__(self, message: str, text: str):
    super().__init__(message)
    self.text = text


@dataclass
class Part:
  name: str
  status: str  # "ok" or "failed: <why>"
  seconds: float
  text: str  # Markdown for the report
  data: dict[str, Any]


def fenced(output: str, lines: int = 30) -> str:
  tail = "\n".join(output.strip().splitlines()[-lines:])
  return f"```\n{tail}\n```"


def run_command(command: list[str], timeout: int) -> str:
  """Runs ``command`` from the repository root; its output, or ``PartFailed`` with its tail."""
  try:
    result = subprocess.run(
      command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )
  except subprocess.TimeoutExpired as e:
    output = e.stdout if isinstance(e.stdout, str) else (e.stdout or b"").decode(errors="replace")
    raise PartFailed(f"stopped after {timeout} s", fenced(output)) from None
  output = result.stdout + result.stderr
  if result.returncode != 0:
    raise PartFailed(f"exit status {result.returncode}", fenced(output))
  return output


def run_parts(parts: list[tuple[str, Callable[[], tuple[str, dict]]]]) -> list[Part]:
  """Runs each part in order; a part that raises is reported, and the next one runs."""
  done = []
  for index, (name, fn) in enumerate(parts, 1):
    print(f"[accelerator {index}/{len(parts)}] {name} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
      text, data = fn()
      status = "ok"
    except Exception as e:  # one part's failure must not cost the others on a lent machine
      status = f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
      text = getattr(e, "text", None) or fenced(traceback.format_exc())
      data = {}
    seconds = time.perf_counter() - start
    print(
      f"[accelerator {index}/{len(parts)}] {name}: {status} ({seconds:.1f} s)",
      file=sys.stderr,
      flush=True,
    )
    done.append(Part(name, status, seconds, text, data))
  return done


# The parts that run in a process of their own (before this one touches the device).


def tests_part(settings: Settings) -> tuple[str, dict]:
  command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-m", "not slow"]
  if settings.test_filter:
    command += ["-k", settings.test_filter]
  command += list(settings.tests)
  try:
    output = run_command(command, settings.timeouts["tests"])
  except PartFailed as e:
    failed = re.findall(r"^(?:FAILED|ERROR) .*$", e.text, re.M)
    raise PartFailed(
      str(e), "\n".join(f"- `{line}`" for line in failed) + "\n\n" + e.text
    ) from None
  summary = output.strip().splitlines()[-1]
  counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|skipped|error)", summary)}
  text = f"`python {shlex.join(command[1:])}`: {summary.strip('= ')}"
  return text, {"counts": counts, "files": list(settings.tests)}


def example_part(script: str, flags: tuple[str, ...], workdir: Path, timeout: int) -> dict:
  """Runs ``examples/<script>`` with ``flags``; returns its ``metrics.json``."""
  out = workdir / Path(script).stem
  run_command([sys.executable, f"examples/{script}", *flags, "--quiet", "--out", str(out)], timeout)
  return json.loads((out / "metrics.json").read_text())


def cnn_part(settings: Settings, workdir: Path) -> tuple[str, dict]:
  flags = settings.cnn_flags
  metrics = example_part("train_cnn.py", flags, workdir, settings.timeouts["cnn"])
  keys = ("test_accuracy", "clip_rate", "steps", "wall_seconds", "first_step_seconds", "devices")
  data = {k: metrics.get(k) for k in keys}
  text = (
    f"`python examples/train_cnn.py {' '.join(flags)}` on {data['devices']}: test accuracy"
    f" {data['test_accuracy']:.4f}, clip rate {data['clip_rate']:.2f}, {data['steps']} steps in"
    f" {data['wall_seconds']:.1f} s (first step, compile included,"
    f" {data['first_step_seconds']:.1f} s)."
  )
  return text, data


def lm_part(settings: Settings, workdir: Path) -> tuple[str, dict]:
  flags = settings.lm_flags
  metrics = example_part("train_lm.py", flags, workdir, settings.timeouts["lm"])
  keys = (
    "validation_bits_per_byte",
    "initial_bits_per_byte",
    "unigram_bits_per_byte",
    "clip_rate",
    "steps",
    "diverged",
    "wall_seconds",
  )
  data = {k: metrics.get(k) for k in keys}
  text = (
    f"`python examples/train_lm.py {' '.join(flags)}`: validation"
    f" {data['validation_bits_per_byte']:.3f} bits per byte (initial"
    f" {data['initial_bits_per_byte']:.3f}, unigram {data['unigram_bits_per_byte']:.3f}), clip"
    f" rate {data['clip_rate']:.2f}, diverged {data['diverged']}, {data['steps']} steps in"
    f" {data['wall_seconds']:.1f} s."
  )
  return text, data


def spike_part(settings: Settings, workdir: Path) -> tuple[str, dict]:
  out = workdir / "spike_methods.md"
  command = [sys.executable, "benchmarks/spike_methods.py", "--threads", "all"]
  command += [*settings.spike_flags, "--out", str(out)]
  run_command(command, settings.timeouts["spike_methods"])
  return out.read_text().strip(), {}


# The parts that run in this process.


def ratios_part(settings: Settings) -> tuple[str, dict]:
  import clipping_cases
  import jax.numpy as jnp
  import numpy as np
  import report
  import threads
  import timing
  import trees

  label = threads.label(None)
  shapes = trees.benchmark_shapes(settings.quick_trees)
  size = sum(int(np.prod(s)) for s in shapes.values())
  sections, data = [], {"times": {}, "memory": {}, "headlines": {}}
  for dtype, name in ((jnp.float32, "float32"), (jnp.bfloat16, "bfloat16")):
    memory: dict[str, int | None] = {}
    cases, _ = clipping_cases.optimizer_cases(shapes, dtype, name, None, None, memory)
    times = timing.time_cases(cases, settings.rounds, settings.iters)
    del cases
    data["times"][name], data["memory"][name] = times, memory
    for headline, case, base in HEADLINES:
      data["headlines"][f"{headline}, {name}"] = timing.ratio(times, case, base)
    table = report.time_table(times, clipping_cases.BASELINE, label, "ms", 1e3, memory)
    sections.append(
      f"Optimizer step, ResNet-50-shaped tree{' (truncated)' if settings.quick_trees else ''},"
      f" {name} ({len(shapes)} leaves, {size / 1e6:.2f}M parameters):\n\n{table}"
    )
  memory = {}
  times = timing.time_cases(
    clipping_cases.cnn_cases(settings.cnn_batch, memory), settings.rounds, settings.iters
  )
  data["times"]["cnn"], data["memory"]["cnn"] = times, memory
  data["headlines"]["CNN step with clipx global clip / without"] = timing.ratio(
    times, "cnn step, clipx global clip", "cnn step, no clipping"
  )
  table = report.time_table(times, clipping_cases.BASELINE, label, "ms", 1e3, memory)
  sections.append(
    f"Whole train step, `examples/cnn.py` CNN, batch {settings.cnn_batch}:\n\n{table}"
  )
  rows = [f"| {k} | {m:.3f}x / {b:.3f}x |" for k, (m, b) in data["headlines"].items()]
  headline = "\n".join(["| ratio | median / min-over-min |", "|---|---:|", *rows])
  return "\n\n".join([headline, *sections]), data


def dp_part(settings: Settings) -> tuple[str, dict]:
  import dp_cases
  import jax
  import jax.numpy as jnp
  import numpy as np

  from examples import cnn

  apply_fn, params = cnn.init(10, (8, 8, 1), seed=0)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.random((settings.dp_batch, 8, 8, 1), np.float32))
  labels = jnp.asarray(rng.integers(0, 10, settings.dp_batch).astype(np.int32))
  steps = dp_cases.jax_steps(apply_fn, params, settings.dp_batch)
  runners = {}
  for name in settings.dp_variants or tuple(steps):
    step, opt_state = steps[name]
    jax.block_until_ready(step(params, opt_state, (images, labels)))  # compile

    def run(step=step, opt_state=opt_state) -> float:
      start = time.perf_counter()
      p, s = params, opt_state
      for _ in range(settings.dp_steps):
        p, s = step(p, s, (images, labels))
      jax.block_until_ready(p)
      return (time.perf_counter() - start) / settings.dp_steps

    runners[name] = run
  seconds = dp_cases.time_interleaved(runners, settings.dp_rounds)
  reference = seconds[NONPRIVATE]
  lines = [
    f"Digits CNN, batch {settings.dp_batch}, clip to norm {dp_cases.MAX_NORM:g}, noise"
    f" {dp_cases.NOISE:g}; best of {settings.dp_rounds} interleaved rounds of"
    f" {settings.dp_steps} steps. Time ratio: the step's time over the non-private step's.",
    "",
    "| step | ms | examples / s | time ratio to non-private |",
    "|---|---:|---:|---:|",
  ]
  for name, s in sorted(seconds.items(), key=lambda kv: kv[1]):
    rate = settings.dp_batch / s
    lines.append(f"| {name} | {s * 1e3:.2f} | {rate:,.0f} | {s / reference:.2f}x |")
  return "\n".join(lines), {"seconds": seconds}


def memory_part() -> tuple[str, dict]:
  import jax

  stats = jax.devices()[0].memory_stats()
  if not stats:
    return "Peak device memory: n/a (the backend reports no memory statistics).", {"peak": None}
  peak, limit = stats.get("peak_bytes_in_use"), stats.get("bytes_limit")
  text = f"Peak device memory of this process (the ratio and DP parts): {peak / 2**30:.2f} GiB" + (
    f" of {limit / 2**30:.1f} GiB." if limit else "."
  )
  return text, {"peak": peak, "limit": limit}


def environment() -> str:
  import jax
  import jaxlib
  import optax

  devices = jax.devices()
  return (
    f"jax {jax.__version__}, jaxlib {jaxlib.__version__}, optax {optax.__version__};"
    f" backend {jax.default_backend()}, {len(devices)} device(s): {devices[0].device_kind};"
    f" {os.cpu_count()} host cores"
  )


def markdown(command: str, parts: list[Part], env: str, seconds: float) -> str:
  lines = [
    f"### On {env.split(': ', 1)[1].split(';')[0]}",
    "",
    f"`{command}`, {datetime.date.today().isoformat()}: {env}. {seconds:.0f} s in all.",
    "",
    "| part | status | seconds |",
    "|---|---|---:|",
    *[f"| {p.name} | {p.status} | {p.seconds:.1f} |" for p in parts],
  ]
  for part in parts:
    lines += ["", f"#### {part.name}", "", part.text]
  return "\n".join(lines) + "\n"


PART_NAMES = ("tests", "cnn", "lm", "spike_methods", "ratios", "dp", "memory")


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tiny", action="store_true", help="every part in seconds (CPU smoke test)")
  parser.add_argument(
    "--parts", default=",".join(PART_NAMES), help=f"comma-separated, of {', '.join(PART_NAMES)}"
  )
  parser.add_argument(
    "--out", type=Path, default=None, help="report (default runs/accelerator/<time>.md)"
  )
  args = parser.parse_args(argv)
  args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
  unknown = sorted(set(args.parts) - set(PART_NAMES))
  if unknown:
    parser.error(f"unknown parts {unknown}; choose from {', '.join(PART_NAMES)}")
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  settings = TINY if args.tiny else FULL
  stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
  out = args.out or RUNS / f"{stamp}.md"
  workdir = out.parent / f"{out.stem}-work"
  workdir.mkdir(parents=True, exist_ok=True)
  available = {
    "tests": lambda: tests_part(settings),
    "cnn": lambda: cnn_part(settings, workdir),
    "lm": lambda: lm_part(settings, workdir),
    "spike_methods": lambda: spike_part(settings, workdir),
    "ratios": lambda: ratios_part(settings),
    "dp": lambda: dp_part(settings),
    "memory": memory_part,
  }
  start = time.perf_counter()
  parts = run_parts([(name, available[name]) for name in PART_NAMES if name in args.parts])
  command = "python benchmarks/accelerator.py" + (" --tiny" if args.tiny else "")
  if args.parts != list(PART_NAMES):
    command += f" --parts {','.join(args.parts)}"
  env = environment()
  text = markdown(command, parts, env, time.perf_counter() - start)
  out.write_text(text)
  raw = {"command": command, "environment": env, "parts": [vars(p) for p in parts]}
  out.with_suffix(".json").write_text(json.dumps(raw, indent=1))
  print(text)
  print(f"wrote {out} and {out.with_suffix('.json').name}", file=sys.stderr)
  return 0 if all(p.status == "ok" for p in parts) else 1


if __name__ == "__main__":
  sys.exit(main())
