"""The project reads nothing outside its repository, and its committed outputs name no machine.

Every tracked text file is scanned (code, notebooks with their outputs, docs, results): a
relative path that climbs above the repository root, a reference to the sibling ``shared``
folder, ``Path(__file__)`` parents above the root, or an absolute path of this machine (home
folders, ``/work/``, ``/tmp/``) fails the test, with the file and line. Cheap: no model, no torch.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
THIS = Path(__file__).resolve()

# assembled from pieces so that this file does not match its own patterns
SIBLING = re.compile(r"\.\./" + "shared" + r"|\b" + "shared" + r"[/\"' ,]+(?:/\s*)?\"?data\"?\s*/\s*\"?wikitext")
MACHINE_PATHS = re.compile(r"(?<![\w.])/(?:" + "|".join(["work", "root", "home", "tmp", "Users"])
                           + r")/[\w.-]")
CLIMB = re.compile(r"(?<![\w.])((?:\.\./)+)([\w.-]*)")
PARENTS = re.compile(r"__file__\)\.resolve\(\)\.parents\[(\d+)\]|__file__\)\.parents\[(\d+)\]")
REPO_PARENT = re.compile(r"\b(?:REPO|ROOT|HERE)\.parent\b")
DEAD_KNOB = re.compile("TOOLKIT_" + "WIKITEXT")


def tracked_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True)
        names = [n for n in out.stdout.decode().split("\0") if n]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: walk the tree
        skip = {".git", ".venv", "venv", "__pycache__", ".pytest_cache", ".ruff_cache", "build",
                "dist", ".hypothesis", ".ipynb_checkpoints"}
        names = [str(p.relative_to(REPO)) for p in REPO.rglob("*")
                 if p.is_file() and not skip & set(p.relative_to(REPO).parts)
                 and not p.name.endswith(".egg-info")]
    return [REPO / n for n in names]


def text_of(path: Path) -> str | None:
    if path.suffix in {".png", ".safetensors", ".gguf", ".bin", ".pt"} or not path.is_file():
        return None
    if path.parts[-2:-1] == ("wikitext2",):  # the bundled data itself
        return None
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return None


def violations(path: Path, text: str) -> list[str]:
    rel = path.relative_to(REPO)
    depth = len(rel.parts) - 1  # folders between the repository root and the file
    found = []
    for lineno, line in enumerate(text.splitlines(), 1):
        where = f"{rel}:{lineno}"
        if SIBLING.search(line):
            found.append(f"{where}: refers to the sibling 'shared' folder: {line.strip()[:120]}")
        if MACHINE_PATHS.search(line):
            found.append(f"{where}: absolute machine path: {line.strip()[:120]}")
        if DEAD_KNOB.search(line):
            found.append(f"{where}: the removed WikiText location variable: {line.strip()[:120]}")
        if REPO_PARENT.search(line):
            found.append(f"{where}: a folder above the repository root: {line.strip()[:120]}")
        for m in PARENTS.finditer(line):
            n = int(m.group(1) or m.group(2))
            if n > depth:  # parents[depth] is the repository root
                found.append(f"{where}: Path(__file__).parents[{n}] is above the repository "
                             f"root (the file is {depth} folder(s) deep)")
        for m in CLIMB.finditer(line):
            ups = m.group(1).count("../")
            # relative to the file's own folder (notebooks and docs run/link from there)
            if ups > depth:
                found.append(f"{where}: '{m.group(0)}' climbs above the repository root")
    return found


def test_no_tracked_file_reads_outside_the_repository():
    files = tracked_files()
    assert len(files) > 20, "the scan found almost no files: is this the repository?"
    problems = []
    for path in files:
        if path.resolve() == THIS:
            continue
        text = text_of(path)
        if text is not None:
            problems += violations(path, text)
    assert not problems, "\n".join(problems)


def test_the_scan_catches_each_kind_of_outside_path():
    """The patterns above, on lines that must be caught (so the scan cannot pass vacuously)."""
    fake = REPO / "tests" / "x.py"  # depth 1
    bad = [
        'WIKI = REPO / ".." / ' + '"shared" / "data" / "wikitext2"',
        "open('../" + "shared/data/wikitext2/wiki.test.raw')",
        "print('/work/" + "main/data')",
        "ROOT = Path(__file__).resolve().parents[2]",
        "p = REPO.parent / 'x'",
        "cat ../../etc/passwd",
    ]
    for line in bad:
        assert violations(fake, line), line
    fine = ["REPO = Path(__file__).resolve().parents[1]", "see ../README.md", "x = a/b"]
    for line in fine:
        assert not violations(fake, line), line


def test_bundled_wikitext_is_the_recorded_data():
    """The bundled WikiText-2 files are byte for byte those data/README.md records."""
    import hashlib

    readme = (REPO / "data" / "README.md").read_text(encoding="utf-8")
    for name in ("wiki.test.raw", "wiki.valid.tokens"):
        path = REPO / "data" / "wikitext2" / name
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        assert digest in readme, f"{name}: SHA-256 {digest} is not the one data/README.md records"
