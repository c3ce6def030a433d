"""Compile time of the rescaling responses against a global clip, on 100 and 1000 leaves.

``rescale_outliers``, ``normalize_by_layer_norm`` and ``stable_spam_clip``
once did their work leaf by leaf, reading each leaf's factors with a static
slice (a distinct kernel per leaf): ``stable_spam_clip`` compiled 100 leaves
in 7.6x a global clip's time, and 1000 not within 6.5 minutes (issue 24, item
15). Each case is ``chain(<clip>, sgd(momentum=0.9))`` on the tree of
``benchmarks/run.py``'s compile case (``n / 2`` x ``{w: 16x16, b: 16}``),
lowered and compiled from abstract shapes (nothing allocated), every case
interleaved round by round with the global clip in one process, pinned to one
thread setting before jax is imported (``threads.py``). The ratio is the median
of the per-round ratios to the global clip's compile.

    python benchmarks/rescaling_compile.py        # writes runs/benchmarks/rescaling_compile.md
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import threads  # noqa: E402

CASES = ("global clip", "rescale_outliers(ema_peak())", "normalize_by_layer_norm()")
CASES += ("stable_spam_clip()",)


def main(argv=None) -> str:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--threads", default="1", help="one setting: 1 or all")
  parser.add_argument("--leaves", default="100,1000")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--out", default="runs/benchmarks/rescaling_compile.md")
  args = parser.parse_args(argv)
  setting = threads.parse(args.threads)
  threads.pin(setting)

  import jax
  import jax.numpy as jnp
  import optax

  import clipx

  make = {
    CASES[0]: lambda: clipx.clip_by_global_norm(1.0),
    CASES[1]: lambda: clipx.rescale_outliers(clipx.ema_peak()),
    CASES[2]: lambda: clipx.normalize_by_layer_norm(),
    CASES[3]: lambda: clipx.stable_spam_clip(),
  }

  def tree(num_leaves: int) -> list[dict]:
    f32 = jnp.float32
    w, b = jax.ShapeDtypeStruct((16, 16), f32), jax.ShapeDtypeStruct((16,), f32)
    return [{"w": w, "b": b} for _ in range(num_leaves // 2)]

  def compile_seconds(name: str, num_leaves: int) -> float:
    tx = optax.chain(make[name](), optax.sgd(0.1, momentum=0.9))
    grads = tree(num_leaves)
    state = jax.eval_shape(tx.init, grads)

    def step(grads, state, params):
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    jax.clear_caches()  # a real compile each time, not a cache hit
    start = time.perf_counter()
    jax.jit(step).lower(grads, state, grads).compile()
    return time.perf_counter() - start

  compile_seconds(CASES[0], 10)  # warm up the compiler
  counts = [int(n) for n in args.leaves.split(",")]
  seconds = {(name, n): [] for name in CASES for n in counts}
  for round_ in range(args.rounds):
    for n in counts:
      for name in CASES:
        seconds[name, n].append(compile_seconds(name, n))
        print(f"round {round_}, {n} leaves, {name}: {seconds[name, n][-1]:.2f} s", flush=True)

  def ratio(name: str, n: int) -> float:
    pairs = zip(seconds[name, n], seconds[CASES[0], n])
    return statistics.median(a / b for a, b in pairs)

  head = " | ".join(f"{n} leaves: s, ratio" for n in counts)
  lines = [
    f"Compile time of `chain(<clip>, sgd(momentum=0.9))` on n / 2 x {{w: 16x16, b: 16}},"
    f" median of {args.rounds} interleaved rounds (seconds; ratio: median of the per-round"
    f" ratios to the global clip), jax {jax.__version__}, {jax.default_backend()},"
    f" {threads.label(setting)}:",
    "",
    f"| clip | {head} |",
    "|---|" + "---|" * len(counts),
  ]
  for name in CASES:
    cells = [f"{statistics.median(seconds[name, n]):.2f}, {ratio(name, n):.2f}x" for n in counts]
    lines.append(f"| {name} | {' | '.join(cells)} |")
  text = "\n".join(lines) + "\n"
  print(text)
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(text)
  return text


if __name__ == "__main__":
  main()
