"""The package as users get it: built into an sdist and a wheel, installed outside the checkout.

The rest of the suite imports clipx from the working tree (an editable
install), so a file missing from the wheel, a wrong package-data entry or a
version that only the checkout knows would pass every other test. The build
test builds both archives (``python -m build``: the wheel from the sdist),
installs the wheel into a fresh virtual environment with its dependencies
from the package registry, and runs there, from an empty folder, the README
blocks that need only clipx's own dependencies. It takes about 40 s (the
registry's jax wheels come from pip's cache after the first run) and needs
the registry, so it runs only with ``CLIPX_WHEEL=1`` (a step of ``.ci/run``).
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import clipx

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from 3.11")

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
DEPENDENCIES = {"clipx", "jax", "optax", "chex", "numpy"}  # what the wheel installs
STDLIB = set(sys.stdlib_module_names)


def test_version_is_written_once():
  """pyproject reads the version from ``clipx.__version__``: no second copy to forget."""
  assert "version" not in PROJECT
  assert "version" in PROJECT["dynamic"]
  assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "clipx.__version__"}
  assert re.fullmatch(r"\d+\.\d+\.\d+", clipx.__version__)


def test_changelog_names_the_version():
  """The newest released entry of CHANGELOG.md is ``clipx.__version__``."""
  text = (ROOT / "CHANGELOG.md").read_text()
  released = re.findall(r"^## (\d+\.\d+\.\d+)", text, re.M)
  assert released and released[0] == clipx.__version__
  assert text.index("## Unreleased") < text.index(f"## {released[0]}")


def test_distribution_name_is_not_the_import_name():
  """PyPI's ``clipx`` is another project: the extras that name this one use its own name."""
  name = PROJECT["name"]
  assert name != "clipx"
  for extra, requirements in PROJECT["optional-dependencies"].items():
    for requirement in requirements:
      base = re.split(r"[\[<>=!~ ;]", requirement, maxsplit=1)[0]
      assert base != "clipx", f"extra {extra!r} names PyPI's clipx: {requirement!r}"


def readme_blocks() -> list[str]:
  """README python blocks that need no more than the wheel's dependencies, on one device."""
  blocks = re.findall(r"^```python\n(.*?)^```$", (ROOT / "README.md").read_text(), re.S | re.M)
  kept = []
  for block in blocks:
    modules = set()
    for node in ast.walk(ast.parse(block)):
      if isinstance(node, ast.Import):
        modules |= {alias.name.split(".")[0] for alias in node.names}
      elif isinstance(node, ast.ImportFrom):
        modules.add((node.module or "").split(".")[0])
    if modules <= DEPENDENCIES | STDLIB and "make_mesh" not in block:
      kept.append(block)
  return kept


def test_readme_has_blocks_for_the_wheel():
  assert len(readme_blocks()) >= 2


# Run in the fresh environment: where clipx came from, its version and files, the blocks.
CHECK = """
import importlib.metadata, json, pathlib, sys
import clipx
blocks = json.loads(sys.argv[1])
for block in blocks:
  exec(compile(block, "<README block>", "exec"), {"__name__": "__main__"})
package = pathlib.Path(clipx.__file__).parent
print(json.dumps({
  "file": clipx.__file__,
  "version": clipx.__version__,
  "metadata_version": importlib.metadata.version(sys.argv[2]),
  "py_typed": (package / "py.typed").is_file(),
  "blocks": len(blocks),
}))
"""


@pytest.mark.slow
@pytest.mark.skipif(
  not os.environ.get("CLIPX_WHEEL"),
  reason="builds and installs the wheel with the package registry (about 40 s); CLIPX_WHEEL=1",
)
def test_wheel_installs_and_runs(tmp_path):
  pytest.importorskip("build", reason="python -m build: the test extra installs it")

  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
  dist = tmp_path / "dist"
  subprocess.run(
    [sys.executable, "-m", "build", "--outdir", str(dist), str(ROOT)],
    check=True,
    capture_output=True,
    env=env,
  )
  stem = f"{PROJECT['name'].replace('-', '_')}-{clipx.__version__}"
  wheel = dist / f"{stem}-py3-none-any.whl"
  assert wheel.is_file() and (dist / f"{stem}.tar.gz").is_file(), sorted(dist.iterdir())
  assert "clipx/py.typed" in zipfile.ZipFile(wheel).namelist()

  venv = tmp_path / "venv"
  subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, env=env)
  python = venv / "bin" / "python"
  subprocess.run(
    [str(python), "-m", "pip", "install", "--quiet", str(wheel)],
    check=True,
    capture_output=True,
    env=env,
  )
  blocks = readme_blocks()
  work = tmp_path / "work"  # an empty folder: nothing of the checkout on sys.path
  work.mkdir()
  result = subprocess.run(
    [str(python), "-c", CHECK, json.dumps(blocks), PROJECT["name"]],
    capture_output=True,
    text=True,
    env={**env, "JAX_PLATFORMS": "cpu"},
    cwd=work,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  found = json.loads(result.stdout.strip().splitlines()[-1])
  assert Path(found["file"]).is_relative_to(venv), found["file"]
  assert found["version"] == found["metadata_version"] == clipx.__version__
  assert found["py_typed"]
  assert found["blocks"] == len(blocks)
