"""Writes one benchmark script's section of benchmarks/README.md, keeping the others."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent / "README.md"


def write_section(begin: str, end: str, body: str, readme: Path = README) -> None:
  """Replaces the text between the markers ``begin`` and ``end`` (appends it if absent).

  Each script owns the section between its own markers, so ``run.py`` and
  ``per_example.py`` can rewrite their tables without touching each other's.
  """
  section = f"{begin}\n{body}\n{end}"
  text = readme.read_text() if readme.exists() else "# Benchmarks\n"
  if begin in text and end in text:
    pattern = re.escape(begin) + ".*?" + re.escape(end)
    text = re.sub(pattern, lambda _: section, text, flags=re.S)
  else:
    text = text.rstrip("\n") + "\n\n" + section + "\n"
  readme.write_text(text)
