"""tradeoff(), plot_tradeoff(), the bitsandbytes baselines and the CLI grid, on tiny models."""

from __future__ import annotations

import copy
import math

import pandas as pd
import pytest
import torch
from conftest import random_ids, tiny_model

from toolkit import compress
from toolkit.harness import COLUMNS, plot_tradeoff, to_markdown, tradeoff
from toolkit.solver.quant import group_bounds


def needs_bnb(test):
    """bitsandbytes is a test dependency: a test that needs it fails (not skips) without it."""
    return test


def _linears(model):
    return [m for m in model.modules() if hasattr(m, "compression")]


# ---- each baseline produces what it claims --------------------------------------------------


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_pruning_baselines_hit_their_sparsity(method):
    model = tiny_model("llama")
    compress(model, method=method, sparsity=0.5, calibration=random_ids(4, 32), nsamples=4,
             seqlen=32, verbose=False)
    for m in _linears(model):
        assert float((m.weight == 0).float().mean()) == pytest.approx(0.5, abs=1 / 64)


def test_nm_pattern_is_exact():
    model = tiny_model("llama")
    compress(model, pattern="2:4", calibration=random_ids(4, 32), nsamples=4, seqlen=32,
             verbose=False)
    for m in _linears(model):
        nz = (m.weight.reshape(m.weight.shape[0], -1, 4) != 0).sum(-1)
        assert int(nz.max()) <= 2


@pytest.mark.parametrize("quant", ["rtn", "gptq"])
def test_quantizers_land_on_their_grid(quant):
    model = tiny_model("llama")
    compress(model, quant=quant, bits=3, group_size=48, calibration=random_ids(4, 32),
             nsamples=4, seqlen=32, verbose=False)
    for m in _linears(model):
        c, w = m.compression, m.weight.detach().float()
        for g, (a, b) in enumerate(group_bounds(w.shape[1], 48)):
            s, z = c.scale[:, g:g + 1], c.zero[:, g:g + 1]
            q = w[:, a:b] / s + z
            assert torch.allclose(q, q.round(), atol=1e-3)  # on the grid
            assert float(q.round().min()) >= 0 and float(q.round().max()) <= 7  # 3 bits


@needs_bnb
@pytest.mark.parametrize("quant_type,double_quant", [("nf4", False), ("fp4", True),
                                                     ("int8", False)])
def test_bnb_modules_are_what_they_claim(quant_type, double_quant):
    import bitsandbytes as bnb

    from toolkit.checkpoint.size import model_bytes
    from toolkit.measure.bnb import bnb_quantize
    from toolkit.model.layers import find_blocks

    model = tiny_model("llama")
    ids = random_ids(1, 16)
    ref = model(ids).logits.detach()
    info = bnb_quantize(model, quant_type=quant_type, double_quant=double_quant)
    _, blocks = find_blocks(model)
    layers = [m for m in blocks.modules() if isinstance(m, (bnb.nn.Linear4bit,
                                                           bnb.nn.Linear8bitLt))]
    assert info["layers"] == len(layers) == 14
    assert not any(type(m) is torch.nn.Linear for m in blocks.modules())
    assert type(model.lm_head) is torch.nn.Linear  # outside the blocks: untouched
    n = sum(math.prod(m.weight.quant_state.shape) if quant_type != "int8" else
            m.weight.numel() for m in layers)
    size = model_bytes(model)
    assert size["compressed_params"] == n
    for m in layers:
        if quant_type == "int8":
            assert m.weight.dtype == torch.int8 and m.state.threshold == 6.0
        else:
            qs = m.weight.quant_state
            assert m.weight.dtype == torch.uint8 and qs.quant_type == quant_type
            assert qs.blocksize == 64 and qs.nested == double_quant
    if quant_type == "int8":  # int8 + float32 scale per row + 1 byte format tag
        rows = sum(m.weight.shape[0] for m in layers)
        assert size["compressed_bytes"] == n + 4 * rows + len(layers)
    else:  # two codes per byte; absmax per 64 weights (uint8 with double quant, else float32)
        assert size["terms"]["packed_4bit"] == n / 2
        assert size["terms"]["absmax"] == n / 64 * (1 if double_quant else 4)
        assert 4 < size["bits_per_weight"] < 5 + (2 if double_quant else 0)  # tiny layers
    out = model(ids).logits.detach()
    assert torch.isfinite(out).all()
    assert float((out - ref).pow(2).mean() / ref.pow(2).mean()) < 0.1


def test_bnb_config_validation():
    from toolkit.measure.bnb import BnbConfig

    with pytest.raises(ValueError, match="quant_type"):
        BnbConfig("int4")
    with pytest.raises(ValueError, match="double_quant"):
        BnbConfig("int8", double_quant=True)


# ---- tradeoff() --------------------------------------------------------------------------------

CONFIGS = [dict(method="magnitude", sparsity=0.5), dict(pattern="2:4"),
           dict(bits=4, quant="rtn", group_size=32), dict(bits=3, group_size=32),
           dict(sparsity=0.5, bits=4, group_size=32)]
BNB = [dict(bnb="nf4"), dict(bnb="int8")]


@pytest.fixture(scope="module")
def table():
    base = tiny_model("llama")
    configs = CONFIGS + BNB
    return tradeoff(lambda: copy.deepcopy(base), None, configs,
                    random_ids(1, 256, seed=3).reshape(-1), eval_seqlen=32, eval_windows=4,
                    calibration=random_ids(4, 32, seed=1), nsamples=4, seqlen=32)


def test_tradeoff_rows_and_columns(table):
    assert list(table.columns) == COLUMNS
    n = 1 + len(CONFIGS) + len(BNB)
    assert len(table) == n
    assert table["method"].tolist()[:6] == [
        "dense", "magnitude 50%", "SparseGPT 2:4", "RTN 4-bit g32", "GPTQ 3-bit g32",
        "SparseGPT 50% + GPTQ 4-bit g32"]
    assert table["perplexity"].map(math.isfinite).all()
    dense = table.iloc[0]
    assert dense["bits"] == 16 and dense["bits_per_weight"] == 16 and dense["sparsity"] == 0
    by = table.set_index("method")
    assert by.loc["SparseGPT 2:4", "sparsity"] == 0.5
    assert by.loc["GPTQ 3-bit g32", "bytes"] < by.loc["RTN 4-bit g32", "bytes"] < dense["bytes"]
    joint = by.loc["SparseGPT 50% + GPTQ 4-bit g32"]
    # the standard layout stores every code: the bytes of 4-bit; compact: kept codes + bitmask
    assert joint["bytes"] == by.loc["RTN 4-bit g32", "bytes"]
    assert joint["packed_bits_per_weight"] < joint["compact_bits_per_weight"] < \
        joint["bits_per_weight"]
    assert f"every code stored; layout='compact' (kept codes + bitmask; " \
        f"toolkit.load_compressed only): {joint['compact_bits_per_weight']:.2f}" in joint["note"]
    pruned = by.loc["magnitude 50%"]  # stored dense in the standard layout
    assert pruned["bits_per_weight"] == 16 and pruned["compact_bits_per_weight"] < 10
    assert "pruned weights stored dense" in pruned["note"]
    assert by.loc["GPTQ 3-bit g32", "compact_bits_per_weight"] == \
        by.loc["GPTQ 3-bit g32", "bits_per_weight"]  # nothing pruned: the same file
    assert by.loc["NF4", "bits"] == 4 and by.loc["NF4", "group_size"] == 64
    assert by.loc["LLM.int8", "bits"] == 8 and pd.isna(by.loc["LLM.int8", "group_size"])
    md = to_markdown(table)
    assert md.count("\n") == n + 1 and "| dense |" in md


def test_tradeoff_memory_and_decode_columns(table):
    """memory_mb: the model's tensors as it runs (packed where pack applies); decode speed is
    off unless asked."""
    from toolkit.runtime.pack import resident_bytes

    by = table.set_index("method")
    dense = by.loc["dense", "memory_mb"]
    assert dense == resident_bytes(tiny_model("llama")) / 1e6
    assert by.loc["magnitude 50%", "memory_mb"] == dense  # pruned only: stays dense on the CPU
    assert by.loc["SparseGPT 2:4", "memory_mb"] == dense  # 2:4 kernels are CUDA only
    rtn = by.loc["RTN 4-bit g32", "memory_mb"]
    assert rtn < 0.5 * dense and by.loc["NF4", "memory_mb"] < 0.5 * dense
    # pack's default for pruned + quantized layers (joint="auto"): the int4 kernel with every
    # code stored (pruned weights as the zero-point code), the bytes of the 4-bit layer
    assert by.loc["SparseGPT 50% + GPTQ 4-bit g32", "memory_mb"] == rtn
    assert table["decode_tokens_per_s"].isna().all()
    md = to_markdown(table)
    assert "| memory (MB) | decode (tok/s) |" in md and f"| {rtn:.1f} | - |" in md


def test_tradeoff_decode_speed():
    base = tiny_model("llama")
    df = tradeoff(lambda: copy.deepcopy(base), None, [dict(bits=4, quant="rtn", group_size=32)],
                  random_ids(1, 128, seed=3).reshape(-1), eval_seqlen=32, eval_windows=1,
                  calibration=random_ids(4, 32, seed=1), nsamples=4, seqlen=32,
                  decode_tokens=4, decode_prompt=8)
    assert (df["decode_tokens_per_s"] > 0).all() and len(df) == 2
    assert df.attrs["decode_tokens"] == 4
    with pytest.raises(ValueError, match="decode_tokens must be None or an integer >= 2"):
        tradeoff(lambda: copy.deepcopy(base), None, [], random_ids(1, 64).reshape(-1),
                 eval_seqlen=32, decode_tokens=1)


def test_tradeoff_same_windows_same_numbers(table):
    """The dense row equals a direct perplexity() call on the same windows."""
    from toolkit import perplexity

    model = tiny_model("llama")
    ids = random_ids(1, 256, seed=3).reshape(-1)[: 4 * 32]
    assert table.iloc[0]["perplexity"] == pytest.approx(perplexity(model, None, ids, seqlen=32,
                                                                   verbose=False))


def _tradeoff_tiny(configs, **kw):
    base = tiny_model("llama")
    return tradeoff(lambda: copy.deepcopy(base), None, configs, random_ids(1, 64).reshape(-1),
                    eval_seqlen=32, eval_windows=2, calibration=random_ids(4, 32, seed=1),
                    nsamples=4, seqlen=32, **kw)


@pytest.mark.parametrize("error", [RuntimeError, ImportError, NotImplementedError, ValueError,
                                   KeyError])
def test_an_unexpected_error_in_compress_propagates(monkeypatch, error):
    """No error of compress() is turned into a "not run" row: it reaches the caller, with the
    row's label in its message (same type where the type takes a message)."""
    import sys

    tr = sys.modules["toolkit.harness"]  # the module (toolkit.tradeoff is the function)

    def fail(*a, **k):
        raise error("boom inside the solver")

    monkeypatch.setattr(tr, "compress", fail)
    rows = []
    expected = RuntimeError if error is KeyError else error  # KeyError quotes its message
    with pytest.raises(expected, match="tradeoff row 'SparseGPT 50%': .*boom inside the solver") \
            as info:
        _tradeoff_tiny([dict(sparsity=0.5)], on_row=rows.append)
    assert isinstance(info.value.__cause__, error)
    assert [r["method"] for r in rows] == ["dense"]  # the dense row ran, then the failure


@pytest.mark.parametrize("where", ["bnb_quantize", "perplexity"])
def test_an_unexpected_error_in_a_bnb_row_propagates(monkeypatch, where):
    """bitsandbytes rows are "not run" only for the reasons in NOT_RUN_BY_DESIGN: another
    RuntimeError (here out of memory, or a failure in the forward pass) propagates."""
    import sys

    tr = sys.modules["toolkit.harness"]
    real = getattr(tr, where)

    def fail(model, *a, **k):
        if where == "perplexity" and not any(type(m).__module__.startswith("bitsandbytes")
                                             for m in model.modules()):
            return real(model, *a, **k)  # the dense row
        raise RuntimeError("out of memory")

    monkeypatch.setattr(tr, where, fail)
    with pytest.raises(RuntimeError, match="tradeoff row 'NF4': out of memory"):
        _tradeoff_tiny([dict(bnb="nf4")])


def test_bnb_not_installed_is_a_not_run_row_with_its_reason(monkeypatch, tmp_path):
    """Without bitsandbytes (bnb_available() says so, as it does when the import fails), the
    bnb rows are not run: the reason of the table in ``not_run`` (and in the CSV), the error in
    ``note``, no size or perplexity, and the plot lists and marks the row."""
    import toolkit.measure.bnb
    from toolkit.harness import NOT_RUN_BY_DESIGN

    why = "bitsandbytes does not import: ModuleNotFoundError: No module named 'bitsandbytes'"
    monkeypatch.setattr(toolkit.measure.bnb, "bnb_available", lambda: (False, why))
    df = _tradeoff_tiny([dict(bits=4, quant="rtn", group_size=32), dict(bnb="nf4"),
                         dict(bnb="int8")])
    assert df["method"].tolist() == ["dense", "RTN 4-bit g32", "NF4", "LLM.int8"]
    reason = NOT_RUN_BY_DESIGN[0].reason
    assert reason == "bitsandbytes is not installed (pip install -e '.[bnb]')"
    assert df["not_run"].tolist() == ["", "", reason, reason]
    assert df["note"].iloc[2] == f"not run: ImportError: {why}"
    for col in ("bytes", "bits_per_weight", "perplexity", "memory_mb"):
        assert df[col].iloc[2:].isna().all() and df[col].iloc[:2].notna().all(), col
    csv = tmp_path / "t.csv"
    df[COLUMNS].to_csv(csv, index=False)
    back = pd.read_csv(csv, keep_default_na=False)
    assert back["not_run"].tolist() == ["", "", reason, reason]

    fig = plot_tradeoff(df)
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert f"NF4: not run ({reason})" in labels and f"LLM.int8: not run ({reason})" in labels
    marks = [ln for ln in ax.lines if ln.get_label().endswith(f"not run ({reason})")]
    assert len(marks) == 2 and all(ln.get_marker() == "x" for ln in marks)
    assert len(ax.collections) == 1  # RTN only: a row without perplexity has no point
    assert len(ax.get_legend().legend_handles) == len(labels)


def test_bnb_refused_on_the_device_is_a_not_run_row(monkeypatch):
    """bitsandbytes refusing to quantize a format on the device (toolkit.measure.bnb turns that into
    "bitsandbytes <format> cannot run on <device>: ...") is the second by-design entry."""
    import bitsandbytes as bnb

    from toolkit.harness import NOT_RUN_BY_DESIGN

    def refuse(self, *a, **k):
        raise RuntimeError("no 4-bit kernel for this device")

    monkeypatch.setattr(bnb.nn.Linear4bit, "to", refuse)
    df = _tradeoff_tiny([dict(bnb="fp4", label="FP4")])
    assert df["method"].tolist() == ["dense", "FP4"]
    assert df["not_run"].tolist() == ["", NOT_RUN_BY_DESIGN[1].reason]
    assert df["note"].iloc[1] == ("not run: RuntimeError: bitsandbytes fp4 cannot run on cpu: "
                                  "RuntimeError: no 4-bit kernel for this device")
    assert math.isnan(df["perplexity"].iloc[1])


def test_plot_marks_a_not_run_row_of_known_size_on_the_top_edge():
    """A not-run row whose size is known gets an x at that size on the top edge of the axes
    (axes coordinates in y, drawn outside the clip box); the others stay as they were."""
    df = pd.DataFrame({"method": ["dense", "a", "b"], "bits_per_weight": [16.0, 4.0, 4.5],
                       "perplexity": [10.0, 12.0, math.nan], "not_run": ["", "", "why not"]})
    ax = plot_tradeoff(df).axes[0]
    (mark,) = [ln for ln in ax.lines if ln.get_label() == "b: not run (why not)"]
    assert list(mark.get_xdata()) == [4.5] and list(mark.get_ydata()) == [1.0]
    assert mark.get_transform() == ax.get_xaxis_transform() and not mark.get_clip_on()
    assert mark.get_marker() == "x" and len(ax.collections) == 1
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["dense (16 bits): 10.00", "a: 12.00", "b: not run (why not)",
                      "Pareto front"]


def test_bad_config():
    with pytest.raises(ValueError):
        tradeoff(lambda: tiny_model("llama"), None, ["nf4"], random_ids(1, 64).reshape(-1),
                 eval_seqlen=32)


# ---- plot_tradeoff() -----------------------------------------------------------------------------


def test_plot_writes_png_with_expected_series(table, tmp_path):
    path = tmp_path / "t.png"
    fig = plot_tradeoff(table, path)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    from toolkit.harness import _pareto

    front = len(_pareto(table.assign(_x=table["bits_per_weight"]))) > 1
    assert labels[0].startswith("dense")
    assert (labels[-1] == "Pareto front") == front
    methods = [m for m in table["method"] if m != "dense"]
    assert [lbl.rsplit(":", 1)[0] for lbl in labels[1:len(labels) - front]] == methods
    assert len(ax.collections) == len(methods)  # one marker per method
    assert len(ax.lines) == 1 + front  # dense reference (+ Pareto front)
    assert ax.get_xlabel().startswith("bits per weight") and "perplexity" in ax.get_ylabel()


def test_plot_log_scale_when_perplexities_spread():
    df = pd.DataFrame({"method": ["dense", "a", "b"], "bits_per_weight": [16, 4, 3],
                       "perplexity": [10.0, 12.0, 900.0]})
    assert plot_tradeoff(df).axes[0].get_yscale() == "log"
    df.loc[2, "perplexity"] = 13.0
    assert plot_tradeoff(df).axes[0].get_yscale() == "linear"


def test_plot_curves_are_solid_lines_in_size_order_outside_the_front():
    """``curves``: each series one solid line through its known points in increasing size,
    labelled in the legend after the Pareto front, each point annotated from a ``label``
    column; the front stays the table's own, and a curve's perplexities decide the log
    scale."""
    df = pd.DataFrame({"method": ["dense", "a", "b"], "bits_per_weight": [16.0, 4.0, 3.0],
                       "perplexity": [10.0, 12.0, 20.0]})
    budget = pd.DataFrame({"bits_per_weight": [4.2, 3.2, 2.6, math.nan],
                           "perplexity": [11.0, 15.0, math.nan, 13.0],
                           "label": ["4.2", "3.2", "2.6", "?"]})
    other = pd.DataFrame({"bits_per_weight": [3.0], "perplexity": [14.0]})
    ax = plot_tradeoff(df, curves={"budget": budget, "other": other}).axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["dense (16 bits): 10.00", "a: 12.00", "b: 20.00", "Pareto front",
                      "budget", "other"]
    (line,) = [ln for ln in ax.lines if ln.get_label() == "budget"]
    assert list(line.get_xdata()) == [3.2, 4.2] and list(line.get_ydata()) == [15.0, 11.0]
    assert line.get_linestyle() == "-" and line.get_marker() == "o"
    (front,) = [ln for ln in ax.lines if ln.get_label() == "Pareto front"]
    assert list(front.get_xdata()) == [3.0, 4.0, 16.0]  # the table's rows only
    assert [(t.get_text(), t.xy) for t in ax.texts] == [("3.2", (3.2, 15.0)), ("4.2", (4.2, 11.0))]
    assert ax.get_yscale() == "linear"
    budget.loc[0, "perplexity"] = 500.0  # spread by the curve alone: log scale
    assert plot_tradeoff(df, curves={"budget": budget}).axes[0].get_yscale() == "log"
    with pytest.raises(ValueError, match=r"curves\['other'\] needs .*missing 'perplexity'"):
        plot_tradeoff(df, curves={"other": other.drop(columns="perplexity")})
    sized = plot_tradeoff(df.assign(bytes=[2e6, 1e6, 0.8e6]), x="bytes",
                          curves={"budget": budget.assign(bytes=[1.1e6, 0.9e6, 0.7e6, 1e6])})
    (line,) = [ln for ln in sized.axes[0].lines if ln.get_label() == "budget"]
    assert list(line.get_xdata()) == [0.9, 1.0, 1.1]  # MB, like the table's rows


# ---- CLI grid ----------------------------------------------------------------------------------


def test_cli_grid():
    from toolkit.cli import build_parser, parse_grid

    grid = parse_grid(["sparsity=0,0.5,0.6", "bits=16,4,3"])
    assert len(grid) == 9 and grid[0] == {"sparsity": 0.0, "bits": 16}
    assert parse_grid(["pattern=none,2:4", "sparsity=0,0.5"]) == [
        {"pattern": None, "sparsity": 0.0}, {"pattern": None, "sparsity": 0.5},
        {"pattern": "2:4", "sparsity": 0.0}]
    with pytest.raises(ValueError, match="KEY"):
        parse_grid(["colour=red"])
    with pytest.raises(ValueError, match="bits"):
        parse_grid(["bits=5,12"])
    args = build_parser().parse_args(
        ["tradeoff", "--grid", "sparsity=0,0.5", "bits=16,4", "--baselines", "nf4", "fp4-dq",
         "--out", "r.csv", "--plot", "r.png", "--nsamples", "4", "--seqlen", "64"])
    assert args.grid == ["sparsity=0,0.5", "bits=16,4"] and args.baselines == ["nf4", "fp4-dq"]
    assert (args.out, args.plot, args.nsamples, args.seqlen) == ("r.csv", "r.png", 4, 64)


def test_pareto_front():
    from toolkit.harness import _pareto

    df = pd.DataFrame({"method": list("abcd"), "_x": [16, 4, 3, 5],
                       "perplexity": [10.0, 11.0, 12.0, 13.0]})
    assert _pareto(df)["method"].tolist() == ["c", "b", "a"]  # d is beaten by b
