"""Validation of the solver's settings, with no import of torch: the command line checks its
flags with these before it loads anything heavy. Each raises ``ValueError`` naming the argument
and the allowed values, and returns the value in its normal form."""

from __future__ import annotations

__all__ = ["check_sparsity", "check_pattern", "check_bits", "check_group_size",
           "check_refine_iters", "check_gguf", "GGUF_TYPES", "GGUF_PRESETS"]

#: The GGUF block types the solver fits (:mod:`toolkit.solver.gguf_grids`): 32-weight blocks and
#: the 256-weight K-quant super-blocks.
GGUF_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
#: llama.cpp's mixed presets: one base type, some tensors at more bits (toolkit.plan.gguf).
GGUF_PRESETS = ("Q2_K_S", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M")


def check_sparsity(sparsity, name: str = "sparsity") -> float:
    """Validate a sparsity fraction in [0, 1)."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        raise ValueError(f"{name} must be a number in [0, 1), got {sparsity!r}")
    return float(sparsity)


def check_pattern(pattern, name: str = "pattern") -> tuple[int, int] | None:
    """Validate an n:m pattern given as ``(n, m)`` or ``"n:m"``: at least n zeros in every m."""
    if pattern is None:
        return None
    if isinstance(pattern, str):
        try:
            n, m = (int(p) for p in pattern.split(":"))
        except ValueError:
            raise ValueError(f"{name} must look like '2:4' (n:m), got {pattern!r}") from None
    else:
        try:
            n, m = pattern
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a pair (n, m) or a string 'n:m', got {pattern!r}") from None
    if not (isinstance(n, int) and isinstance(m, int)) or m < 2 or not 1 <= n < m:
        raise ValueError(f"{name} must satisfy 1 <= n < m with m >= 2 (e.g. 2:4, 4:8), got {n}:{m}")
    return n, m


def check_bits(bits, name: str = "bits") -> int | None:
    """Validate ``bits``: None (no quantization), an int in 2..8, or 16 (meaning no quantization)."""
    if bits is None or bits == 16:
        return None
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"{name} must be one of 2..8 or 16 (or None), got {bits!r}")
    return bits


def check_group_size(group_size, name: str = "group_size") -> int | None:
    """Validate ``group_size``: None or -1 (one grid per output row) or an int >= 1.

    A group size that does not divide the number of columns is allowed: the last group is
    narrower and has its own scale and zero point.
    """
    if group_size is None or group_size == -1:
        return None
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(
            f"{name} must be a positive integer, or None/-1 for one grid per output row, "
            f"got {group_size!r}"
        )
    return group_size


def check_refine_iters(iters, name: str = "refine_iters") -> int:
    """Validate the number of re-solve iterations (0 = off)."""
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"{name} must be an integer >= 0 (0 = plain SparseGPT), got {iters!r}")
    return iters


def check_gguf(value, name: str = "gguf") -> str | None:
    """Validate a GGUF type or preset name (None: no GGUF grid); case-insensitive, returned in
    GGUF's spelling (``"q4_k_m"`` -> ``"Q4_K_M"``)."""
    if value is None:
        return None
    if isinstance(value, str) and value.upper() in GGUF_TYPES + GGUF_PRESETS:
        return value.upper()
    raise ValueError(f"{name} must be a GGUF type ({', '.join(GGUF_TYPES)}) or a llama.cpp preset "
                     f"({', '.join(GGUF_PRESETS)}), or None, got {value!r}")
