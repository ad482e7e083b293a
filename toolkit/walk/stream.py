"""Compress a model larger than memory, block by block from its safetensors shards, resumably.

    from toolkit.walk.stream import compress_streaming
    report = compress_streaming("Llama-70B/", "out/", sparsity=0.5, bits=4)
    # or: toolkit compress --model Llama-70B/ --stream --out out/ --sparsity 0.5 --bits 4

The flow (the same sweep step as :func:`toolkit.compress`, so the same Hessians, solver and
seed give bitwise the same tensors)::

    config.json --meta device--> skeleton (parameters not allocated; small buffers real)
    shard headers: every tensor present with the shape the config implies (checked first;
        keys mapped to the model's tensors as from_pretrained maps them, see below)
    embeddings (what runs before block 0) from the shards --calibration--> inputs of block 0
    embeddings back to meta
    for each block not finished yet:
        load only its tensors (safetensors, by key; experts merged) -> sweep_block() -> its
            compressed tensors (experts: encode_experts, as save_compressed stores them)
        persist: shard model-(b+2)-of-N, the next block's inputs, then the journal (commit point)
        block back to meta
    finalize: the rest (embeddings, final norm, lm_head) -> model-00001-of-N, copied one tensor
        at a time; index; toolkit_compression.json; generation config; tokenizer; config.json last

Peak host memory: max(embeddings, one block) + the calibration activations (once: each batch's
outputs replace its inputs) + one group's Hessian (all of a block's with schedule="parallel") +
at most ``sweep_memory_mb`` (batches of windows and the outputs kept between passes;
:func:`toolkit.walk.sweep.sweep_memory`); see docs/large-models.md.

Resuming: the output folder keeps ``toolkit_stream.json`` (a fingerprint of the configuration,
the source checkpoint's headers and the calibration tokens; the finished blocks with the SHA-256
of their shards; the file of the next block's inputs). Every file is written to a temporary
name, fsynced and renamed; the journal is rewritten the same way after a block's files, so an
interruption at any point (crash, Ctrl-C, full disk) leaves the last finished block recorded and
the same command continues from the next one. A different configuration on the same folder is
refused. ``config.json`` and the index only appear at the end: a partial folder never loads.

``TOOLKIT_FAIL_AFTER_BLOCK=k`` (for tests) raises :class:`InjectedFailure` once block ``k`` is
persisted.

Mixture-of-experts models (:mod:`toolkit.model.experts`) stream like dense ones. Their checkpoints
store the experts per expert (Mixtral ``block_sparse_moe.experts.3.w1.weight``, Qwen3-MoE
``mlp.experts.3.gate_proj.weight``) while the model holds fused 3-D parameters
(``mlp.experts.gate_up_proj``); :class:`_Layout` maps the checkpoint's keys to the model's
tensors with transformers' own conversion mapping for the model type (the renamings and
``WeightConverter`` merges ``from_pretrained`` applies: keys sorted as the loader sorts them, each
converter's keys gathered and converted together), so every family transformers converts is
read, and a block equals the same block after ``from_pretrained``, bit for bit. Checkpoints that
store the fused tensors under the model's own names (GPT-OSS) need no conversion. A layout the
mapping does not explain (a parameter no key makes, or a merge of the wrong shape) is refused
before the output folder is touched, naming the parameters, the keys nothing takes and the model
type. Each block's experts are written by :func:`toolkit.checkpoint.saveload.encode_experts`, as
``save_compressed`` writes them (``pack-quantized`` per expert under the names transformers
merges back, or the toolkit's formats), so the streamed checkpoint holds the same tensors as the
in-memory one; ``expert_hessian`` and ``routers`` apply, and the report has the experts' token
counts and the routers left dense.

Not supported: several processes (``torchrun``; each rank would need the whole stream, and
writing is rank 0's) -- refused with a clear error; ``allocation="owl"`` (needs a dense pass
over the whole model first; it refuses MoE models in memory too).
"""

from __future__ import annotations

import copy
import ctypes
import ctypes.util
import hashlib
import json
import logging
import math
import os
import struct
import time
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from toolkit.checkpoint.formats import partial_group_keys
from toolkit.checkpoint.saveload import (
    SAFETENSORS_DTYPES,
    SAFETENSORS_NAMES,
    TOOLKIT_NAME,
    WEIGHTS_NAME,
    CheckpointError,
    LayerTable,
    compressed_layers,
    encode_experts,
    encode_layer,
    file_sha256,
    linear_names,
    plain_config,
    read_header,
    source_dtype,
    stored_tensors,
    write_model_config,
)
from toolkit.config.options import CompressConfig
from toolkit.config.records import build_report, config_dict
from toolkit.measure.text import calibration_plan, get_calibration
from toolkit.model import experts
from toolkit.model.layers import find_blocks
from toolkit.walk import distributed, sweep

__all__ = ["compress_streaming", "InjectedFailure", "JOURNAL_NAME", "StreamError"]

log = logging.getLogger("toolkit")

JOURNAL_NAME = "toolkit_stream.json"
WORK_DIR = ".stream"  # next blocks' inputs, inside the output folder
JOURNAL_VERSION = 1
FAIL_ENV = "TOOLKIT_FAIL_AFTER_BLOCK"
INDEX_NAME = WEIGHTS_NAME + ".index.json"



class InjectedFailure(RuntimeError):
    """Raised by the ``TOOLKIT_FAIL_AFTER_BLOCK`` test hook."""


class StreamError(ValueError):
    """The output folder cannot be used for this run (another configuration, not a stream's
    folder, inconsistent journal)."""


# ----------------------------------------------------------------------------------------------
# files: atomic writes
# ----------------------------------------------------------------------------------------------

def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


@contextmanager
def _atomic_file(path: Path, mode: str):
    """Open ``path.tmp`` for writing; on success fsync it, rename it to ``path`` and fsync the
    folder; on any failure remove it (``path`` is never half-written)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _atomic_json(path: Path, data) -> None:
    with _atomic_file(path, "w") as f:
        json.dump(data, f, indent=1)


def _write_safetensors(path: Path, items: list, metadata: dict | None = None) -> dict:
    """Write a safetensors file atomically, one tensor in memory at a time.

    ``items``: ``[(name, dtype, shape, get)]`` where ``get()`` returns the tensor (CPU). Written
    to ``path.tmp``, fsynced, renamed. Returns ``{"bytes", "sha256"}`` of the file.
    """
    header, offset = {}, 0
    for name, dtype, shape, _ in items:
        n = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        header[name] = {"dtype": SAFETENSORS_NAMES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + n]}
        offset += n
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    digest = hashlib.sha256()
    with _atomic_file(path, "wb") as f:
        for chunk in (struct.pack("<Q", len(raw)), raw):
            f.write(chunk)
            digest.update(chunk)
        for name, dtype, shape, get in items:
            t = get().detach().to("cpu").contiguous()
            if t.dtype != dtype or list(t.shape) != list(shape):
                raise RuntimeError(f"{name}: got {t.dtype} {list(t.shape)}, announced "
                                   f"{dtype} {list(shape)}")
            if t.numel():
                buf = memoryview(t.reshape(-1).view(torch.uint8).numpy())
                f.write(buf)
                digest.update(buf)
            del t
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def _tensor_items(tensors: dict) -> list:
    return [(k, v.dtype, list(v.shape), (lambda v=v: v)) for k, v in tensors.items()]


_LIBC = None


def _return_freed_memory() -> None:
    """Hand the heap memory freed by the last block back to the operating system.

    glibc keeps freed allocations of up to 32 MB in its heap for reuse (its mmap threshold
    rises to the largest block freed), so without this the resident memory of a streaming run
    creeps up block after block and at the end holds about twice what it uses. No-op where
    ``malloc_trim`` does not exist (macOS, Windows, musl)."""
    global _LIBC
    if _LIBC is None:
        name = ctypes.util.find_library("c")
        try:
            lib = ctypes.CDLL(name) if name else None
            _LIBC = lib if lib is not None and hasattr(lib, "malloc_trim") else False
        except OSError:
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


# ----------------------------------------------------------------------------------------------
# the source checkpoint
# ----------------------------------------------------------------------------------------------

class _Source:
    """The tensors of a safetensors checkpoint folder, by name, read lazily (headers only until
    a tensor is asked for; each shard is opened only while its tensors are read)."""

    def __init__(self, folder: Path):
        self.folder = folder
        index = folder / INDEX_NAME
        if index.is_file():
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
            files = sorted(set(weight_map.values()))
            missing = [n for n in files if not (folder / n).is_file()]
            if missing:
                raise CheckpointError(
                    f"{index}: lists {len(files)} shards, {len(missing)} missing from {folder}: "
                    f"{', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
            self.files = [folder / n for n in files]
        elif (folder / WEIGHTS_NAME).is_file():
            weight_map = None
            self.files = [folder / WEIGHTS_NAME]
        elif list(folder.glob("*.bin")) or list(folder.glob("*.pt")):
            raise CheckpointError(f"{folder}: only pickle weight files (.bin/.pt); streaming "
                                  "reads safetensors only")
        else:
            raise FileNotFoundError(f"{folder}: no {INDEX_NAME} nor {WEIGHTS_NAME}")
        self.headers = {file: read_header(file) for file in self.files}
        self.where: dict[str, Path] = {}
        for file, header in self.headers.items():
            for key in header:
                if key != "__metadata__":
                    self.where[key] = file
        if weight_map is not None:
            for key, name in weight_map.items():
                if self.where.get(key) != folder / name:
                    raise CheckpointError(f"{folder / name}: has no tensor {key!r}, which "
                                          f"{index.name} places there")

    def __contains__(self, key) -> bool:
        return key in self.where

    def info(self, key) -> dict:
        return self.headers[self.where[key]][key]

    def fingerprint(self) -> str:
        """SHA-256 of the shard names, sizes and headers (not the data: hashing a 70B model
        would take as long as a block)."""
        h = hashlib.sha256()
        for file in self.files:
            h.update(f"{file.name}:{file.stat().st_size}:".encode())
            h.update(json.dumps(self.headers[file], sort_keys=True).encode())
        return h.hexdigest()

    def read(self, keys: list[str], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The tensors ``keys`` (floating ones converted to ``dtype``).

        Read with plain file reads straight into the tensors' memory, not through a memory map:
        mapped pages of the shards would count in the process's resident memory next to the
        copies (twice the embeddings at the start)."""
        out = {}
        for k in keys:
            file = self.where[k]
            info = self.headers[file][k]
            st_dtype = SAFETENSORS_DTYPES.get(info["dtype"])
            if st_dtype is None:
                raise CheckpointError(f"{file}: tensor {k!r} has dtype {info['dtype']}, not "
                                      "supported by streaming")
            start, end = info["data_offsets"]
            t = torch.empty(info["shape"], dtype=st_dtype)
            try:
                with open(file, "rb", buffering=0) as f:
                    (n,) = struct.unpack("<Q", f.read(8))
                    f.seek(8 + n + start)
                    if t.numel():
                        view = memoryview(t.reshape(-1).view(torch.uint8).numpy())
                        got = 0
                        while got < end - start:
                            r = f.readinto(view[got:])
                            if not r:
                                break
                            got += r
                        if got != end - start:
                            raise CheckpointError(f"{file}: truncated while reading {k!r}")
            except FileNotFoundError:
                raise CheckpointError(f"{file}: shard disappeared while streaming") from None
            out[k] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        return out


# ----------------------------------------------------------------------------------------------
# the source checkpoint's layout: which stored tensors make each tensor of the model
# ----------------------------------------------------------------------------------------------

class _Recipe:
    """One tensor (or a few) of the model as transformers' loader builds it: the checkpoint keys
    it reads, in the order it collects them, and the ``WeightConverter`` that turns them into the
    model's tensors (None: one stored tensor taken as it is, possibly renamed)."""

    def __init__(self, first: str, converter=None):
        self.first = first  # the model tensor the loader files the keys under
        self.converter = converter
        self.keys: list[str] = []
        self.patterns: list[str] = []  # the converter's source pattern each key matched

    def run(self, tensors: dict[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
        """The model tensors made from ``tensors`` (checkpoint key -> tensor, consumed: each is
        released as soon as the conversion is done with it; meta tensors give the shapes without
        reading anything)."""
        if self.converter is None:
            return {self.first: tensors.pop(self.keys[0])}
        conv = copy.deepcopy(self.converter)  # a converter collects the tensors it is given
        for key, pattern in zip(self.keys, self.patterns):
            conv.add_tensor(self.first, key, pattern, tensors.pop(key))
        out = conv.convert(self.first, model=model, config=model.config)
        return {k: v[0] if isinstance(v, list) else v for k, v in out.items()}


def _conversion_mapping(model) -> list:
    """The weight transforms ``from_pretrained`` applies to ``model``'s checkpoint keys
    (transformers' conversion mapping for the model type: renamings, and converters such as the
    merge of per-expert tensors into fused 3-D parameters); ``[]`` before transformers 5."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
    except ImportError:  # transformers 4.x: keys are the model's own names
        return []
    return get_model_conversion_mapping(model)


class _Layout:
    """Which checkpoint tensors make each tensor of ``model``, found as transformers' loader
    finds them (``from_pretrained``: every key renamed by the model type's conversion mapping,
    keys sorted the loader's way, those of one converter gathered and converted together, e.g.
    Mixtral's ``block_sparse_moe.experts.3.w1.weight`` into ``mlp.experts.gate_up_proj``), so
    that a block read here equals the same block after ``from_pretrained``, bit for bit.
    Checkpoints that already store the model's own names (fused 3-D experts as GPT-OSS stores
    them) need no conversion. Only headers are read until :meth:`load`."""

    def __init__(self, model: nn.Module, source: _Source, dtype: torch.dtype):
        self.model, self.source, self.dtype = model, source, dtype
        mapping = _conversion_mapping(model)
        self.mapping = mapping
        self.recipes: dict[str, _Recipe] = {}  # by first target
        self.unmatched: list[str] = []  # checkpoint keys no tensor of the model takes
        wanted = model.state_dict()  # every name the loader fills (tied aliases included)
        if mapping:
            from transformers.core_model_loading import (
                WeightConverter,
                WeightRenaming,
                dot_natural_key,
                rename_source_key,
            )

            renamings = [t for t in mapping if isinstance(t, WeightRenaming)]
            converters = [t for t in mapping if isinstance(t, WeightConverter)]
            by_pattern = {p: c for c in converters for p in c.source_patterns}
            prefix = getattr(model, "base_model_prefix", None)
            keys = sorted(source.where, key=dot_natural_key)
        else:
            keys = sorted(source.where)
        for key in keys:
            name, pattern = key, None
            if mapping:
                name, pattern = rename_source_key(key, renamings, converters, prefix, wanted)
                if name not in wanted and key in wanted:  # as the loader: only the prefix
                    name, pattern = rename_source_key(key, [], [], prefix, wanted)
            if name not in wanted:
                self.unmatched.append(key)
                continue
            rec = self.recipes.get(name)
            conv = by_pattern[pattern] if pattern is not None else None
            if rec is None:
                rec = self.recipes[name] = _Recipe(name, copy.deepcopy(conv) if conv else None)
            elif rec.converter is None or conv is None:
                raise CheckpointError(
                    f"{source.folder}: checkpoint keys {rec.keys + [key]} all give the model's "
                    f"tensor {name!r}; which one to read is ambiguous")
            rec.keys.append(key)
            rec.patterns.append(pattern if pattern is not None else key)
        # what each recipe makes, from the headers alone (meta tensors through the same ops)
        self.made: dict[str, tuple[_Recipe, list[int]]] = {}
        for rec in self.recipes.values():
            metas = {}
            for key in rec.keys:
                info = source.info(key)
                st_dtype = SAFETENSORS_DTYPES.get(info["dtype"])
                if st_dtype is None:
                    raise CheckpointError(f"{source.where[key]}: tensor {key!r} has dtype "
                                          f"{info['dtype']}, not supported by streaming")
                metas[key] = torch.empty(info["shape"], dtype=st_dtype, device="meta")
            try:
                out = rec.run(metas, model)
            except Exception as e:  # noqa: BLE001 - any failure: the layout is not understood
                raise CheckpointError(
                    f"{source.folder}: transformers' conversion of checkpoint keys "
                    f"{_some(rec.keys)} into {rec.first!r} failed ({type(e).__name__}: {e})"
                    f"{self._not_understood()}") from None
            for name, t in out.items():
                self.made[name] = (rec, list(t.shape))
        used = [t for t in mapping if t.was_used()] if mapping else []
        # what from_pretrained leaves on the model: save_pretrained (and export's per-expert
        # names, toolkit.model.experts.checkpoint_names) reverts these
        model._weight_conversions = used

    def _not_understood(self) -> str:
        """The end of an error message: the keys nothing takes, the model type and its
        mapping."""
        cfg = getattr(self.model, "config", None)
        n_conv = sum(1 for t in self.mapping if hasattr(t, "operations"))
        stray = (f"; checkpoint keys no tensor of the model takes: {_some(self.unmatched)}"
                 if self.unmatched else "")
        return (f"{stray}. Model type {getattr(cfg, 'model_type', None)!r} "
                f"({type(self.model).__name__}; transformers' conversion mapping for it has "
                f"{len(self.mapping)} transforms, {n_conv} of them converting): streaming reads "
                "a checkpoint as from_pretrained does, and this layout is not understood")

    def source_of(self, name: str, aliases: list[str]) -> str | None:
        """The name under which :meth:`load` gives the tensor ``name`` (itself, or a tied alias
        the checkpoint stores instead); None when the checkpoint lacks it."""
        return next((n for n in [name] + aliases if n in self.made), None)

    def check(self, table: list, found: dict[str, str | None]) -> None:
        """Every parameter present with the shape the config implies (``found``: model name ->
        :meth:`source_of`); raises :class:`CheckpointError` naming what is missing or wrong, and
        the checkpoint keys nothing took."""
        missing = [n for n, t in table if found[n] is None and isinstance(t, nn.Parameter)]
        if missing:
            raise CheckpointError(
                f"{', '.join(str(f) for f in self.source.files)}: missing tensor"
                f"{'s' if len(missing) > 1 else ''} {_some(missing)}"
                + (self._not_understood() if self.unmatched else ""))
        for name, t in table:
            got = found[name]
            if got is None:
                continue
            rec, shape = self.made[got]
            if shape != list(t.shape):
                where = (f"{self.source.where[rec.keys[0]]}: tensor {rec.keys[0]!r}"
                         if rec.converter is None else
                         f"{self.source.folder}: tensor {got!r} made by transformers' conversion "
                         f"of {_some(rec.keys)}")
                raise CheckpointError(
                    f"{where} has shape {shape}, the model config implies {list(t.shape)}"
                    + (self._not_understood() if rec.converter is not None else ""))

    def load(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The tensors ``names`` (as :meth:`source_of` gives them) read and converted, floating
        ones in ``dtype`` (converted per stored tensor, before any merge, as the loader does)."""
        recipes = list({id(self.made[n][0]): self.made[n][0] for n in names}.values())
        out = {}
        for rec in recipes:
            made = rec.run(self.source.read(rec.keys, self.dtype), self.model)
            out.update({n: made[n] for n in names if n in made})
            del made
        return out


def _some(names: list[str], n: int = 8) -> str:
    return ", ".join(names[:n]) + (f", ... ({len(names)} in all)" if len(names) > n else "")


# ----------------------------------------------------------------------------------------------
# the skeleton
# ----------------------------------------------------------------------------------------------

def _skeleton(folder: Path, dtype: torch.dtype, trust_remote_code: bool):
    """The model on the meta device (parameters not allocated; buffers such as rotary
    frequencies are real, they are computed, not stored)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    if hasattr(config, "quantization_config"):
        raise CheckpointError(f"{folder / 'config.json'}: the model is already quantized "
                              f"({getattr(config.quantization_config, 'quant_method', None) or config.quantization_config}); "
                              "streaming compresses dense checkpoints")
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                 trust_remote_code=trust_remote_code)
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # from_config ties, but not under init_empty_weights
    model.eval()
    return model


def _config_tied(model) -> dict[str, str]:
    keys = getattr(model, "_tied_weights_keys", None) or {}
    if not getattr(model.config, "tie_word_embeddings", False) and not isinstance(keys, dict):
        return {}
    if isinstance(keys, dict):
        return dict(keys) if getattr(model.config, "tie_word_embeddings", True) else {}
    return {}


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor | None) -> None:
    """Replace the parameter/buffer ``name`` by ``value`` (None: back to meta)."""
    mname, _, pname = name.rpartition(".")
    module = model.get_submodule(mname) if mname else model
    old = module._parameters.get(pname) if pname in module._parameters else None
    if value is None:
        value = torch.empty_like(old if old is not None else module._buffers[pname],
                                 device="meta")
    if pname in module._parameters:
        module._parameters[pname] = nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[pname] = value


# ----------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------

def _fingerprint(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _shard_name(i: int, n: int) -> str:
    return f"model-{i:05d}-of-{n:05d}.safetensors"


def _clean_temporaries(out: Path) -> None:
    for folder in (out, out / WORK_DIR):
        if folder.is_dir():
            for p in folder.glob("*.tmp"):
                p.unlink(missing_ok=True)


def _injected(b: int) -> None:
    v = os.environ.get(FAIL_ENV)
    if v is not None and v.strip() != "" and int(v) == b:
        raise InjectedFailure(f"{FAIL_ENV}={v}: injected failure after block {b} was persisted")


@torch.no_grad()
def compress_streaming(model_dir, out, tokenizer=None, *, config=None,
                       dtype: torch.dtype = torch.float32, layout: str = "standard",
                       partial_groups: str = "block", trust_remote_code: bool = False,
                       save_dtype: torch.dtype | None = None, **kwargs):
    """Compress the checkpoint folder ``model_dir`` block by block into the folder ``out``.

    ``model_dir`` holds ``config.json`` and safetensors weights (``model.safetensors`` or
    shards with ``model.safetensors.index.json``). Only the embeddings, one block and the
    calibration activations are in memory at a time. The settings are those of
    :func:`toolkit.compress` (``config=CompressConfig(...)`` or keywords); ``dtype`` is the dtype
    the weights are loaded and compressed in (float32 like :func:`toolkit.load_model`);
    ``save_dtype`` the dtype the dense tensors and scales are written in (default: what the
    source's ``config.json`` declares, as :func:`~toolkit.checkpoint.saveload.save_compressed` does);
    ``layout``/``partial_groups`` as in
    :func:`~toolkit.checkpoint.saveload.save_compressed`. The tokenizer is loaded from ``model_dir`` when not
    given (and copied into ``out``). Mixture-of-experts checkpoints are read as
    ``from_pretrained`` reads them (per-expert keys merged into the fused parameters by
    transformers' conversion mapping) and their experts written as ``save_compressed`` writes
    them; ``expert_hessian``/``routers`` apply (see the module docstring).

    ``out`` ends as the checkpoint :func:`~toolkit.checkpoint.saveload.save_compressed` writes (sharded:
    one shard for the embeddings/norm/lm_head, one per block), loadable with
    :func:`toolkit.load_compressed`. Re-running the same call on an interrupted ``out`` resumes
    at the first unfinished block; another configuration on it raises :class:`StreamError`.
    Returns a :class:`toolkit.api.CompressionReport` (``summary["blocks resumed"]`` counts the
    blocks found finished).
    """

    t0 = time.perf_counter()
    if config is None:
        config = CompressConfig(**kwargs)
    elif kwargs:
        raise ValueError("pass either config=... or keyword settings, not both")
    if distributed.active() and distributed.world_size() > 1:
        raise ValueError("streaming (--stream) does not run under torchrun/several processes yet: "
                         "run it in one process (it still onloads one block at a time to the "
                         "GPU); several processes need the whole model in memory on each rank")
    if config.allocation != "uniform" and "allocation" in config.effort_set:
        raise ValueError("effort='max' turns on allocation='owl', which needs a dense pass over "
                         "the whole model before compressing: not available with streaming. Give "
                         "the other parts yourself: asymmetric=True, reconstruct_steps="
                         f"{config.reconstruct_steps}, refine_iters={config.refine_iters}")
    if config.allocation != "uniform":
        raise ValueError(f"allocation={config.allocation!r} needs a dense pass over the whole "
                         "model before compressing: not available with streaming")
    if layout not in ("standard", "compact"):
        raise ValueError(f"layout must be 'standard' or 'compact', got {layout!r}")
    if partial_groups not in ("block", "error"):
        raise ValueError(f"partial_groups must be 'block' or 'error', got {partial_groups!r}")
    model_dir, out = Path(model_dir), Path(out)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: no config.json (streaming needs a local model "
                                "folder with safetensors weights)")

    # ---- everything checked before the output folder is touched ------------------------------
    source = _Source(model_dir)
    model = _skeleton(model_dir, dtype, trust_remote_code)
    write_dtype = save_dtype if save_dtype is not None else source_dtype(model)[0]
    if not isinstance(write_dtype, torch.dtype) or not write_dtype.is_floating_point:
        raise ValueError(f"save_dtype must be a floating torch dtype, got {save_dtype}")
    blocks_name, blocks = find_blocks(model)
    n_blocks = len(blocks)
    # no weight of the blocks left dense unnoticed (MoE: the routers left dense, for the report)
    notes = experts.check_layers(blocks_name, blocks, config.layer_settings,
                                 routers=config.routers)
    beside = bool(config.asymmetric or config.reconstruct_steps)  # the full-precision stream
    if beside and any(experts.has_experts(blk) for blk in blocks):
        raise ValueError("asymmetric targets and block reconstruction (asymmetric, "
                         "reconstruct_steps, effort='max') do not cover mixture-of-experts "
                         "models yet (the full-precision model routes tokens to other experts, so "
                         "inputs do not pair); leave them off here")
    table, tied = stored_tensors(model)
    config_tied = _config_tied(model)
    aliases: dict[str, list[str]] = {}
    for a, b in list(tied.items()) + list(config_tied.items()):
        aliases.setdefault(b, []).append(a)
        aliases.setdefault(a, []).append(b)
    # where each tensor comes from (MoE: per-expert keys merged as from_pretrained merges them)
    layout_src = _Layout(model, source, dtype)
    source_key = {name: layout_src.source_of(name, aliases.get(name, [])) for name, _ in table}
    layout_src.check(table, source_key)
    prefix = [f"{blocks_name}.{b}." for b in range(n_blocks)]
    block_keys = [[n for n, _ in table if n.startswith(p)] for p in prefix]
    in_block = {n for ks in block_keys for n in ks}
    rest_keys = [n for n, _ in table if n not in in_block]

    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    calibration, nsamples, seqlen = calibration_plan(config, model, device)
    if tokenizer is None:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True,
                                                      trust_remote_code=trust_remote_code)
        except Exception as e:  # noqa: BLE001 - any failure means "no tokenizer there"
            if not isinstance(calibration, torch.Tensor):
                raise ValueError(f"{model_dir}: no tokenizer ({e}); pass tokenizer=... or "
                                 "calibration= a tensor of token ids") from None
            tokenizer = None
    ids = get_calibration(calibration, tokenizer, nsamples=nsamples, seqlen=seqlen,
                          seed=config.seed)
    vocab = getattr(model.config, "vocab_size", None)
    if vocab is not None and int(ids.max()) >= vocab:
        raise ValueError(f"calibration token id {int(ids.max())} is outside the model's "
                         f"vocabulary ({vocab}): wrong tokenizer?")

    plans = [[(r, config.layer_settings(r.name))
              for r in experts.find_layers(blk, f"{blocks_name}.{b}", routers=config.routers)]
             for b, blk in enumerate(blocks)]
    block_strategy = partial_group_keys((s, r.in_features) for p in plans for r, s in p)
    if not any(s is not None and s.active for p in plans for _, s in p):
        raise ValueError("nothing to do: give sparsity, pattern or bits (or overrides that set "
                         "them), and make sure ignore does not exclude every layer")
    calibrate = any(s is not None and s.active and s.needs_hessian for p in plans for _, s in p)

    cfg_plain = {k: v for k, v in config_dict(config).items() if k not in ("verbose", "device")}
    fingerprint = _fingerprint(dict(
        settings=cfg_plain, dtype=str(dtype), save_dtype=str(write_dtype), layout=layout,
        partial_groups=partial_groups,
        source=source.fingerprint(), calibration_ids=hashlib.sha256(
            ids.to(torch.int64).numpy().tobytes()).hexdigest(), journal=JOURNAL_VERSION))
    n_shards = n_blocks + 1

    # ---- the output folder: new, or a journal to resume ----------------------------------------
    journal_path = out / JOURNAL_NAME
    if out.exists() and not out.is_dir():
        raise StreamError(f"{out} exists and is not a folder")
    if out.is_dir() and not journal_path.is_file() and any(out.iterdir()):
        raise StreamError(f"{out} exists, is not empty and is not a streaming run's folder (no "
                          f"{JOURNAL_NAME}); choose another output folder")
    journal = None
    if journal_path.is_file():
        try:
            with open(journal_path) as f:
                journal = json.load(f)
        except json.JSONDecodeError as e:
            raise StreamError(f"{journal_path}: unreadable journal ({e})") from None
        if journal.get("fingerprint") != fingerprint:
            old = journal.get("settings", {})
            diff = {k: (old.get(k), v) for k, v in _journal_settings(
                cfg_plain, dtype, write_dtype, layout, partial_groups, model_dir, nsamples,
                seqlen).items()
                if old.get(k) != v}
            raise StreamError(
                f"{out} holds a run with another configuration, source checkpoint or "
                f"calibration (it was started with {old}); differences (then, now): "
                f"{diff or 'the source shards or the calibration tokens'}. Resume it with the "
                f"same command, or write to another folder")
    out.mkdir(parents=True, exist_ok=True)
    (out / WORK_DIR).mkdir(exist_ok=True)
    _clean_temporaries(out)
    if journal is None:
        journal = dict(version=JOURNAL_VERSION, fingerprint=fingerprint,
                       settings=_journal_settings(cfg_plain, dtype, write_dtype, layout,
                                                  partial_groups, model_dir, nsamples, seqlen),
                       blocks_total=n_blocks, shards=n_shards, attempts=0, complete=False,
                       blocks={}, inputs=None, rest=None)
    journal["attempts"] = attempt = int(journal.get("attempts", 0)) + 1
    _check_journal(out, journal, n_blocks)
    resumed = sum(1 for _ in journal["blocks"])
    if journal.get("complete"):
        log.info("%s is already complete", out)
        return _report(config, journal, nsamples, seqlen, device, calibration, resumed, t0,
                       notes)
    _atomic_json(journal_path, journal)

    # ---- block 0's inputs (or the saved inputs of the first unfinished block) -----------------
    first = next((b for b in range(n_blocks) if str(b) not in journal["blocks"]), n_blocks)
    inputs = reference = saved_reference = None
    last = -1
    if calibrate and first < n_blocks:
        front = [n for n in rest_keys if source_key[n] is not None
                 and not _is_output_embedding(model, n)]
        loaded = layout_src.load([source_key[n] for n in front])
        for n in front:
            _set_tensor(model, n, loaded[source_key[n]])
        del loaded
        inputs = sweep.capture_block_inputs(model, blocks, ids, device, config.sweep_memory_mb)
        for n in front:
            _set_tensor(model, n, None)  # the embeddings are not needed until the end
        _return_freed_memory()
        if first > 0:
            inputs.hidden, saved_reference = _load_inputs(out, journal, first, device)
        # the full-precision hidden states beside the compressed ones, up to the last block
        # that has a layer to solve
        last = max((b for b, p in enumerate(plans)
                    if any(s is not None and s.active and s.needs_hessian for _, s in p)),
                   default=-1)
        if beside and first <= last:
            reference = sweep.Reference(inputs.hidden)
            if first > 0:
                if saved_reference is None:
                    raise StreamError(f"{out / JOURNAL_NAME}: the saved inputs of block {first} "
                                      "have no full-precision hidden states; delete the folder "
                                      "to start again")
                reference.hidden = saved_reference

    # ---- the blocks ---------------------------------------------------------------------------
    from tqdm.auto import tqdm

    bar = tqdm(range(first, n_blocks), desc="compressing blocks (streaming)", unit="block",
               disable=not config.verbose, initial=first, total=n_blocks)
    for b in bar:
        if str(b) in journal["blocks"]:
            continue
        tb = time.perf_counter()
        block = blocks[b]
        keys = block_keys[b]
        loaded = layout_src.load([source_key[n] for n in keys if source_key[n] is not None])
        local = {n[len(prefix[b]):]: loaded[source_key[n]] for n in keys
                 if source_key[n] is not None}
        del loaded
        block.load_state_dict(local, strict=False, assign=True)
        del local
        for p in block.parameters():
            p.requires_grad_(False)
        rows = sweep.sweep_block(block, b, plans[b], inputs, device=device,
                           block_size=config.block_size, percdamp=config.percdamp,
                           hessian_dtype=getattr(torch, config.hessian_dtype),
                           schedule=config.schedule, memory_mb=config.sweep_memory_mb,
                           expert_hessian=config.expert_hessian,
                           reference=reference if b <= last else None,
                           asymmetric=config.asymmetric,
                           reconstruct_steps=config.reconstruct_steps)
        # the block's stored tensors: compressed layers, its experts (as save_compressed stores
        # them), then its dense tensors
        tensors: dict[str, torch.Tensor] = OrderedDict()
        records = OrderedDict()
        comp_names = set()
        for name, module in compressed_layers(block):
            full = f"{blocks_name}.{b}.{name}"
            rec = encode_layer(full, module, layout, partial_groups, write_dtype,
                               block_strategy)
            if rec is None:
                continue
            tensors.update(rec.pop("tensors"))
            records[full] = rec
            if not rec["problem"]:
                comp_names.add(f"{full}.weight")
        # the block's compressed expert slices: the only records on the model are this block's
        expert_recs, dropped = encode_experts(model, layout, partial_groups, write_dtype,
                                              block_strategy)
        for full, rec in expert_recs:
            tensors.update(rec.pop("tensors"))
            records[full] = rec
        comp_names |= dropped  # fused parameters stored per expert instead
        acc = LayerTable(layout)
        for full, rec in records.items():
            acc.add(full, rec)
        if acc.actorder_bad or (acc.partial and partial_groups == "error"):
            acc.check(partial_groups)  # raises now; warnings are logged once, at the end
        for n in block_keys[b]:
            if n not in comp_names:
                live = _get_tensor(model, n)
                tensors[n] = (live.to(write_dtype) if live.is_floating_point() else
                              live).contiguous()
        shard = _shard_name(b + 2, n_shards)
        _persist(out, shard, tensors, what=f"block {b}")
        del tensors
        for _, module in compressed_layers(block):
            del module.compression
        for _, module, _ in experts.compressed_experts(block):
            delattr(module, experts.RECORDS)
        block.to("meta")
        info = {"bytes": (out / shard).stat().st_size}
        info["sha256"] = file_sha256(out / shard)
        if inputs is not None and b + 1 < n_blocks:
            journal["inputs"] = _save_inputs(out, b + 1, inputs.hidden,
                                             reference.hidden if reference is not None
                                             and b + 1 <= last else None)
        elif b + 1 >= n_blocks:
            journal["inputs"] = None
        journal["blocks"][str(b)] = dict(
            attempt=attempt, file=shard, seconds=time.perf_counter() - tb,
            rows=[_row_json(r) for r in rows], records=records, **info)
        _atomic_json(journal_path, journal)
        _remove_old_inputs(out, journal)
        log.info("block %d/%d persisted (%s)", b + 1, n_blocks, shard)
        _return_freed_memory()
        _injected(b)

    # ---- finalize ------------------------------------------------------------------------------
    inputs = None
    _finalize(out, journal, model, model_dir, layout_src, table, tied, rest_keys, source_key,
              n_shards, n_blocks, write_dtype, layout, partial_groups, tokenizer, config, notes)
    return _report(config, journal, nsamples, seqlen, device, calibration, resumed, t0, notes)


def _journal_settings(cfg_plain, dtype, write_dtype, layout, partial_groups, model_dir, nsamples,
                      seqlen):
    d = dict(cfg_plain)
    d["calibration"] = str(d.get("calibration"))
    d.update(nsamples=nsamples, seqlen=seqlen, dtype=str(dtype), save_dtype=str(write_dtype),
             layout=layout,
             partial_groups=partial_groups, source=str(Path(model_dir).resolve()))
    return json.loads(json.dumps(d, default=str))


def _is_output_embedding(model, name: str) -> bool:
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is None:
        return False
    for mname, m in model.named_modules():
        if m is out:
            return name.startswith(f"{mname}.")
    return False


def _get_tensor(model: nn.Module, name: str) -> torch.Tensor:
    mname, _, pname = name.rpartition(".")
    module = model.get_submodule(mname) if mname else model
    t = module._parameters.get(pname) if pname in module._parameters else module._buffers[pname]
    return t.detach()


def _persist(out: Path, name: str, tensors: dict, what: str) -> dict:
    try:
        return _write_safetensors(out / name, _tensor_items(tensors),
                                  metadata={"format": "pt", "producer": "toolkit"})
    except OSError as e:
        raise OSError(e.errno, f"writing {out / name} ({what}) failed: {e.strerror or e}. "
                      f"Nothing of {what} was recorded: {out} stays resumable; free space (or fix "
                      "the cause) and run the same command again") from e


def _save_inputs(out: Path, b: int, hidden: list[torch.Tensor],
                 reference: list[torch.Tensor] | None = None) -> dict:
    """Block ``b``'s inputs (and the full-precision model's, ``reference``) for resuming."""
    name = f"{WORK_DIR}/inputs-{b:05d}.safetensors"
    items = [(f"hidden.{i}", h.dtype, list(h.shape), (lambda h=h: h)) for i, h in
             enumerate(hidden)]
    items += [(f"reference.{i}", h.dtype, list(h.shape), (lambda h=h: h)) for i, h in
              enumerate(reference or [])]
    try:
        info = _write_safetensors(out / name, items)
    except OSError as e:
        raise OSError(e.errno, f"writing {out / name} (inputs of block {b}) failed: "
                      f"{e.strerror or e}. {out} stays resumable at block {b - 1}; free space "
                      "and run the same command again") from e
    return dict(block=b, file=name, count=len(hidden), reference=reference is not None, **info)


def _load_inputs(out: Path, journal: dict, b: int, device
                 ) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """The saved inputs of block ``b`` and, when they were saved, the full-precision model's."""
    from safetensors import safe_open

    rec = journal.get("inputs")
    if not rec or rec.get("block") != b:
        raise StreamError(f"{out / JOURNAL_NAME}: no saved inputs for block {b} (journal "
                          "inconsistent); delete the folder to start again")
    path = out / rec["file"]
    if not path.is_file() or path.stat().st_size != rec["bytes"] or file_sha256(path) != rec["sha256"]:
        raise StreamError(f"{path}: the saved inputs of block {b} are missing or corrupt; delete "
                          f"{out} to start again")
    with safe_open(str(path), framework="pt") as f:
        hidden = [f.get_tensor(f"hidden.{i}").to(device) for i in range(rec["count"])]
        reference = ([f.get_tensor(f"reference.{i}").to(device) for i in range(rec["count"])]
                     if rec.get("reference") else None)
    return hidden, reference


def _remove_old_inputs(out: Path, journal: dict) -> None:
    keep = (journal.get("inputs") or {}).get("file")
    for p in (out / WORK_DIR).glob("inputs-*.safetensors"):
        if f"{WORK_DIR}/{p.name}" != keep:
            p.unlink(missing_ok=True)


def _check_journal(out: Path, journal: dict, n_blocks: int) -> None:
    """The finished blocks' shards exist with the recorded sizes (SHA-256 at finalize)."""
    if journal.get("blocks_total") != n_blocks:
        raise StreamError(f"{out / JOURNAL_NAME}: written for {journal.get('blocks_total')} "
                          f"blocks, the model has {n_blocks}")
    done = sorted(int(b) for b in journal["blocks"])
    if done != list(range(len(done))):
        raise StreamError(f"{out / JOURNAL_NAME}: finished blocks {done} are not a prefix")
    for b in done:
        rec = journal["blocks"][str(b)]
        p = out / rec["file"]
        if not p.is_file() or p.stat().st_size != rec["bytes"]:
            raise StreamError(f"{p}: the shard of finished block {b} is missing or was changed "
                              f"since it was written; delete {out} to start again")


def _row_json(r: dict) -> dict:
    d = dict(r)
    d["shape"] = list(d["shape"])
    for k, v in d.items():
        if isinstance(v, float) and not math.isfinite(v):
            d[k] = str(v)
    return d


def _finalize(out, journal, model, model_dir, layout_src, table, tied, rest_keys, source_key,
              n_shards, n_blocks, dtype, layout, partial_groups, tokenizer, config, notes):
    """The rest shard, then the metadata; config.json is renamed into place last."""
    from transformers import GenerationConfig

    journal_path = out / JOURNAL_NAME
    tensors_meta = dict(table)
    rest = _shard_name(1, n_shards)
    if not journal.get("rest") or not (out / rest).is_file() or \
            (out / rest).stat().st_size != journal["rest"]["bytes"]:
        items = []
        for n in rest_keys:
            t = tensors_meta[n]
            dt = dtype if t.is_floating_point() else t.dtype
            if source_key[n] is not None:
                def get(n=n):
                    return layout_src.load([source_key[n]])[source_key[n]]
            else:  # a persistent buffer the checkpoint lacks: the model's own value
                def get(t=t, dt=dt):
                    return t.detach().to(dt)
            items.append((n, dt, list(t.shape), get))
        try:
            info = _write_safetensors(out / rest, items, metadata={"format": "pt",
                                                                    "producer": "toolkit"})
        except OSError as e:
            raise OSError(e.errno, f"writing {out / rest} failed: {e.strerror or e}. All blocks "
                          f"are done and recorded; {out} stays resumable: free space and run "
                          "the same command again to finish") from e
        journal["rest"] = dict(file=rest, **info)
        _atomic_json(journal_path, journal)

    # the metadata of every layer from the journal, in save_compressed's order: the layers in
    # the model's order, then the slices of fused experts (they decide the config groups' order)
    acc = LayerTable(layout)
    files = {rest: {"bytes": journal["rest"]["bytes"], "sha256": journal["rest"]["sha256"]}}
    weight_map = {n: rest for n in rest_keys}
    for b in range(n_blocks):
        rec = journal["blocks"][str(b)]
        p = out / rec["file"]
        if file_sha256(p) != rec["sha256"]:
            raise StreamError(f"{p}: SHA-256 differs from the one recorded when block {b} was "
                              f"written (corrupt); delete the file and the block's entry, or "
                              f"start again")
        files[rec["file"]] = {"bytes": rec["bytes"], "sha256": rec["sha256"]}
        for name, r in rec["records"].items():
            if not r["entry"].get("experts"):
                acc.add(name, r)
        header = read_header(p)
        weight_map.update({k: rec["file"] for k in header if k != "__metadata__"})
    for b in range(n_blocks):
        for name, r in journal["blocks"][str(b)]["records"].items():
            if r["entry"].get("experts"):
                acc.add(name, r)
    acc.check(partial_groups)
    qcfg = acc.configs(linear_names(model))

    meta = acc.meta(dtype, tied, config=config, model=model,
                    summary={"streamed": True, "blocks": n_blocks, "attempts": journal["attempts"],
                             **notes})
    meta["files"] = files
    stage = out / WORK_DIR / "final"
    stage.mkdir(parents=True, exist_ok=True)
    try:
        gen = None
        if (model_dir / "generation_config.json").is_file():
            gen = GenerationConfig.from_pretrained(model_dir)
        write_model_config(stage, plain_config(model), gen, qcfg, dtype)
        with open(stage / TOOLKIT_NAME, "w") as f:
            json.dump(meta, f, indent=2)
        with open(stage / INDEX_NAME, "w") as f:
            json.dump({"metadata": {"total_size": sum(v["bytes"] for v in files.values())},
                       "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
        if tokenizer is not None:
            tokenizer.save_pretrained(stage)
        names = sorted(p.name for p in stage.iterdir() if p.is_file())
        for name in names:
            with open(stage / name, "rb") as f:
                os.fsync(f.fileno())
        # everything but config.json, then the index, then config.json: a folder without
        # config.json is not a model folder for any loader
        last = [INDEX_NAME, "config.json"]
        for name in [n for n in names if n not in last] + last:
            os.replace(stage / name, out / name)
        _fsync_dir(out)
    except OSError as e:
        raise OSError(e.errno, f"finishing {out} failed: {e.strerror or e}. All blocks are done "
                      f"and recorded; {out} stays resumable (no config.json yet): free space and "
                      "run the same command again") from e
    journal["complete"] = True
    journal["inputs"] = None
    _atomic_json(journal_path, journal)
    for p in (out / WORK_DIR).glob("**/*"):
        if p.is_file():
            p.unlink(missing_ok=True)
    for p in sorted((out / WORK_DIR).glob("**/*"), reverse=True) + [out / WORK_DIR]:
        if p.is_dir():
            try:
                p.rmdir()
            except OSError:
                pass


def _peak_rss() -> int:
    """Peak resident memory of this process so far, in bytes (0 where unknown).

    Linux: VmHWM (ru_maxrss survives fork+exec and would report a parent's peak)."""
    try:
        with open("/proc/self/status") as f:
            return int(f.read().split("VmHWM:")[1].split()[0]) * 1024
    except (OSError, IndexError, ValueError):
        pass
    try:
        import resource
        import sys

        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(r if sys.platform == "darwin" else r * 1024)
    except (ImportError, OSError):  # pragma: no cover - Windows
        return 0


def _report(config, journal, nsamples, seqlen, device, calibration, resumed, t0, notes):
    rows = []
    for b in range(journal["blocks_total"]):
        rec = journal["blocks"].get(str(b))
        for r in (rec or {}).get("rows", []):
            r = dict(r)
            r["shape"] = tuple(r["shape"])
            for k in ("error", "rel_error"):
                if k in r:
                    r[k] = float(r[k])
            rows.append(r)
    return build_report(config, rows, calibration=calibration, nsamples=nsamples, seqlen=seqlen,
                        device=device, extra={
                            "mode": "streaming",
                            "blocks resumed": resumed,
                            "peak host memory (RSS)": _peak_rss(),
                            "seconds": time.perf_counter() - t0,
                            **notes,  # MoE routers left dense; tensors left dense by ignore
                        })
