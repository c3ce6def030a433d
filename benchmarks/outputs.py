"""Where a benchmark's report goes: a file under ``runs/``, and the README only when asked.

A benchmark run never writes into the repository's tracked files by default:
its Markdown report goes to ``runs/benchmarks/<script>-<time>.md`` (``runs/`` is
in .gitignore) or to ``--out``; ``--write-readme`` also puts it into the
script's own section of ``benchmarks/README.md`` (see ``readme_section``).
"""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path

from readme_section import README, write_section

ROOT = Path(__file__).resolve().parent.parent
RUNS = ROOT / "runs" / "benchmarks"


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument(
    "--out",
    type=Path,
    default=None,
    help="report file (default: runs/benchmarks/<script>-<time>.md)",
  )
  parser.add_argument(
    "--write-readme",
    action="store_true",
    help="also replace this script's section of benchmarks/README.md",
  )


def default_out(script: str) -> Path:
  """``runs/benchmarks/<script>-<YYYYmmdd-HHMMSS>.md``: a new file for every run."""
  stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
  return RUNS / f"{script}-{stamp}.md"


def resolve(args: argparse.Namespace, script: str) -> Path:
  """Fixes ``args.out`` (the default under runs/ if not given) and returns it."""
  args.out = args.out or default_out(script)
  return args.out


def raw_dir(out: Path) -> Path:
  """A folder beside the report for each thread setting's raw results (``<report>-raw/``)."""
  path = out.parent / f"{out.stem}-raw"
  path.mkdir(parents=True, exist_ok=True)
  return path


def publish(
  report: str, args: argparse.Namespace, script: str, begin: str, end: str, readme: Path = README
) -> Path:
  """Writes ``report`` to ``args.out`` (or the default under runs/); returns that path."""
  out = resolve(args, script)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(report + "\n")
  print(f"wrote {out}")
  if args.write_readme:
    write_section(begin, end, report, readme)
    print(f"updated {readme}")
  return out
