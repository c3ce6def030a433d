"""Compile time of per-layer and unit-wise clipping on stacked layers, 2 against 48 layers.

A stacked leaf is one array whatever its number of layers, and its per-layer
norms are one reduction over the non-layer axes, so compiling the clip step
should not grow with ``L``. The unstacked twin (one leaf per layer) is timed
beside it for contrast. Shapes are abstract (``jax.ShapeDtypeStruct``): nothing
is allocated, only lowered and compiled.

    python benchmarks/stacked_compile.py            # writes runs/benchmarks/stacked_compile.md
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import optax

import clipx

WIDTH = 256


def stacked_tree(layers: int) -> dict:
  """A transformer-like stack: attention and MLP kernels, biases, a layer-norm scale."""
  shape = lambda *s: jax.ShapeDtypeStruct((layers, *s), jnp.float32)  # noqa: E731
  return {
    "embed": jax.ShapeDtypeStruct((1000, WIDTH), jnp.float32),
    "blocks": {
      "attn": {"qkv": shape(WIDTH, 3 * WIDTH), "out": shape(WIDTH, WIDTH)},
      "mlp": {
        "up": shape(WIDTH, 4 * WIDTH),
        "up_bias": shape(4 * WIDTH),
        "down": shape(4 * WIDTH, WIDTH),
      },
      "norm": {"scale": shape(WIDTH)},
    },
  }


def unstacked_tree(layers: int) -> dict:
  tree = stacked_tree(layers)
  one = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape[1:], s.dtype), tree["blocks"])
  return {"embed": tree["embed"], "blocks": {str(i): one for i in range(layers)}}


def in_blocks(path, leaf) -> int:
  return 1 if clipx.stacking.path_name(path).startswith("blocks") else 0


def compile_seconds(tx: optax.GradientTransformation, tree: dict) -> float:
  tx = optax.chain(tx, optax.sgd(0.1, momentum=0.9))
  state = jax.eval_shape(tx.init, tree)

  def step(grads, state, params):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  start = time.perf_counter()
  jax.jit(step).lower(tree, state, tree).compile()
  return time.perf_counter() - start


CASES = {
  "layer, stacked=": lambda: clipx.clip_by_layer_norm(1.0, stacked=in_blocks),
  "agc, stacked=": lambda: clipx.adaptive_grad_clip(0.01, stacked=in_blocks),
}
TWINS = {
  "layer, unstacked twin": lambda: clipx.clip_by_layer_norm(1.0),
  "agc, unstacked twin": lambda: clipx.adaptive_grad_clip(0.01),
}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--layers", default="2,48")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--out", default="runs/benchmarks/stacked_compile.md")
  args = parser.parse_args()
  counts = [int(n) for n in args.layers.split(",")]
  rows = []
  for name, make in {**CASES, **TWINS}.items():
    tree_fn = stacked_tree if name in CASES else unstacked_tree
    medians = []
    for layers in counts:
      times = [compile_seconds(make(), tree_fn(layers)) for _ in range(args.repeats)]
      medians.append(statistics.median(times))
    rows.append((name, medians))
    print(name, [f"{m:.2f}" for m in medians], flush=True)
  head = " | ".join(f"{n} layers" for n in counts)
  lines = [
    f"Compile time (median of {args.repeats}, seconds) of `chain(<clip>, sgd(momentum))`,"
    f" jax {jax.__version__}, {jax.default_backend()}:",
    "",
    f"| clip | {head} | {counts[-1]} / {counts[0]} |",
    "|---|" + "---|" * (len(counts) + 1),
  ]
  for name, medians in rows:
    cells = " | ".join(f"{m:.2f}" for m in medians)
    lines.append(f"| {name} | {cells} | {medians[-1] / medians[0]:.2f}x |")
  text = "\n".join(lines) + "\n"
  print(text)
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(text)


if __name__ == "__main__":
  main()
