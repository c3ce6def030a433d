"""The examples refuse nonsense on the command line, naming the flag (examples/cli.py)."""

import argparse
import importlib
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples import cli  # noqa: E402

# (module, flag, bad value): each used to be accepted and train to chance or print NaN.
BAD_FLAGS = [
  ("train_cnn_flags", "--lr", "-1"),
  ("train_cnn_flags", "--epochs", "0"),
  ("train_cnn_flags", "--momentum", "1.5"),
  ("train_cnn_flags", "--max-norm", "nan"),
  ("train_rnn", "--lr", "0"),
  ("train_rnn", "--steps", "-3"),
  ("train_lm", "--lr", "-1"),
  ("train_lm", "--width", "0"),
  ("train_lm", "--warmup-steps", "-1"),
  ("spike_methods", "--epochs", "0"),
  ("spike_methods", "--lr", "inf"),
  ("threshold_sweep", "--min-threshold", "0"),
  ("stability", "--spike-lr", "-0.1"),
  ("adaptive_thresholds", "--lr", "-1"),
  ("lm_spike", "--lr", "0"),
  ("lm_sweep", "--steps", "0"),
  ("rnn_sweep", "--steps", "0"),
  ("dp_train_cnn", "--lr", "-1"),
  ("dp_train_cnn", "--momentum", "2"),
]


@pytest.mark.parametrize("module, flag, value", BAD_FLAGS)
def test_examples_refuse_nonsense_naming_the_flag(module, flag, value, capsys):
  parse_args = importlib.import_module(f"examples.{module}").parse_args
  with pytest.raises(SystemExit) as exit_info:
    parse_args([flag, value])
  assert exit_info.value.code == 2
  assert f"argument {flag}" in capsys.readouterr().err


@pytest.mark.parametrize(
  "kind, good, bad",
  [
    (cli.positive_float, {"1e-3": 1e-3, "2": 2.0}, ["0", "-1", "nan", "inf", "x"]),
    (cli.fraction, {"0": 0.0, "0.9": 0.9}, ["1", "-0.1", "nan"]),
    (cli.positive_int, {"1": 1, "7": 7}, ["0", "-2", "1.5"]),
    (cli.nonnegative_int, {"0": 0, "3": 3}, ["-1", "x"]),
  ],
)
def test_cli_types(kind, good, bad):
  for text, value in good.items():
    assert kind(text) == value
  for text in bad:
    with pytest.raises(argparse.ArgumentTypeError):
      kind(text)


def test_spike_methods_quiet_prints_results_and_out_writes_them(tmp_path, capsys):
  from examples import spike_methods

  results = spike_methods.main(
    ["--task", "rnn", "--steps", "5", "--methods", "none", "--quiet", "--out", str(tmp_path)]
  )
  printed = capsys.readouterr().out
  assert "none: test MSE" in printed  # --quiet hides progress, never the result
  written = json.loads((tmp_path / "spike_methods.json").read_text())
  assert written["results"]["none"]["test_loss"] == pytest.approx(results["none"]["test_loss"])
  assert written["config"]["steps"] == 5
