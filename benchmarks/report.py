"""The Markdown of ``run.py``: its tables, the targets of issue 6, and the profile notes.

Every ratio is printed beside the thread setting it was measured at (the
``threads`` column): ratios across frameworks depend on it (see ``threads.py``).
"""

from __future__ import annotations

import statistics

from timing import ratio

# What the profiles of this harness showed (XLA CPU, jax 0.10); kept with the tables so a
# rerun keeps the explanation next to the numbers.
NOTES = """### Where the time goes (profiles, issue 6)

- **Global clip sits at the memory floor.** The compiled clipx step has sgd's own
  elementwise fusions (the scale is fused into them: no extra elementwise pass) plus one
  reduction per large leaf and one per group of small leaves. The floor rows measure sgd
  plus one read of the gradients (a sum of squares kept in state, nothing scaled): no
  norm-based clip can beat it, since the norm must be read before sgd's pass can use it.
  On this 2-core machine a bare `sum(x*x)` of 25.6M floats reads at ~19 GB/s (5.2-6.3 ms,
  already multi-threaded; row-blocked, column-blocked and dot forms were no faster) while
  sgd's pass moves ~25 GB/s, so the floor is ~1.25-1.3x sgd.
- **AGC's floor is sgd plus one read of the gradients and one of the parameters**, both
  needed for the unit norms before the scale. Optax's AGC sits at that floor too, so
  0.85x of it would need a second pass to come from cache; XLA schedules all the
  reductions before the updates, and the 25.6M-parameter tree does not fit the 32 MiB L3.
- **Compile time is kernels and ops per leaf.** XLA CPU compiles identical fusions once,
  but every op per leaf costs in tracing and in XLA's passes, and every reduction kernel
  costs tens of ms to compile. Since `clipx/scaling.py` the scales and per-leaf offsets are
  the outputs of one small `lax.cond` (opaque to fusion) and each leaf reads its scales at a
  runtime offset, so same-shape leaves share kernels (tests/test_scaling.py). Also: the
  per-leaf `select` that kept subnormals in the clip's own output was dropped (~+0.35x
  compile on 1000 leaves; XLA CPU flushes subnormals in the optimizer's arithmetic anyway,
  tested), the scale is broadcast once per leaf shape, small leaves concatenate without a
  reshape each, and per-leaf code uses `lax` instead of `jnp` (tracing a 1000-leaf global
  clip: 1.3 s -> 0.4 s in `scale_leaf`).
- **bfloat16**: XLA CPU computes bf16 arithmetic in float32, and merged the norm's
  widening with the optimizer's; the widened gradients were then materialized for the
  reduction (196 MiB). A no-op `optimization_barrier` before the norm's widening
  (`clipx.norms.widen`) keeps them apart in the common path (value clipping: 97.5 ->
  0.4 MiB). The overflow fallback reads each leaf twice (its largest magnitude, then
  its scaled squares); identical barriers are merged, so the max reads the leaf through
  a barrier of its own (`widen(..., reader=1)`): global clip 97.5 -> 1.3 MiB, AGC 196 ->
  1.8 MiB (tests/test_memory.py). Taking the max of the bits as int16 also avoided the
  widening, but XLA CPU then copied the bits for its integer reduction (49 MiB). A
  fallback with one reduction per leaf (squares of `x * 2**-96`) compiled faster (a
  3-leaf step 0.58 -> 0.43 s) but XLA CPU materialized the scale factor broadcast to each
  leaf's shape (23 MiB in float32); not adopted.
- **AGC's compile time is spread thin.** A perf profile of the 1000-leaf AGC compile
  against sgd's: LLVM for ~45 kernels (the concatenations that stack small leaves are
  70% of the IR, though a stack of 500 leaves alone compiles in 0.24 s), copy insertion
  (+1.3 CPU-s: the 1000 offsets out of one `lax.cond` are constants in its branches,
  each copied), buffer assignment (+0.7 s) and tracing (+1 s). Tried, each compile in
  its own process: the offsets out of conds of 64 or 128 outputs (no gain over 5
  interleaved rounds), out of a `lax.sort` (+30%) or an `optimization_barrier` (3x);
  static slices (a distinct kernel per leaf, 30 s); a variadic reduce over same-shape
  leaves instead of stacking them (500 leaves: 3.3 s against 0.24 s). Every leaf
  reading its units' scales at a runtime offset, so that same-shape leaves share one
  kernel, is what XLA CPU charges for; without any per-leaf slice (a wrong result, as
  a floor) the compile was 1.7-1.9x sgd's.
- **Compile time of concatenations**: XLA CPU emits one kernel per concatenation whose
  code grows with its operands; 500 small leaves in one concatenation compiled in
  0.4-0.6 s, in two levels of at most 64-128 (`clipx.norms.concatenate`) in 0.15-0.3 s. In the
  whole step the gain is within this machine's noise (+-20% between runs).
- **A trap**: `isfinite(sum(g_sq))` over AGC's unit sums of squares is folded by XLA into
  a second full reduction of every gradient, which materialized all squares (+195 MiB, 4x
  slower); the check is `all(isfinite(g_sq))`.
- **Value clipping** computes the largest magnitude for its stats: one more read that
  `optax.clip` does not do.
"""


def time_table(times, baselines, setting: str, unit: str, scale: float, memory=None) -> str:
  """A row per case: median and min time, and its ratio to ``baselines[case]`` at ``setting``."""
  header = f"| case | median {unit} | min {unit} | vs | ratio (median / min) | threads |"
  lines = [header, "|---|---:|---:|---|---:|---|"]
  if memory is not None:
    lines[0] += " temp MiB |"
    lines[1] += "---:|"
  for name, t in times.items():
    base = baselines.get(name)
    if base in times:
      med, low = ratio(times, name, base)
      vs, r = base, f"{med:.2f}x / {low:.2f}x"
    else:
      vs, r = "", ""
    line = (
      f"| {name} | {statistics.median(t) * scale:.1f} | {min(t) * scale:.1f} | {vs} | {r}"
      f" | {setting.removeprefix('threads=')} |"
    )
    if memory is not None:
      mem = memory.get(name)
      line += " - |" if mem is None else f" {mem / 2**20:.1f} |"
    lines.append(line)
  return "\n".join(lines)


def targets_table(results, setting: str) -> str:
  """The targets of issue 6 against the measured (median / min) ratios at ``setting``."""
  threads = setting.removeprefix("threads=")
  f32, cnn_t, comp = results["float32"], results["cnn"], results["compile"]
  rows = []

  def add(what, target, times, name, base):
    if name not in times or base not in times:
      rows.append(f"| {what} | <= {target:.2f}x | not measured | - | {threads} |")
      return
    med, low = ratio(times, name, base)
    met = "yes" if med <= target else "no"
    # Three decimals: "1.50x, not met" would read as a contradiction at two.
    rows.append(f"| {what} | <= {target:.2f}x | {med:.3f}x / {low:.3f}x | {met} | {threads} |")

  g = "clipx.clip_by_global_norm + sgd"
  add("global clip + sgd / sgd, ResNet-50 f32", 1.25, f32, g, "sgd-momentum alone")
  add("clipx global + sgd / optax same chain", 1.00, f32, g, "optax.clip_by_global_norm + sgd")
  add(
    "clipx AGC + sgd / optax AGC + sgd",
    0.85,
    f32,
    "clipx.adaptive_grad_clip + sgd",
    "optax.adaptive_grad_clip + sgd",
  )
  add(
    "clipx global + sgd / torch clip_grad_norm_ + SGD", 0.55, f32, g, "torch clip_grad_norm_ + SGD"
  )
  add("autoclip / fixed global clip", 1.03, f32, "clipx global, autoclip + sgd", g)
  add("zclip / fixed global clip", 1.03, f32, "clipx global, zclip + sgd", g)
  leaves = results["compile_leaves"]
  add(f"compile, {leaves} leaves, global clip + sgd / sgd", 1.5, comp, g, "sgd-momentum alone")
  add(
    f"compile, {leaves} leaves, AGC + sgd / sgd",
    2.0,
    comp,
    "clipx.adaptive_grad_clip + sgd",
    "sgd-momentum alone",
  )
  add(
    "CNN step with global clip / without",
    1.03,
    cnn_t,
    "cnn step, clipx global clip",
    "cnn step, no clipping",
  )
  for label in ("float32", "bfloat16"):
    mem = results.get(f"memory_{label}", {})
    base = mem.get("sgd-momentum alone")
    extra = [(m - base) / 2**20 for n, m in mem.items() if "clipx" in n and m is not None]
    if base is None or not extra:
      continue
    grad_mib = results["grad_bytes"] / 2**20 / (1 if label == "float32" else 2)
    worst = max(extra)
    met = "yes" if worst < 0.1 * grad_mib else "no"
    rows.append(
      f"| extra temp memory of clipx clipping, ResNet-50 {label} | none of gradient size"
      f" ({grad_mib:.0f} MiB) | at most {worst:.1f} MiB | {met} | {threads} |"
    )
  table = "\n".join(
    ["| target | bound | measured (median / min) | met | threads |", "|---|---|---|---|---|", *rows]
  )
  floors = []
  for name, base in (
    ("floor: sgd + one read of the gradients", "sgd-momentum alone"),
    ("floor: sgd + one read of gradients and params", "sgd-momentum alone"),
    ("floor: sgd + one read of gradients and params", "optax.adaptive_grad_clip + sgd"),
    ("floor: sgd + one read of the gradients", "torch clip_grad_norm_ + SGD"),
  ):
    if name in f32 and base in f32:
      med, low = ratio(f32, name, base)
      floors.append(f"{name} / {base}: {med:.2f}x / {low:.2f}x ({setting})")
  if floors:
    table += (
      "\n\nMemory floors in the same run (what no norm-based clip can beat: its norm must"
      " be read before sgd's pass can use it): " + "; ".join(floors) + "."
    )
  return table
