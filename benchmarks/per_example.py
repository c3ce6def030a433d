"""Per-example clipping (DP-SGD) throughput and memory: ``python benchmarks/per_example.py``.

One DP-SGD step (per-example gradients, clip each to norm 1, average, add
Gaussian noise, SGD update) of the digits CNN (``examples/cnn.py``, 8x8x1
inputs, 79,626 parameters) at batch 256, timed for:

- ``clipx.clipped_grad`` in chunks of 32 and 1 examples (``lax.scan`` over
  vmapped chunks) and unchunked (``jax.vmap`` over the batch), with its
  default on CPU of convolutions computed as matrix products, and with XLA's
  convolutions (``conv_as_matmul=False``);
- naive vmap: ``jax.vmap(jax.grad)`` over the batch, then
  ``jax.vmap(clipx.global_norm)`` and a scaled mean (what one writes by hand);
- ``optax.contrib.dpsgd``: ``jax.vmap(jax.grad)`` per-example gradients into
  Optax's DP-SGD transformation;
- Opacus 1.x (PyTorch, the same net, ``GradSampleModule`` + ``DPOptimizer``)
  where installed (``pip install -e ".[bench]"``), in a process of its own;
- for reference, a non-private step (one batched gradient, XLA's convolutions).

Thread settings (``threads.py``): everything is measured once per setting
(``--threads 1,all`` by default: the clipx / Opacus ratio depends on it), each
in a fresh process pinned before jax or torch is imported, and every ratio is
printed beside its setting. What is measured is in ``dp_cases.py``.

Also measured: the per-example norms alone, batched with one ``lax.cond``
(clipx) against ``jax.vmap(clipx.global_norm)``, whose cond becomes a select
that runs its overflow fallback every time; and peak temporary memory (XLA's
compiled ``memory_analysis()``) against batch size, with and without chunking
(in the first setting's process: it does not depend on threads).

The report goes to ``runs/benchmarks/`` (or ``--out``); ``--write-readme`` also
replaces this script's section of ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when imported by path

import outputs  # noqa: E402
import threads  # noqa: E402

BEGIN, END = "<!-- per_example:begin -->", "<!-- per_example:end -->"
MAX_NORM, NOISE = 1.0, 1.0  # as dp_cases (which imports jax, so not imported here)
OPACUS = "Opacus (PyTorch)"


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch-size", type=int, default=256)
  parser.add_argument("--rounds", type=int, default=10, help="interleaved timing rounds")
  parser.add_argument("--steps", type=int, default=3, help="steps per variant per round")
  parser.add_argument(
    "--memory-batches", default="64,256,1024,4096", help="batch sizes for the memory table"
  )
  parser.add_argument("--no-opacus", action="store_true", help="skip Opacus even if installed")
  parser.add_argument(
    "--threads",
    default=",".join(threads.SETTINGS),
    help="thread settings, each measured in a fresh process: 'all' or a core count (default 1,all)",
  )
  parser.add_argument("--setting-out", type=Path, help=argparse.SUPPRESS)  # one setting's child
  parser.add_argument("--memory", action="store_true", help=argparse.SUPPRESS)
  outputs.add_arguments(parser)
  args = parser.parse_args(argv)
  args.settings = [threads.parse(s) for s in args.threads.split(",")]
  return args


def measure_in_fresh_process(args, setting: int | None, memory: bool, workdir: Path) -> dict:
  name = "all" if setting is None else str(setting)
  out = workdir / f"threads-{name}.json"
  command = [sys.executable, __file__, "--threads", name, "--setting-out", str(out)]
  command += ["--batch-size", str(args.batch_size), "--rounds", str(args.rounds)]
  command += ["--steps", str(args.steps), "--memory-batches", args.memory_batches]
  command += (["--no-opacus"] if args.no_opacus else []) + (["--memory"] if memory else [])
  subprocess.run(command, check=True)
  return json.loads(out.read_text())


def markdown(args, results: dict[str, dict]) -> str:
  """The report: ``results`` maps each setting's label to its measurement."""
  first = next(iter(results.values()))
  versions = "; ".join(f"{label}: {r['versions']}" for label, r in results.items())
  command = "python benchmarks/per_example.py"
  defaults = parse_args([])
  for flag in ("batch_size", "rounds", "steps", "threads"):
    if getattr(args, flag) != getattr(defaults, flag):
      command += f" --{flag.replace('_', '-')} {getattr(args, flag)}"
  lines = [
    f"Digits CNN (79,626 parameters), batch {args.batch_size}, clip to norm {MAX_NORM:g},"
    f" noise multiplier {NOISE:g}, SGD. {platform.machine()} CPU, {os.cpu_count()} cores"
    " shared with other jobs: absolute rates are noisy, the ratios were measured side by side"
    f" (best of {args.rounds} interleaved rounds of {args.steps} steps). Each thread setting"
    " ran in fresh processes (JAX in one, Opacus in another) pinned to it before jax or torch"
    f" was imported. {versions}.{load_line(results)}",
    "",
    f'Command: `{command}` (Opacus: `pip install -e ".[bench]"`)',
    "",
    "| DP-SGD step | threads | clipped examples / s | vs Opacus |",
    "|---|---|---:|---:|",
  ]
  for label, result in results.items():
    rates = result["rates"]
    reference = rates.get(OPACUS)
    for name, rate in sorted(rates.items(), key=lambda kv: -kv[1]):
      ratio = f"{rate / reference:.2f}x" if reference else "n/a"
      lines.append(f"| {name} | {label.removeprefix('threads=')} | {rate:,.0f} | {ratio} |")
  lines += [
    "",
    "Per-example norms alone (batch of per-example gradients precomputed):",
    "",
    "| per-example global norms | threads | ms | relative |",
    "|---|---|---:|---:|",
  ]
  for label, result in results.items():
    norm_times = result["norm_times"]
    fastest = min(norm_times.values())
    for name, seconds in norm_times.items():
      lines.append(
        f"| {name} | {label.removeprefix('threads=')} | {seconds * 1e3:.2f}"
        f" | {seconds / fastest:.2f}x |"
      )
  memory, batch_sizes = first.get("memory"), first.get("batch_sizes")
  if memory:
    lines += [
      "",
      "Peak temporary memory of the compiled clipped-gradient function"
      " (`memory_analysis().temp_size_in_bytes`, MiB):",
      "",
      "| batch size | " + " | ".join(str(b) for b in batch_sizes) + " |",
      "|---|" + "---:|" * len(batch_sizes),
    ]
    for name, row in memory.items():
      lines.append(f"| {name} | " + " | ".join(f"{b / 2**20:.1f}" for b in row) + " |")
  lines += ["", *targets(results, memory or {}, batch_sizes)]
  return "\n".join(lines)


def load_line(results: dict[str, dict]) -> str:
  """The machine's 1-minute load average at the start and end of each setting's run."""
  loads = [
    f"{label} {r['load'][0]:.1f} -> {r['load'][1]:.1f}"
    for label, r in results.items()
    if "load" in r
  ]
  return f" Load average (1 min, {os.cpu_count()} cores): {'; '.join(loads)}." if loads else ""


def targets(results: dict[str, dict], memory: dict[str, list[int]], batch_sizes) -> list[str]:
  """The issue 8 targets, met or not, in words, at each thread setting."""
  out = ["Targets (issue 8):", ""]
  for label, result in results.items():
    rates = result["rates"]
    opacus = rates.get(OPACUS)
    if opacus:
      best = max((r, n) for n, r in rates.items() if n.startswith("clipx"))
      verdict = "met" if best[0] >= 1.5 * opacus else "missed"
      out.append(
        f"- throughput >= 1.5x Opacus at {label}: {verdict}, {best[0] / opacus:.2f}x with"
        f" {best[1]} (unchunked vmap: {rates['clipx unchunked (vmap)'] / opacus:.2f}x)."
      )
    else:
      out.append(f"- throughput >= 1.5x Opacus at {label}: not measured (Opacus not installed).")
  out.append(
    "- Under vmap XLA makes a convolution's per-example kernel gradient a grouped"
    " convolution, which its CPU backend runs slowly; clipx computes convolutions as matrix"
    " products on CPU (the XLA convs rows switch that off)."
  )
  for name, row in memory.items():
    if name.startswith("clipx chunk"):
      growth = (row[-1] - row[0]) / 2**20
      out.append(
        f"- memory flat in batch size when chunked ({name}): {row[0] / 2**20:.1f} MiB at"
        f" {batch_sizes[0]}, {row[-1] / 2**20:.1f} MiB at {batch_sizes[-1]}; the"
        f" {growth:.1f} MiB of growth is the batch itself and its per-example norms,"
        " not gradients."
      )
  return out


def main(argv=None) -> str:
  args = parse_args(argv)
  if args.setting_out is not None:  # a child: one setting, pinned before jax is imported
    (setting,) = args.settings
    threads.pin(setting)
    import dp_cases

    args.setting_out.write_text(json.dumps(dp_cases.measure(args, setting, args.memory)))
    return ""

  workdir = outputs.raw_dir(outputs.resolve(args, "per_example"))
  results = {
    threads.label(s): measure_in_fresh_process(args, s, i == 0, workdir)
    for i, s in enumerate(args.settings)
  }
  report = "## Per-example clipping (DP-SGD)\n\n" + markdown(args, results)
  print(report)
  outputs.publish(report, args, "per_example", BEGIN, END)
  return report


if __name__ == "__main__":
  main()
