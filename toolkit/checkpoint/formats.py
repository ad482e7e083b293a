"""The compressed-tensors checkpoint format as the tools write it, and who reads what.

:mod:`toolkit.checkpoint.saveload` writes and reads checkpoints with these pieces; they are kept apart because
they describe *files*, whoever wrote them (the toolkit, llm-compressor 0.10 or 0.14, ...):

* the format names (the standard ones, and the toolkit's own, which other readers refuse);
* :func:`parse_groups` and :func:`plan_layers`: which module each tensor belongs to, resolving a
  ``config_groups`` entry's ``targets`` (exact module names, ``re:`` patterns matched from the
  start of the name, class names such as ``"Linear"`` matched against the module's classes)
  minus ``ignore``, the same rules as compressed-tensors' own matching;
* the decoders: :func:`unpack_codes` (both bit layouts of ``pack-quantized``: compressed-tensors
  >= 0.19 packs values densely across int32 words, 0.14 put ``32 // bits`` values in each word),
  :func:`dequantize` (``(q - zero_point) * scale`` in the scale's dtype, per column group, per
  block or through a ``g_idx``: the same arithmetic as compressed-tensors);
* :func:`predict_readers`: from these facts, which readers load a folder, refuse it, or -- the
  case this module exists to rule out for the toolkit's own files -- load it with other weights
  and no error. The rules for transformers were measured with transformers 5.24.0 +
  compressed-tensors 0.20.1 (``tests/test_readers.py`` checks every prediction against a real
  load, for the toolkit's files and for llm-compressor's, ``tests/fixtures/llmcompressor``); the
  vLLM rules come from vLLM's compressed-tensors scheme selection code (not run here).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, replace

import torch

from toolkit.model.layers import is_conv1d

__all__ = ["JOINT_FORMAT", "SPARSE_FORMAT", "SPARSE24_FORMAT", "CONV1D_FORMAT", "MIXED_FORMAT",
           "EXPERTS_FORMAT", "EXPERTS_DENSE_FORMAT",
           "TOOLKIT_FORMATS", "LEGACY_SPARSE_FORMATS", "READERS", "Group", "LayerPlan",
           "Verdict", "parse_groups", "matches", "plan_layers", "unpack_codes", "pack_layout",
           "unpack_zero_point", "column_groups", "dequantize", "expected_shapes",
           "predict_readers", "version_tuple", "block_key", "partial_group_keys",
           "block_strategy_keys",
           "GUARD_GROUP", "guard_group", "dequantize_fate", "arrange_groups", "dense_group",
           "experts_decoders",
           "experts_group"]

# ---- format names ------------------------------------------------------------------------------

#: compact layout, pruned + quantized: the kept codes packed (int32) + a bitmask
JOINT_FORMAT = "toolkit-sparse-bitmask-pack-quantized"
#: compact layout, pruned only: compressed-tensors' legacy sparse-bitmask tensors
SPARSE_FORMAT = "toolkit-sparse-bitmask"
#: compact layout, 2:4 only: compressed-tensors' legacy sparse-24-bitmask tensors
SPARSE24_FORMAT = "toolkit-sparse-24-bitmask"
#: pack-quantized tensors of a GPT-2 style Conv1D layer (weight stored (in, out)); compressed-
#: tensors quantizes nn.Linear only and loads these into the wrong orientation without an error
CONV1D_FORMAT = "toolkit-pack-quantized-conv1d"
#: top-level ``format`` of a file whose groups use several formats, one of them the toolkit's own
MIXED_FORMAT = "toolkit-mixed"
#: pack-quantized tensors of one slice of a fused mixture-of-experts parameter stored under a name
#: transformers does not merge into the fused parameter (a model without a per-expert checkpoint
#: layout, e.g. GPT-OSS, or a fused parameter some of whose slices are not quantized): a
#: standard name would leave the fused parameter missing, i.e. randomly initialised, without
#: an error
EXPERTS_FORMAT = "toolkit-experts-pack-quantized"
#: a slice of a fused expert parameter stored on its own as a plain (out, in) ``weight`` (the
#: uncompressed slices of a parameter whose other slices are stored compressed)
EXPERTS_DENSE_FORMAT = "toolkit-experts-dense"
TOOLKIT_FORMATS = (JOINT_FORMAT, SPARSE_FORMAT, SPARSE24_FORMAT, CONV1D_FORMAT, MIXED_FORMAT,
                   EXPERTS_FORMAT, EXPERTS_DENSE_FORMAT)
#: sparse formats of compressed-tensors <= 0.14 (no decompressor since 0.15) -> the same tensors
LEGACY_SPARSE_FORMATS = {"sparse-bitmask": SPARSE_FORMAT, "sparse-24-bitmask": SPARSE24_FORMAT}

#: the readers :func:`predict_readers` speaks about, and how they are named
READERS = {
    "transformers": "transformers AutoModelForCausalLM.from_pretrained",
    "dequantize": "from_pretrained + CompressedTensorsConfig(dequantize=True)",
    "load_compressed": "toolkit.load_compressed",
    "vllm": "vLLM (from its format rules, not run)",
}
#: the versions the transformers rules were measured with
MEASURED_WITH = "transformers 5.25.0 + compressed-tensors 0.20.1"


def version_tuple(text) -> tuple[int, ...]:
    """``"0.14.0.1"`` -> ``(0, 14, 0, 1)``; unknown -> ``()``."""
    out = []
    for part in str(text or "").split("."):
        m = re.match(r"\d+", part)
        if not m:
            break
        out.append(int(m.group()))
    return tuple(out)


# ---- which layers share the block strategy -------------------------------------------------------

def block_key(settings) -> tuple | None:
    """The per-layer settings that make one ``pack-quantized`` config group of the standard
    layout (``None``: not quantized in groups)."""
    if settings is None or settings.bits is None or settings.group_size is None:
        return None
    return (settings.bits, settings.group_size, bool(settings.sym), bool(settings.act_order))


def partial_group_keys(items) -> set[tuple]:
    """``items``: ``(settings, cols)`` of every layer of a model. The :func:`block_key` of the
    settings the standard layout stores with the format's ``block`` strategy (blocks of
    1 x group size, the same grids), for *every* layer of those settings, so that each setting
    is one config group:

    * asymmetric settings: transformers' plain ``from_pretrained`` (5.23+, with
      compressed-tensors 0.20) reads asymmetric zero points only in the block strategy's
      unpacked int8 form (``group``/``channel`` zero points are packed into int32 down the
      rows, which its loader does not allocate: size mismatch); vLLM reads no ``block``
      strategy for integer weights, so an asymmetric folder is transformers' and
      :func:`toolkit.load_compressed`'s (``sym=True`` gives the ``group`` strategy vLLM reads);
    * settings some layer of which has a partial last group (``cols > group_size`` and not a
      multiple of it): the ``group`` strategy needs the group size to divide the columns.

    (The name is historical: partial groups were the first reason.)"""
    return {block_key(s) for s, cols in items
            if block_key(s) is not None and (not s.sym or (cols > s.group_size and
                                                            cols % s.group_size))}


def block_strategy_keys(items) -> set[tuple]:
    """:func:`partial_group_keys` under the name that says what it returns."""
    return partial_group_keys(items)


# ---- config groups and target resolution --------------------------------------------------------

@dataclass
class Group:
    """One ``config_groups`` entry of a ``quantization_config`` (kept as plain data, so that
    entries compressed-tensors no longer parses, e.g. ``actorder="group"``, can still be read)."""

    name: str
    targets: list[str]
    weights: dict | None
    input_activations: dict | None
    format: str | None


def parse_groups(qc: dict) -> list[Group]:
    """The ``config_groups`` of ``quantization_config`` ``qc`` in file order."""
    out = []
    for name, g in (qc.get("config_groups") or {}).items():
        if isinstance(g, list):  # shorthand: a list of targets with a preset name
            g = {"targets": g}
        out.append(Group(name=name, targets=list(g.get("targets") or []),
                         weights=g.get("weights"), input_activations=g.get("input_activations"),
                         format=g.get("format") or qc.get("format")))
    return out


def matches(name: str, module, target: str) -> bool:
    """compressed-tensors' rule: ``re:`` patterns match the name from its start, other targets
    are a module name or the name of one of the module's classes (``"Linear"``)."""
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    if target == name:
        return True
    return module is not None and any(c.__name__ == target for c in type(module).__mro__)


def _matched(name, module, targets, ignore) -> bool:
    return any(matches(name, module, t) for t in targets) and \
        not any(matches(name, module, t) for t in ignore)


# ---- the plan: what each layer of a folder is --------------------------------------------------

@dataclass
class LayerPlan:
    """How one weight of a checkpoint is stored.

    ``kind``: ``pack`` (pack-quantized), ``joint`` (the toolkit's kept codes + bitmask),
    ``naive`` (int8 codes in ``weight``), ``int`` (int-quantized), ``sparse`` / ``sparse24``
    (bitmask layouts), ``dense`` (a plain ``weight``, recorded as pruned) or ``other``
    (a format nobody here decodes: marlin-24, float formats, ...). ``args``: the weight's
    QuantizationArgs as a dict (None when not quantized). ``fmt``: the declared format.
    """

    name: str
    kind: str
    fmt: str
    args: dict | None = None
    group: str | None = None
    module_type: str = "?"
    conv1d: bool = False
    shape: tuple[int, int] | None = None  # (out, in) of the logical weight
    activations: bool = False  # input activations are quantized
    sparse: str | None = None  # the sparsity_config format also covering this layer
    declared: str | None = None  # the format config.json declares, when the layer is not in it
    expert: dict | None = None  # a slice of a fused expert parameter: where it goes (see export)
    notes: list[str] = field(default_factory=list)


_KINDS = {"pack-quantized": "pack", "naive-quantized": "naive", "int-quantized": "int",
          JOINT_FORMAT: "joint", CONV1D_FORMAT: "pack", SPARSE_FORMAT: "sparse",
          EXPERTS_FORMAT: "pack", EXPERTS_DENSE_FORMAT: "dense",
          SPARSE24_FORMAT: "sparse24", "sparse-bitmask": "sparse", "sparse-24-bitmask": "sparse24",
          "dense": "dense"}


def _weight_shape(module) -> tuple[int, int] | None:
    w = getattr(module, "weight", None)
    if w is None or w.dim() != 2:
        return None
    return (w.shape[1], w.shape[0]) if is_conv1d(module) else tuple(w.shape)


def plan_layers(model, qc: dict, meta_layers: dict | None, tensor_names) -> dict[str, LayerPlan]:
    """Every compressed weight of a checkpoint, by module name, in the model's order.

    ``model``: the architecture (meta tensors are fine) or None (module names then come from the
    tensor names only, and class-name targets cannot be resolved); ``qc``: the
    ``quantization_config`` dict ({} when none); ``meta_layers``: the ``layers`` of
    ``toolkit_compression.json`` (its per-layer ``format`` wins over the config: files written
    before format version 2 declared standard names for the toolkit's own layouts);
    ``tensor_names``: the names of the stored tensors.
    """
    tensor_names = set(tensor_names)
    if model is not None:
        modules = [(n, m) for n, m in model.named_modules() if _weight_shape(m) is not None]
    else:  # names only: every prefix that owns a compressed tensor
        suffixes = (".weight_packed", ".weight", ".compressed", ".bitmask")
        names = sorted({k.rsplit(".", 1)[0] for k in tensor_names if k.endswith(suffixes)})
        modules = [(n, None) for n in names]
    plan: dict[str, LayerPlan] = {}
    ignore = list(qc.get("ignore") or [])
    for g in parse_groups(qc):
        for name, module in modules:
            if name in plan or not _matched(name, module, g.targets, ignore):
                continue
            fmt = g.format or "dense"
            plan[name] = LayerPlan(
                name=name, kind=_KINDS.get(fmt, "other"), fmt=fmt, args=g.weights, group=g.name,
                module_type=type(module).__name__ if module is not None else "?",
                conv1d=module is not None and is_conv1d(module),
                shape=_weight_shape(module) if module is not None else None,
                activations=bool(g.input_activations))
            if g.weights is None and plan[name].kind in ("pack", "naive", "int"):
                plan[name].kind = "other"
                plan[name].notes.append("no weight quantization arguments")
    sc = qc.get("sparsity_config") or {}
    sfmt = sc.get("format")
    if sfmt in LEGACY_SPARSE_FORMATS:
        for name, module in modules:
            if not _matched(name, module, sc.get("targets") or [], sc.get("ignore") or []):
                continue
            if f"{name}.bitmask" not in tensor_names:
                continue
            if name in plan:
                plan[name].sparse = sfmt
            else:
                plan[name] = LayerPlan(
                    name=name, kind=_KINDS[sfmt], fmt=sfmt,
                    module_type=type(module).__name__ if module is not None else "?",
                    conv1d=module is not None and is_conv1d(module),
                    shape=_weight_shape(module) if module is not None else None)
    groups = parse_groups(qc)
    for name, e in (meta_layers or {}).items():
        fmt = e.get("format")
        if fmt is None:
            continue
        p = plan.get(name)
        if p is None and e.get("experts"):  # a slice of a fused expert parameter: no module
            g = next((g for g in groups if _matched(name, None, g.targets, ignore)), None)
            p = plan[name] = LayerPlan(
                name=name, kind=_KINDS.get(fmt, "other"), fmt=fmt,
                args=g.weights if g is not None else None, group=g.name if g else None,
                module_type="experts", shape=tuple(e["shape"]) if e.get("shape") else None,
                activations=bool(g is not None and g.input_activations))
        elif p is None:
            module = dict(modules).get(name)
            p = plan[name] = LayerPlan(
                name=name, kind="dense", fmt=fmt,
                module_type=type(module).__name__ if module is not None else "?",
                conv1d=bool(e.get("transposed")),
                shape=tuple(e["shape"]) if e.get("shape") else None)
        p.expert = e.get("experts")
        if fmt in _KINDS and fmt != p.fmt:  # a layout of ours declared under a standard name
            p.notes.append(f"declared {p.fmt!r} in config.json, stored as {fmt!r}")
            p.declared = p.fmt
            p.kind, p.fmt = _KINDS[fmt], fmt
        if p.shape is None and e.get("shape"):
            p.shape = tuple(e["shape"])
    order = {n: i for i, (n, _) in enumerate(modules)}

    def position(item):
        name, p = item
        if name in order or not p.expert:
            return order.get(name, len(order))
        # an expert slice: after the last module of its MoE block (e.g. the router)
        prefix = p.expert["module"]
        while "." in prefix:
            prefix = prefix.rsplit(".", 1)[0]
            near = [i for n, i in order.items() if n.startswith(prefix + ".")]
            if near:
                return max(near) + 0.5
        return len(order)

    return dict(sorted(plan.items(), key=position))


# ---- decoding ------------------------------------------------------------------------------------

def pack_layout(width: int, n: int, bits: int, version=None) -> str:
    """Which bit layout a row of ``width`` int32 words holding ``n`` values of ``bits`` bits
    uses: ``"dense"`` (compressed-tensors >= 0.19: value ``j`` at bit ``j * bits`` of the row's
    bit stream, straddling words) or ``"padded"`` (0.14: ``32 // bits`` values per word). The
    two are the same bytes when ``bits`` divides 32; otherwise the width tells them apart, and
    where it does not (a few columns), the version that wrote the file does."""
    if 32 % bits == 0:
        return "dense"
    dense, padded = math.ceil(n * bits / 32), math.ceil(n / (32 // bits))
    if width == dense and width != padded:
        return "dense"
    if width == padded and width != dense:
        return "padded"
    if width == dense == padded:
        v = version_tuple(version)
        return "padded" if v and v < (0, 15) else "dense"
    raise ValueError(f"{width} int32 words cannot hold {n} values of {bits} bits in either "
                     f"layout ({dense} packed densely, {padded} with {32 // bits} per word)")


def unpack_codes(packed: torch.Tensor, bits: int, n: int, layout: str = "dense") -> torch.Tensor:
    """The unsigned ``bits``-bit values in each row of the int32 words ``packed`` ``[R, W]``:
    ``[R, n]`` int64, least significant bits first (see :func:`pack_layout`)."""
    words = packed.to(torch.int64) & 0xFFFFFFFF
    rows, width = words.shape
    mask = (1 << bits) - 1
    if layout == "padded":
        per = 32 // bits
        shifts = torch.arange(per, dtype=torch.int64) * bits
        vals = ((words.unsqueeze(-1) >> shifts) & mask).reshape(rows, width * per)
        return vals[:, :n]
    start = torch.arange(n, dtype=torch.int64) * bits
    k, off = start // 32, start % 32
    if n and int(k[-1]) >= width:
        raise ValueError(f"{width} int32 words hold fewer than {n} values of {bits} bits")
    low = words[:, k] >> off
    high_bits = torch.clamp(off + bits - 32, min=0)  # bits taken from the next word
    nxt = torch.clamp(k + 1, max=max(width - 1, 0))
    high = (words[:, nxt] & ((1 << high_bits) - 1)) << (32 - off)
    return (low | high) & mask


def unpack_zero_point(packed: torch.Tensor, bits: int, rows: int, layout: str = "dense"):
    """Zero points packed down each column (``packed_dim=0``): ``[ceil(rows*bits/32), G]`` ->
    ``[rows, G]`` unsigned."""
    return unpack_codes(packed.T.contiguous(), bits, rows, layout).T


def column_groups(args: dict, rows: int, cols: int, g_idx: torch.Tensor | None = None):
    """``(row_index [rows], col_index [cols], n_row_groups, n_col_groups)``: which scale row and
    column each weight uses, for a QuantizationArgs dict (strategies channel, group, block,
    tensor; ``g_idx`` for the old ``actorder="group"``)."""
    strategy = args.get("strategy")
    rix = torch.arange(rows)
    if g_idx is not None:
        cix = g_idx.long().flatten()
        return rix, cix, rows, int(cix.max()) + 1 if cix.numel() else 0
    if strategy == "channel":
        return rix, torch.zeros(cols, dtype=torch.long), rows, 1
    if strategy == "tensor":
        return torch.zeros(rows, dtype=torch.long), torch.zeros(cols, dtype=torch.long), 1, 1
    if strategy == "group":
        g = int(args["group_size"])
        if cols % g:
            raise ValueError(f"group strategy with group_size {g} does not divide {cols} columns")
        return rix, torch.arange(cols) // g, rows, cols // g
    if strategy == "block":
        br, bc = (int(x) for x in args["block_structure"])
        return (torch.arange(rows) // br, torch.arange(cols) // bc, math.ceil(rows / br),
                math.ceil(cols / bc))
    raise ValueError(f"weight strategy {strategy!r} is not supported")


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, rix, cix):
    """``(q - zero) * scale`` with the scale and zero point of each weight's group, computed in
    the scale's dtype like compressed-tensors (``q``/``zero`` signed codes)."""
    dt = scale.dtype
    s = scale[rix][:, cix]
    out = q.to(dt)
    if zero is not None:
        out = out - zero[rix][:, cix].to(dt)
    return out * s


def expected_shapes(p: LayerPlan, version=None) -> dict[str, list[int]]:
    """The tensors a standard reader expects for layer plan ``p`` (``pack``/``naive`` kinds with
    a known shape), by local name: what compressed-tensors' own loader allocates."""
    if p.shape is None or p.args is None or p.kind not in ("pack", "naive"):
        return {}
    rows, cols = p.shape
    bits = int(p.args.get("num_bits") or 8)
    try:
        _, _, nr, nc = column_groups(p.args, rows, cols)
    except ValueError:
        return {}
    out = {"weight_scale": [nr, nc]}
    if p.kind == "pack":
        out["weight_packed"] = [rows, math.ceil(cols * bits / 32)]
        if not p.args.get("symmetric", True):
            out["weight_zero_point"] = ([math.ceil(rows * bits / 32), nc]
                                        if p.args.get("strategy") in ("group", "channel")
                                        else [nr, nc])
    else:
        out["weight"] = [rows, cols]
    return out


# ---- who reads what ---------------------------------------------------------------------------

@dataclass
class Verdict:
    """What one reader does with a folder: ``status`` is ``"loads"`` (the stored weights, so the
    logits of the model that was saved), ``"error"`` (it raises) or ``"wrong"`` (it returns a
    model with other weights and no error); ``reason`` says why in a few words."""

    status: str
    reason: str = ""

    def text(self) -> str:
        """``loads``, ``refuses`` or (for files of other tools only: the toolkit writes none)
        ``LOADS WRONG WEIGHTS without an error``, and the reason."""
        return f"{self.word()}{': ' + self.reason if self.reason else ''}"

    def word(self) -> str:
        return {"loads": "loads", "error": "refuses",
                "wrong": "LOADS WRONG WEIGHTS without an error"}[self.status]


def _ct_parse_error(qc: dict) -> str | None:
    """The first line of compressed-tensors' complaint about ``qc``, or None if it parses."""
    if not qc.get("config_groups"):
        return None
    try:
        from compressed_tensors.quantization import QuantizationConfig

        QuantizationConfig.model_validate(qc)  # what transformers passes it
    except Exception as e:  # noqa: BLE001 - pydantic's errors: we only need the words
        lines = [x.strip() for x in str(e).splitlines() if x.strip()]
        return (lines[2] if len(lines) > 2 else " ".join(lines))[:120]
    return None


def _registered(fmt: str) -> bool:
    from compressed_tensors.compressors import BaseCompressor

    try:
        BaseCompressor.get_value_from_registry(fmt)
        return True
    except Exception:  # noqa: BLE001 - KeyError/ValueError by version
        return False


def _scheme_key(p: LayerPlan):
    a = p.args or {}
    return (p.fmt, a.get("num_bits"), a.get("symmetric"), a.get("strategy"), a.get("group_size"),
            tuple(a.get("block_structure") or ()), bool(p.activations))


def _effective_grouping(args: dict, cols: int):
    """Columns per scale of a scheme applied to ``cols`` columns; None when it cannot apply."""
    s = args.get("strategy")
    if s == "channel":
        return cols
    if s == "group":
        g = int(args["group_size"])
        return g if cols % g == 0 else None
    if s == "block":
        br, bc = args["block_structure"]
        return min(bc, cols) if br == 1 else None
    return None


def dequantize_fate(a: dict | None, b: dict | None, cols: int | None) -> str:
    """What compressed-tensors' ``pack-quantized`` decompression does to a layer of ``cols``
    columns quantized with the weight arguments ``b`` when it is given the arguments ``a``
    instead (transformers decompresses every layer with ONE config group's scheme on its
    dequantizing path, and every fused expert with one scheme on both paths): ``"loads"`` (the
    same weights), ``"error"`` (it raises) or ``"wrong"`` (other weights, no error). Rules read
    from compressed-tensors 0.20 (``_process_group`` raises when the group size does not divide
    the columns; asymmetric ``group``/``channel`` schemes assert a zero point) and measured in
    ``tests/test_readers.py``; a case not known to load or raise counts as ``"wrong"``."""
    a, b = a or {}, b or {}
    if cols is None:
        return "wrong"
    if a.get("strategy") == "group" and cols % int(a["group_size"]):
        return "error"  # "tensor column shape must be divisible by the given group_size"
    if not a.get("symmetric", True) and b.get("symmetric", True) and \
            a.get("strategy") in ("group", "channel"):
        return "error"  # "Asymmetric quant requires zero-point values"
    packed = ("group", "channel")  # zero points packed into int32 down the rows
    if not a.get("symmetric", True) and not b.get("symmetric", True) and \
            (a.get("strategy") in packed) != (b.get("strategy") in packed):
        # measured: a block scheme first fails on packed zero points (shape); the reverse
        # (unpacking int8 zero points as int32 words) was not measured: assume the worst
        return "error" if a.get("strategy") == "block" else "wrong"
    same = (a.get("num_bits") == b.get("num_bits") and
            bool(a.get("symmetric", True)) == bool(b.get("symmetric", True)) and
            _effective_grouping(a, cols) is not None and
            _effective_grouping(a, cols) == _effective_grouping(b, cols))
    return "loads" if same else "wrong"


# ---- several schemes in one file: which group transformers takes, and the guard ---------------

#: the name of the config group the standard layout puts first in a file whose layers have
#: several schemes that one scheme cannot decode (see :func:`guard_group`)
GUARD_GROUP = "toolkit_guard_several_schemes"
#: the guard's group size: larger than any layer's columns, so decompressing any layer with the
#: guard's scheme raises
GUARD_GROUP_SIZE = 2 ** 30


def _experts_target(t: str) -> bool:
    return t.startswith("re:") and "experts" in t


def dense_group(groups: list[Group]) -> Group | None:
    """The config group whose scheme transformers' dequantizing load applies to every
    non-expert layer (transformers 5.25 ``get_dense_scheme``): the first group none of whose
    targets is a ``re:`` pattern naming experts, else the first group."""
    if not groups:
        return None
    return next((g for g in groups if not any(_experts_target(t) for t in g.targets)), groups[0])


def experts_group(groups: list[Group]) -> Group | None:
    """The config group whose scheme transformers applies to every expert slice it merges into
    fused parameters, on both of its paths (transformers 5.25 ``get_experts_scheme``): the
    first group with a ``re:`` target naming experts, else the first group with a target that is
    not a ``re:`` pattern, else the first group."""
    if not groups:
        return None
    return next((g for g in groups if any(_experts_target(t) for t in g.targets)), None) or \
        next((g for g in groups if any(not t.startswith("re:") for t in g.targets)), groups[0])


def guard_group() -> dict:
    """A config group that targets no module, put first in a standard file whose layers have
    several schemes that no one scheme decodes (e.g. 4-bit layers and an 8-bit ``down_proj``).

    transformers' dequantizing load (``CompressedTensorsConfig(dequantize=True)``) decompresses
    every non-expert layer with the scheme of the first config group that does not single out
    experts (:func:`dense_group`) -- with several schemes, other weights and no error. With
    this group first it takes the guard's scheme, a group size of 2**30 columns, and
    compressed-tensors raises on the first layer ("tensor column shape must be divisible by
    the given group_size 1073741824"): the load fails instead of going wrong. Readers that
    resolve each layer's own group -- transformers' plain ``from_pretrained``,
    :func:`toolkit.load_compressed`, vLLM (its target map gets no entry from a group without
    targets) -- are not affected; compressed-tensors validates the group like any other."""
    from compressed_tensors.quantization import QuantizationArgs

    args = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="group",
                            group_size=GUARD_GROUP_SIZE)
    return {"format": "pack-quantized", "input_activations": None, "output_activations": None,
            "targets": [], "weights": json.loads(args.model_dump_json())}


def _decodes(a: dict | None, fa: str, b: dict | None, fb: str, names, cols) -> bool:
    return all(fa == fb and dequantize_fate(a, b, cols.get(n)) == "loads" for n in names)


def experts_decoders(groups: list[tuple], cols: dict[str, int], experts) -> list[int]:
    """The indices of the groups holding expert slices whose scheme decodes every expert slice
    of the file exactly (transformers merges them all with one scheme, through a module without
    zero points: an asymmetric ``block`` scheme never qualifies). ``groups`` as
    :func:`arrange_groups` takes them."""
    out = []
    for i, (a, fa, names) in enumerate(groups):
        if not any(n in experts for n in names):
            continue
        if not (a or {}).get("symmetric", True) and (a or {}).get("strategy") == "block":
            continue
        if all(_decodes(a, fa, b, fb, [n for n in nb if n in experts], cols)
               for j, (b, fb, nb) in enumerate(groups) if j != i):
            out.append(i)
    return out


def arrange_groups(groups: list[tuple], cols: dict[str, int],
                   experts: set[str] | frozenset = frozenset()) -> tuple[list[tuple], bool]:
    """The order of a standard file's config groups, and whether it needs :func:`guard_group`.

    ``groups``: ``[(weight args dict, format, layer names)]``; ``cols``: columns per layer;
    ``experts``: the layers that are slices of fused expert parameters (transformers
    decompresses them with the scheme of :func:`experts_group`, the first group here, so a
    group holding experts whose scheme decodes every expert slice goes first, see
    :func:`experts_decoders`). The first group is otherwise one whose scheme decodes every
    other non-expert layer exactly (:func:`dequantize_fate`), the ``block`` groups preferred
    (a 1 x g block scheme decodes g-group layers exactly, not the reverse); when no candidate
    does, the guard is needed (True): the dequantizing path must raise."""
    idx = sorted(range(len(groups)),
                 key=lambda i: 0 if (groups[i][0] or {}).get("strategy") == "block" else 1)
    holding = [i for i in idx if any(n in experts for n in groups[i][2])]
    if holding:
        good = set(experts_decoders(groups, cols, experts))
        candidates = [i for i in holding if i in good] or holding[:1]
    else:
        candidates = idx

    def decodes(c: int) -> bool:
        a, fa, _ = groups[c]
        return all(j == c or _decodes(a, fa, b, fb, [n for n in names if n not in experts], cols)
                   for j in idx for b, fb, names in [groups[j]])

    for c in candidates:
        if decodes(c):
            return [groups[c]] + [groups[j] for j in idx if j != c], False
    c = candidates[0] if candidates else 0
    return [groups[c]] + [groups[j] for j in idx if j != c], len(groups) > 1


def predict_readers(config_data: dict, plan: dict[str, LayerPlan], shapes: dict[str, list],
                    linear_names: list[str] | None = None,
                    meta: dict | None = None) -> dict[str, Verdict]:
    """Which readers load the folder whose ``config.json`` is ``config_data``, whose compressed
    layers are ``plan`` (:func:`plan_layers`) and whose stored tensor shapes are ``shapes``;
    ``linear_names``: every ``nn.Linear`` of the architecture (for vLLM's rule that each one is
    a target or ignored). Keys: :data:`READERS`."""
    qc = config_data.get("quantization_config") or {}
    method = qc.get("quant_method")
    out: dict[str, Verdict] = {}
    if qc and method != "compressed-tensors":
        why = f"quantization_config is {method!r}, not compressed-tensors"
        return {"transformers": Verdict("loads", f"transformers' own {method} loader "
                                                 "(not checked here)"),
                "dequantize": Verdict("error", why),
                "load_compressed": Verdict("error", why),
                "vllm": Verdict("loads", f"vLLM's {method} support (not checked here)")}
    layers = list(plan.values())
    unreadable = [p for p in layers if p.kind == "other" or p.activations]
    version = qc.get("version")

    # ---- toolkit.load_compressed ----
    if unreadable:
        p = unreadable[0]
        what = ("quantized input activations (load_compressed keeps activations in floating "
                "point)" if p.activations else f"format {p.fmt!r}")
        out["load_compressed"] = Verdict("error", f"{p.name}: {what}")
    else:
        out["load_compressed"] = Verdict("loads")

    # ---- transformers, plain and dequantizing ----
    if not qc:
        out["transformers"] = Verdict("loads", "plain dense model")
        out["dequantize"] = Verdict("error", "not a quantized model (no quantization_config)")
    else:
        groups = parse_groups(qc)
        parse_error = _ct_parse_error(qc)
        unknown = sorted({f for f in [qc.get("format")] + [g.format for g in groups]
                          if f and not _registered(f)}) if groups else []
        dense_sparse = [p for p in layers if p.kind in ("sparse", "sparse24") and p.args is None
                        and p.group is None]
        mismatched = []
        for p in layers:
            seen = replace(p, kind=_KINDS.get(p.declared, "other"), fmt=p.declared) \
                if p.declared else p  # what a reader of the config expects
            for local, shape in expected_shapes(seen, version).items():
                key = f"{p.name}.{local}"
                if key in shapes and list(shapes[key]) != list(shape):
                    mismatched.append((p, key, list(shapes[key]), shape))
                    break
        not_linear = [p for p in layers if p.group is not None and p.conv1d]
        ours = sorted({f for f in [qc.get("format")] + [g.format for g in groups]
                       if f in TOOLKIT_FORMATS})
        if parse_error and ours:
            both = Verdict("error", f"format {ours[0]!r} is the toolkit's own: compressed-tensors "
                                    "refuses the config (ValidationError)")
            out["transformers"] = out["dequantize"] = both
        elif parse_error:
            both = Verdict("error", f"compressed-tensors cannot parse the config: {parse_error}")
            out["transformers"] = out["dequantize"] = both
        elif unknown:
            both = Verdict("error", f"no compressed-tensors compressor for {', '.join(unknown)}")
            out["transformers"] = out["dequantize"] = both
        elif not groups:
            if dense_sparse:
                wrong = Verdict("wrong", f"{len(dense_sparse)} layers are in the legacy "
                                         f"{dense_sparse[0].fmt} format, which compressed-tensors "
                                         ">= 0.15 ignores: they keep their random initial weights")
                out["transformers"] = out["dequantize"] = wrong
            else:
                out["transformers"] = Verdict("loads", "weights stored dense")
                out["dequantize"] = Verdict("loads", "weights stored dense")
        else:
            # plain from_pretrained: compressed-tensors allocates each target's tensors and
            # decompresses them after loading (strict shapes)
            asym_packed = [p for p in layers if p.kind == "pack" and p.args and not
                           p.args.get("symmetric", True) and
                           p.args.get("strategy") in ("group", "channel")]
            plain = None
            if not_linear:
                plain = Verdict("wrong", f"{not_linear[0].name} is a {not_linear[0].module_type}: "
                                         "compressed-tensors quantizes nn.Linear only and loads "
                                         "it transposed")
            elif mismatched:
                p, key, got, want = mismatched[0]
                plain = Verdict("error", f"tensor {key} is {got}, the format declares {want}")
            elif dense_sparse or any(p.sparse for p in layers):
                plain = Verdict("error", "legacy sparse tensors next to quantized ones")
            elif any(p.kind == "int" for p in layers):
                plain = Verdict("error", "int-quantized weights with quantized activations")
            elif asym_packed:
                plain = Verdict("error", f"asymmetric zero points packed along the rows "
                                         f"({asym_packed[0].name}); this loader expects them "
                                         "unpacked (size mismatch)")
            else:
                plain = Verdict("loads")
            out["transformers"] = plain
            # dequantize=True: every non-expert layer decompressed with ONE config group's
            # scheme (transformers 5.25 integrations/compressed_tensors.py get_dense_scheme)
            dg = dense_group(groups)
            deq = None
            if not_linear:
                deq = Verdict("error", f"{not_linear[0].name} is a {not_linear[0].module_type} "
                                       "(shape mismatch)")
            elif mismatched:
                p, key, got, want = mismatched[0]
                deq = Verdict("wrong", f"tensor {key} is {got}, not the declared {want}: the "
                                       "codes are unpacked as if it were")
            elif dense_sparse:
                deq = Verdict("wrong", f"{dense_sparse[0].name} ({dense_sparse[0].fmt}) is not "
                                       "read: it keeps its random initial weights")
            elif any(p.sparse or p.kind == "int" for p in layers):
                deq = Verdict("error", "int-quantized / legacy sparse tensors (KeyError)")
            else:
                fates: dict[str, list] = {}
                for p in layers:
                    if p.group is None or p.expert or p.group == dg.name:
                        continue
                    fate = "wrong" if p.fmt != (dg.format or "dense") else dequantize_fate(
                        dg.weights, p.args, p.shape[1] if p.shape else None)
                    fates.setdefault(fate, []).append(p)
                n = len({_scheme_key(q) for q in layers if q.group and not q.expert})
                if dg.name == GUARD_GROUP and not dg.targets and fates.get("error"):
                    deq = Verdict("error", f"{n} schemes, and this path decompresses every layer "
                                           "with one config group's scheme: the file's first "
                                           f"group ({GUARD_GROUP}) makes it raise")
                elif fates.get("error"):
                    p = fates["error"][0]
                    deq = Verdict("error", f"it decompresses every layer with the scheme of "
                                           f"config group {dg.name!r}, which fails on {p.name}")
                elif fates.get("wrong"):
                    p = fates["wrong"][0]
                    deq = Verdict("wrong", f"it decompresses every layer with the scheme of "
                                           f"config group {dg.name!r} ({n} schemes here; "
                                           f"{p.name} differs)")
            out["dequantize"] = deq or Verdict("loads")
            fused = _experts_verdict(groups, layers)
            for key in ("transformers", "dequantize"):
                if fused is not None and out[key].status != "error" and \
                        (fused.status == "error" or out[key].status == "loads"):
                    out[key] = fused

    # compressed-tensors 0.14 ignores the block strategy and infers the group width from the
    # shapes: right where the block width divides the columns, wrong (or an error) elsewhere
    blocks = [p for p in layers if p.group is not None and
              (p.args or {}).get("strategy") == "block" and p.shape and
              p.shape[1] % int(((p.args or {}).get("block_structure") or [1, 1])[1])]
    for key in ("transformers", "dequantize"):
        if blocks and out.get(key) and out[key].status == "loads":
            note = ("with transformers 5 / compressed-tensors >= 0.15; 0.14 ignores the 'block' "
                    "strategy of a partial last group and can load wrong weights")
            out[key] = Verdict("loads", "; ".join(x for x in (out[key].reason, note) if x))

    # ---- vLLM, from its scheme selection rules (not run) ----
    out["vllm"] = _vllm_verdict(qc, layers, linear_names)
    return {k: out[k] for k in READERS}


def _experts_verdict(groups: list[Group], layers: list[LayerPlan]) -> Verdict | None:
    """What transformers 5.25 does with slices of fused expert parameters stored per expert in
    a config group (None when there are none). Its conversion mapping merges the per-expert
    tensors into the fused parameters, decompressing each with ONE scheme, that of
    :func:`experts_group`, through a module holding ``weight_packed``, ``weight_scale`` and
    ``weight_shape`` only: asymmetric ``group``/``channel`` schemes fail ("Asymmetric quant
    requires zero-point values"), an asymmetric ``block`` scheme decodes without its zero points
    (wrong), other schemes than that group's decode as :func:`dequantize_fate` says. Both
    loaders take this path."""
    ex = [p for p in layers if p.expert and p.group is not None]
    if not ex:
        return None
    chosen = experts_group(groups)
    args = chosen.weights or {}
    if not args.get("symmetric", True) and args.get("strategy") in ("group", "channel"):
        return Verdict("error", f"experts ({ex[0].name}, ...) are decompressed without their "
                                "zero points: 'Asymmetric quant requires zero-point values'")
    if not args.get("symmetric", True):
        return Verdict("wrong", f"experts ({ex[0].name}, ...) are decompressed without their "
                                f"zero points ({args.get('strategy')} strategy: no check)")
    for p in ex:
        if p.group == chosen.name:
            continue
        fate = "wrong" if p.fmt != (chosen.format or "dense") else dequantize_fate(
            args, p.args, p.shape[1] if p.shape else None)
        if fate != "loads":
            return Verdict(fate, f"every expert is decompressed with the scheme of config group "
                                 f"{chosen.name!r}; {p.name} has another")
    return Verdict("loads", "fused experts merged from per-expert tensors (conversion mapping)")


_FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _vllm_verdict(qc: dict, layers: list[LayerPlan], linear_names) -> Verdict:
    if not qc:
        return Verdict("loads", "plain dense model")
    if not qc.get("config_groups"):
        return Verdict("error", "no config_groups (vLLM's compressed-tensors config needs them; "
                                "legacy sparse-only formats)")
    for p in layers:
        if p.group is None and p.kind == "dense":
            continue  # stored as a plain weight (listed in ``ignore``)
        a = p.args or {}
        where = f"{p.name}: "
        if p.fmt in TOOLKIT_FORMATS:
            return Verdict("error", where + f"format {p.fmt!r} is the toolkit's own")
        if p.kind in ("sparse", "sparse24") or p.sparse:
            w8a8 = (p.sparse == "sparse-24-bitmask" and p.activations and
                    a.get("num_bits") == 8 and a.get("strategy") in ("channel", "tensor"))
            if w8a8:  # CompressedTensors24: cutlass 2:4 kernels
                return Verdict("loads", where + "2:4 + int8 weights and activations "
                                                "(CompressedTensors24; needs an sm90 GPU)")
            return Verdict("error", where + f"{p.sparse or p.fmt}: vLLM reads legacy sparse "
                                            "tensors only as 2:4 with int8 weights and "
                                            "activations")
        if p.kind == "other" and p.fmt == "marlin-24":
            return Verdict("loads", where + "marlin-24 (CompressedTensorsW4A16Sparse24; older "
                                            "vLLM releases only)")
        if p.activations:
            return Verdict("loads", where + "weight + activation quantization schemes "
                                            "(not checked here)")
        if p.kind != "pack":
            return Verdict("error", where + f"format {p.fmt!r}: vLLM's weight-only int schemes "
                                            "read pack-quantized")
        if a.get("strategy") not in ("group", "channel"):
            return Verdict("error", where + f"strategy {a.get('strategy')!r}: the WNA16 scheme "
                                            "takes group or channel (the toolkit stores "
                                            "asymmetric grids and partial last groups as "
                                            "'block'; sym=True with a group size that divides "
                                            "the columns gives 'group')")
        bits, sym = a.get("num_bits"), a.get("symmetric", True)
        if not sym and bits not in (4, 8):
            return Verdict("error", where + f"asymmetric {bits}-bit: zero points are supported "
                                            "for 4 and 8 bits")
        if bits not in (2, 3, 4, 5, 6, 7, 8):
            return Verdict("error", where + f"{bits}-bit")
    if linear_names is not None:
        covered = {p.name for p in layers}
        ignore = list(qc.get("ignore") or [])
        loose = [n for n in linear_names if n not in covered and n.split(".")[-1] != "lm_head"
                 and not any(matches(n, None, t) for t in ignore)]
        if loose:
            return Verdict("error", f"{loose[0]} is neither a target nor ignored ('Unable to "
                                    "find matching target')")
    keys = {p.name: _scheme_key(p) for p in layers}
    for name in keys:
        for fused in _FUSED:
            head, _, last = name.rpartition(".")
            if last == fused[0]:
                ks = {keys.get(f"{head}.{x}") for x in fused}
                if len(ks) > 1:
                    return Verdict("error", f"{head}.{'/'.join(fused)} are fused in vLLM but have "
                                            "different schemes")
    bits = sorted({p.args["num_bits"] for p in layers if p.args and p.args.get("num_bits")})
    note = "WNA16 (pack-quantized, " + "/".join(f"{b}-bit" for b in bits) + ")"
    if any(b not in (4, 8) for b in bits):
        note += "; widths other than 4/8 need a recent vLLM (older releases: 4 and 8 only)"
    if any(p.expert and p.group is not None for p in layers):
        note += ("; experts stored per expert under transformers' checkpoint names go to vLLM's "
                 "compressed-tensors MoE method")
    return Verdict("loads", note)
