"""A griffe extension: clipx's docstrings use a little reStructuredText; the site is Markdown.

The docstrings follow Optax's habits (``code``, :func:`clipx.autoclip`,
`Title <https://...>`_ links, ``::`` before a code block), which read well in
``help()`` and on GitHub. mkdocstrings renders docstrings as Markdown, so
before rendering this rewrites the three constructs Markdown lacks:

- ``:func:`name``` (and ``:class:``, ``:mod:``, ``:data:``, ``:meth:``,
  ``:attr:``) becomes a link to the API reference when ``name`` is a public
  clipx name (one in ``clipx.__all__``, each documented on ``api.md``), and
  plain code otherwise;
- ``\\`Title <url>\\`_`` becomes ``[Title](url)``;
- a paragraph ending in ``::`` ends in ``:`` (the indented block after it is
  already a Markdown code block).

``clipx.__all__`` is read from the source, so the build does not import JAX.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import griffe

_ROLE = re.compile(r":(?:func|class|mod|data|meth|attr|obj):`~?([^`]+)`")
_LINK = re.compile(r"`([^`<]+?)\s*<(https?://[^>]+)>`_{1,2}")
_LITERAL = re.compile(r"(\S)::$", re.MULTILINE)


def public_names(init: Path) -> set[str]:
  """The names in ``__all__`` of a package's ``__init__.py``, read without importing it."""
  for node in ast.parse(init.read_text()).body:
    if isinstance(node, ast.Assign) and any(
      isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
    ):
      return set(ast.literal_eval(node.value))
  return set()


def to_markdown(text: str, public: set[str]) -> str:
  """The docstring ``text`` with its reStructuredText roles, links and ``::`` rewritten."""

  def role(match: re.Match) -> str:
    target = match.group(1).strip()
    name = target.removeprefix("clipx.")
    if name in public:
      return f"[`{target}`][clipx.{name}]"
    return f"`{target}`"

  text = _ROLE.sub(role, text)
  text = _LINK.sub(r"[\1](\2)", text)
  return _LITERAL.sub(r"\1:", text)


class RstToMarkdown(griffe.Extension):
  """Rewrites every docstring of a loaded package (see the module docstring)."""

  def on_package(self, *, pkg: griffe.Module, **kwargs) -> None:
    init = pkg.filepath if isinstance(pkg.filepath, Path) else None
    public = public_names(init) if init is not None and init.name == "__init__.py" else set()
    self._rewrite(pkg, public)

  def _rewrite(self, obj: griffe.Object, public: set[str]) -> None:
    if obj.docstring is not None:
      obj.docstring.value = to_markdown(obj.docstring.value, public)
    for member in obj.members.values():
      if not member.is_alias:
        self._rewrite(member, public)
