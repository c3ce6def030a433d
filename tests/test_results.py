"""The README's trained figures are the committed results files, rendered.

``python examples/reproduce.py`` writes ``results/<experiment>.json`` and the
Markdown blocks; these tests re-render the blocks from the files (no
training) and hold every ``<!-- results:NAME -->`` block of the README and the
docs to them, and check each file's spread against numpy.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from examples import reproduce  # noqa: E402

RESULTS = sorted((ROOT / "results").glob("*.json"))
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"<!-- results:([\w-]+) -->\n(.*?)\n<!-- /results -->", re.S)


def test_every_registered_experiment_has_a_results_file():
  assert {p.stem for p in RESULTS} >= set(reproduce.REGISTRY)


@pytest.mark.parametrize("path", RESULTS, ids=lambda p: p.stem)
def test_results_file_has_seeds_and_a_consistent_spread(path):
  results = json.loads(path.read_text())
  seeds = results["seeds"]
  assert len(seeds) >= 3 and len(set(seeds)) == len(seeds)
  assert {"cpu", "cores", "platform", "jax", "flax", "optax"} <= set(results["machine"])
  assert "{seed}" in results["command"]
  assert results["rows"]
  for row in results["rows"]:
    for key, stat in row["metrics"].items():
      values = np.array(stat["values"], float)
      assert len(values) == len(seeds), (row["name"], key)
      assert stat["median"] == pytest.approx(np.median(values), abs=1e-12), (row["name"], key)
      assert stat["min"] == np.min(values) and stat["max"] == np.max(values)


def test_readme_blocks_match_the_results_files():
  expected = reproduce.blocks()
  found = {}
  for document in DOCUMENTS:
    for name, text in BLOCK.findall(document.read_text()):
      assert name in expected, f"{document.name}: no results/{name}.json for block {name}"
      assert text == expected[name], (
        f"{document.name}: block {name} differs from results/{name}.json;"
        " run `python examples/reproduce.py --out results --tables-only --sync-docs`"
      )
      found[name] = document.name
  # Every experiment's table is quoted in the README, with the machine it ran on.
  assert set(expected) <= set(found), set(expected) - set(found)


def test_tables_file_is_the_rendering():
  assert (ROOT / "results" / "tables.md").read_text() == reproduce.render_document()


def test_table_rendering(tmp_path):
  """A made-up file: median [min, max] per row, the command with S for the seed."""
  stat = reproduce.summarize([0.97, 0.99, 0.98])
  assert stat == {"values": [0.97, 0.99, 0.98], "median": 0.98, "min": 0.97, "max": 0.99}
  results = {
    "seeds": [0, 1, 2],
    "command": "python x.py --seed {seed}",
    "row_header": "method",
    "rows": [{"name": "a", "metrics": {"test_accuracy": stat}}],
  }
  assert reproduce.render_table(results).splitlines() == [
    "Median [min, max] over seeds 0, 1, 2; one seed: `python x.py --seed S`.",
    "",
    "| method | test accuracy |",
    "|---|---|",
    "| a | 0.980 [0.970, 0.990] |",
  ]


def test_fewer_than_three_seeds_is_refused(capsys):
  with pytest.raises(SystemExit):
    reproduce.parse_args(["--seeds", "0,1"])
  assert "at least 3" in capsys.readouterr().err


def test_reproduce_writes_under_runs_unless_told_results():
  # Scripts never write over tracked files by default; the committed files need --out results.
  assert reproduce.parse_args([]).out == "runs/results"
  assert reproduce.parse_args(["--out", "results"]).out == "results"
