"""Compression on several processes with ``torch.distributed`` (``torchrun``; NCCL on GPUs, gloo on
CPUs).

Nothing here runs unless a process group is initialised: every function below is a no-op (or
the plain single-process call) otherwise, so the sweep has one code path. With a process group,
the sweep (:mod:`toolkit.walk.sweep`) calls these hooks::

    local_share(ids)           each rank keeps its contiguous share of the calibration windows
                               (all ranks draw the same windows; a checksum verifies it)
    all_reduce_hessian(acc)    H_rank * n_rank summed over ranks, divided by the summed token count:
                               the single-process H = 2/n sum x x^T (up to float rounding)
    solve_group(...)           the group's layers (q/k/v; gate/up) are spread over the ranks by cost
                               rows * cols^2; each rank solves its own, then every layer's weight
                               is broadcast from its owner and its ``module.compression`` (scale,
                               zero, g_idx, error, sparsity) and report row are gathered, so every
                               rank ends with the same model and report
    next-block inputs          each rank runs only its own share: nothing to exchange

Every rank holds a full copy of the model (on the CPU, say) and onloads one block at a time to
its device, ``cuda:LOCAL_RANK`` on GPUs. Groups of one block are solved one after another (each
group sees the outputs of the already-compressed groups before it), so a group of one layer
(o_proj, down_proj) is solved on one rank while the others wait.

Supported: GPU onloading (one block at a time on each rank's GPU), CPU ranks with gloo, every
pruning/quantization setting (the results match one process up to float rounding).
Not supported yet: the streaming mode (``compress --stream``, blocks read from and written to
disk), which refuses to run under several processes with a clear error.

A rank that fails while solving sends its exception to the others, which all raise it. A rank
that dies, or fails elsewhere, makes the others raise :class:`DistributedError` when the
connection drops or, at the latest, when the process-group timeout runs out
(``TOOLKIT_DIST_TIMEOUT`` seconds, 1800 by default; ``init_from_env(timeout_s=...)``).
"""

from __future__ import annotations

import atexit
import os
import pickle
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = ["init_from_env", "active", "rank", "world_size", "is_main", "rank_device",
           "local_share", "all_reduce_hessian", "all_reduce_cross", "assign", "solve_group", "DistributedError",
           "DEFAULT_TIMEOUT_S"]

DEFAULT_TIMEOUT_S = 1800.0
_timeout_s: float | None = None  # the timeout this module initialised the group with


class DistributedError(RuntimeError):
    """A collective operation failed: another rank failed, was killed, or timed out."""


def active() -> bool:
    """True when a ``torch.distributed`` process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0, or no process group: the process that prints and writes files."""
    return rank() == 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def init_from_env(timeout_s: float | None = None, backend: str | None = None,
                  device=None) -> bool:
    """Initialise the default process group from torchrun's environment, if launched by it.

    Returns True when a process group is (now) initialised. Reads ``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``/``MASTER_PORT`` (set by ``torchrun``); the backend is NCCL when CUDA is
    available and ``device`` (the compute device asked for, None: the default) is not the CPU,
    else gloo; each GPU rank uses ``cuda:LOCAL_RANK``. ``timeout_s`` (default
    ``TOOLKIT_DIST_TIMEOUT`` or 1800 s) bounds how long a rank waits for the others.
    """
    global _timeout_s
    if active():
        return True
    if not all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")):
        return False
    if not dist.is_available():
        raise DistributedError("launched by torchrun, but this torch build has no "
                               "torch.distributed")
    if timeout_s is None:
        timeout_s = float(os.environ.get("TOOLKIT_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    if backend is None:
        on_cpu = device is not None and torch.device(device).type == "cpu"
        backend = "nccl" if torch.cuda.is_available() and not on_cpu else "gloo"
    kwargs = {}
    if backend == "nccl":
        device = torch.device("cuda", local_rank())
        torch.cuda.set_device(device)
        kwargs["device_id"] = device
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s), **kwargs)
    _timeout_s = timeout_s
    atexit.register(_shutdown)
    return True


def _shutdown() -> None:
    if active():
        dist.destroy_process_group()


def rank_device(device: torch.device) -> torch.device:
    """``cuda`` without an index means ``cuda:LOCAL_RANK`` under a process group."""
    device = torch.device(device)
    if active() and device.type == "cuda" and device.index is None:
        return torch.device("cuda", local_rank())
    return device


@contextmanager
def _collective(what: str):
    """Turn a failed collective into one clear error naming the step and the rank."""
    try:
        yield
    except DistributedError:
        raise
    except RuntimeError as e:  # DistBackendError, DistNetworkError, gloo timeouts...
        limit = f"{_timeout_s:g} s" if _timeout_s is not None else "the process-group timeout"
        raise DistributedError(
            f"rank {rank()} of {world_size()}: {what} failed: another rank failed, was killed, or "
            f"did not arrive within {limit}; see the other ranks' output. ({e})") from e


def local_share(ids: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous share of the calibration windows (all of them without a group).

    Every rank must have drawn the same windows (same calibration, seed, nsamples, seqlen): a
    checksum is compared across ranks, and each rank needs at least one window.
    """
    if not active():
        return ids
    world = world_size()
    if len(ids) < world:
        raise ValueError(f"{len(ids)} calibration windows cannot be split over {world} processes: "
                         f"give nsamples >= {world}")
    mine = (tuple(ids.shape), int(ids.long().sum()), int((ids.long() * 31 + 7).remainder(1000003)
                                                         .sum()))
    seen = [None] * world
    with _collective("comparing the calibration windows"):
        dist.all_gather_object(seen, mine)
    if any(s != seen[0] for s in seen):
        raise ValueError(f"the ranks drew different calibration windows ({seen}): give every "
                         "process the same calibration, nsamples, seqlen and seed")
    return torch.tensor_split(ids, world)[rank()]


@torch.no_grad()
def all_reduce_hessian(acc) -> None:
    """Sum a :class:`~toolkit.solver.hessian.HessianAccumulator` over the ranks, in place.

    Each rank holds the mean ``H_r = 2/n_r sum x x^T`` over its ``n_r`` tokens; the result is
    ``sum_r n_r H_r / sum_r n_r``, the Hessian one process would get from all tokens.
    """
    if not active():
        return
    total = acc.H * acc.nsamples
    n = torch.tensor([float(acc.nsamples)], dtype=torch.float64, device=acc.H.device)
    with _collective(f"summing the Hessian of {acc.name}"):
        dist.all_reduce(total)
        dist.all_reduce(n)
    count = int(round(float(n.item())))
    acc.H = total.div_(count) if count else total
    acc.nsamples = count


@torch.no_grad()
def all_reduce_cross(acc) -> None:
    """Sum a :class:`~toolkit.solver.targets.CrossAccumulator` over the ranks, in place, as
    :func:`all_reduce_hessian` does: ``sum_r n_r D_r / sum_r n_r``."""
    if not active():
        return
    total = acc.D * acc.nsamples
    n = torch.tensor([float(acc.nsamples)], dtype=torch.float64, device=total.device)
    with _collective(f"summing the cross term of {acc.name}"):
        dist.all_reduce(total)
        dist.all_reduce(n)
    acc.nsamples = int(round(float(n.item())))
    acc.D = total.div_(acc.nsamples) if acc.nsamples else total


def layer_cost(ref) -> int:
    """Estimated solver work for one layer: rows * cols^2."""
    rows, cols = ref.get_weight().shape  # (out, in), for linears and expert slices alike
    return int(rows) * int(cols) ** 2


def assign(costs: list[int], world: int) -> list[int]:
    """Owner rank of each item: largest first to the least-loaded rank (deterministic)."""
    load = [0] * world
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += costs[i]
    return owner


def _picklable(e: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:  # noqa: BLE001 - anything that does not travel is sent as text
        return RuntimeError(f"{type(e).__name__}: {e}")


def _broadcast_weight(w: torch.Tensor, src: int) -> None:
    """Broadcast a parameter in place; gloo gets a float32 copy of 16-bit weights (exact)."""
    if w.device.type == "cpu" and w.dtype not in (torch.float32, torch.float64):
        buf = w.float()
        dist.broadcast(buf, src=src)
        w.copy_(buf)
    else:
        dist.broadcast(w, src=src)


def solve_group(solve, group: list, settings: list, *args, **kwargs) -> list[dict]:
    """``solve(group, settings, *args, **kwargs)`` with the group's layers spread over the ranks.

    ``solve`` is :func:`toolkit.walk.sweep._solve_group`: it compresses the layers it is given in place,
    sets their ``module.compression`` and returns one report row per active layer (each row has
    ``layer``, the layer's name). Without a process group it is simply called.
    """
    if not active():
        return solve(group, settings, *args, **kwargs)
    world, me = world_size(), rank()
    todo = [i for i, s in enumerate(settings) if s is not None and s.active]
    owner = dict(zip(todo, assign([layer_cost(group[i]) for i in todo], world)))
    mine = [i for i in todo if owner[i] == me]
    plan = [(group[i].name, settings[i]) for i in todo]
    payload: dict = {"error": None, "rows": {}, "comp": {}, "plan": plan}
    try:
        if mine:
            rows = solve([group[i] for i in mine], [settings[i] for i in mine], *args, **kwargs)
            payload["rows"] = {r["layer"]: r for r in rows}
            payload["comp"] = {group[i].name: group[i].get_record() for i in mine}
    except Exception as e:  # noqa: BLE001 - sent to every rank, re-raised below
        payload = {"error": _picklable(e), "plan": plan}
    gathered = [None] * world
    with _collective(f"gathering the results of {group[0].name}"):
        dist.all_gather_object(gathered, payload)
    for r, p in enumerate(gathered):
        if p["error"] is not None:
            err = p["error"]
            if hasattr(err, "add_note"):
                err.add_note(f"(raised on rank {r} of {world} while solving "
                             f"{', '.join(group[i].name for i in todo if owner[i] == r)})")
            raise err
    if any(p["plan"] != plan for p in gathered):
        raise ValueError(f"the ranks chose different settings for {group[0].name}'s group; every "
                         "process must run the same configuration")
    rows: dict = {}
    comps: dict = {}
    for p in gathered:
        rows.update(p["rows"])
        comps.update(p["comp"])
    with _collective(f"broadcasting the weights of {group[0].name}"):
        for i in todo:
            w = group[i].get_weight()  # (out, in): a linear's weight or an expert's slice
            if w.is_contiguous():
                _broadcast_weight(w, src=owner[i])
            else:  # Conv1D (transposed), or part of a fused expert parameter (toolkit.model.experts)
                buf = w.contiguous()
                _broadcast_weight(buf, src=owner[i])
                w.copy_(buf)
    for i in todo:
        if owner[i] != me and comps.get(group[i].name) is not None:
            group[i].set_record(comps[group[i].name])
    # the row order of one process: layers with the same settings together, in group order
    order = [group[i].name for s in dict.fromkeys(settings[i] for i in todo)
             for i in todo if settings[i] == s]
    return [rows[name] for name in order if name in rows]
