"""Learning-rate sensitivity of the language model, with and without clipping.

``python examples/lm_sweep.py`` trains ``train_lm.py``'s transformer for every
method over a log-spaced grid of AdamW learning rates and several seeds, and
reports per method (Wortsman et al. 2023, `Small-scale proxies for
large-scale Transformer training instabilities
<https://arxiv.org/abs/2309.14322>`_):

- **LR sensitivity**: the mean over the grid of ``min(final loss, initial
  loss)`` minus the best final loss over the grid (validation bits per byte;
  lower is more robust), computed per seed;
- the **highest learning rate that trains**, per seed and on every seed; a run
  *trains* when its final validation loss is
  finite and at most 10% above the best final loss of its seed over the whole
  sweep (every method and learning rate);
- the number of loss spikes (``lm_report``'s definition) over the grid;
- the best final validation bits per byte.

A run is one compiled ``lax.scan`` over the steps, the same computation as
``train_lm.py`` with the same flags (same initialisation, batches and
schedule); each method compiles once for all its runs. ``--batch-mode vmap``
batches a method's whole grid (learning rates x seeds) into one program with
``jax.vmap`` instead: on 2 CPU cores that was slower, 36 s against 20 s for
the 9 runs of 100 steps of ``--methods "global 1.0" --lrs 1e-3,1e-2,1e-1
--steps 100 --layers 2`` (compile included, same results to float32
rounding), so one run at a time is the default.

It writes ``<out>/lm-lr-sweep.json`` (the ``results/`` schema of
``reproduce.py``, plus the whole grid) and the loss-vs-learning-rate figure.
The settings were chosen by measurement, with this script itself: at 2 layers
of width 64 and 300 steps, ``--methods "none,global 1.0" --seeds 0 --lrs
1e-3,3e-3,1e-2,3e-2,1e-1,3e-1,1 --steps 300 --layers 2`` (86 s) put the
unclipped model's best rate at 1e-2 and its final loss at lr 1 near the
unigram baseline, with the largest attention logit 2e5 (against 54 at 1e-2);
a step costs about 20 ms at 4 layers, so 8 methods x 7 rates x 3 seeds of 500
steps fit in the ~45 minutes the sweep may take on 2 cores (it took 51 with
other work beside it). ``--from-results FILE`` re-summarizes a finished sweep
without training, or with ``--methods`` trains those methods at its settings
and adds them to it (the frontier methods were added so, in a second run).

To refresh the committed files::

  python examples/lm_sweep.py --out results --figure docs/img/lm_lr_sweep.png
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

if not __package__:  # run as a script: make the examples package importable
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from examples import cli, lm, lm_data, lm_report, reproduce, train_lm  # noqa: E402

# Sweep name -> (train_lm --clip, --max-norm or None for its default).
METHODS: dict[str, tuple[str, float | None]] = {
  "none": ("none", None),
  "global 1.0": ("global", 1.0),
  "layer 0.5 (stacked)": ("layer", 0.5),
  "zclip": ("zclip", None),
  "adagc": ("adagc", None),
  "stable_spam_clip": ("stable_spam_clip", None),
  "skip_spikes": ("skip_spikes", None),
  "block_rms 1.0 (update)": ("block_rms", 1.0),
  "growth_limit 1.01 (Fira)": ("growth_limit", None),
  "stable_adamw": ("stable_adamw", None),
  "spam": ("spam", None),
  "clippy": ("clippy", None),
  "qk_clip 100": ("qk_clip", 100.0),
}
DEFAULT_LRS = "1e-3,3e-3,1e-2,3e-2,1e-1,3e-1,1"
TRAINS_WITHIN = 1.1  # a run trains: final loss at most 10% above its seed's best in the sweep


def lr_sensitivity(final: np.ndarray, initial: float) -> float:
  """Wortsman et al.'s LR sensitivity of one seed: ``final`` holds one loss per learning rate.

  ``E_lr[min(final, initial)] - min_lr final``; a non-finite final loss counts
  as the initial loss.
  """
  final = np.where(np.isfinite(final), final, initial)
  return float(np.mean(np.minimum(final, initial)) - np.min(final))


def highest_training_lr(lrs: Sequence[float], trains: Sequence[bool]) -> float:
  """The highest learning rate whose run trains (0 if none does)."""
  return max((lr for lr, ok in zip(lrs, trains) if ok), default=0.0)


def make_grid_runner(args: argparse.Namespace, clip: str, max_norm: float | None, data, windows):
  """``(lrs, seeds) -> (initial, final, metrics)`` of one method; leading axes (lr, seed)."""
  config = train_lm.config_of(args)
  definition = lm.define(config)
  stacked = train_lm.layer_axes(definition)
  max_norm = max_norm if max_norm is not None else train_lm.CLIPS[clip][1]

  def run(lr, params, seed):
    tx = train_lm.make_optimizer(
      clip, max_norm, train_lm.schedule(lr, args.steps, args.warmup_steps), stacked, args.heads
    )
    probe = train_lm.forensics_probe(stacked)
    step = train_lm.make_train_step(definition.apply_fn, tx, probe, args.batch_size, args.seq_len)
    evaluate = lambda p: lm.next_byte_loss(definition.apply_fn, p, windows)[0]  # noqa: E731

    def body(carry, key):
      params, opt_state, probe_state = carry
      params, opt_state, probe_state, metrics = step(params, opt_state, probe_state, data, key)
      return (params, opt_state, probe_state), metrics

    keys = jax.random.split(jax.random.key(seed), args.steps)
    carry = (params, tx.init(params), probe.init(params))
    (trained, _, _), metrics = jax.lax.scan(body, carry, keys)
    return lm.bits(evaluate(params)), lm.bits(evaluate(trained)), metrics

  abstract_params = jax.eval_shape(definition.create_params, 0)
  names = jax.eval_shape(train_lm.forensics_probe(stacked).init, abstract_params).names.names
  # Each seed's parameters drawn outside the vmap, as train_lm.py draws them: JAX's "rbg"
  # keys give other bits under vmap than one at a time.
  create_params = jax.jit(definition.create_params)
  initial_params = lambda seeds: [create_params(np.uint32(s)) for s in seeds]  # noqa: E731
  if args.batch_mode == "vmap":
    grid = jax.jit(jax.vmap(jax.vmap(run, (None, 0, 0)), (0, None, None)))

    def batched(lrs, seeds):
      params = jax.tree.map(lambda *x: jnp.stack(x), *initial_params(seeds))
      return grid(jnp.asarray(lrs, jnp.float32), params, jnp.asarray(seeds, jnp.uint32))

    return batched, names

  single = jax.jit(run)

  def loop(lrs, seeds):
    params = initial_params(seeds)
    outs = [
      [single(jnp.float32(lr), p, jnp.uint32(seed)) for p, seed in zip(params, seeds)] for lr in lrs
    ]
    flat = [o for row in outs for o in row]
    return jax.tree.map(lambda *x: jnp.stack(x).reshape(len(lrs), len(seeds), *x[0].shape), *flat)

  return loop, names


def method_runs(
  lrs: list[float], seeds: list[int], initial, final, metrics, names: tuple[str, ...]
) -> list[dict[str, Any]]:
  """One record per (learning rate, seed) of one method: losses, clip rate, spikes, logits."""
  losses = np.asarray(metrics["loss"], np.float64)
  runs = []
  for j, seed in enumerate(seeds):
    for i, lr in enumerate(lrs):
      final_bpb = float(final[i, j])
      runs.append(
        {
          "lr": lr,
          "seed": seed,
          "initial_bits_per_byte": float(initial[i, j]),
          "validation_bits_per_byte": final_bpb
          if math.isfinite(final_bpb) and np.all(np.isfinite(losses[i, j]))
          else None,
          "clip_rate": float(np.mean(metrics["clipped"][i, j])),
          "spikes": lm_report.spikes(
            losses[i, j], np.asarray(metrics["source"][i, j]), metrics["share"][i, j], names
          ),
          "attention_logit_max": float(np.nanmax(metrics["logit_max"][i, j])),
        }
      )
  return runs


def summarize(grid: dict[str, list[dict[str, Any]]], lrs: list[float], seeds: list[int]) -> list:
  """The results rows: per method, each seed's LR sensitivity, highest LR that trains, spikes, best.

  Marks each run ``trains``: finite, and its final loss within ``TRAINS_WITHIN`` of
  the best final loss of that seed over the whole sweep (every method and rate).
  """
  best_of_seed = {
    seed: min(
      r["validation_bits_per_byte"]
      for runs in grid.values()
      for r in runs
      if r["seed"] == seed and r["validation_bits_per_byte"] is not None
    )
    for seed in seeds
  }
  rows = []
  for method, runs in grid.items():
    per_seed: dict[str, list[float]] = {
      "lr_sensitivity": [],
      "max_lr": [],
      "loss_spikes": [],
      "best_bpb": [],
    }
    for seed in seeds:
      mine = sorted((r for r in runs if r["seed"] == seed), key=lambda r: r["lr"])
      final = np.array(
        [
          np.nan if r["validation_bits_per_byte"] is None else r["validation_bits_per_byte"]
          for r in mine
        ]
      )
      for run, value in zip(mine, final):
        run["trains"] = bool(value <= TRAINS_WITHIN * best_of_seed[seed])  # NaN: False
      per_seed["lr_sensitivity"].append(lr_sensitivity(final, mine[0]["initial_bits_per_byte"]))
      per_seed["max_lr"].append(highest_training_lr(lrs, [r["trains"] for r in mine]))
      per_seed["loss_spikes"].append(sum(len(r["spikes"]) for r in mine))
      per_seed["best_bpb"].append(float(np.nanmin(final)))
    rows.append(
      {"name": method, "metrics": {k: reproduce.summarize(v) for k, v in per_seed.items()}}
    )
  return rows


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
    description="Learning-rate sensitivity of the byte-level transformer, per clipping method.",
    formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  parser.add_argument(
    "--methods",
    default=None,
    help=f"comma-separated, of: {', '.join(METHODS)} (default: all; with --from-results: none)",
  )
  parser.add_argument("--lrs", default=DEFAULT_LRS, help="comma-separated learning rates")
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--steps", type=cli.positive_int, default=500)
  parser.add_argument("--warmup-steps", type=cli.nonnegative_int, default=0, help="0: no warm-up")
  parser.add_argument("--batch-size", type=cli.positive_int, default=16)
  parser.add_argument("--seq-len", type=cli.positive_int, default=64)
  parser.add_argument("--layers", type=cli.positive_int, default=4)
  parser.add_argument("--width", type=cli.positive_int, default=64)
  parser.add_argument("--heads", type=cli.positive_int, default=4)
  parser.add_argument("--layer-axis", type=int, choices=(0, 1), default=0)
  parser.add_argument("--bfloat16", action="store_true")
  parser.add_argument("--batch-mode", choices=("vmap", "loop"), default="loop")
  parser.add_argument("--out", default="runs/lm-lr-sweep", help="folder for the results file")
  parser.add_argument("--figure", default=None, help="default: <out>/lm_lr_sweep.png")
  parser.add_argument(
    "--from-results",
    default=None,
    help="start from this lm-lr-sweep.json (its settings and grid): re-summarize it, and"
    " train only the --methods given, adding or replacing them",
  )
  parser.add_argument("--quiet", action="store_true")
  args = parser.parse_args(argv)
  if args.methods is None:
    args.methods = "" if args.from_results else ",".join(METHODS)
  args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
  unknown = [m for m in args.methods if m not in METHODS]
  if unknown:
    parser.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
  try:
    args.lrs = sorted(float(v) for v in args.lrs.split(","))
    args.seeds = [int(v) for v in args.seeds.split(",")]
  except ValueError as error:
    parser.error(f"--lrs and --seeds take comma-separated numbers: {error}")
  if not all(lr > 0 and math.isfinite(lr) for lr in args.lrs):
    parser.error(f"--lrs must be positive, got {args.lrs}")
  if args.steps < 1 or not 0 <= args.warmup_steps < args.steps:
    parser.error("--steps must be >= 1 and --warmup-steps in [0, --steps)")
  return args


def every_seed(grid: dict[str, list[dict[str, Any]]], lrs: list[float]) -> dict[str, float]:
  """Per method, the highest learning rate whose runs train on every seed (after ``summarize``)."""
  return {
    method: highest_training_lr(
      lrs, [all(r["trains"] for r in runs if r["lr"] == lr) for lr in lrs]
    )
    for method, runs in grid.items()
  }


def results_file(args: argparse.Namespace, corpus, unigram: float, grid: dict, timings: dict):
  """The ``lm-lr-sweep.json`` content for the methods run so far."""
  return {
    "experiment": "lm-lr-sweep",
    "description": (
      "Byte-level transformer on the Python standard library, AdamW over a learning-rate grid"
      " (Wortsman et al. 2023's LR sensitivity, validation bits per byte)."
    ),
    "command": "python examples/lm_sweep.py --seeds {seed}",
    "seeds": args.seeds,
    "row_header": "method",
    "rows": summarize(grid, args.lrs, args.seeds),
    "highest_lr_training_on_every_seed": every_seed(grid, args.lrs),
    "learning_rates": args.lrs,
    "settings": {
      k: v
      for k, v in vars(args).items()
      if k not in ("methods", "lrs", "seeds", "out", "figure", "from_results", "quiet")
    },
    "corpus": {
      "sha256": corpus.sha256,
      "bytes": corpus.num_bytes,
      "documents": corpus.num_documents,
      "python": corpus.python,
    },
    "unigram_bits_per_byte": unigram,
    "trains_definition": f"finite and final loss <= {TRAINS_WITHIN} x the seed's best in the sweep",
    "spike_definition": lm_report.SPIKE_DEFINITION,
    "grid": grid,
    "seconds_per_method": timings,
    "machine": reproduce.machine(),
  }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  start = time.perf_counter()
  corpus = lm_data.build_corpus()
  data = lm_data.as_device(corpus.train)
  windows = lm_data.as_device(
    lm_data.validation_windows(corpus.validation, train_lm.EVAL_WINDOWS, args.seq_len)
  )
  unigram = lm_data.unigram_bits_per_byte(corpus.train, corpus.validation)
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  grid: dict[str, list] = {}
  timings: dict[str, float] = {}
  if args.from_results:  # the settings and runs of a finished sweep, summarized anew
    previous = json.loads(Path(args.from_results).read_text())
    for key, value in previous["settings"].items():
      if key != "from_results":
        setattr(args, key, value)
    args.lrs, args.seeds = previous["learning_rates"], previous["seeds"]
    grid, timings = previous["grid"], previous["seconds_per_method"]
    start -= previous.get("wall_seconds", 0.0)
  methods = tqdm(args.methods, disable=args.quiet, desc="methods")
  for method in methods:
    methods.set_postfix(method=method)
    clip, max_norm = METHODS[method]
    method_start = time.perf_counter()
    runner, names = make_grid_runner(args, clip, max_norm, data, windows)
    initial, final, metrics = jax.device_get(runner(args.lrs, args.seeds))
    timings[method] = time.perf_counter() - method_start
    grid[method] = method_runs(args.lrs, args.seeds, initial, final, metrics, names)
    results = results_file(args, corpus, unigram, grid, timings)  # written after every method
    (out / "lm-lr-sweep.json").write_text(json.dumps(results, indent=1) + "\n")
  methods.close()
  results = results_file(args, corpus, unigram, grid, timings)
  results["wall_seconds"] = time.perf_counter() - start
  (out / "lm-lr-sweep.json").write_text(json.dumps(results, indent=1) + "\n")
  figure = Path(args.figure) if args.figure else out / "lm_lr_sweep.png"
  lm_report.plot_sweep(results, figure)
  if not args.quiet:
    print(reproduce.render_table(results))
    print(f"wrote {out / 'lm-lr-sweep.json'} and {figure} in {results['wall_seconds']:.0f} s")
  return results


if __name__ == "__main__":
  main()
