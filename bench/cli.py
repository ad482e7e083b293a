"""The first minutes at the command line: how fast the CLI answers, and what threads do under load.

    python bench/cli.py answers          # -> data/results/cli_answers.csv
    python bench/cli.py first-command    # -> data/results/first_command_threads.csv

``answers``: the wall time of each line of ``tests/test_cli.py::QUICK_ANSWERS`` (``--help``,
``--version``, flag and path errors, "nothing to do"), run as ``toolkit ...`` in a fresh process,
median of ``--repeats`` runs. The test checks that none of them imports torch or transformers
(which holds on any machine); this bench records the seconds that buys.

``first-command``: the README's first command, ``toolkit compress --sparsity 0.5 --bits 4``
(with ``--eval none``: the compress time alone, from the report's ``seconds``), on an idle
machine and beside one busy process per ``--busy`` core (a Python loop, as another job on a
shared machine would be), each once with the default thread count (usable cores minus the load)
and once with ``--threads`` set to every core (what torch does by default); idle also with
``--threads 1`` (what one free core does: the best a run beside one busy process on two cores
can hope for). Before the idle runs
the bench waits (up to ``--wait-idle`` seconds) until the one-minute load average is below 0.5,
so that work which ran just before does not lower the default; the load is started 70 s before
each loaded run so that the load average, which the default reads, has seen it. Writes one row
per run: condition, threads given, threads used, compress seconds, the ratio to the faster idle
run on every core (the idle figure), the machine.
"""

from __future__ import annotations

import argparse
import csv
import multiprocessing as mp
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _machine import describe

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def _toolkit(args: list[str], env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "toolkit", *args], capture_output=True,
                          text=True, cwd=REPO, env=env)


def answers(out: Path, repeats: int) -> None:
    from test_cli import QUICK_ANSWERS

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    rows = []
    for argv, code, _fragment in QUICK_ANSWERS:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            r = _toolkit(argv, env)
            times.append(time.perf_counter() - t0)
            assert r.returncode == code, (argv, r.returncode, r.stderr[-500:])
        rows.append(dict(command="toolkit " + " ".join(argv), exit=code,
                         median_s=round(statistics.median(times), 3),
                         max_s=round(max(times), 3), repeats=repeats, machine=describe()))
        print(f"{rows[-1]['median_s']:6.2f} s  {rows[-1]['command']}", flush=True)
    _write(out, rows)


def _busy() -> None:  # pragma: no cover - runs in a child process
    x = 0
    while True:
        x += 1


def _wait_idle(limit: float) -> None:
    t0 = time.monotonic()
    while os.getloadavg()[0] >= 0.5 and time.monotonic() - t0 < limit:
        time.sleep(10)
    print(f"load average {os.getloadavg()[0]:.2f} after {time.monotonic() - t0:.0f} s of waiting",
          flush=True)


def first_command(out: Path, busy: int, settle: float, wait_idle: float) -> None:
    cores = len(os.sched_getaffinity(0))
    base = ["compress", "--sparsity", "0.5", "--bits", "4", "--eval", "none"]
    # idle with one thread: what one free core can do, the floor of a run beside one busy process
    runs = [("idle", None), ("idle", cores), ("idle", 1), ("loaded", None), ("loaded", cores)]
    rows = []
    for condition, threads in runs:
        procs = []
        if condition == "idle":
            _wait_idle(wait_idle)
        if condition == "loaded":
            procs = [mp.Process(target=_busy, daemon=True) for _ in range(busy)]
            for p in procs:
                p.start()
            time.sleep(settle)
        try:
            argv = base + (["--threads", str(threads)] if threads else [])
            machine = describe()
            r = _toolkit(argv)
        finally:
            for p in procs:
                p.terminate()
                p.join()
        if r.returncode != 0:
            raise SystemExit(r.stderr[-2000:])
        used = re.search(r"with (\d+) threads", r.stderr)
        secs = re.search(r"^\s*seconds\s*:\s*([0-9.]+)", r.stdout, flags=re.M)
        seconds = float(secs.group(1)) if secs else float("nan")
        rows.append(dict(condition=condition, busy_processes=busy if procs else 0,
                         threads_given=threads or "default", threads_used=int(used.group(1)),
                         compress_seconds=round(seconds, 1), machine=machine))
        print(rows[-1], flush=True)
    idle = min(r["compress_seconds"] for r in rows if r["condition"] == "idle"
               and r["threads_used"] == cores)
    rows = [{**{k: v for k, v in r.items() if k != "machine"},
             "ratio_to_idle": round(r["compress_seconds"] / idle, 2), "machine": r["machine"]}
            for r in rows]
    _write(out, rows)


def _write(out: Path, rows: list[dict]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    tmp.replace(out)  # the whole CSV, from one run
    print(f"wrote {out}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    a = sub.add_parser("answers")
    a.add_argument("--repeats", type=int, default=5)
    a.add_argument("--out", type=Path, default=REPO / "data" / "results" / "cli_answers.csv")
    f = sub.add_parser("first-command")
    f.add_argument("--busy", type=int, default=1, help="busy processes beside loaded runs")
    f.add_argument("--settle", type=float, default=70.0,
                   help="seconds the load runs before a loaded run")
    f.add_argument("--wait-idle", type=float, default=900.0,
                   help="longest wait for the load average to fall below 0.5 before idle runs")
    f.add_argument("--out", type=Path,
                   default=REPO / "data" / "results" / "first_command_threads.csv")
    args = p.parse_args()
    if args.what == "answers":
        answers(args.out, args.repeats)
    else:
        first_command(args.out, args.busy, args.settle, args.wait_idle)


if __name__ == "__main__":
    main()
