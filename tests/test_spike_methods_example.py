"""examples/spike_methods.py runs every method for a few steps and reports what it did."""

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples import spike_methods  # noqa: E402


@pytest.mark.slow
def test_every_method_trains_on_the_rnn_task_and_counts_its_clips():
  results = spike_methods.main(["--task", "rnn", "--steps", "30", "--quiet"])
  assert set(results) == set(spike_methods.METHODS)
  for method, result in results.items():
    assert np.isfinite(result["test_loss"]), method
    assert 0.0 <= result["clip_rate"] <= 1.0, method
  assert results["none"]["clip_rate"] == 0.0


@pytest.mark.slow
def test_gradient_methods_go_before_adam_and_update_methods_after():
  import optax

  for method, (where, _) in spike_methods.METHODS.items():
    tx = spike_methods.make_optimizer(method, 1e-3)
    params = {"w": np.ones(3, np.float32)}
    updates, _ = tx.update({"w": np.full(3, 2.0, np.float32)}, tx.init(params), params)
    assert np.all(np.asarray(updates["w"]) < 0), method  # a descent step
    assert isinstance(tx, optax.GradientTransformation), (method, where)
