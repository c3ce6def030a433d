"""Overhead of the spike methods and of forensics against a fixed global clip.

``python benchmarks/spike_methods.py`` times one optimizer step (clip + Adam
or SGD-momentum, buffers donated) on the ResNet-50-shaped tree of
``trees.py``, every case interleaved round after round in one process pinned
to one thread setting (``--threads``, default 1: XLA on one core), and prints
each case's paired median ratio to the fixed global clip. Targets (issue 18):
each adaptive method <= 1.05x, forensics <= 1.02x.

"Forensics off" is the fixed global clip written without the per-leaf
attribution (``norms.group_norms_split``, the path before forensics landed),
so the forensics row is the cost of ``source``/``share`` alone. The report goes
to ``runs/benchmarks/spike_methods.md`` (or ``--out``).

XLA CPU allocates a step's temporaries afresh each call, and glibc serves a
large one with a new ``mmap``: a ResNet-50-sized temporary (a chained clip's
intermediate tree, Adam's update before an update clip) is page-faulted in
every step, about 25,000 faults. The header names the ``MALLOC_*`` settings
in effect; ``MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0
MALLOC_TRIM_THRESHOLD_=17179869184 python benchmarks/spike_methods.py``
keeps freed memory for reuse, which shows what is left of each cost.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import threads  # noqa: E402


def malloc_settings() -> str:
  """The glibc ``MALLOC_*`` variables in effect: they decide whether XLA CPU's
  large temporaries are page-faulted in afresh every step (``benchmarks/README.md``)."""
  found = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
  return ", ".join(f"{k}={v}" for k, v in sorted(found.items())) or "defaults"


def minor_faults_per_step(case, iters: int) -> float:
  """Minor page faults of this process per step of ``case`` (``getrusage``): a large
  temporary that malloc maps afresh each step shows up as ~one fault per 4 KiB page."""
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  case.run(iters)
  return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / iters


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--threads", default="1", help="one setting: 1 or all")
  parser.add_argument("--rounds", type=int, default=7)
  parser.add_argument("--iters", type=int, default=5)
  parser.add_argument("--quick", action="store_true", help="a small tree, for the smoke test")
  parser.add_argument(
    "--only",
    default="",
    help="comma-separated substrings of case names to time (the base case always runs),"
    " e.g. 'forensics' for a long run of that pair alone",
  )
  parser.add_argument("--out", default="runs/benchmarks/spike_methods.md")
  return parser.parse_args(argv)


def main(argv=None) -> str:
  args = parse_args(argv)
  setting = threads.parse(args.threads)
  threads.pin(setting)

  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from timing import Case, ratio, time_cases
  from trees import benchmark_shapes, random_tree

  import clipx
  from clipx import norms, rescaling, scaling

  def adagc_chain() -> optax.GradientTransformation:
    def warmup_bound(count):
      return jnp.where(count < 100, 1.0, jnp.inf)

    policy = clipx.ema_ratio(1.04, 0.99, warmup_steps=100, warmup="min")
    return optax.chain(clipx.clip_by_global_norm(warmup_bound), clipx.clip_by_layer_norm(policy))

  def global_clip_without_forensics(max_norm: float) -> optax.GradientTransformation:
    def update(updates, state, params=None):
      leaves = jax.tree.leaves(updates)
      d, r = norms.group_norms_split(leaves, np.zeros(len(leaves), np.int32), 1)
      decision = scaling.decide(d[0], r[0], jnp.float32(max_norm))
      hi, lo = scaling.gated_scale(decision.clipped, decision.hi, decision.lo)
      return scaling.scale_tree(updates, hi, lo), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)

  adam = lambda: optax.adam(1e-3)  # noqa: E731
  cases_tx = {
    "global 1.0 + adam (forensics off)": optax.chain(global_clip_without_forensics(1.0), adam()),
    "global 1.0 + adam": optax.chain(clipx.clip_by_global_norm(1.0), adam()),
    "zclip + adam": optax.chain(clipx.clip_by_global_norm(clipx.zclip()), adam()),
    "adagc + adam": optax.chain(clipx.adagc(), adam()),
    "stable_spam_clip + adam": optax.chain(clipx.stable_spam_clip(), adam()),
    "adam, update window_zscore": optax.chain(
      optax.scale_by_adam(),
      clipx.clip_by_global_norm(clipx.window_zscore()),
      optax.scale(-1e-3),
    ),
    "adam, update block_rms": optax.chain(
      optax.scale_by_adam(), clipx.clip_by_block_rms(1.0), optax.scale(-1e-3)
    ),
    # Issue 25: StableAdamW's per-tensor RMS cut (wraps AdamW: reads its nu), Clippy
    # after the optimizer (needs params), Fira's growth limiter per tensor before Adam.
    "stable_adamw_clip(adamw)": clipx.stable_adamw_clip(
      optax.adamw(1e-3, b2=0.99, eps=1e-6, weight_decay=1e-2), b2=0.99, eps=1e-6
    ),
    "adam, then clippy": optax.chain(adam(), clipx.clippy(0.1, 1e-7)),
    "growth_limit per tensor + adam": optax.chain(
      clipx.clip_by_layer_norm(clipx.growth_limit(1.01)), adam()
    ),
    # Issue 25: SPAM (Adam with the spike clip against its own v and moment resets:
    # an optimizer of its own); QK-Clip after Adam on stand-in query and key kernels
    # (each bottleneck's first and second conv, 4 "heads" on the output channels; a
    # ResNet has no attention), fed one logit per head that clips half of them.
    "spam": clipx.spam(1e-3),
    "adam, then qk_clip": optax.chain(
      adam(),
      clipx.qk_clip(
        100.0,
        query=lambda path: clipx.stacking.path_name(path).endswith("/a/conv"),
        key=lambda path: clipx.stacking.path_name(path).endswith("/b/conv"),
        heads=4,
      ),
    ),
    "global 1.0 + adamw": optax.chain(
      clipx.clip_by_global_norm(1.0), optax.adamw(1e-3, b2=0.99, eps=1e-6, weight_decay=1e-2)
    ),
    # Like-for-like references: a fixed clip in the same places. A second norm
    # scope after a clip (AdaGC's global then per-tensor clip, Stable-SPAM's two
    # stages) or a clip after Adam needs the clipped tree (or Adam's update)
    # before its norm, a second pass over memory on XLA CPU.
    "global 1.0 twice + adam": optax.chain(
      clipx.clip_by_global_norm(1.0), clipx.clip_by_global_norm(1.0), adam()
    ),
    # The two presets as the chains of their pieces (what they were before their
    # one-pass forms): the cost of the materialized intermediate tree.
    "adagc as a chain + adam": optax.chain(adagc_chain(), adam()),
    "stable_spam_clip as a chain + adam": optax.chain(
      rescaling.rescale_outliers(rescaling.ema_peak(0.999)),
      rescaling.normalize_by_layer_norm(),
      adam(),
    ),
    "adam, update global 1.0": optax.chain(
      optax.scale_by_adam(), clipx.clip_by_global_norm(1.0), optax.scale(-1e-3)
    ),
    "adam, update optax.clip_by_global_norm(1.0)": optax.chain(
      optax.scale_by_adam(), optax.clip_by_global_norm(1.0), optax.scale(-1e-3)
    ),
  }
  base = "global 1.0 + adam"
  wanted = [w.strip() for w in args.only.split(",") if w.strip()]
  if wanted:
    cases_tx = {k: v for k, v in cases_tx.items() if k == base or any(w in k for w in wanted)}
  shapes = benchmark_shapes(args.quick)
  params = jax.tree.map(jnp.asarray, random_tree(shapes, 0))
  grads = jax.tree.map(jnp.asarray, random_tree(shapes, 1, scale=0.1))

  cases = {}
  for name, tx in cases_tx.items():
    extra = {"attention_logits": jnp.array([50.0, 150.0, 99.0, 400.0])} if "qk" in name else {}

    def step(params, state, grads, tx=tx, extra=extra):
      updates, state = tx.update(grads, state, params, **extra)
      return optax.apply_updates(params, updates), state

    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, tx.init(params), grads).compile()
    state = (jax.tree.map(jnp.copy, params), tx.init(params))
    cases[name] = Case(compiled, state, (grads,))
  times = time_cases(cases, args.rounds, args.iters)
  faults = {name: minor_faults_per_step(case, args.iters) for name, case in cases.items()}
  label = threads.label(setting)
  leaves = len(jax.tree.leaves(params))
  size = sum(int(np.prod(s)) for s in shapes.values())
  lines = [
    f"One optimizer step, ResNet-50-shaped tree ({leaves} leaves, {size / 1e6:.2f}M parameters),"
    f" float32, {label}, {args.rounds} rounds x {args.iters} steps; jax {jax.__version__};"
    f" glibc malloc settings: {malloc_settings()}.",
    "",
    f"| case | median ms | ratio to `{base}` (median, min/min) | page faults / step | target |",
    "|---|---|---|---|---|",
  ]
  for name in cases:
    median, best = ratio(times, name, base)
    methods = ("zclip", "adagc", "stable_spam", "adam, update window", "adam, update block")
    target = "forensics <= 1.02x" if "forensics off" in name else ""
    target = "<= 1.05x" if name.startswith(methods) and "as a chain" not in name else target
    if "forensics off" in name:  # the cost of forensics: base over this row
      median, best = ratio(times, base, name)
      name = f"`{base}` over `{name}` (forensics' cost)"
    ms = 1e3 * float(np.median(times[name] if name in times else times[base]))
    per_step = faults[name if name in faults else base]
    lines.append(f"| {name} | {ms:.1f} | {median:.3f}x / {best:.3f}x | {per_step:.0f} | {target} |")
  text = "\n".join(lines) + "\n"
  print(text)
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(text)
  return text


if __name__ == "__main__":
  main()
