"""Calibration and evaluation text: from a source to ``nsamples x seqlen`` token windows.

Sources accepted by :func:`get_calibration` and :func:`load_text`:

* ``"python-docs"`` (the offline default): English prose that every CPython installation
  carries: the Python Language Reference as shipped in ``pydoc_data.topics`` (about 465 KB,
  the text behind ``help()``), followed by the docstrings of a fixed list of standard-library
  modules (about 750 KB). Nothing is downloaded; the text depends only on the Python version.
  Its ``"test"`` split (the last fifth of the Language Reference, held out) serves offline
  evaluation.
* ``"wikitext2"``, ``"c4"``, ``"ptb"``: the usual calibration sets of the SparseGPT/GPTQ
  papers, through ``datasets`` (needs the hub or a local ``datasets`` cache). ``"wikitext2"``
  also works offline: when the hub cannot be reached (or ``HF_DATASETS_OFFLINE``/
  ``HF_HUB_OFFLINE`` is set) the copy bundled in the repository's ``data/wikitext2`` is read
  (test split: ``wiki.test.raw``; calibration: ``wiki.valid.tokens``, the bundled copy has no
  train split), and :func:`describe_source` names the copy that was used.
* a path to a local text file (UTF-8), the text itself (a string of more than 256
  characters), a list of strings, or a tensor of token ids.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

if TYPE_CHECKING:  # torch is imported where it is used: the command line checks first
    import torch

__all__ = ["load_text", "get_calibration", "tokenize_text", "DEFAULT_CALIBRATION",
           "HUB_SOURCES", "python_docs_text", "bundled_wikitext2", "describe_source",
           "hub_reachable", "default_calibration_size", "calibration_plan"]

log = logging.getLogger("toolkit")

DEFAULT_CALIBRATION = "python-docs"
HUB_SOURCES = ("wikitext2", "c4", "ptb")
# WikiText-2 shipped with the project (data/README.md: source, licence, checksums)
BUNDLED_DIR = Path(__file__).resolve().parents[2] / "data" / "wikitext2"
_BUNDLED_FILES = {"test": "wiki.test.raw", "validation": "wiki.valid.tokens",
                  "train": "wiki.valid.tokens"}

# Pure-Python standard-library modules whose docstrings extend the offline default text.
_DOC_MODULES = (
    "argparse", "asyncio", "base64", "bisect", "calendar", "codecs", "collections",
    "concurrent.futures", "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime",
    "decimal", "difflib", "doctest", "email", "enum", "fractions", "ftplib", "functools",
    "gettext", "hashlib", "heapq", "http.client", "http.server", "imaplib", "inspect",
    "ipaddress", "itertools", "json", "locale", "logging", "mailbox", "multiprocessing", "optparse",
    "os", "pathlib", "pickle", "pprint", "pydoc", "random", "re", "sched", "selectors", "shelve",
    "shutil", "smtplib", "socket", "sqlite3", "ssl", "statistics", "string", "subprocess",
    "tarfile", "tempfile", "textwrap", "threading", "tokenize", "trace", "traceback", "typing",
    "unittest", "urllib.parse", "urllib.request", "uuid", "wave", "weakref", "xml.dom.minidom",
    "zipfile", "zoneinfo",
)


def python_docs_text(split: str = "train") -> str:
    """The offline default text (see the module docstring).

    ``split="test"`` is the last fifth of the Language Reference (cut at a paragraph break,
    about 93 KB), held out for an offline perplexity check; ``"train"`` is everything else.
    """
    from pydoc_data.topics import topics

    reference = "\n\n".join(topics[k] for k in sorted(topics))
    cut = reference.rfind("\n\n", 0, int(0.8 * len(reference)))
    if split == "test":
        return reference[cut:].strip()
    if split != "train":
        raise ValueError(f"split must be 'train' or 'test' for python-docs, got {split!r}")
    parts = [reference[:cut]]
    seen: set[int] = set()
    for name in _DOC_MODULES:
        try:
            mod = importlib.import_module(name)
        except Exception:  # a module missing from a trimmed Python: skip it
            continue
        doc = inspect.getdoc(mod)
        if doc:
            parts.append(doc)
        for attr, obj in sorted(vars(mod).items()):
            if attr.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
                continue
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            doc = inspect.getdoc(obj)
            if doc:
                parts.append(doc)
            if inspect.isclass(obj):
                for mname, meth in sorted(vars(obj).items()):
                    if not mname.startswith("_") and callable(meth):
                        d = inspect.getdoc(meth)
                        if d and len(d) > 40:
                            parts.append(d)
    return "\n\n".join(parts)


def bundled_wikitext2(split: str = "test") -> Path:
    """Path of the WikiText-2 file bundled in ``data/wikitext2`` for ``split``: ``"test"`` ->
    ``wiki.test.raw``; ``"validation"`` and ``"train"`` -> ``wiki.valid.tokens`` (the bundled
    copy has no train split). Raises ``FileNotFoundError`` when the package runs outside its
    repository (a wheel install) and the files are not there."""
    if split not in _BUNDLED_FILES:
        raise ValueError(f"split must be one of {', '.join(_BUNDLED_FILES)}, got {split!r}")
    path = BUNDLED_DIR / _BUNDLED_FILES[split]
    if not path.is_file():
        raise FileNotFoundError(
            f"the bundled WikiText-2 file {path.name} is not where the repository keeps it "
            f"({BUNDLED_DIR}); install from a clone of the repository (pip install -e .) or "
            "pass the text as a file path")
    return path


def _offline_env() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection within ``timeout`` seconds
    (``False`` at once with ``HF_DATASETS_OFFLINE``/``HF_HUB_OFFLINE`` set). Asked once per
    process."""
    if _offline_env():
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _use_bundled(name: str) -> bool:
    return name == "wikitext2" and not hub_reachable()


def describe_source(source, split: str = "train") -> str:
    """A short name of where a text comes from, for reports: the source name, the bundled copy
    used offline, a file name, or ``"given text"`` / ``"token ids"``."""
    import torch

    if isinstance(source, torch.Tensor):
        return "token ids"
    if isinstance(source, (list, tuple)):
        return "given text"
    if source in HUB_SOURCES:
        if _use_bundled(source):
            return (f"{source} (bundled copy data/wikitext2/{_BUNDLED_FILES[split]}, "
                    "hub not reachable)")
        return f"{source} (hub, {split} split)"
    if source == DEFAULT_CALIBRATION:
        return f"{source} ({split} split)" if split == "test" else source
    try:
        if Path(source).is_file():
            return Path(source).name
    except (OSError, ValueError, TypeError):
        pass
    return "given text"


def _hub_text(name: str, split: str) -> str:
    if _use_bundled(name):
        path = bundled_wikitext2(split)
        log.info("wikitext2: the hub is not reachable, reading the bundled copy %s", path.name)
        return path.read_text(encoding="utf-8").replace("\r\n", "\n")
    try:
        from datasets import load_dataset
    except ImportError as e:  # pragma: no cover - datasets is a dependency
        raise ImportError("calibration from the hub needs the 'datasets' package") from e
    if name in ("c4", "ptb") and not hub_reachable():
        raise ValueError(
            f"{name!r} is read from the Hugging Face hub, which cannot be reached from here "
            "(offline, or HF_DATASETS_OFFLINE/HF_HUB_OFFLINE set); offline sources: "
            "'wikitext2' (bundled copy), 'python-docs', or a text file path")
    if name == "wikitext2":
        ds = load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
        return "\n\n".join(ds["text"])
    if name == "ptb":
        ds = load_dataset("ptb_text_only", "penn_treebank", split=split)
        return " ".join(ds["sentence"])
    if name == "c4":
        if split == "train":
            files = {"train": "en/c4-train.00000-of-01024.json.gz"}
        else:
            files = {"validation": "en/c4-validation.00000-of-00008.json.gz"}
        ds = load_dataset("allenai/c4", data_files=files, split=split)
        return "\n\n".join(ds["text"][:20000])
    raise ValueError(f"unknown hub source {name!r}")


def load_text(source, split: str = "train") -> str:
    """Return the text of a named source, a local file, or the text itself.

    Lists of strings are joined; a string longer than 256 characters (or with a newline) that
    is not a file is taken as the text itself.

    ``split`` applies to the hub sources ("train", "validation", "test").
    """
    if isinstance(source, (list, tuple)):
        if not all(isinstance(s, str) for s in source):
            raise ValueError("calibration as a list must be a list of strings")
        return "\n\n".join(source)
    if not isinstance(source, (str, os.PathLike)):
        raise ValueError(
            "calibration must be 'python-docs', 'wikitext2', 'c4', 'ptb', a path to a text file, "
            f"a list of strings or a tensor of token ids; got {type(source).__name__}"
        )
    if source == DEFAULT_CALIBRATION:
        return python_docs_text("test" if split == "test" else "train")
    if source in HUB_SOURCES:
        return _hub_text(source, split)
    try:
        is_file = Path(source).is_file()
    except (OSError, ValueError):  # too long or odd to be a path: it is text
        is_file = False
    if is_file:
        return Path(source).read_text(encoding="utf-8").replace("\r\n", "\n")
    if isinstance(source, str) and (len(source) > 256 or "\n" in source):
        return source.replace("\r\n", "\n")
    raise ValueError(
        f"calibration {str(source)!r} is neither a known source ('python-docs', 'wikitext2', "
        "'c4', 'ptb'), an existing text file, nor a text (a string of more than 256 characters)"
    )


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """Token ids of ``text`` as a 1-D LongTensor (no special tokens added)."""
    import torch

    if tokenizer is None:
        raise ValueError(
            "a tokenizer is needed to turn calibration text into tokens: pass tokenizer=..., "
            "or pass calibration as a tensor of token ids"
        )
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.as_tensor(ids, dtype=torch.long).reshape(-1)


def get_calibration(calibration, tokenizer=None, nsamples: int = 128, seqlen: int = 2048,
                    seed: int = 0) -> torch.Tensor:
    """``nsamples`` windows of ``seqlen`` tokens, as a LongTensor (nsamples, seqlen).

    The text is tokenized once and cut into non-overlapping windows; ``nsamples`` of them are
    drawn at random (seeded), so no calibration token is used twice. A 2-D tensor of token ids
    with ``seqlen`` columns is used as given (its first ``nsamples`` rows).
    """
    import torch

    if isinstance(nsamples, bool) or not isinstance(nsamples, int) or nsamples < 1:
        raise ValueError(f"nsamples must be a positive integer, got {nsamples!r}")
    if isinstance(seqlen, bool) or not isinstance(seqlen, int) or seqlen < 1:
        raise ValueError(f"seqlen must be a positive integer, got {seqlen!r}")
    if isinstance(calibration, torch.Tensor):
        ids = calibration.long()
        if ids.ndim == 2 and ids.shape[1] == seqlen:
            if ids.shape[0] < nsamples:
                raise ValueError(
                    f"calibration tensor has {ids.shape[0]} rows, nsamples={nsamples} needs more"
                )
            return ids[:nsamples].clone()
        ids = ids.reshape(-1)
        what = "the calibration tensor"
    else:
        ids = tokenize_text(tokenizer, load_text(calibration, split="train"))
        what = f"calibration {calibration if isinstance(calibration, str) else 'text'!s}"
    windows = ids.numel() // seqlen
    if windows < nsamples:
        raise ValueError(
            f"{what} has {ids.numel():,} tokens; nsamples x seqlen = {nsamples} x {seqlen} needs "
            f"{nsamples * seqlen:,}. Give more text, or lower nsamples or seqlen"
        )
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(windows, generator=g)[:nsamples]
    return ids[: windows * seqlen].reshape(windows, seqlen)[pick].clone()


def default_calibration_size(device) -> tuple[int, int]:
    """``(nsamples, seqlen)`` used when not given: 128 x 2048 on CUDA (the papers' setting),
    32 x 512 on CPU (16x fewer tokens, so that a CPU run takes minutes, not hours).

    The environment variable ``TOOLKIT_DEFAULT_CALIBRATION="NxL"`` replaces both (the tests use
    it to keep CI short); the report always states what was used.
    """
    import torch


    knob = os.environ.get("TOOLKIT_DEFAULT_CALIBRATION")
    if knob:
        try:
            n, L = (int(v) for v in knob.lower().split("x"))
            if n < 1 or L < 1:
                raise ValueError
        except ValueError:
            raise ValueError(f"TOOLKIT_DEFAULT_CALIBRATION must look like '16x256', got {knob!r}") from None
        return n, L
    if torch.device(device).type == "cuda":
        return 128, 2048
    return 32, 512


def context_length(model) -> int | None:
    """The model's context length from its config (None when the config does not say)."""
    c = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(c, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def calibration_plan(config, model, device) -> tuple[object, int, int]:
    """``(calibration, nsamples, seqlen)`` of a :class:`~toolkit.config.options.CompressConfig` after
    defaults: the offline text, the device's calibration size, ``seqlen`` capped at (and
    checked against) the model's context."""
    calibration = config.calibration if config.calibration is not None else DEFAULT_CALIBRATION
    default_n, default_len = default_calibration_size(device)
    nsamples = config.nsamples or default_n
    context = context_length(model)
    seqlen = config.seqlen or (min(default_len, context) if context else default_len)
    if context is not None and seqlen > context:
        raise ValueError(f"seqlen={seqlen} is longer than the model's context ({context} tokens)")
    return calibration, nsamples, seqlen
