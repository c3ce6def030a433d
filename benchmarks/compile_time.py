"""Compile time of a clip + SGD step on the 1000-leaf tree, against SGD alone: the release bar.

The tree is ``benchmarks/run.py``'s compile case: 500 x ``{w: 16x16, b: 16}``,
abstract (nothing allocated). Each case is ``chain(<clip>, sgd(momentum=0.9))``
jitted with donated buffers, timed from ``jit`` to a compiled executable
(tracing, lowering and XLA's compile, each also reported), after
``jax.clear_caches()`` so every round is a real compile. The cases are
interleaved round by round in one process, pinned to one thread setting before
jax is imported (``threads.py``); a ratio is the median of the per-round ratios
to SGD's total. clipx's transforms keep their forensics (``source``/``share``)
on, as they always do. The bars (issue 26): a global clip at most 1.6x SGD,
AGC at most 2.5x.

    python benchmarks/compile_time.py      # writes runs/benchmarks/compile_time.md
    git worktree add /tmp/old 0690fce && python benchmarks/compile_time.py --clipx-from /tmp/old
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import threads  # noqa: E402

BARS = {"clipx.clip_by_global_norm + sgd": 1.6, "clipx.adaptive_grad_clip + sgd": 2.5}


def main(argv=None) -> str:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--threads", default="1", help="one setting: 1 or all")
  parser.add_argument("--leaves", type=int, default=1000)
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--out", default="runs/benchmarks/compile_time.md")
  parser.add_argument(
    "--clipx-from",
    default=None,
    help="a checkout (e.g. a git worktree of an older commit) to import clipx from,"
    " to measure that commit on today's jax and XLA",
  )
  args = parser.parse_args(argv)
  if args.clipx_from is not None:
    source = pathlib.Path(args.clipx_from).resolve()
    if not (source / "clipx" / "__init__.py").is_file():
      parser.error(f"--clipx-from {args.clipx_from}: no clipx/__init__.py there")
    sys.path.insert(0, str(source))
  setting = threads.parse(args.threads)
  threads.pin(setting)

  import jax
  import jax.numpy as jnp
  import optax

  import clipx

  def sgd():
    return optax.sgd(0.01, momentum=0.9)

  cases = {
    "sgd-momentum alone": sgd,
    "optax.clip_by_global_norm + sgd": lambda: optax.chain(optax.clip_by_global_norm(1.0), sgd()),
    "clipx.clip_by_global_norm + sgd": lambda: optax.chain(clipx.clip_by_global_norm(1.0), sgd()),
    "optax.adaptive_grad_clip + sgd": lambda: optax.chain(optax.adaptive_grad_clip(0.01), sgd()),
    "clipx.adaptive_grad_clip + sgd": lambda: optax.chain(clipx.adaptive_grad_clip(0.01), sgd()),
    "clipx.clip_by_layer_norm + sgd": lambda: optax.chain(clipx.clip_by_layer_norm(1.0), sgd()),
  }
  f32 = jnp.float32
  w, b = jax.ShapeDtypeStruct((16, 16), f32), jax.ShapeDtypeStruct((16,), f32)
  tree = {f"layer{i:04d}": {"w": w, "b": b} for i in range(args.leaves // 2)}

  def phases(make) -> tuple[float, float, float]:
    tx = make()
    state = jax.eval_shape(tx.init, tree)

    def step(params, opt_state, grads):
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    jax.clear_caches()  # a real compile, not a cache hit
    start = time.perf_counter()
    traced = jax.jit(step, donate_argnums=(0, 1)).trace(tree, state, tree)
    after_trace = time.perf_counter()
    lowered = traced.lower()
    after_lower = time.perf_counter()
    lowered.compile()
    end = time.perf_counter()
    return after_trace - start, after_lower - after_trace, end - after_lower

  phases(cases["sgd-momentum alone"])  # warm up the compiler
  seconds: dict[str, list[tuple[float, float, float]]] = {name: [] for name in cases}
  for round_ in range(args.rounds):
    names = list(cases) if round_ % 2 == 0 else list(reversed(cases))
    for name in names:
      seconds[name].append(phases(cases[name]))
      print(f"round {round_ + 1}: {name}: {sum(seconds[name][-1]):.2f} s", flush=True)

  base = [sum(t) for t in seconds["sgd-momentum alone"]]
  lines = [
    f"`python benchmarks/compile_time.py --threads {args.threads} --leaves {args.leaves}"
    f" --rounds {args.rounds}`: {args.leaves} leaves, jax {jax.__version__}, optax"
    f" {optax.__version__}, {jax.devices()[0].platform}, threads={setting}, clipx from"
    f" {pathlib.Path(clipx.__file__).parent.parent}. Median seconds"
    " (trace / lower / XLA compile); ratio = median of the per-round ratios to SGD's total.",
    "",
    "| step | trace s | lower s | compile s | total s | / sgd | bar | within |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for name, rounds in seconds.items():
    med = [statistics.median(t[i] for t in rounds) for i in range(3)]
    ratio = statistics.median(sum(t) / b for t, b in zip(rounds, base))
    bar = BARS.get(name)
    within = "" if bar is None else ("yes" if ratio <= bar else "no")
    cells = [f"{m:.2f}" for m in med] + [f"{sum(med):.2f}", f"{ratio:.2f}x"]
    cells += ["" if bar is None else f"<= {bar}x", within]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  text = "\n".join(lines) + "\n"
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(text)
  print(text)
  print(f"wrote {out}")
  return text


if __name__ == "__main__":
  main()
