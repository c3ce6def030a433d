"""Speed, compile time and memory of clipx against Optax and PyTorch: ``python benchmarks/run.py``.

Every figure is a ratio measured side by side in one run: the cases of a
table run interleaved, round after round, so load from other processes on a
shared machine hits them alike. Each row reports the median and the minimum
time per step over the rounds, and its ratio to the row it is compared with
(the median of the per-round ratios, and min over min; ``timing.py``).
Absolute times are noise on a shared CPU; the ratios are the numbers to trust.

Thread settings (``threads.py``): the whole measurement runs once per setting
(``--threads 1,all`` by default), each in a fresh process pinned to it before
jax is imported; torch's rows come from a process of their own with the same
setting (``torch_optimizer_worker.py``). Every ratio is printed beside its
setting.

What is measured is in ``clipping_cases.py``, the trees in ``trees.py``, the
Markdown in ``report.py``. The report goes to ``runs/benchmarks/`` (or
``--out``); ``--write-readme`` also replaces this script's section of
``benchmarks/README.md``. ``--quick`` runs a scaled-down version in seconds (the
CI smoke test).
"""

from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when imported by path

import outputs  # noqa: E402
import threads  # noqa: E402

BEGIN, END = "<!-- run:begin -->", "<!-- run:end -->"


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="small trees, few rounds (CI smoke)")
  parser.add_argument("--rounds", type=int, default=None, help="timing rounds per table")
  parser.add_argument("--iters", type=int, default=None, help="steps per case per round")
  parser.add_argument(
    "--compile-rounds", type=int, default=None, help="compiles per case (slow: up to minutes)"
  )
  parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch rows")
  parser.add_argument(
    "--threads",
    default=",".join(threads.SETTINGS),
    help="thread settings, each measured in a fresh process: 'all' or a core count (default 1,all)",
  )
  parser.add_argument("--setting-out", type=Path, help=argparse.SUPPRESS)  # one setting's child
  outputs.add_arguments(parser)
  args = parser.parse_args(argv)
  args.settings = [threads.parse(s) for s in args.threads.split(",")]
  return args


def forwarded(args: argparse.Namespace) -> list[str]:
  """The measurement's arguments, for a child process."""
  out = ["--quick"] if args.quick else []
  for flag in ("rounds", "iters", "compile_rounds"):
    if getattr(args, flag) is not None:
      out += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
  return out + (["--no-torch"] if args.no_torch else [])


def measure_in_fresh_process(args: argparse.Namespace, setting: int | None, workdir: Path) -> str:
  """One setting's tables, from ``python run.py --threads <setting>`` in a new process."""
  name = "all" if setting is None else str(setting)
  section = workdir / f"threads-{name}.md"
  command = [sys.executable, __file__, *forwarded(args), "--threads", name]
  subprocess.run([*command, "--setting-out", str(section)], check=True)
  return section.read_text()


def main(argv=None) -> str:
  args = parse_args(argv)
  if args.setting_out is not None:  # a child: one setting, pinned before jax is imported
    (setting,) = args.settings
    threads.pin(setting)
    import clipping_cases

    args.setting_out.write_text(clipping_cases.measure(args, setting, threads.label(setting)))
    return ""

  workdir = outputs.raw_dir(outputs.resolve(args, "run"))
  sections = [measure_in_fresh_process(args, s, workdir) for s in args.settings]
  command = " ".join(["python benchmarks/run.py", *forwarded(args)])
  if args.threads != ",".join(threads.SETTINGS):
    command += f" --threads {args.threads}"
  report = "\n\n".join(
    [
      "## Clipping speed, compile time and memory",
      f"`{command}`, {datetime.date.today().isoformat()}. Settings: "
      + ", ".join(threads.label(s) for s in args.settings)
      + "; each measured in a fresh process pinned before jax or torch was imported (torch"
      " in a process of its own). Ratio = median of the per-round ratios / min over min."
      " Temp MiB: XLA's compiled `memory_analysis().temp_size_in_bytes` of the step.",
      *sections,
      __import__("report").NOTES.strip(),
    ]
  )
  print(report)
  outputs.publish(report, args, "run", BEGIN, END)
  return report


if __name__ == "__main__":
  main()
