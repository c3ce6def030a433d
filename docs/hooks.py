"""mkdocs hooks: the benchmark page shows ``benchmarks/README.md`` as it is in the repository.

The README is written to be read on GitHub, next to the scripts it names, so
it is adapted where it is included (``<!-- include benchmarks/README.md -->`` in
``docs/benchmarks.md``) rather than copied:

- its headings move one level down, under the page's own title;
- a relative link to a file (a script, a JSON result) becomes the file's
  repository path in code, since the site does not publish the scripts (a
  link to them would break ``mkdocs build --strict``);
- a relative image is published with the site, under ``benchmarks/``.

Without the README (a checkout in progress) the page says so instead of failing.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "benchmarks" / "README.md"
MARKER = "<!-- include benchmarks/README.md -->"
IMAGE_SUFFIXES = {".png", ".svg", ".jpg", ".jpeg", ".gif"}

_LINK = re.compile(r"(!?)\[([^\]]*)\]\(([^)\s]+)\)")
_HEADING = re.compile(r"^(#{1,5}) ", re.MULTILINE)


def _images(readme: str) -> set[str]:
  """Repository paths (``benchmarks/x.png``) of the local images the README shows."""
  found = set()
  for bang, _, target in _LINK.findall(readme):
    path = posixpath.normpath(posixpath.join("benchmarks", target.split("#")[0]))
    if bang and Path(path).suffix.lower() in IMAGE_SUFFIXES and (ROOT / path).is_file():
      found.add(path)
  return found


def _adapt(readme: str) -> str:
  def link(match: re.Match) -> str:
    bang, text, target = match.groups()
    if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
      return match.group(0)  # a URL or an anchor: fine as it is
    path = posixpath.normpath(posixpath.join("benchmarks", target.split("#")[0]))
    if bang and path in _images(readme):
      return f"![{text}]({path})"  # published by on_files, at this path
    return f"{text} (`{path}`)" if text and text.strip("`") != path else f"`{path}`"

  return _HEADING.sub(r"#\1 ", _LINK.sub(link, readme))


def on_files(files: Files, config) -> Files:
  if README.is_file():
    for path in sorted(_images(README.read_text())):
      files.append(
        File(path, src_dir=str(ROOT), dest_dir=config["site_dir"], use_directory_urls=False)
      )
  return files


def on_page_markdown(markdown: str, page, config, files) -> str:
  if MARKER not in markdown:
    return markdown
  if README.is_file():
    return markdown.replace(MARKER, _adapt(README.read_text()))
  return markdown.replace(
    MARKER, "!!! note\n    `benchmarks/README.md` is not in this checkout yet.\n"
  )
