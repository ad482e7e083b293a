"""Re-execute the tutorial notebooks in place, so that they are committed with the outputs of one
run, figures included.

    python tutorials/execute.py          # all six, one after the other
    python tutorials/execute.py 02 04    # the notebooks whose names start with 02 and 04

Each notebook is cleared and run top to bottom in a fresh kernel with the working directory set
to ``tutorials/`` (so that relative paths resolve as they do for a reader), offline, and with
matplotlib's **inline** backend, the one JupyterLab's kernel uses: every figure a cell draws is
stored in the notebook as a PNG. Under ``MPLBACKEND=Agg`` (set by some test harnesses)
``plt.show()`` draws nothing into the notebook, so the backend is forced here, whatever the
environment says. A notebook is written back only when it ran without error and holds at least
as many figures as its code draws (:func:`check_figures`); each one's run time is printed.

``tests/test_notebooks.py`` uses the same functions.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

import nbclient
import nbformat

TUTORIALS = Path(__file__).resolve().parent
NOTEBOOKS = sorted(TUTORIALS.glob("[0-9][0-9]_*.ipynb"))
INLINE = "module://matplotlib_inline.backend_inline"   # the ipykernel default
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TQDM_DISABLE": "1"}
# a call that makes one figure: pyplot's, and the toolkit's trade-off plot (a Figure of its own)
FIGURE_CALL = re.compile(r"\b(?:plt\.(?:subplots|figure)|plot_tradeoff)\(")
# what a path of this machine looks like in an output (a warning's file name, a cache folder)
MACHINE_PATH = re.compile(r"(?<![\w.])/(?:work|root|tmp|home|Users|private|var/folders)/")


def code_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def figure_calls(nb) -> int:
    """How many figures the notebook's code makes: its ``plt.subplots``/``plt.figure`` (and
    ``plot_tradeoff``) calls, counted in the source, comments left out."""
    calls = 0
    for c in code_cells(nb):
        lines = (line.split("#", 1)[0] for line in c.source.splitlines())
        calls += sum(len(FIGURE_CALL.findall(line)) for line in lines)
    return calls


def png_outputs(nb) -> int:
    """How many PNG images the notebook's outputs hold."""
    return sum("image/png" in o.get("data", {}) for c in code_cells(nb) for o in c.outputs)


def check_figures(nb, name: str = "notebook") -> None:
    """Raise AssertionError unless the outputs hold at least one PNG and at least one per
    figure the code makes."""
    calls, pngs = figure_calls(nb), png_outputs(nb)
    assert pngs >= 1, f"{name}: no figure in the outputs (its code makes {calls})"
    assert pngs >= calls, (f"{name}: {pngs} figures in the outputs, but its code makes {calls}: "
                           "were they executed with a non-inline matplotlib backend (Agg)?")


def output_text(nb) -> str:
    """All text of the outputs (streams, plain text, HTML, tracebacks), for the path check."""
    parts = []
    for c in code_cells(nb):
        for o in c.outputs:
            parts.append(o.get("text", ""))
            for key, value in o.get("data", {}).items():
                if key.startswith("text/"):
                    parts.append(value if isinstance(value, str) else "".join(value))
            parts.extend(o.get("traceback", []))
    return "\n".join(parts)


def machine_paths(nb) -> list[str]:
    """The lines of the outputs that show a path of the machine that ran them."""
    return [line for line in output_text(nb).splitlines() if MACHINE_PATH.search(line)]


def clear(nb):
    for c in code_cells(nb):
        c.outputs, c.execution_count = [], None
        c.metadata.pop("execution", None)
    return nb


def execute(nb, backend: str = INLINE, timeout: int = 1800, cwd: Path = TUTORIALS):
    """Run ``nb`` (cleared first) top to bottom in a fresh python3 kernel whose environment has
    ``MPLBACKEND=backend`` and the offline switches; returns it, executed. Raises
    ``nbclient.exceptions.CellExecutionError`` when a cell raises."""
    clear(nb)
    env = {**os.environ, **OFFLINE, "MPLBACKEND": backend}
    client = nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                     record_timing=False,
                                     resources={"metadata": {"path": str(cwd)}})
    client.execute(env=env)
    return nb


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("only", nargs="*", help="prefixes of the notebooks to run (default: all)")
    args = ap.parse_args(argv)
    paths = [p for p in NOTEBOOKS if not args.only or any(p.name.startswith(o) for o in args.only)]
    if not paths:
        ap.error(f"no notebook matches {args.only}")
    failed = 0
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        t0 = time.perf_counter()
        try:
            execute(nb)
            check_figures(nb, path.name)
            leaks = machine_paths(nb)
            assert not leaks, f"{path.name}: machine paths in the outputs: {leaks[:3]}"
        except (nbclient.exceptions.CellExecutionError, AssertionError) as e:
            print(f"{path.name}: FAILED after {time.perf_counter() - t0:.0f} s, not written:\n{e}",
                  file=sys.stderr)
            failed += 1
            continue
        nbformat.write(nb, path)
        load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
        print(f"{path.name}: {time.perf_counter() - t0:.0f} s{load}, {png_outputs(nb)} figures "
              f"({figure_calls(nb)} drawn by its code)", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
