"""The reader matrix of ``tests/test_readers.py`` with other transformers / compressed-tensors
versions: which of the toolkit's checkpoints they load, refuse, or load wrong.

    python bench/readers.py --python /path/to/venv-a/bin/python /path/to/venv-b/bin/python

Writes every scheme x layout of the matrix with this environment's toolkit (into ``--workdir``,
each folder with ``reference.safetensors``: the in-memory model's logits), then loads each
folder in each given Python -- an environment with torch, transformers and compressed-tensors,
no toolkit needed -- with plain ``from_pretrained`` and with the dequantizing config
(``CompressedTensorsConfig(dequantize=True)``; ``run_compressed=False`` on transformers 4),
and compares the logits bitwise. Writes ``data/results/readers_other_versions.csv`` (one row
per scheme, layout, environment and reader) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from _machine import describe

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

# run by the other environments: no toolkit import, only transformers + compressed-tensors
LOADER = r'''
import json, sys, warnings
from pathlib import Path
import torch
import transformers, compressed_tensors
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
warnings.filterwarnings("ignore")
transformers.logging.set_verbosity_error()
v = (transformers.__version__, compressed_tensors.__version__)
out = []
for folder in json.loads(sys.argv[1]):
    ref = load_file(str(Path(folder) / "reference.safetensors"))
    for reader in ("transformers", "dequantize"):
        try:
            kw = {}
            if reader == "dequantize":
                from transformers.utils.quantization_config import CompressedTensorsConfig
                major = int(transformers.__version__.split(".")[0])
                kw["quantization_config"] = CompressedTensorsConfig(
                    **({"dequantize": True} if major >= 5 else {"run_compressed": False}))
            m = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kw).eval()
            with torch.no_grad():
                logits = m(ref["input_ids"]).logits.float()
            status = "loads" if torch.equal(logits, ref["logits"]) else "wrong"
            detail = "" if status == "loads" else \
                f"max |diff| {float((logits - ref['logits']).abs().max()):.3g}"
        except Exception as e:
            status, detail = "error", f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
        out.append(dict(folder=Path(folder).name, reader=reader, outcome=status, detail=detail,
                        transformers=v[0], compressed_tensors=v[1]))
print("RESULT " + json.dumps(out))
'''


def write_folders(root: Path) -> dict[str, tuple[str, str]]:
    """Every scheme x layout of the matrix: ``{folder name: (scheme, layout)}``."""
    import logging

    import torch
    from conftest import tiny_model
    from safetensors.torch import save_file
    from test_readers import BATCH, CALIB, LAYOUTS, SCHEMES

    import toolkit
    from toolkit.checkpoint.saveload import save_compressed

    logging.getLogger("toolkit").setLevel(logging.ERROR)
    names = {}
    for label, (family, model_kw, kw) in SCHEMES.items():
        model = tiny_model(family, **model_kw)
        toolkit.compress(model, **CALIB, **kw)
        with torch.no_grad():
            ref = model(BATCH).logits.float()
        for layout in LAYOUTS:
            name = f"{re.sub(r'[^a-z0-9]+', '-', label.lower())}-{layout}"
            folder = save_compressed(model, root / name, layout=layout, overwrite=True)
            save_file({"logits": ref.contiguous(), "input_ids": BATCH.contiguous()},
                      str(folder / "reference.safetensors"))
            names[name] = (label, layout)
    return names


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--python", nargs="+", required=True,
                   help="Python executables of the environments to try")
    p.add_argument("--workdir", default=None, help="where the checkpoints go (default: a "
                                                   "temporary folder)")
    p.add_argument("--out", default=str(REPO / "data" / "results" /
                                        "readers_other_versions.csv"))
    args = p.parse_args(argv)
    import pandas as pd

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="readers-"))
    names = write_folders(work)
    folders = json.dumps([str(work / n) for n in names])
    rows = []
    for py in args.python:
        r = subprocess.run([py, "-c", LOADER, folders], capture_output=True, text=True,
                           timeout=3600)
        if r.returncode != 0:
            print(r.stderr[-3000:], file=sys.stderr)
            return 1
        line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")][-1]
        for row in json.loads(line[len("RESULT "):]):
            scheme, layout = names[row.pop("folder")]
            rows.append(dict(scheme=scheme, layout=layout, **row))
    df = pd.DataFrame(rows).assign(machine=describe())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(out, index=False)
    words = {"loads": "equal", "error": "error", "wrong": "WRONG"}
    envs = list(dict.fromkeys(zip(df["transformers"], df["compressed_tensors"])))
    head = ["scheme", "layout"] + [f"{t} + ct {c} {r}" for t, c in envs
                                   for r in ("plain", "dequantize")]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for (scheme, layout), g in df.groupby(["scheme", "layout"], sort=False):
        cells = [words[g[(g.transformers == t) & (g.compressed_tensors == c) &
                         (g.reader == r)].outcome.iloc[0]]
                 for t, c in envs for r in ("transformers", "dequantize")]
        print(f"| {scheme} | {layout} | " + " | ".join(cells) + " |")
    print(f"\ncommand: python bench/readers.py --python {' '.join(args.python)}\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
