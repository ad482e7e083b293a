"""The package's layering: imports point down only, and no module takes part in an import cycle.

``lint-imports`` (the contracts in ``pyproject.toml``, run by ``.ci/run``) checks the layers;
this test draws the whole import graph of ``toolkit`` with grimp (function-level imports
included) and asserts that it has no cycle at all, not even inside one layer.
"""

from __future__ import annotations

from pathlib import Path

import grimp
import pytest
import tomllib

REPO = Path(__file__).resolve().parents[1]


def _graph():
    return grimp.build_graph("toolkit", include_external_packages=False, cache_dir=None)


def _cycles(graph) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), plus self-imports.
    Imports of a package's ``__init__`` by its own submodules are ignored (Python runs the
    ``__init__`` first anyway; only the package's public face re-exports, checked by the
    'forbidden' contract)."""
    nodes = sorted(graph.modules)
    edges = {m: sorted(graph.find_modules_directly_imported_by(m)) for m in nodes}
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if v.startswith(w + "."):  # a submodule importing its own package
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in nodes:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle():
    assert _cycles(_graph()) == []


def test_cycle_finder_sees_a_cycle():
    """The finder itself: a graph with one planted cycle (function-level imports count)."""
    g = grimp.ImportGraph()
    for m in ("p", "p.a", "p.b", "p.c"):
        g.add_module(m)
    g.add_import(importer="p.a", imported="p.b")
    g.add_import(importer="p.b", imported="p.c")
    g.add_import(importer="p.c", imported="p.a")
    g.add_import(importer="p.a", imported="p")
    assert _cycles(g) == [["p.a", "p.b", "p.c"]]


def test_every_subpackage_is_a_layer_and_says_what_it_may_import():
    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    layers = next(c for c in cfg["contracts"] if c["type"] == "layers")["layers"]
    named = {part.strip() for layer in layers for part in layer.split("|")}
    pkg = REPO / "toolkit"
    subpackages = {p.parent.name for p in pkg.glob("*/__init__.py")}
    modules = {p.stem for p in pkg.glob("*.py")} - {"__init__", "__main__"}
    assert subpackages | modules == named
    for sub in sorted(subpackages):
        doc = (pkg / sub / "__init__.py").read_text()
        assert doc.startswith('"""') and "May import" in doc, f"toolkit/{sub}/__init__.py"


@pytest.mark.parametrize("contract_type", ["layers", "forbidden"])
def test_contracts_are_configured(contract_type):
    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    assert any(c["type"] == contract_type for c in cfg["contracts"])
