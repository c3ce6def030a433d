"""The README's two set-up commands stay true, and CI runs the test one."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _setup_commands() -> list[str]:
  readme = (ROOT / "README.md").read_text()
  first_block = re.search(r"```bash\n(.*?)```", readme, re.S)
  assert first_block, "README must open with a bash block of set-up commands"
  return [line for line in first_block.group(1).splitlines() if line.strip()]


def test_readme_has_exactly_two_setup_commands():
  commands = _setup_commands()
  assert commands == [
    'pip install -e ".[examples]" && python examples/train_cnn.py',
    'pip install -e ".[test]" && pytest',
  ]
  assert (ROOT / "examples" / "train_cnn.py").is_file()


def test_extras_named_by_the_commands_exist():
  tomllib = pytest.importorskip("tomllib")  # Python 3.11+
  extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
  for name in ("examples", "test", "cuda12", "tpu"):
    assert name in extras
  test_extra = " ".join(extras["test"])
  assert "examples" in test_extra and "pytest" in test_extra


def test_ci_runs_the_readme_test_command():
  ci = (ROOT / ".ci" / "run").read_text()
  assert 'pip install --quiet -e ".[test]"' in ci or 'pip install -e ".[test]"' in ci
  assert re.search(r"^pytest\s*$", ci, re.M)
  # The default run skips the slow tests; CI runs them too.
  assert re.search(r"^(CLIPX_WHEEL=1 )?pytest -m slow\s*$", ci, re.M)
