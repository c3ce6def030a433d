"""The language-model example: corpus, model, metrics, spike and sensitivity formulas, CLI runs."""

from __future__ import annotations

import hashlib
import json
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from examples import lm, lm_data, lm_report, lm_sweep, reproduce, train_lm  # noqa: E402

TINY = ["--steps", "6", "--layers", "2", "--width", "16", "--heads", "2", "--seq-len", "16"]
TINY += ["--batch-size", "4", "--sample-bytes", "8", "--quiet"]


# The corpus.


def test_corpus_is_the_listed_documents_and_its_hash_is_stable():
  first, second = lm_data.build_corpus(), lm_data.build_corpus()
  assert first.sha256 == second.sha256 and first.num_bytes == second.num_bytes
  assert first.num_documents > len(lm_data.STDLIB_MODULES)
  # Train and validation are the documents' 90% / 10% parts: no byte lost or repeated.
  separators = (first.num_documents - 1) * len(lm_data.SEPARATOR)
  assert len(first.train) + len(first.validation) == first.num_bytes + separators
  assert len(first.validation) / len(first.train) == pytest.approx(1 / 9, rel=0.01)


def test_corpus_hash_is_the_committed_one_on_this_python():
  committed = json.loads((ROOT / "results" / "lm-lr-sweep.json").read_text())["corpus"]
  corpus = lm_data.build_corpus()
  if corpus.python != committed["python"]:
    pytest.skip(f"the committed sweep used Python {committed['python']}, this is {corpus.python}")
  assert (corpus.sha256, corpus.num_bytes) == (committed["sha256"], committed["bytes"])


def test_a_missing_module_is_named(tmp_path):
  (tmp_path / "abc.py").write_text("x = 1\n")
  with pytest.raises(FileNotFoundError, match="nothere.py"):
    lm_data.build_corpus(str(tmp_path), ("abc.py", "nothere.py"))


def test_a_small_corpus_hashes_its_documents(tmp_path):
  (tmp_path / "a.py").write_bytes(b"0123456789")
  corpus = lm_data.build_corpus(str(tmp_path), ("a.py",))
  from pydoc_data import topics

  documents = [topics.topics[k].encode() for k in sorted(topics.topics)] + [b"0123456789"]
  assert corpus.sha256 == hashlib.sha256(lm_data.SEPARATOR.join(documents)).hexdigest()
  assert corpus.train[-9:].tobytes() == b"012345678" and corpus.validation[-1:].tobytes() == b"9"


def test_unigram_baseline_is_the_smoothed_cross_entropy():
  train = np.array([0, 0, 1], np.uint8)
  validation = np.array([0, 2], np.uint8)
  total = 3 + 256
  expected = -(math.log2(3 / total) + math.log2(1 / total)) / 2
  assert lm_data.unigram_bits_per_byte(train, validation) == pytest.approx(expected)


def test_sampled_windows_are_contiguous_slices():
  data = jnp.arange(1000, dtype=jnp.int32)
  windows = np.asarray(lm_data.sample_windows(jax.random.key(0), data, 8, 20))
  assert windows.shape == (8, 21)
  np.testing.assert_array_equal(np.diff(windows, axis=1), 1)


# The model.


def _model(layer_axis=0):
  config = lm.LMConfig(layers=2, width=16, heads=2, seq_len=8, layer_axis=layer_axis)
  return lm.init(config, seed=0)


def test_attention_logit_max_is_the_largest_causal_logit():
  model = _model()
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (3, 8)), jnp.int32)
  _, logit_max = model.apply_fn(model.params, tokens)
  # Layer 0 by hand: its input is the embedding plus positions, layer-normalised.
  p = jax.tree.map(np.asarray, model.params)
  block = jax.tree.map(lambda x: x[0], p["blocks"])
  x = p["embed"]["embedding"][np.asarray(tokens)] + p["position"][:8]
  mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  h = (x - mean) / np.sqrt(var + 1e-6) * block["attn_norm"]["scale"] + block["attn_norm"]["bias"]
  q = (h @ block["attn"]["query"]["kernel"]).reshape(3, 8, 2, 8)
  k = (h @ block["attn"]["key"]["kernel"]).reshape(3, 8, 2, 8)
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(8)
  logits[..., ~np.tril(np.ones((8, 8), bool))] = -np.inf
  np.testing.assert_allclose(logit_max[0], logits.max(axis=(0, 2, 3)), rtol=1e-4)


def test_the_model_is_causal_and_both_layouts_agree():
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 256, (2, 8)), jnp.int32)
  changed = tokens.at[:, 5].set((tokens[:, 5] + 1) % 256)
  first, second = _model(0), _model(1)
  logits, _ = first.apply_fn(first.params, tokens)
  logits_changed, _ = first.apply_fn(first.params, changed)
  np.testing.assert_array_equal(logits[:, :5], logits_changed[:, :5])
  assert not np.allclose(logits[:, 5:], logits_changed[:, 5:])
  assert second.params["blocks"]["mlp_in"]["kernel"].shape == (16, 2, 64)
  np.testing.assert_allclose(
    second.apply_fn(second.params, tokens)[0], logits, rtol=1e-5, atol=1e-5
  )


# The report's formulas.


def test_spike_steps_follow_the_definition():
  losses = np.full(120, 2.0)
  losses[60] = 2.0 + lm_report.SPIKE_MARGIN + 0.01  # a spike
  losses[80:83] = 3.0  # one spike of three steps
  losses[100] = 2.0 + lm_report.SPIKE_MARGIN - 0.01  # under the margin
  losses[110] = np.nan
  losses[10] = 9.0  # before a full window: not judged
  assert lm_report.spike_steps(losses) == [60, 80, 110]


def test_group_names_split_into_leaf_and_layer():
  assert lm_report.split_group_name("blocks/attn/query/kernel[3]") == (
    "blocks/attn/query/kernel",
    3,
  )
  assert lm_report.split_group_name("embed/embedding") == ("embed/embedding", None)


def test_lr_sensitivity_against_a_hand_computation():
  # Initial 8; finals over four rates: 4, 3, 9 (worse than initial: counts 8), NaN (counts 8).
  final = np.array([4.0, 3.0, 9.0, np.nan])
  assert lm_sweep.lr_sensitivity(final, 8.0) == pytest.approx((4 + 3 + 8 + 8) / 4 - 3)
  assert lm_sweep.highest_training_lr([1e-3, 1e-2, 1e-1], [True, True, False]) == 1e-2
  assert lm_sweep.highest_training_lr([1e-3, 1e-2, 1e-1], [False, True, False]) == 1e-2
  assert lm_sweep.highest_training_lr([1e-3, 1e-2], [False, False]) == 0.0


def test_summary_rows_mark_runs_that_train():
  run = lambda lr, seed, bpb: {  # noqa: E731
    "lr": lr,
    "seed": seed,
    "initial_bits_per_byte": 8.0,
    "validation_bits_per_byte": bpb,
    "spikes": [],
  }
  grid = {
    "a": [run(0.1, 0, 3.0), run(1.0, 0, 3.2), run(0.1, 1, 3.0), run(1.0, 1, None)],
    "b": [run(0.1, 0, 4.0), run(1.0, 0, 3.1), run(0.1, 1, 3.1), run(1.0, 1, 3.2)],
  }
  rows = {r["name"]: r["metrics"] for r in lm_sweep.summarize(grid, [0.1, 1.0], [0, 1])}
  assert rows["a"]["max_lr"]["values"] == [1.0, 0.1]  # seed 1 at lr 1: non-finite
  assert rows["b"]["max_lr"]["values"] == [1.0, 1.0]  # seed 0 at 0.1: 4.0 > 1.1 x 3.0
  assert lm_sweep.every_seed(grid, [0.1, 1.0]) == {"a": 0.1, "b": 1.0}
  assert rows["a"]["lr_sensitivity"]["values"] == pytest.approx([0.1, (3.0 + 8.0) / 2 - 3.0])


# The scripts.


@pytest.mark.slow
@pytest.mark.parametrize(
  "clip",
  ["global", "none", "layer", "adagc", "skip_spikes", "block_rms", "growth_limit"]
  + ["stable_adamw", "spam", "clippy", "qk_clip"],
)
def test_train_lm_runs_and_writes_the_metrics(tmp_path, clip):
  results = train_lm.main([*TINY, "--clip", clip, "--out", str(tmp_path)])
  written = json.loads((tmp_path / "metrics.json").read_text())
  assert written["steps"] == 6 and len(written["step_loss"]) == 6
  for key in ("validation_bits_per_byte", "initial_bits_per_byte", "unigram_bits_per_byte"):
    assert isinstance(written[key], float)
  assert len(written["attention_logit_max"][0]) == 2  # one per layer
  assert written["corpus"]["sha256"] == lm_data.build_corpus().sha256
  assert set(written) >= {"diverged", "grad_norm", "clip_rate", "spikes", "samples"}
  assert results["validation_bits_per_byte"] < results["initial_bits_per_byte"]
  assert (tmp_path / "training.png").stat().st_size > 0


@pytest.mark.slow
def test_both_layer_layouts_train_alike():
  first = train_lm.main([*TINY, "--clip", "layer", "--max-norm", "0.05"])
  second = train_lm.main([*TINY, "--clip", "layer", "--max-norm", "0.05", "--layer-axis", "1"])
  assert any(first["clipped"])
  np.testing.assert_allclose(first["step_loss"], second["step_loss"], rtol=1e-5)
  np.testing.assert_allclose(first["grad_norm"], second["grad_norm"], rtol=1e-5)


@pytest.mark.parametrize("layer_axis", [pytest.param(0, marks=pytest.mark.slow), 1])
def test_qk_clip_in_the_lm_scales_each_layers_query_and_key_heads(layer_axis):
  # lr 0: AdamW moves nothing, so the step is QK-Clip's alone: head h of layer l has its
  # query and key columns multiplied by sqrt(min(1, tau / S[l, h])), its values untouched.
  config = lm.LMConfig(layers=2, width=16, heads=2, seq_len=8, layer_axis=layer_axis)
  definition = lm.define(config)
  params = definition.create_params(0)
  stacked = train_lm.layer_axes(definition)
  tx = train_lm.make_optimizer("qk_clip", 100.0, 0.0, stacked, heads=2)
  logits = jnp.array([[400.0, 50.0], [50.0, 1600.0]])  # (layers, heads)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params, attention_logits=logits)
  new = jax.tree.map(lambda p, u: p + u, params, updates)
  factor = np.sqrt(np.minimum(1.0, 100.0 / np.asarray(logits)))  # [[.5, 1], [1, .25]]
  for name in ("query", "key", "value"):
    before = np.moveaxis(np.asarray(params["blocks"]["attn"][name]["kernel"]), layer_axis, 0)
    after = np.moveaxis(np.asarray(new["blocks"]["attn"][name]["kernel"]), layer_axis, 0)
    expected = before.reshape(2, 16, 2, 8).copy()
    if name != "value":
      expected *= factor[:, None, :, None]
    np.testing.assert_allclose(after, expected.reshape(before.shape), rtol=1e-6)
  np.testing.assert_array_equal(new["head"]["kernel"], params["head"]["kernel"])


@pytest.mark.parametrize("flags", [["--lr", "-1"], ["--steps", "0"], ["--width", "15"]])
def test_train_lm_refuses_nonsense(flags, capsys):
  with pytest.raises(SystemExit):
    train_lm.parse_args(flags)


@pytest.mark.slow
def test_the_sweep_writes_a_results_file(tmp_path):
  results = lm_sweep.main(
    ["--methods", "none,global 1.0", "--lrs", "1e-2,1e-1", "--seeds", "0,1,2", "--steps", "4"]
    + ["--layers", "1", "--width", "16", "--heads", "2", "--seq-len", "16", "--batch-size", "2"]
    + ["--out", str(tmp_path), "--quiet"]
  )
  written = json.loads((tmp_path / "lm-lr-sweep.json").read_text())
  assert [r["name"] for r in written["rows"]] == ["none", "global 1.0"]
  assert len(written["grid"]["none"]) == 6
  assert reproduce.render_table(written) == reproduce.render_table(results)
  assert (tmp_path / "lm_lr_sweep.png").stat().st_size > 0
