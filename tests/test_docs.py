"""The README and docs/: every relative link resolves to a file, folder or heading (GitHub's anchors), and every page
in docs/ is reachable from the README."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^ {0,3}(```|~~~)")
CODE_SPAN = re.compile(r"(`+).*?\1")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)  # http:, https:, mailto:


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks."""
    lines, fenced = [], None
    for line in text.splitlines():
        fence = FENCE.match(line)
        if fence and (fenced is None or fence.group(1) == fenced):
            fenced = fence.group(1) if fenced is None else None
        elif fenced is None:
            lines.append(line)
    return lines


def links(text: str) -> list[str]:
    """Link targets in the prose, inline code spans left out."""
    return [m.group(1) for line in prose_lines(text) for m in LINK.finditer(CODE_SPAN.sub("", line))]


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: its text without markup, lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "")
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every heading's anchor; a repeated one gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    out = set()
    for line in prose_lines(text):
        match = HEADING.match(line)
        if match:
            base = slug(match.group(2))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def broken_links(page: Path) -> list[str]:
    """The page's relative links whose file, folder or heading is not there."""
    broken = []
    for target in links(page.read_text(encoding="utf-8")):
        if EXTERNAL.match(target):
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / unquote(path)).resolve() if path else page
        if not resolved.exists():
            broken.append(f"{target}: no such file or folder")
        elif anchor and (resolved.suffix != ".md" or anchor not in anchors(resolved.read_text(encoding="utf-8"))):
            broken.append(f"{target}: no such heading")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    assert links(page.read_text(encoding="utf-8")), f"{page.name} links nowhere"
    assert broken_links(page) == []


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(ROOT / unquote(t.partition("#")[0])).resolve() for t in links((ROOT / "README.md").read_text())}
    assert [p.name for p in PAGES[1:] if p.resolve() not in linked] == []


def test_the_checker_finds_broken_links_and_anchors(tmp_path):
    (tmp_path / "a.md").write_text("# Top\n\n## Same `code` name: here\n\n## Top\n\n```sh\n# not a heading\n```\n")
    page = tmp_path / "b.md"
    page.write_text(
        "[ok](a.md#top) [ok](a.md#top-1) [ok](a.md#same-code-name-here) [ok](#b) [web](https://example.org/x)\n"
        "`[in code](missing.md)`\n\n# B\n\n"
        "[gone](missing.md) [bad anchor](a.md#not-a-heading)\n"
        "```\n[fenced](missing.md)\n```\n"
    )
    assert broken_links(page) == ["missing.md: no such file or folder",
                                  "a.md#not-a-heading: no such heading"]


def section(page: Path, heading: str) -> str:
    """The text under a heading, up to the next heading of the same or a higher level."""
    lines = prose_lines(page.read_text(encoding="utf-8"))
    starts = [i for i, line in enumerate(lines) if (m := HEADING.match(line)) and m.group(2) == heading]
    assert starts, f"no section {heading!r} in {page.name}"
    level = len(HEADING.match(lines[starts[0]]).group(1))
    end = next((i for i in range(starts[0] + 1, len(lines))
                if (m := HEADING.match(lines[i])) and len(m.group(1)) <= level), len(lines))
    return "\n".join(lines[starts[0] + 1:end])


def test_the_repository_layout_names_every_module_script_and_helper():
    layout = section(ROOT / "docs" / "architecture.md", "Repository layout")
    package = ROOT / "Python" / "image_similarity"
    modules = [p.stem for p in package.rglob("*.py") if p.stem != "__init__"]
    scripts = [p.name for p in (ROOT / "benchmarks").glob("*.py")]
    helpers = [p.name for p in (ROOT / "tests").rglob("*.py")
               if not p.name.startswith("test_") and p.name not in ("conftest.py", "__init__.py")]
    assert modules and scripts and helpers
    named = set(re.findall(r"`([\w.]+?)(?:\.py)?`", layout))
    assert [name for name in modules + scripts + helpers if name.removesuffix(".py") not in named] == []


def test_the_readme_layout_names_every_top_level_folder():
    layout = section(ROOT / "README.md", "Layout")
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    folders = {line.split("/", 1)[0] for line in tracked.splitlines() if "/" in line}
    assert folders and [f for f in sorted(folders) if f"`{f}/" not in layout] == []
