"""Reruns every trained figure quoted in the README: ``python examples/reproduce.py``.

A single run of a chaotic training (a too-high learning rate, injected spikes)
is not a fact: another CPU, another instruction set or another thread count
sends it elsewhere. So each experiment here trains over several seeds (0, 1, 2
by default), writes ``results/<experiment>.json`` (every seed's value, the
median, min and max, the command that reproduces one seed, and the machine),
and renders Markdown tables of ``median [min, max]`` into
``results/tables.md``. The README's tables are those blocks verbatim, between
``<!-- results:NAME -->`` and ``<!-- /results -->``; ``tests/test_results.py``
holds them to the committed files.

Adding an experiment is one decorated function from a seed (and the loaded
digits) to ``{row name: {metric: value}}``; its table goes where the README
says ``<!-- results:NAME -->`` / ``<!-- /results -->``::

  @experiment("my-example", "python examples/my_example.py --seed {seed}", row_header="run")
  def my_example(seed, dataset):
    from examples import my_example

    result = my_example.main(["--seed", str(seed), "--quiet"])
    return {"default": {"test_accuracy": result["test_accuracy"]}}

then ``python examples/reproduce.py --only my-example --sync-docs``. Metrics
named in ``METRICS`` get their column header and format.

Examples::

  python examples/reproduce.py --out results        # everything, seeds 0,1,2
  python examples/reproduce.py --only stability-spikes --seeds 0,1,2,3,4  # into runs/results
  python examples/reproduce.py --out results --tables-only  # re-render from results/*.json
  python examples/reproduce.py --out results --tables-only --sync-docs  # and into the README

Without ``--out`` it writes under ``runs/results``, never over the committed files.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

if not __package__:  # run as a script: make the examples package importable
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from examples import data  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"

# A 0/1 metric (solved, diverged) shows as how many seeds had it: "2/3".
COUNT = "count"
# Metric key -> (column header, format of one value, or COUNT). Unknown keys print with "{:.3g}".
METRICS = {
  "test_accuracy": ("test accuracy", "{:.3f}"),
  "clip_rate": ("clip rate", "{:.2f}"),
  "epsilon": ("epsilon", "{:.2f}"),
  "spikes_caught": ("large spikes clipped", "{:.0f}"),
  "spikes": ("large spikes (norm > 10x median)", "{:.0f}"),
  "test_loss": ("test MSE", "{:.3g}"),
  "solved": ("solved", COUNT),
  "diverged": ("diverged", COUNT),
  "baseline_loss": ("trivial predictor MSE", "{:.3g}"),
  "lr_sensitivity": ("LR sensitivity (bits/byte)", "{:.3f}"),
  "max_lr": ("highest lr that trains", "{:g}"),
  "loss_spikes": ("loss spikes over the grid", "{:.0f}"),
  "best_bpb": ("best bits/byte", "{:.3f}"),
}

Rows = dict[str, dict[str, float]]


@dataclass(frozen=True)
class Experiment:
  """One named experiment: ``run(seed, dataset) -> {row: {metric: value}}``."""

  name: str
  command: str  # reproduces one seed; ``{seed}`` is filled in
  row_header: str  # the table's first column
  run: Callable[[int, tuple[np.ndarray, ...]], Rows]


REGISTRY: dict[str, Experiment] = {}


def experiment(name: str, command: str, *, row_header: str) -> Callable:
  """Registers ``run`` under ``name`` (in the order the tables are written)."""

  def register(run: Callable[[int, tuple[np.ndarray, ...]], Rows]) -> Callable:
    REGISTRY[name] = Experiment(name, command, row_header, run)
    return run

  return register


def _accuracy_and_clip_rate(rows: list[dict[str, Any]]) -> Rows:
  return {
    r["name"]: {"test_accuracy": r["test_accuracy"], "clip_rate": r["clip_rate"]} for r in rows
  }


@experiment(
  "cnn-defaults", "python examples/train_cnn.py --clip CLIP --seed {seed}", row_header="`--clip`"
)
def cnn_defaults(seed: int, dataset: tuple[np.ndarray, ...]) -> Rows:
  """``train_cnn.py``'s defaults (digits, lr 0.01, 10 epochs) with every ``--clip``."""
  from examples import train_cnn

  rows = {}
  for clip in train_cnn.CLIPS:
    args = train_cnn.parse_args(["--clip", clip, "--seed", str(seed), "--quiet"])
    result = train_cnn.train(args, dataset)
    name = clip if args.max_norm is None else f"{clip} {args.max_norm:g}"
    rows[name] = {"test_accuracy": result["test_accuracy"], "clip_rate": result["clip_rate"]}
  return rows


@experiment(
  "stability-high-lr",
  "python examples/stability.py --experiment high-lr --seed {seed}",
  row_header="method",
)
def stability_high_lr(seed: int, dataset: tuple[np.ndarray, ...]) -> Rows:
  """lr 0.3, batch 8, 4 epochs: fixed thresholds, no clipping and the adaptive policies."""
  from examples import stability

  args = stability.parse_args(["--experiment", "high-lr", "--seed", str(seed), "--quiet"])
  return _accuracy_and_clip_rate(stability.high_lr(args, dataset))


@experiment(
  "stability-spikes",
  "python examples/stability.py --experiment spikes --seed {seed}",
  row_header="method",
)
def stability_spikes(seed: int, dataset: tuple[np.ndarray, ...]) -> Rows:
  """lr 0.05, every 50th batch's inputs x100, 10 epochs."""
  from examples import stability

  args = stability.parse_args(["--experiment", "spikes", "--seed", str(seed), "--quiet"])
  return _accuracy_and_clip_rate(stability.spikes(args, dataset))


@experiment("spike-methods", "python examples/spike_methods.py --seed {seed}", row_header="method")
def spike_methods(seed: int, dataset: tuple[np.ndarray, ...]) -> Rows:
  """Adam lr 0.01 (late decay), batch 8, 10 epochs, every 50th batch's inputs x100."""
  from examples import spike_methods

  args = spike_methods.parse_args(["--seed", str(seed), "--quiet"])
  return {
    method: {"test_accuracy": r["test_accuracy"], "clip_rate": r["clip_rate"]}
    for method, r in spike_methods.run(args, dataset).items()
  }


@experiment(
  "spike-methods-rnn",
  "python examples/spike_methods.py --task rnn --seed {seed}",
  row_header="method",
)
def spike_methods_rnn(seed: int, dataset: tuple[np.ndarray, ...]) -> Rows:
  """tanh RNN, adding problem of length 50, Adam lr 0.003 (constant), 10000 steps, no injection."""
  from examples import spike_methods

  args = spike_methods.parse_args(["--task", "rnn", "--seed", str(seed), "--quiet"])
  keys = ("test_loss", "solved", "diverged", "clip_rate")
  return {
    method: {key: float(r[key]) for key in keys} for method, r in spike_methods.run(args).items()
  }


@experiment(
  "threshold-sweep",
  "python examples/threshold_sweep.py --mode loop --seed {seed}",
  row_header="threshold",
)
def threshold_sweep_rows(seed: int, dataset: tuple[np.ndarray, ...]) -> Rows:
  """One model per global-norm threshold (lr 1.0, batch 32, 3 epochs)."""
  from examples import threshold_sweep

  args = threshold_sweep.parse_args(["--mode", "loop", "--seed", str(seed), "--quiet"])
  result = threshold_sweep.sweep(
    threshold_sweep.thresholds_of(args),
    dataset,
    mode="loop",
    lr=args.lr,
    momentum=args.momentum,
    schedule=args.schedule,
    epochs=args.epochs,
    batch_size=args.batch_size,
    seed=seed,
  )
  return {
    threshold_sweep.label(t): {"test_accuracy": acc, "clip_rate": rate}
    for t, acc, rate in zip(result["thresholds"], result["test_accuracy"], result["clip_rate"])
  }


@experiment(
  "data-parallel",
  "XLA_FLAGS=--xla_force_host_platform_device_count=8 python examples/train_cnn.py --epochs 3"
  " --seed {seed}",
  row_header="devices",
)
def data_parallel(seed: int, dataset: tuple[np.ndarray, ...]) -> Rows:
  """``train_cnn.py --epochs 3`` on 8 simulated CPU devices (a data-parallel mesh) and on 1."""
  import subprocess
  import tempfile

  rows = {}
  for devices in (1, 8):
    with tempfile.TemporaryDirectory() as out:
      # The device count is fixed when JAX starts: one fresh process per count.
      flags = f"--xla_force_host_platform_device_count={devices}"
      env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags)
      argv = ["--epochs", "3", "--seed", str(seed), "--quiet", "--out", out]
      script = str(ROOT / "examples" / "train_cnn.py")
      subprocess.run([sys.executable, script, *argv], check=True, env=env, capture_output=True)
      metrics = json.loads((Path(out) / "metrics.json").read_text())
    rows[f"{devices} device" + "s" * (devices > 1)] = {"test_accuracy": metrics["test_accuracy"]}
  return rows


@experiment(
  "policy-replay",
  "python examples/adaptive_thresholds.py --seed {seed}",
  row_header="policy (replayed)",
)
def policy_replay(seed: int, dataset: tuple[np.ndarray, ...]) -> Rows:
  """Each policy replayed over one spiked run's norm trace (lr 0.05, inputs x100 every 50)."""
  import tempfile

  from examples import adaptive_thresholds

  with tempfile.TemporaryDirectory() as out:
    args = adaptive_thresholds.parse_args(["--seed", str(seed), "--out", out])
    norms, period = adaptive_thresholds.record_trace(args, Path(out))
  spikes = np.arange(period - 1, len(norms), period)
  rows = {}
  for name, make in adaptive_thresholds.POLICIES.items():
    thresholds = adaptive_thresholds.replay(make(), norms)
    summary = adaptive_thresholds.summarise(norms, thresholds, spikes)
    rows[name] = {key: summary[key] for key in ("clip_rate", "spikes_caught", "spikes")}
  return rows


@experiment("dp-sgd", "python examples/dp_train_cnn.py --seed {seed}", row_header="run")
def dp_sgd(seed: int, dataset: tuple[np.ndarray, ...]) -> Rows:
  """DP-SGD with the script's defaults; epsilon at delta 1e-5 (needs dp-accounting)."""
  from examples import dp_train_cnn

  result = dp_train_cnn.main(["--seed", str(seed), "--quiet"])
  metrics = {"test_accuracy": result["test_accuracy"]}
  if result["epsilon"] is not None:
    metrics["epsilon"] = result["epsilon"]
  return {"DP-SGD, delta 1e-5": metrics}


@experiment(
  "rnn-adding", "python examples/train_rnn.py --clip CLIP --seed {seed}", row_header="`--clip`"
)
def rnn_adding(seed: int, dataset: tuple[np.ndarray, ...]) -> Rows:
  """``train_rnn.py``'s defaults (tanh RNN, adding problem of length 50, lr 0.01, 10000 steps)."""
  from examples import train_rnn

  rows = {}
  for row in train_rnn.run_seeds(seeds=(seed,), clips=("none", "global"))["rows"]:
    args = train_rnn.parse_args(["--clip", row["clip"]])
    name = row["clip"] if args.max_norm is None else f"{row['clip']} {args.max_norm:g}"
    rows[name] = {
      "test_loss": row["test_loss"],
      "solved": float(row["solved"]),
      "diverged": float(row["diverged"]),
      "baseline_loss": row["baseline_loss"],
    }
  return rows


def machine() -> dict[str, Any]:
  """What the results depend on: CPU, core count, XLA's threads and the library versions."""
  import flax
  import jax
  import optax

  cpu = platform.processor() or platform.machine()
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        cpu = line.split(":", 1)[1].strip()
        break
  except OSError:
    pass
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return {
    "platform": platform.platform(),
    "cpu": cpu,
    "cores": cores,
    # XLA CPU runs one intra-op thread per usable core unless XLA_FLAGS says otherwise.
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "backend": jax.default_backend(),
    "python": platform.python_version(),
    "jax": jax.__version__,
    "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__") else jax.__version__,
    "flax": flax.__version__,
    "optax": optax.__version__,
    "numpy": np.__version__,
  }


def summarize(values: Sequence[float]) -> dict[str, Any]:
  """Per-seed values with their median, min and max."""
  values = [float(v) for v in values]
  return {
    "values": values,
    "median": float(np.median(values)),
    "min": float(np.min(values)),
    "max": float(np.max(values)),
  }


def run_experiment(exp: Experiment, seeds: Sequence[int], dataset) -> dict[str, Any]:
  """Runs every seed and returns the results file's content."""
  start = time.perf_counter()
  per_seed: list[Rows] = []
  for seed in seeds:
    print(f"{exp.name}: seed {seed} ...", flush=True)
    per_seed.append(exp.run(seed, dataset))
  rows = []
  for name in per_seed[0]:
    metrics = {
      key: summarize([seed_rows[name][key] for seed_rows in per_seed]) for key in per_seed[0][name]
    }
    rows.append({"name": name, "metrics": metrics})
  return {
    "experiment": exp.name,
    "description": (exp.run.__doc__ or "").strip(),
    "command": exp.command,
    "seeds": list(seeds),
    "row_header": exp.row_header,
    "rows": rows,
    "machine": machine(),
    "wall_seconds": time.perf_counter() - start,
  }


def cell(key: str, stat: dict[str, Any]) -> str:
  fmt = METRICS.get(key, (key, "{:.3g}"))[1]
  if fmt == COUNT:
    return f"{sum(v != 0 for v in stat['values'])}/{len(stat['values'])}"
  median, low, high = (fmt.format(stat[k]) for k in ("median", "min", "max"))
  return f"{median} [{low}, {high}]"


def render_table(results: dict[str, Any]) -> str:
  """The Markdown table of one results file: a row per configuration, median [min, max]."""
  keys = list(dict.fromkeys(k for row in results["rows"] for k in row["metrics"]))
  headers = [results["row_header"], *(METRICS.get(k, (k,))[0] for k in keys)]
  lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
  for row in results["rows"]:
    cells = [cell(k, row["metrics"][k]) if k in row["metrics"] else "" for k in keys]
    lines.append("| " + " | ".join([row["name"], *cells]) + " |")
  seeds = ", ".join(str(s) for s in results["seeds"])
  command = results["command"].replace("{seed}", "S")
  caption = f"Median [min, max] over seeds {seeds}; one seed: `{command}`."
  return "\n".join([caption, "", *lines])


def render_machine(all_results: Sequence[dict[str, Any]]) -> str:
  """One line per distinct machine the committed results came from."""
  lines = []
  for m in dict.fromkeys(json.dumps(r["machine"], sort_keys=True) for r in all_results):
    m = json.loads(m)
    threads = m["xla_flags"] or "XLA's default: one thread per core"
    lines.append(
      f"{m['cpu']}, {m['cores']} cores ({threads}), {m['platform']};"
      f" jax {m['jax']}, flax {m['flax']}, optax {m['optax']}, numpy {m['numpy']}"
    )
  return "\n".join(lines)


def load_results(results_dir: Path = RESULTS) -> dict[str, dict[str, Any]]:
  """``results/*.json`` by experiment name, registry order first."""
  found = {p.stem: json.loads(p.read_text()) for p in sorted(results_dir.glob("*.json"))}
  order = [n for n in REGISTRY if n in found] + [n for n in found if n not in REGISTRY]
  return {name: found[name] for name in order}


def blocks(results_dir: Path = RESULTS) -> dict[str, str]:
  """Block name -> the Markdown between ``<!-- results:NAME -->`` and ``<!-- /results -->``."""
  all_results = load_results(results_dir)
  rendered = {name: render_table(r) for name, r in all_results.items()}
  if all_results:
    rendered["machine"] = render_machine(list(all_results.values()))
  return rendered


def render_document(results_dir: Path = RESULTS) -> str:
  """``results/tables.md``: every block, marked as the README marks it."""
  parts = ["# Results (written by `python examples/reproduce.py`; do not edit)", ""]
  for name, text in blocks(results_dir).items():
    parts += [f"## {name}", "", f"<!-- results:{name} -->", text, "<!-- /results -->", ""]
  return "\n".join(parts)


# A block's opening line, its old content (possibly none) and its closing line.
BLOCK = re.compile(r"(<!-- results:([\w-]+) -->\n)(?:.*?\n)??(<!-- /results -->)", re.S)


def sync_documents(documents: Sequence[Path], results_dir: Path = RESULTS) -> list[Path]:
  """Rewrites every marked block of ``documents`` with its rendering; returns those changed."""
  rendered = blocks(results_dir)
  changed = []
  for document in documents:
    text = document.read_text()
    new = BLOCK.sub(lambda m: m[1] + rendered.get(m[2], "(no results file)") + "\n" + m[3], text)
    if new != text:
      document.write_text(new)
      changed.append(document)
  return changed


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
    description="Rerun the README's trained figures over several seeds.",
    formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  parser.add_argument("--only", default="", help=f"comma-separated, of: {', '.join(REGISTRY)}")
  parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (at least 3)")
  parser.add_argument(
    "--out",
    default="runs/results",
    help="folder of the results files (the committed ones: --out results)",
  )
  parser.add_argument(
    "--tables-only", action="store_true", help="re-render the tables from the results files"
  )
  parser.add_argument(
    "--sync-docs",
    action="store_true",
    help="also rewrite the marked blocks of README.md and docs/*.md from the results files",
  )
  args = parser.parse_args(argv)
  args.only = [n for n in args.only.split(",") if n] or list(REGISTRY)
  unknown = [n for n in args.only if n not in REGISTRY]
  if unknown:
    parser.error(f"unknown experiments {unknown}; choose from {', '.join(REGISTRY)}")
  try:
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
  except ValueError:
    parser.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
  if len(args.seeds) < 3:
    parser.error("--seeds: give at least 3 (one run of a chaotic training is not a figure)")
  return args


def main(argv: Sequence[str] | None = None) -> None:
  args = parse_args(argv)
  out = Path(args.out)
  if not args.tables_only:
    out.mkdir(parents=True, exist_ok=True)
    dataset = data.load_or_exit("digits", None)
    for name in args.only:
      results = run_experiment(REGISTRY[name], args.seeds, dataset)
      (out / f"{name}.json").write_text(json.dumps(results, indent=1, allow_nan=False) + "\n")
      print(f"{name}: {results['wall_seconds']:.0f} s, wrote {out / name}.json", flush=True)
  document = render_document(out)
  (out / "tables.md").write_text(document)
  print(document)
  if args.sync_docs:
    documents = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for path in sync_documents(documents, out):
      print(f"updated the results blocks of {path.relative_to(ROOT)}")


if __name__ == "__main__":
  main()
