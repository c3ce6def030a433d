"""docs/architecture.md stays true: its "may import" table is checked against the code.

Each row of the table names a module of ``clipx/`` and the clipx modules it
may import. The code's imports are read with ``ast`` (every ``import`` and
``from ... import`` anywhere in the file, functions included), so a new
import, a new module or a cycle in the making fails here until the page says
so.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "architecture.md"
PACKAGE = ROOT / "clipx"
HEADING = "## The modules, from the ground up"


def page_table(text: str) -> dict[str, list[str]]:
  """``{module: [modules it may import]}`` from the table under ``HEADING``, in row order."""
  section = text.split(HEADING, 1)[1].split("\n## ", 1)[0]
  rows: dict[str, list[str]] = {}
  for line in section.splitlines():
    cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
    if len(cells) != 3 or not cells[0].startswith("`"):
      continue
    (module,) = re.findall(r"`([\w.]+)`", cells[0])
    assert module not in rows, f"{module} has two rows"
    rows[module] = re.findall(r"`([\w.]+)`", cells[2])
    assert rows[module] or cells[2] == "nothing", f"{module}: '{cells[2]}'"
  return rows


def modules() -> set[str]:
  return {path.stem for path in PACKAGE.glob("*.py")}


def clipx_imports(path: Path, known: set[str]) -> set[str]:
  """The clipx modules ``path`` imports; ``"clipx"`` for the package itself."""
  found: set[str] = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      for alias in node.names:
        parts = alias.name.split(".")
        if parts[0] == "clipx":
          found.add(parts[1] if len(parts) > 1 else "clipx")
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      parts = node.module.split(".")
      if parts[0] != "clipx":
        continue
      if len(parts) > 1:
        found.add(parts[1])
      else:  # from clipx import a module, or a name of the package's __init__
        found |= {a.name if a.name in known else "clipx" for a in node.names}
    elif isinstance(node, ast.ImportFrom) and node.level > 0:
      found.add(f"relative import of {node.module}")  # the package uses absolute imports
  return found


@pytest.fixture(scope="module")
def table() -> dict[str, list[str]]:
  return page_table(PAGE.read_text())


def test_every_module_has_a_row(table):
  assert set(table) == modules()


def test_rows_import_only_earlier_rows(table):
  """The table is a stack: nothing may import a module of its own row or a later one."""
  order = list(table)
  for index, (module, allowed) in enumerate(table.items()):
    later = [name for name in allowed if name not in order[:index]]
    assert not later, f"{module} may import {later}, which are not below it"


@pytest.mark.parametrize("module", sorted(modules()))
def test_module_imports_what_its_row_allows(table, module):
  imports = clipx_imports(PACKAGE / f"{module}.py", modules())
  assert "clipx" not in imports or module == "__init__", f"{module} imports the package"
  extra = imports - set(table.get(module, [])) - {module}
  assert not extra, f"clipx/{module}.py imports {sorted(extra)}: docs/architecture.md forbids it"


def test_the_parser_sees_imports(tmp_path):
  """The checker is not vacuous: it finds each form of import, nested ones included."""
  source = tmp_path / "m.py"
  source.write_text(
    "import clipx.norms\nfrom clipx import scaling, stats\nfrom clipx.thresholds import x\n"
    "def f():\n  from clipx.guards import y\n  import clipx\nfrom clipx import global_norm\n"
  )
  known = {"norms", "scaling", "stats", "thresholds", "guards"}
  assert clipx_imports(source, known) == known | {"clipx"}
  table = page_table(f"{HEADING}\n\n| a | b | c |\n|---|---|---|\n| `x` | y | `norms`, `stats` |\n")
  assert table == {"x": ["norms", "stats"]}
