"""The docs a newcomer reads: every relative link in README.md and docs/ leads to a file, the README's quick start
is what CI runs, and every test the docs name as proof exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Written at the same time on another branch (min_p, repetition_penalty); linked before it lands here.
NOT_YET_MERGED = {ROOT / "docs" / "sampling.md"}

LINK = re.compile(r"\]\(([^)\s]+)\)")  # [text](target) and ![alt](target)


def relative_links(text: str) -> list[str]:
    """Link targets that are paths inside the repository (no scheme, not a bare #anchor), without the anchor."""
    targets = (m.group(1) for m in LINK.finditer(text))
    return [t.split("#")[0] for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:", t) and not t.startswith("#")]


def dead_links(page: Path) -> list[str]:
    dead = []
    for target in relative_links(page.read_text(encoding="utf-8")):
        path = (page.parent / target).resolve()
        if not path.exists() and path not in NOT_YET_MERGED:
            dead.append(target)
    return dead


def test_the_link_finder_sees_dead_and_live_links(tmp_path):
    page = tmp_path / "page.md"
    (tmp_path / "there.md").write_text("x")
    page.write_text("[a](there.md) [b](missing.md#part) ![c](img/none.png) [d](https://example.com) [e](#top)")
    assert relative_links(page.read_text()) == ["there.md", "missing.md", "img/none.png"]
    assert dead_links(page) == ["missing.md", "img/none.png"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    assert dead_links(page) == [], f"{page.relative_to(ROOT)} links to files that do not exist"


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(ROOT / t).resolve() for t in relative_links((ROOT / "README.md").read_text(encoding="utf-8"))}
    unlinked = [p.name for p in PAGES[1:] if p.resolve() not in linked]
    assert unlinked == []


def fenced_block_after(text: str, heading: str) -> list[str]:
    section = text.split(heading, 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, f"no bash block under {heading!r}"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_readme_quick_start_commands_are_the_ones_ci_runs():
    quick = fenced_block_after((ROOT / "README.md").read_text(encoding="utf-8"), "## Quick start")
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()]
    setup, test = quick[0], quick[1]
    assert setup in ci, "the README's setup command is not the one .ci/run runs"
    assert test in ci, "the README's test command is not the one .ci/run runs"
    assert ci.index(setup) < ci.index(test)
    assert quick[2] == 'llama3 generate "The capital of France is"'
    assert fenced_block_after((ROOT / "README.md").read_text(encoding="utf-8"), "## Tests") == [test]


def test_tests_named_in_the_docs_exist():
    named = []
    for page in PAGES:
        named += re.findall(r"(tests/test_\w+\.py)::(\w+)", page.read_text(encoding="utf-8"))
    assert named, "the docs name no tests: the pattern is out of date"
    missing = [f"{f}::{name}" for f, name in named if f"def {name}(" not in (ROOT / f).read_text(encoding="utf-8")]
    assert missing == []
