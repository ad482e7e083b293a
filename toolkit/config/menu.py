"""The size planner's vocabulary: menus of per-layer options and sizes such as ``"60MB"``.

Parsing only (no model, no solver), so that :mod:`toolkit.config.options` can check the values of
``target_size``, ``budget_menu``, ``budget_layout`` and ``budget_metric`` when a configuration is
built; :mod:`toolkit.plan.budget` does the planning.

A menu option is written ``[SPARSITY+]BITS``: ``"16"`` (the layer is left as it is), ``"8g128"``
(8 bits, groups of 128 columns), ``"4g32"``, ``"4row"`` (one grid per row), ``"50%+4g128"``
(50% unstructured sparsity and 4 bits), ``"2:4+3g128"``, ``"60%"`` (pruned, not quantized).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from toolkit.solver.checks import check_bits, check_group_size, check_pattern, check_sparsity

__all__ = ["DEFAULT_MENU", "PREVIOUS_MENU", "DEFAULT_LAYOUT", "METRICS", "MenuOption",
           "parse_menu", "parse_size",
           "menu_spec"]

#: The layout budgets are counted in unless ``budget_layout`` says otherwise: the checkpoint
#: layout ``transformers`` loads (every quantized code stored; sparse-only layers dense).
DEFAULT_LAYOUT = "standard"
#: How errors of different layers are made comparable (see :func:`plan_budget`).
METRICS = ("fisher", "relative", "raw")

#: The default menu: 16-bit (left alone); 8, 6 and 5 bits in groups of 128; 4, 3 and 2 bits in
#: groups of 128 and 64; 50% sparsity with 4 or 3 bits (these two only compete in layouts where
#: sparsity saves bytes). A ladder of sizes with no large gap (the planner can only trade in
#: the steps the menu offers), chosen on SmolLM2 against the earlier menu ``16, 8g128, 4g128,
#: 4g32, 3g128, 3g32, 2g128, 50%+4g128, 50%+3g128`` (see docs/size-budget.md); every
#: grid without pruning is profiled in one sweep, so profiling stays under 3x one compress.
DEFAULT_MENU = ("16", "8g128", "6g128", "5g128", "4g128", "4g64", "3g128", "3g64", "2g128",
                "2g64", "50%+4g128", "50%+3g128")
#: The default menu before the 6/5-bit and group-64 options (kept to reproduce earlier runs).
PREVIOUS_MENU = ("16", "8g128", "4g128", "4g32", "3g128", "3g32", "2g128", "50%+4g128",
                 "50%+3g128")

_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


# ---- parsing: sizes and menus ---------------------------------------------------------------

def parse_size(value, name: str = "target_size") -> int:
    """Bytes from an integer or a string such as ``"60MB"``, ``"1.5 GiB"``, ``"123456"``
    (KB/MB/GB/TB are powers of 10, KiB/MiB/GiB/TiB powers of 2); fractions of a byte are
    dropped."""
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", value)
        unit = m.group(2).lower() if m else None
        if m is None or unit not in _SIZE_UNITS:
            raise ValueError(f"{name} must be a number of bytes or a size such as '60MB', "
                             f"'1.5GiB' (units: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), "
                             f"got {value!r}")
        value = float(m.group(1)) * _SIZE_UNITS[unit]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not math.isfinite(value) or value < 1:
        raise ValueError(f"{name} must be a positive number of bytes or a size such as '60MB', "
                         f"got {value!r}")
    return int(value)


@dataclass(frozen=True)
class MenuOption:
    """One entry of the menu: what the per-layer options ``sparsity``, ``pattern``, ``bits``
    and ``group_size`` become for a layer that takes it. ``spec`` is its short name:
    ``"16"`` (left alone), ``"4g128"`` (4 bits, groups of 128), ``"8row"`` (one grid per row),
    ``"50%+4g128"``, ``"2:4+4g128"``, ``"60%"`` (pruned, not quantized)."""

    spec: str
    sparsity: float = 0.0
    pattern: tuple[int, int] | None = None
    bits: int | None = None
    group_size: int | None = 128

    def changes(self) -> dict:
        """The option as ``overrides`` values."""
        return dict(sparsity=self.sparsity, pattern=self.pattern, bits=self.bits,
                    group_size=self.group_size)

    @property
    def prunes(self) -> bool:
        return self.sparsity > 0 or self.pattern is not None


def menu_spec(sparsity=0.0, pattern=None, bits=None, group_size=128) -> str:
    """The short name of a menu option (``"50%+4g128"``; ``"16"`` for nothing)."""
    prune = f"{pattern[0]}:{pattern[1]}" if pattern is not None else (
        f"{sparsity * 100:g}%" if sparsity else "")
    if bits is None:
        quant = "" if prune else "16"
    else:
        quant = f"{bits}g{group_size}" if group_size is not None else f"{bits}row"
    return "+".join(p for p in (prune, quant) if p)


def _menu_item(item, where: str) -> MenuOption:
    if isinstance(item, MenuOption):
        return item
    if isinstance(item, dict):
        bad = set(item) - {"sparsity", "pattern", "bits", "group_size"}
        if bad:
            raise ValueError(f"{where}: a menu option sets sparsity, pattern, bits and "
                             f"group_size only (set sym, act_order, ... for every option with "
                             f"the usual keywords, or per layer with overrides), got "
                             f"{sorted(bad)}")
        sparsity = check_sparsity(item.get("sparsity", 0.0) or 0.0, f"{where} sparsity")
        pattern = check_pattern(item.get("pattern"), f"{where} pattern")
        bits = check_bits(item.get("bits"), f"{where} bits")
        group_size = check_group_size(item.get("group_size", 128), f"{where} group_size")
    elif isinstance(item, str):
        text = item.strip().lower().replace(" ", "")
        prune_txt, _, quant_txt = text.rpartition("+")
        if not prune_txt and ("%" in quant_txt or ":" in quant_txt or "." in quant_txt):
            prune_txt, quant_txt = quant_txt, ""
        sparsity, pattern = 0.0, None
        try:
            if ":" in prune_txt:
                pattern = check_pattern(prune_txt, f"{where} pattern")
            elif prune_txt:
                v = float(prune_txt[:-1]) / 100 if prune_txt.endswith("%") else float(prune_txt)
                sparsity = check_sparsity(v, f"{where} sparsity")
            m = re.fullmatch(r"(\d+)(?:g(\d+)|(row))?", quant_txt) if quant_txt else None
            if quant_txt and m is None:
                raise ValueError("bad bits part")
            bits = check_bits(int(m.group(1)), f"{where} bits") if m else None
            group_size = None if m and m.group(3) else (int(m.group(2)) if m and m.group(2)
                                                        else 128)
            group_size = check_group_size(group_size, f"{where} group_size")
        except ValueError as e:
            if str(e) != "bad bits part" and where in str(e):
                raise
            raise ValueError(
                f"{where}: cannot read menu option {item!r}; write [SPARSITY+]BITS, e.g. '16', "
                f"'8g128', '4g32', '4row' (one grid per row), '50%+4g128', '2:4+3g128', "
                f"'60%'") from None
    else:
        raise ValueError(f"{where}: a menu option is a string such as '4g128' or "
                         f"'50%+4g128', or a dict of sparsity/pattern/bits/group_size; got "
                         f"{item!r}")
    if sparsity and pattern is not None:
        raise ValueError(f"{where}: give either a sparsity or an n:m pattern, not both")
    if bits is None:
        group_size = 128  # irrelevant without quantization; one value so duplicates merge
    return MenuOption(menu_spec(sparsity, pattern, bits, group_size), sparsity, pattern, bits,
                      group_size)


def parse_menu(menu=None, name: str = "budget_menu") -> tuple[MenuOption, ...]:
    """The menu as :class:`MenuOption` s: ``None`` (the :data:`DEFAULT_MENU`), a string of
    comma-separated specs (``"16,4g128,3g128,50%+4g128"``) or a list of specs or dicts
    (``{"sparsity": 0.5, "bits": 4, "group_size": 128}``). Duplicates are dropped."""
    if menu is None:
        menu = DEFAULT_MENU
    if isinstance(menu, str):
        menu = [m for m in menu.split(",") if m.strip()]
    if isinstance(menu, dict) or not hasattr(menu, "__iter__"):
        raise ValueError(f"{name} must be a list of options such as ['16', '4g128', "
                         f"'50%+4g128'] or a comma-separated string, got {menu!r}")
    out: dict[str, MenuOption] = {}
    for i, item in enumerate(menu):
        opt = _menu_item(item, f"{name}[{i}]")
        out.setdefault(opt.spec, opt)
    if not out:
        raise ValueError(f"{name} is empty: give at least one option")
    return tuple(out.values())
