"""The front door and the rooms: README short and linked to every docs page, no broken link,
and every file under data/results/ indexed with the command that wrote it."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md"] + sorted((REPO / "docs").glob("*.md")) + \
    [REPO / "data" / "README.md", REPO / "data" / "results" / "README.md",
     REPO / "tutorials" / "README.md"]


def _slug(heading: str) -> str:
    """A heading's anchor as GitHub makes it."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, flags=re.M)}


def _links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    return [t for t in re.findall(r"\]\(([^)\s]+)\)", text)
            if not re.match(r"[a-z]+://", t) and not t.startswith("mailto:")]


def test_readme_is_short():
    assert len((REPO / "README.md").read_text(encoding="utf-8").splitlines()) <= 250


def test_every_docs_page_is_linked_from_readme():
    linked = {(REPO / t.partition("#")[0]).resolve() for t in _links(REPO / "README.md")}
    pages = set((REPO / "docs").glob("*.md"))
    assert pages, "no docs/ pages"
    assert {p.resolve() for p in pages} <= linked, sorted(
        p.name for p in pages if p.resolve() not in linked)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page):
    broken = []
    for target in _links(page):
        path, _, frag = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(target)
        elif frag and dest.suffix == ".md" and frag not in _anchors(dest):
            broken.append(target)
    assert broken == []


def test_link_checker_sees_a_broken_link(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("# Top\n[a](missing.md) [b](#top) [c](#nowhere) [d](https://x.org)\n")
    assert _links(page) == ["missing.md", "#top", "#nowhere"]
    assert _anchors(page) == {"top"}


def test_results_index_lists_every_file():
    res = REPO / "data" / "results"
    rows = re.findall(r"^\| `([^`]+)` \|", (res / "README.md").read_text(encoding="utf-8"),
                      flags=re.M)
    assert len(rows) == len(set(rows)), "a file has two rows"
    files = {p.name for p in res.iterdir() if p.is_file()} - {"README.md"}
    try:
        tracked = subprocess.run(["git", "ls-files", "."], cwd=res, capture_output=True,
                                 text=True, check=True).stdout.split()
        files |= {Path(p).name for p in tracked} - {"README.md"}
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: the files suffice
        pass
    assert set(rows) == files, (sorted(files - set(rows)), sorted(set(rows) - files))


def test_results_index_names_the_commit_that_last_wrote_each_file():
    """The commit column is `git log -1 -- FILE` (a clone without history cannot check it)."""
    res = REPO / "data" / "results"
    text = (res / "README.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| `([^`]+)` \|.*\| `([0-9a-f]{7,40})` \|", text, flags=re.M)
    assert len(rows) >= 40
    wrong = []
    for name, commit in rows:
        last = subprocess.run(["git", "log", "-1", "--format=%H", "--", name], cwd=res,
                              capture_output=True, text=True, check=True).stdout.strip()
        assert last, f"{name}: no commit wrote it (shallow clone?)"
        if not last.startswith(commit):
            wrong.append((name, commit, last[:7]))
    assert not wrong, f"index commit differs from git log -1 (file, index, git): {wrong}"
