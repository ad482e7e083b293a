"""How many CPU threads torch computes with: a default that holds up when other work shares the
cores, and a context to set it.

torch's own default is one thread per core. On a machine where another job keeps some cores busy
that collapses: the threads of each parallel region wait for the slowest one, which waits for a
core (measured on 2 cores with one busy loop beside the command: see docs/usage.md). The default
here is the number of usable cores minus the current load (the one-minute load average, rounded),
at least 1: on an idle machine every core, on a shared one the cores that are free.

Nothing here imports torch at module level (the command line decides the count before torch is
imported); :func:`using_threads` imports it when entered.
"""

from __future__ import annotations

import contextlib
import os

__all__ = ["usable_cores", "current_load", "default_threads", "check_threads", "using_threads"]


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS, Windows
        return os.cpu_count() or 1


def current_load() -> float:
    """The one-minute load average (runnable processes), 0.0 where the OS has none."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


def default_threads(cores: int | None = None, load: float | None = None) -> int:
    """Usable cores minus the current load (rounded), at least 1 and at most the cores; a
    positive ``OMP_NUM_THREADS`` in the environment (the user's own choice) wins when neither
    argument is given."""
    if cores is None and load is None:
        env = os.environ.get("OMP_NUM_THREADS", "")
        if env.isdigit() and int(env) > 0:
            return int(env)
    cores = usable_cores() if cores is None else cores
    load = current_load() if load is None else load
    return max(1, min(cores, cores - round(load)))


def check_threads(threads, name: str = "threads") -> int | None:
    """Validate a thread count: None (the default policy) or an integer >= 1."""
    if threads is None:
        return None
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"{name} must be a positive integer (or None for the default: usable "
                         f"cores minus the current load), got {threads!r}")
    return threads


@contextlib.contextmanager
def using_threads(threads: int | None = None):
    """Run the body with ``threads`` torch CPU threads (None: :func:`default_threads`), and put
    the previous count back afterwards. Yields the count in force::

        from toolkit import using_threads
        with using_threads(1):
            compress(model, tok, sparsity=0.5)
    """
    import torch

    n = default_threads() if check_threads(threads) is None else threads
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(before)
