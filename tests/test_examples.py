"""The examples run: a few steps each on tiny data, in this process (JAX starts once).

One check runs ``train_cnn.py`` in a subprocess on 2 simulated CPU devices (the
device count is fixed when JAX starts) and compares it with the 1-device run.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import clipx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from examples import (  # noqa: E402
  adaptive_thresholds,
  data,
  reporting,
  stability,
  threshold_sweep,
  train_cnn,
)

METRICS_KEYS = {
  "test_accuracy",
  "train_loss",
  "test_accuracy_per_epoch",
  "clip_rate",
  "grad_norm",
  "threshold",
  "wall_seconds",
  "steps",
  "diverged",
}


@pytest.fixture(scope="module")
def digits():
  return data.load_dataset("digits")


# One epoch on digits at a rate where clipping is active on most steps.
DIGITS_ARGS = ["--epochs", "1", "--batch-size", "32", "--lr", "0.05", "--schedule", "constant"]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
  """``train_cnn.main`` on digits, 1 device, with every output (one compile for the module)."""
  out = tmp_path_factory.mktemp("run")
  results = train_cnn.main([*DIGITS_ARGS, "--out", str(out), "--quiet", "--tensorboard"])
  return results, out


@pytest.mark.slow
def test_clipping_reduces_loss_on_digits(digits_run):
  results, _ = digits_run
  losses = np.array(results["step_loss"])
  assert results["steps"] == len(losses) == 1437 // 32
  # The untrained model is no better than guessing (cross-entropy about ln 10 = 2.3);
  # one epoch with clipping cuts the loss to a fraction of that.
  assert losses[0] > 2.0
  assert losses[-10:].mean() < 0.3 * losses[0]
  assert results["test_accuracy"] > 0.8  # chance is 0.1
  assert 0.2 < results["clip_rate"] <= 1 and not results["diverged"]


def test_train_cnn_outputs(digits_run):
  results, out = digits_run
  steps = results["steps"]
  metrics = json.loads((out / "metrics.json").read_text())
  assert METRICS_KEYS <= set(metrics)
  assert len(metrics["train_loss"]) == len(metrics["test_accuracy_per_epoch"]) == 1
  assert len(metrics["grad_norm"]) == len(metrics["threshold"]) == steps
  assert metrics["threshold"] == [1.0] * steps
  # 360 test images in one padded batch of 512: the padding is masked out.
  assert math.isclose(round(metrics["test_accuracy"] * 360), metrics["test_accuracy"] * 360)
  # The clipped flag agrees with "pre-clip norm above the threshold".
  norms = np.array(metrics["grad_norm"])
  assert metrics["clip_rate"] == pytest.approx(np.mean(norms > 1.0))
  with open(out / "metrics.csv") as f:
    rows = list(csv.DictReader(f))
  assert [int(r["step"]) for r in rows] == list(range(1, steps + 1))
  np.testing.assert_allclose([float(r["clip/global/norm"]) for r in rows], norms, rtol=1e-6)
  clipped_norm = np.array([float(r["clip/global/clipped_norm"]) for r in rows])
  np.testing.assert_allclose(clipped_norm, np.minimum(norms, 1.0), rtol=1e-5)
  assert int(float(rows[-1]["clip/global/clip_count"])) == int(np.sum(norms > 1.0))
  assert (out / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  try:
    import tensorboardX  # noqa: F401

    assert any((out / "tensorboard").iterdir())
  except ImportError:
    assert not (out / "tensorboard").exists()


@pytest.mark.slow
def test_train_cnn_script_data_parallel_matches_one_device(digits_run, tmp_path):
  one, _ = digits_run
  env = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2",
  )
  argv = [*DIGITS_ARGS, "--max-steps", "10", "--out", str(tmp_path), "--quiet"]
  proc = subprocess.run(
    [sys.executable, str(ROOT / "examples" / "train_cnn.py"), *argv],
    capture_output=True,
    text=True,
    timeout=300,
    env=env,
    cwd=tmp_path,  # not the repository root: the script must find its own package
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  two = json.loads((tmp_path / "metrics.json").read_text())
  assert two["devices"].startswith("2 devices")
  assert one["devices"].startswith("1 device")
  assert two["steps"] == 10
  # Same init and batches (a constant rate, so stopping early changes nothing before);
  # only the reduction order over the sharded batch differs.
  np.testing.assert_allclose(two["step_loss"], one["step_loss"][:10], rtol=1e-4)
  np.testing.assert_allclose(two["grad_norm"], one["grad_norm"][:10], rtol=1e-4)


def test_flag_errors(capsys):
  with pytest.raises(SystemExit):
    train_cnn.parse_args(["--clip", "zclip", "--max-norm", "1.0"])
  assert "--max-norm has no meaning with --clip zclip" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    train_cnn.parse_args(["--max-norm", "-1"])
  with pytest.raises(SystemExit):
    train_cnn.parse_args(["--tensorboard"])
  assert train_cnn.parse_args(["--clip", "agc"]).max_norm == 0.05


def test_missing_policy_is_a_clear_error(monkeypatch):
  monkeypatch.delattr(clipx, "zclip", raising=False)
  with pytest.raises(SystemExit, match=r"no clipx\.zclip\(\)"):
    train_cnn.make_optimizer("zclip", None, 0.1, 0.9)


def test_missing_tensorboardx_is_a_message(monkeypatch, tmp_path, capsys):
  monkeypatch.setitem(sys.modules, "tensorboardX", None)  # import fails
  args = train_cnn.parse_args(["--tensorboard", "--out", str(tmp_path)])
  assert reporting.open_tensorboard(args) is None
  assert "pip install tensorboardX" in capsys.readouterr().err


@pytest.mark.parametrize("clip", train_cnn.CLIPS)
def test_each_clip_flag_builds_its_scope(clip):
  if clip in train_cnn.ADAPTIVE and not hasattr(clipx, clip):
    pytest.skip(f"this clipx has no {clip}")
  args = train_cnn.parse_args(["--clip", clip])
  tx = train_cnn.make_optimizer(clip, args.max_norm, 0.1, 0.9)
  state = tx.init({"conv": {"kernel": jnp.zeros((3, 3, 1, 4)), "bias": jnp.zeros(4)}})
  kinds = list(clipx.stats(state))
  expected = {"none": [], "value": ["value"], "layer": ["layer"], "agc": ["agc"]}
  assert kinds == expected.get(clip, ["global"])
  assert args.max_norm == {"value": 0.1, "agc": 0.05, "global": 1.0, "layer": 1.0}.get(clip)


@pytest.mark.parametrize("policy", train_cnn.ADAPTIVE)
def test_adaptive_policies_build(policy):
  if not hasattr(clipx, policy):
    pytest.skip(f"this clipx has no {policy}")
  tx = train_cnn.make_optimizer(policy, None, 0.1, 0.9)
  params = {"w": jnp.ones(3)}

  @jax.jit
  def run(norms):  # a steady gradient norm, then a 100x spike
    def step(state, norm):
      return tx.update({"w": jnp.full(3, norm / 3**0.5)}, state, params)[1], None

    state, _ = jax.lax.scan(step, tx.init(params), norms)
    return reporting.step_summary(clipx.stats(state))

  summary = run(jnp.array([1.0] * 40 + [100.0]))
  assert bool(summary["clipped"]), summary  # every policy clips the spike after warm-up
  assert float(summary["scope_norm"]) == pytest.approx(100.0, rel=1e-5)
  assert 0 < float(summary["threshold"]) < 100.0


@pytest.mark.slow
def test_threshold_sweep_modes_agree(digits, tmp_path, monkeypatch):
  monkeypatch.setattr(threshold_sweep.data, "load_dataset", lambda *a: digits)
  summary = threshold_sweep.main(
    ["--mode", "both", "--thresholds", "2", "--min-threshold", "0.1", "--max-threshold", "10"]
    + ["--max-steps", "6", "--batch-size", "16", "--out", str(tmp_path), "--quiet"]
  )
  assert summary["thresholds"] == pytest.approx([0.1, 10.0, math.inf])
  assert summary["steps"] == 6
  assert set(summary["timing"]) == {"loop", "vmap"}
  # Loop and vmap train the same models on the same batches.
  assert summary["modes_agree_max_accuracy_difference"] <= 1 / 360 + 1e-9
  # Threshold 0.1 clips every step here; 10 and inf do not clip these norms.
  assert summary["clip_rate"][0] == 1.0 and summary["clip_rate"][2] == 0.0
  saved = json.loads((tmp_path / "threshold_sweep.json").read_text())
  assert saved["thresholds"][-1] is None  # inf written as null: strict JSON
  assert (tmp_path / "threshold_sweep.png").stat().st_size > 1000


@pytest.mark.slow
def test_stability_runs_both_experiments(digits, tmp_path, monkeypatch):
  monkeypatch.setattr(stability.data, "load_dataset", lambda *a: digits)
  summary = stability.main(
    ["--thresholds", "1", "--policies", "", "--max-steps", "4", "--batch-size", "16"]
    + ["--spike-every", "2", "--out", str(tmp_path), "--quiet"]
  )
  high = {row["name"]: row for row in summary["high-lr"]}
  assert set(high) == {"global 1", "none"}
  assert high["none"]["clip_rate"] == 0.0
  spikes = {row["name"]: row for row in summary["spikes"]}
  assert set(spikes) == {"global 1", "none"}
  # Every second batch is spiked (inputs x100): its gradient norm stands out.
  norms = np.array(spikes["none"]["grad_norm"])
  assert len(norms) == 4 and norms[1] > 3 * norms[0]
  # The first step is the same for both (same init and batch), clipped only with clipping.
  assert spikes["global 1"]["grad_norm"][0] == pytest.approx(norms[0], rel=1e-6)
  assert spikes["global 1"]["clip_rate"] > 0 and spikes["none"]["clip_rate"] == 0
  for name in ["stability.png", "spikes.png", "stability.json"]:
    assert (tmp_path / name).stat().st_size > 100


def test_missing_dataset_file_is_a_clean_exit(tmp_path):
  with pytest.raises(SystemExit, match=r"error: mnist: missing file train-images-idx3-ubyte"):
    train_cnn.main(["--dataset", "mnist", "--data-dir", str(tmp_path), "--quiet"])
  with pytest.raises(SystemExit, match=r"data_batch_1.*--data-dir"):
    threshold_sweep.main(["--dataset", "cifar10", "--data-dir", str(tmp_path), "--quiet"])


@pytest.mark.slow
def test_same_seed_same_machine_is_bit_identical(digits_run, digits):
  """What the README promises: the same seed, machine and thread count repeat a run exactly."""
  one, _ = digits_run
  again = train_cnn.train(
    train_cnn.parse_args([*DIGITS_ARGS, "--max-steps", "10", "--quiet"]), digits
  )
  assert again["step_loss"] == one["step_loss"][:10]
  assert again["grad_norm"] == one["grad_norm"][:10]


@pytest.mark.slow
def test_quiet_still_prints_the_result(capsys, digits, monkeypatch):
  monkeypatch.setattr(train_cnn.data, "load_or_exit", lambda *a: digits)
  train_cnn.main([*DIGITS_ARGS, "--max-steps", "3", "--quiet"])
  out = capsys.readouterr().out
  assert out.startswith("test accuracy ") and out.count("\n") == 1, out  # no bar, no epochs


@pytest.mark.parametrize("script", [stability, threshold_sweep, adaptive_thresholds])
def test_outputs_default_under_runs(script):
  """No script writes into the repository root or a tracked file unless told to."""
  out = Path(script.parse_args([]).out)
  assert out.parts[0] == "runs" and len(out.parts) == 2, out


def test_train_cnn_reads_as_an_example():
  """The training script is data, model, optimizer, steps and loop; reporting lives beside it."""
  source = (ROOT / "examples" / "train_cnn.py").read_text()
  assert len(source.splitlines()) <= 270
  for reporting_only in ("import csv", "import matplotlib", "tensorboardX", "SummaryWriter("):
    assert reporting_only not in source, reporting_only
