"""The benchmark scripts start (their imports and arguments hold), and bench/stream.py runs end
to end on a tiny model: a CSV with both paths, bitwise-equal checkpoints, the machine line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
SCRIPTS = sorted(p.name for p in BENCH.glob("*.py") if not p.name.startswith("_"))


def test_every_script_is_listed():
    assert {"act_order.py", "compress.py", "distributed.py", "gpu.py", "inference.py",
            "readers.py", "refine.py", "solver.py", "stream.py", "tradeoff.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script):
    r = subprocess.run([sys.executable, str(BENCH / script), "--help"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "usage:" in r.stdout


def test_stream_bench_tiny(tmp_path):
    out = tmp_path / "stream.csv"
    r = subprocess.run([sys.executable, str(BENCH / "stream.py"), "--hidden", "64",
                        "--intermediate", "128", "--blocks", "2", "--heads", "4", "--vocab", "500",
                        "--nsamples", "4", "--seqlen", "32", "--threads", "1", "--out", str(out),
                        "--workdir", str(tmp_path / "work")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    df = pd.read_csv(out)
    assert list(df["mode"]) == ["stream", "memory"]
    assert df["bitwise_equal"].all()
    assert (df["peak_MiB"] > df["libraries_MiB"]).all()
    assert df["share_vs_memory"].iloc[1] == 1.0
    assert "CPU cores" in df["machine"].iloc[0] and "torch" in df["machine"].iloc[0]
    assert (tmp_path / "work" / "out-stream" / "config.json").is_file()


def test_gpu_bench_says_no_gpu_and_runs_its_cpu_smoke(tmp_path):
    """bench/gpu.py: without a GPU it says so (exit 2); --cpu-smoke runs every step on the CPU
    (a random tiny LLaMA, the CUDA tests left to their own run) and writes its three tables."""
    import torch

    if not torch.cuda.is_available():
        r = subprocess.run([sys.executable, str(BENCH / "gpu.py")], capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 2 and "NO CUDA GPU IS PRESENT" in r.stdout
    r = subprocess.run([sys.executable, str(BENCH / "gpu.py"), "--cpu-smoke", "--model", "tiny",
                        "--skip-tests", "--out-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "CPU SMOKE RUN" in r.stdout
    runs = pd.read_csv(tmp_path / "gpu_smoke_compress.csv")
    assert list(runs["setting"]) == ["dense", "SparseGPT 50%", "GPTQ 4-bit g128",
                                     "SparseGPT 50% + GPTQ 4-bit g128"]
    assert (runs["perplexity"] > 1).all() and runs["smoke"].all()
    blocks = pd.read_csv(tmp_path / "gpu_smoke_blocks.csv")
    assert sorted(blocks["block"].unique()) == [0, 1, 2, 3] and len(blocks) == 12
    agree = pd.read_csv(tmp_path / "gpu_smoke_agreement.csv")
    # on the CPU both sides are the CPU: every mask agrees
    assert (agree["mask_agreement"] == 1.0).all()
    assert len(agree[agree["kind"] == "same problem"]) == 2 * 7
