"""Which GGUF type each tensor gets: llama.cpp's presets (``Q4_K_M``, ...), the fallback for
rows a K-quant cannot hold, and the types of the embeddings and the output head.

``compress(model, tok, gguf=...)`` takes a GGUF *type* (``"Q4_K"``: every compressed layer in
that type, as ``llama-quantize --pure`` does) or a llama.cpp *preset* (``"Q4_K_M"``: a base type
and, for some tensors, more bits). Before the sweep, :func:`resolve_gguf` turns each layer's
setting into one type, with the rules llama.cpp's quantizer applies to a LLaMA-style model (no
experts, not Falcon, under 70B; ``i`` the block, ``n`` the number of blocks,
``more(i) = i < n/8 or i >= 7n/8 or (i - n/8) % 3 == 2``):

=======  ======  =====================================  ===================================
preset   base    attn_v                                 ffn_down               (attn_output)
=======  ======  =====================================  ===================================
Q2_K_S   Q2_K    Q4_K when n_head / n_kv_head >= 4      Q4_K for i < n/8
Q3_K_S   Q3_K    -                                      -
Q3_K_M   Q3_K    Q5_K for i < 2, else Q4_K              Q5_K for i < n/16, else Q4_K  (Q4_K)
Q3_K_L   Q3_K    Q5_K                                   Q5_K                          (Q5_K)
Q4_K_S   Q4_K    Q5_K for i < 4                         Q5_K for i < n/8
Q4_K_M   Q4_K    Q6_K when more(i)                      Q6_K when more(i)
Q5_K_S   Q5_K    -                                      -
Q5_K_M   Q5_K    Q6_K when more(i)                      Q6_K when more(i)
=======  ======  =====================================  ===================================

(fused ``qkv`` projections: Q4_K for Q3_K_M/L, Q5_K for Q4_K_M, Q6_K for Q5_K_M.) Roles are
read from the layer names (``v_proj``, ``down_proj``, ``o_proj``, ``qkv_proj`` and their GPT-2,
Falcon and Phi spellings); other layers get the base type.

**Fallback.** A K-quant stores rows in super-blocks of 256 columns. A layer whose column count is
not a multiple of 256 gets llama.cpp's fallback type (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0,
Q2_K/Q3_K -> Q4_0: llama.cpp now uses IQ4_NL there, which the solver does not fit). On SmolLM2
(hidden size 576) that is every layer but ``down_proj``.

**Embeddings and output.** With a preset, the output head (or, with tied embeddings, the shared
embedding matrix) gets Q6_K (Q8_0 when its columns are not a multiple of 256) and untied token
embeddings the base type, as llama.cpp chooses; with a plain type (``--pure``) both get that
type (with the same fallback).
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import replace

from toolkit.solver.checks import GGUF_PRESETS, GGUF_TYPES
from toolkit.solver.gguf_grids import FALLBACK, TYPES

__all__ = ["PRESET_BASE", "preset_type", "resolve_gguf", "fallback_type", "embedding_types",
           "layer_role", "uses_gguf"]

log = logging.getLogger("toolkit")

PRESET_BASE = {"Q2_K_S": "Q2_K", "Q3_K_S": "Q3_K", "Q3_K_M": "Q3_K", "Q3_K_L": "Q3_K",
               "Q4_K_S": "Q4_K", "Q4_K_M": "Q4_K", "Q5_K_S": "Q5_K", "Q5_K_M": "Q5_K"}
assert tuple(PRESET_BASE) == GGUF_PRESETS

_ROLES = (
    ("attn_qkv", r"(qkv_proj|query_key_value|c_attn|Wqkv)$"),
    ("attn_v", r"(v_proj|value)$"),
    ("attn_output", r"(o_proj|out_proj|attn\.c_proj|dense|self_attn\.dense)$"),
    ("ffn_down", r"(down_proj|dense_4h_to_h|mlp\.c_proj|fc2|w2)$"),
)


def layer_role(name: str) -> str:
    """The tensor role llama.cpp's rules know a layer by (``attn_v``, ``ffn_down``, ...), from
    its name; ``"other"`` for the rest."""
    for role, pattern in _ROLES:
        if re.search(pattern, name):
            return role
    return "other"


def _block_index(name: str) -> int:
    m = re.search(r"\.(\d+)\.", name)
    return int(m.group(1)) if m else 0


def _more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def preset_type(preset: str, role: str, i: int, n: int, n_gqa: float = 1.0) -> str:
    """The GGUF type llama.cpp's preset ``preset`` gives a tensor of ``role`` in block ``i`` of
    ``n`` (``n_gqa``: attention heads per key/value head)."""
    base = PRESET_BASE[preset]
    if role == "attn_v":
        if preset == "Q2_K_S" and n_gqa >= 4:
            return "Q4_K"
        if preset == "Q3_K_M":
            return "Q5_K" if i < 2 else "Q4_K"
        if preset == "Q3_K_L":
            return "Q5_K"
        if preset in ("Q4_K_M", "Q5_K_M") and _more_bits(i, n):
            return "Q6_K"
        if preset == "Q4_K_S" and i < 4:
            return "Q5_K"
    elif role == "ffn_down":
        if preset == "Q2_K_S" and i < n // 8:
            return "Q4_K"
        if preset == "Q3_K_M":
            return "Q5_K" if i < n // 16 else "Q4_K"
        if preset == "Q3_K_L":
            return "Q5_K"
        if preset in ("Q4_K_M", "Q5_K_M") and _more_bits(i, n):
            return "Q6_K"
        if preset == "Q4_K_S" and i < n // 8:
            return "Q5_K"
    elif role == "attn_output":
        if preset == "Q3_K_M":
            return "Q4_K"
        if preset == "Q3_K_L":
            return "Q5_K"
    elif role == "attn_qkv":
        if preset in ("Q3_K_M", "Q3_K_L"):
            return "Q4_K"
        if preset == "Q4_K_M":
            return "Q5_K"
        if preset == "Q5_K_M":
            return "Q6_K"
    return base


def fallback_type(gtype: str, cols: int) -> str | None:
    """``gtype`` when rows of ``cols`` columns fit its blocks, else llama.cpp's fallback type
    when that fits, else None (no GGUF block type holds such rows)."""
    if cols % TYPES[gtype].block == 0:
        return gtype
    alt = FALLBACK.get(gtype)
    if alt is not None and cols % TYPES[alt].block == 0:
        return alt
    return None


def uses_gguf(config) -> bool:
    """Whether a :class:`~toolkit.config.options.CompressConfig` asks for GGUF grids anywhere."""
    return config.settings.gguf is not None or any(
        c.get("gguf") is not None for c in (config.overrides or {}).values())


def resolve_gguf(layer_settings, layers, n_blocks: int, n_gqa: float = 1.0):
    """Wrap a settings function so that every layer's ``gguf`` is one storable type.

    ``layers``: the layers to be compressed (objects with ``name`` and ``get_weight()``, as
    :func:`toolkit.model.experts.find_layers` returns them). Presets become a type per layer
    (:func:`preset_type`); a type whose blocks do not divide the layer's columns becomes
    llama.cpp's fallback. Raises ``ValueError`` naming a layer no GGUF block type can hold.
    Returns ``(settings function, notes)``: ``notes`` counts the layers per type and the
    fallbacks, for the report's summary."""
    chosen: dict[str, str] = {}
    fallbacks = []
    nbits = nparams = 0
    for ref in layers:
        s = layer_settings(ref.name)
        if s is None or s.gguf is None:
            continue
        cols = ref.get_weight().shape[1]
        want = s.gguf
        if want in PRESET_BASE:
            want = preset_type(want, layer_role(ref.name), _block_index(ref.name), n_blocks,
                               n_gqa)
        got = fallback_type(want, cols)
        if got is None:
            raise ValueError(f"{ref.name}: {cols} columns fit no GGUF block type ({want} needs "
                             f"a multiple of {TYPES[want].block}); leave the layer out with "
                             "ignore=...")
        if got != want:
            fallbacks.append(f"{ref.name} {want}->{got}")
        chosen[ref.name] = got
        n = ref.get_weight().numel()
        nparams += n
        nbits += n * TYPES[got].bits_per_weight
    if fallbacks:
        log.info("GGUF fallback (columns not a multiple of 256) for %d layers, e.g. %s",
                 len(fallbacks), fallbacks[0])

    def settings(name):
        s = layer_settings(name)
        if s is None or s.gguf is None or name not in chosen:
            return s
        return replace(s, gguf=chosen[name])

    counts = Counter(chosen.values())
    notes = {}
    if chosen:
        notes["GGUF types (layers)"] = ", ".join(f"{t} {n}" for t, n in counts.most_common())
        notes["GGUF bits/weight (layers)"] = nbits / nparams
    if fallbacks:
        notes["GGUF fallbacks"] = f"{len(fallbacks)} layers (columns not a multiple of 256)"
    return settings, notes


def embedding_types(gguf: str, tied: bool, embed_cols: int, out_cols: int | None):
    """``(token embedding type, output head type)`` for a run with ``gguf`` (a type or a preset):
    see the module docstring; the output type is None when tied. Each is None where no GGUF block
    type holds the rows (then left as it is)."""
    if gguf in PRESET_BASE:
        head = fallback_type("Q6_K", out_cols if not tied else embed_cols)
        if head is None:
            head = fallback_type("Q8_0", out_cols if not tied else embed_cols)
        embed = head if tied else fallback_type(PRESET_BASE[gguf], embed_cols)
        return embed, (None if tied else head)
    if gguf not in GGUF_TYPES:
        raise ValueError(f"not a GGUF type or preset: {gguf!r}")
    embed = fallback_type(gguf, embed_cols)
    return embed, (None if tied else fallback_type(gguf, out_cols))
