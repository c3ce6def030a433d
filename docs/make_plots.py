"""Draws the documentation's plot of each adaptive threshold policy on a real norm trace.

``python docs/make_plots.py`` trains the digits CNN once through
``examples/adaptive_thresholds.py`` (SGD-momentum, every 50th batch's inputs
multiplied by 100, fixed global clipping at 1.0 so the run survives the
spikes; about a minute on two CPU cores), keeps the pre-clip global gradient
norm of every step in ``docs/img/norm_trace.json``, replays that trace through
``autoclip``, ``zclip``, ``ema_ratio`` and ``quantile`` with their default
settings, and writes ``docs/img/adaptive_policies.png``.

``python docs/make_plots.py --trace docs/img/norm_trace.json`` redraws from
the committed trace without training.

A replay shows the threshold each policy computes on the *same* norms, not a
run trained with that policy (clipping changes the trajectory).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import matplotlib  # noqa: E402

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import clipx  # noqa: E402
from examples import adaptive_thresholds  # noqa: E402

IMG = ROOT / "docs" / "img"

POLICIES = {
  "autoclip()": clipx.autoclip,
  "zclip()": clipx.zclip,
  "ema_ratio()": clipx.ema_ratio,
  "quantile()": clipx.quantile,
}

ZOOM = 250  # steps in the right-hand column: warm-up and the first injected spikes


def load_or_record(trace: str | None) -> tuple[np.ndarray, int]:
  """The trace's norms and spike period; records and saves a new trace without ``trace``."""
  with tempfile.TemporaryDirectory() as out:
    args = adaptive_thresholds.parse_args(["--out", out] + (["--trace", trace] if trace else []))
    norms, period = adaptive_thresholds.record_trace(args, Path(out))
    if trace is None:
      IMG.mkdir(parents=True, exist_ok=True)
      saved = json.loads((Path(out) / "trace.json").read_text())
      (IMG / "norm_trace.json").write_text(json.dumps(saved, separators=(",", ":")))
  return norms, period


def plot(norms: np.ndarray, period: int, path: Path) -> None:
  steps = np.arange(1, len(norms) + 1)
  shown = np.where(norms > 0, norms, np.nan)  # zero norms have no place on a log axis
  spikes = np.arange(period - 1, len(norms), period) if period else np.zeros(0, int)
  # Only the spikes that are spikes: a saturated batch can give a tiny norm instead.
  spikes = adaptive_thresholds.large_spikes(norms, spikes)
  ylim = (0.5 * np.nanpercentile(shown, 1), 2 * np.nanmax(shown))
  fig, axes = plt.subplots(
    len(POLICIES), 2, figsize=(11, 2.4 * len(POLICIES)), sharey="row", width_ratios=(2, 1)
  )
  for row, (name, make) in zip(axes, POLICIES.items()):
    threshold = adaptive_thresholds.replay(make(), norms)
    clipped = np.isfinite(norms) & (norms > threshold)
    for ax, stop in zip(row, (len(norms), ZOOM)):
      view = slice(0, stop)
      ax.plot(steps[view], shown[view], color="0.65", lw=0.7, label="gradient norm")
      ax.plot(steps[view], threshold[view], color="C0", lw=1.3, label="threshold")
      hits = clipped[view]
      ax.plot(steps[view][hits], shown[view][hits], ".", color="C3", ms=2.5, label="clipped")
      in_view = spikes[spikes < stop]
      ax.plot(steps[in_view], shown[in_view], "v", color="k", ms=4, label="injected spike")
      ax.set(yscale="log", ylim=ylim)
      ax.set_xlim(0, stop)
    row[0].set_ylabel(name)
    row[0].set_title(f"{name}: clips {np.mean(clipped):.0%} of steps", fontsize=9, loc="left")
  axes[0][1].set_title(f"first {ZOOM} steps", fontsize=9, loc="left")
  axes[0][0].legend(fontsize=7, ncol=4, loc="upper right")
  for ax in axes[-1]:
    ax.set_xlabel("step")
  fig.suptitle("Adaptive thresholds replayed on one real gradient-norm trace (digits CNN)")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--trace", default=None, help="a saved trace (norm_trace.json) to replay")
  args = parser.parse_args()
  norms, period = load_or_record(args.trace)
  IMG.mkdir(parents=True, exist_ok=True)
  plot(norms, period, IMG / "adaptive_policies.png")
  print(f"wrote {IMG / 'adaptive_policies.png'} from {len(norms)} steps")


if __name__ == "__main__":
  main()
