"""Mixture-of-experts models: every expert compressed (fused 3-D parameters and per-expert
nn.Linear modules), routed-token Hessians, the all-token option, the zero-token fallback, routers
dense by default, and a clear error for any weight the sweep cannot handle (toolkit.model.experts)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import random_ids, tiny_model, tiny_moe
from torch import nn

from toolkit import compress, model_bytes
from toolkit.model.experts import (
    ExpertLinearRef,
    ExpertRef,
    ExpertsError,
    UnsupportedWeights,
    find_layers,
)
from toolkit.model.layers import find_blocks
from toolkit.solver.baselines import magnitude_mask
from toolkit.solver.layer import factorize, solve_layers
from toolkit.solver.masks import is_nm_valid
from toolkit.solver.quant import rtn_quantize

N, SEQ = 8, 32
CONFIGS = {
    "50%": dict(sparsity=0.5),
    "2:4": dict(pattern="2:4"),
    "4bit-g32": dict(bits=4, group_size=32),
    "50%+4bit-g32": dict(sparsity=0.5, bits=4, group_size=32),
}


# ---- a per-expert nn.Linear layout (transformers 4.x Mixtral, remote code) -------------------

class ExpertMLP(nn.Module):
    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.w1 = nn.Linear(hidden, inter, bias=False)
        self.w2 = nn.Linear(inter, hidden, bias=False)
        self.w3 = nn.Linear(hidden, inter, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class ListMoE(nn.Module):
    """Router ``gate`` (nn.Linear) + an nn.ModuleList of expert MLPs, top-k routing."""

    def __init__(self, hidden: int, inter: int, n: int, k: int):
        super().__init__()
        self.gate = nn.Linear(hidden, n, bias=False)
        self.experts = nn.ModuleList(ExpertMLP(hidden, inter) for _ in range(n))
        self.k = k

    def forward(self, hidden):
        shape = hidden.shape
        x = hidden.reshape(-1, shape[-1])
        probs = F.softmax(self.gate(x).float(), dim=-1)
        w, idx = torch.topk(probs, self.k, dim=-1)
        w = (w / w.sum(-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tok, pos = torch.where(idx == e)
            if tok.numel():
                out.index_add_(0, tok, expert(x[tok]) * w[tok, pos, None])
        return out.reshape(shape)


def list_moe_model(seed: int = 0, experts: int = 4):
    model = tiny_model("llama", seed=seed)
    torch.manual_seed(seed + 1)
    for layer in model.model.layers:
        layer.mlp = ListMoE(64, 48, experts, 2)
    return model.eval()


# ---- helpers --------------------------------------------------------------------------------

def _compress(model, **kw):
    return compress(model, calibration=random_ids(N, SEQ), nsamples=N, seqlen=SEQ,
                    verbose=False, **kw)


def _layers(model, routers=False):
    name, blocks = find_blocks(model)
    return [r for b, blk in enumerate(blocks)
            for r in find_layers(blk, f"{name}.{b}", routers=routers)]


def _block_weights(model) -> dict:
    """Every floating tensor of >= 2 dims inside the blocks: name -> tensor."""
    name, blocks = find_blocks(model)
    return {f"{name}.{b}.{n}": p for b, blk in enumerate(blocks)
            for n, p in blk.named_parameters() if p.ndim >= 2 and p.is_floating_point()}


def _on_grid(ref, bits) -> bool:
    comp = ref.get_record()
    w = ref.get_weight().float()
    cols = w.shape[1]
    g_idx = comp.g_idx.long() if comp.g_idx is not None else (
        torch.arange(cols) // (comp.settings.group_size or cols))
    s, z = comp.scale[:, g_idx], comp.zero[:, g_idx]
    q = (w / s + z).round()
    return bool(((q >= 0) & (q <= 2 ** bits - 1)).all()) and torch.equal(
        (s * (q - z)).to(w.dtype), w)


def _routed_inputs(model, ids, block: int = 0):
    """Independently of toolkit.model.experts: the tokens entering block ``block``'s experts module
    and the router's choice, from a forward pre-hook on the experts module."""
    experts = model.model.layers[block].mlp.experts
    seen = []

    def hook(_m, args, kwargs):
        values = list(args) + list(kwargs.values())
        seen.append((values[0].reshape(-1, values[0].shape[-1]).double(), values[1]))

    h = experts.register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad():
        for row in ids:
            model(row[None])
    h.remove()
    return seen


def _hessian(xs: list[torch.Tensor]) -> torch.Tensor:
    X = torch.cat(xs)
    return (2 / X.shape[0] * X.T @ X).float()


# ---- every expert compressed ----------------------------------------------------------------

FAMILIES = ["mixtral", "qwen3_moe", "olmoe", "qwen2_moe"]  # every setting
MORE = ["deepseek_v3", "gpt_oss"]  # shared experts + dense first block; (in, out) interleaved


@pytest.mark.parametrize("family, name", [(f, n) for f in FAMILIES for n in CONFIGS]
                         + [(f, "50%+4bit-g32") for f in MORE] + [("gpt_oss", "2:4")])
def test_every_expert_compressed(family, name):
    kw = CONFIGS[name]
    model = tiny_moe(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = _compress(model, **kw)
    layers = _layers(model)
    experts = [r for r in layers if isinstance(r, ExpertRef)]
    n_blocks_moe = 1 if family == "deepseek_v3" else 2
    parts = 3  # gate, up, down
    assert len(experts) == n_blocks_moe * 4 * parts
    assert list(report.layers["layer"]) and set(report.layers["layer"]) == {r.name for r in layers}
    rows = report.layers.set_index("layer")
    for ref in layers:
        w = ref.get_weight()
        row = rows.loc[ref.name]
        if "sparsity" in kw:  # exact per expert (quantization may add zeros, never remove)
            pruned = round(kw["sparsity"] * w.numel())
            assert row.sparsity == pruned / w.numel(), ref.name
            zeros = int((w == 0).sum())
            assert zeros >= pruned if "bits" in kw else zeros == pruned, ref.name
        if "pattern" in kw:
            assert is_nm_valid(w, 2, 4), ref.name
        if "bits" in kw:
            assert _on_grid(ref, kw["bits"]), ref.name
        if isinstance(ref, ExpertRef):
            assert row.hessian == "routed" and row.tokens >= 0
    # the tokens per expert add up to top_k per token in every MoE block
    for b in range(2 - n_blocks_moe, 2):
        rows_b = report.layers[(report.layers.block == b) & report.layers.hessian.notna()]
        sel = rows_b[rows_b.layer.str.endswith("gate_proj")]
        assert len(sel) == 4
        assert int(sel.tokens.sum()) == 2 * N * SEQ
    # report totals = the parameters present: every >= 2-D weight of the blocks but the
    # routers/gates (and GPT-OSS's expert biases)
    weights = _block_weights(model)
    routers = {k for k in weights if k.endswith(("mlp.gate.weight", "mlp.router.weight",
                                                 "shared_expert_gate.weight"))}
    biases = {k for k in weights if k.endswith("bias")}
    expected = sum(p.numel() for k, p in weights.items() if k not in routers | biases)
    assert report.summary["params compressed"] == expected
    assert model_bytes(model)["compressed_params"] == expected
    assert report.summary["routers left dense"].startswith(f"{len(routers)} tensors")
    # routers, norms, embeddings, biases: bit-identical; the rest changed
    compressed = {k for k in weights if k not in routers | biases}
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]) == (k not in compressed), k
    out = model.generate(random_ids(1, 5), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 9)


@pytest.mark.parametrize("bits", [None, 4])
def test_routed_hessians_match_an_independent_reference(bits):
    """Block 0's experts: gate/up solved on the Hessian of the tokens the router sent each
    expert, down on the outputs of the already-compressed gate/up; error below
    magnitude pruning / round-to-nearest on the same weights and Hessian."""
    model = tiny_moe("mixtral")
    dense = copy.deepcopy(model)
    ids = random_ids(N, SEQ)
    kw = dict(sparsity=0.5) if bits is None else dict(bits=bits, group_size=32)
    report = compress(model, calibration=ids, nsamples=N, seqlen=SEQ, verbose=False,
                      ignore=["self_attn"], **kw)  # block 0's experts see the dense inputs
    seen = _routed_inputs(dense, ids)
    ex, ex0 = model.model.layers[0].mlp.experts, dense.model.layers[0].mlp.experts
    inter = ex.down_proj.shape[2]
    rows = report.layers.set_index("layer")
    for e in range(4):
        xs = [x[(idx == e).any(-1)] for x, idx in seen]
        n_tokens = sum(x.shape[0] for x in xs)
        H = _hessian(xs)
        gate0, up0 = ex0.gate_up_proj.data[e, :inter], ex0.gate_up_proj.data[e, inter:]
        expect = solve_layers([gate0, up0], factorize(H), block_size=128,
                              sparsity=kw.get("sparsity", 0.0), bits=bits, group_size=32)
        torch.testing.assert_close(ex.gate_up_proj.data[e, :inter], expect[0].weight,
                                   rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ex.gate_up_proj.data[e, inter:], expect[1].weight,
                                   rtol=1e-4, atol=1e-5)
        name = f"model.layers.0.mlp.experts.{e}"
        assert rows.loc[f"{name}.gate_proj"].tokens == n_tokens
        # against the data-free baselines on the same weights and Hessian
        for w0, res, part in ((gate0, expect[0], "gate_proj"), (up0, expect[1], "up_proj")):
            if bits is None:
                base = w0 * magnitude_mask(w0, 0.5)
            else:
                base = rtn_quantize(w0, bits, 32, False, False, None)[0]
            d_base, d_ours = (w0 - base).double(), (w0 - res.weight).double()
            err_base = float(((d_base @ H.double()) * d_base).sum())
            err_ours = float(((d_ours @ H.double()) * d_ours).sum())
            assert err_ours < err_base, (name, part)
            assert rows.loc[f"{name}.{part}"].error == pytest.approx(err_ours, rel=1e-3)
        # down_proj reads the outputs of the compressed gate/up
        gate, up = ex.gate_up_proj.data[e, :inter].double(), ex.gate_up_proj.data[e, inter:]
        hs = [ex.act_fn(x @ gate.T) * (x @ up.double().T) for x in xs]
        expect = solve_layers([ex0.down_proj.data[e]], factorize(_hessian(hs)), block_size=128,
                              sparsity=kw.get("sparsity", 0.0), bits=bits, group_size=32)
        torch.testing.assert_close(ex.down_proj.data[e], expect[0].weight, rtol=1e-4, atol=1e-5)


def test_all_token_hessians_and_the_router_still_decides():
    """expert_hessian='all': every token feeds every expert's Hessian; the block's output (the
    next block's input) still follows the router."""
    model = tiny_moe("mixtral")
    dense = copy.deepcopy(model)
    ids = random_ids(N, SEQ)
    # only block 1's experts: their inputs are block 0's routed outputs (nothing else changes)
    report = compress(model, calibration=ids, nsamples=N, seqlen=SEQ, verbose=False,
                      sparsity=0.5, expert_hessian="all", ignore=["self_attn", r"layers\.0\."])
    seen = _routed_inputs(dense, ids, block=1)
    H = _hessian([x for x, _ in seen])  # every token
    ex, ex0 = model.model.layers[1].mlp.experts, dense.model.layers[1].mlp.experts
    inter = ex.down_proj.shape[2]
    rows = report.layers.set_index("layer")
    for e in range(4):
        expect = solve_layers([ex0.gate_up_proj.data[e, :inter], ex0.gate_up_proj.data[e, inter:]],
                              factorize(H), sparsity=0.5)
        torch.testing.assert_close(ex.gate_up_proj.data[e, :inter], expect[0].weight,
                                   rtol=1e-4, atol=1e-5)
        row = rows.loc[f"model.layers.1.mlp.experts.{e}.gate_proj"]
        assert row.hessian == "all tokens"
        assert row.tokens == sum(int((idx == e).any(-1).sum()) for _, idx in seen)  # routed
    assert report.summary["method"].endswith("all-token expert Hessians")


def _never_route_to(model, expert: int):
    """Make every router of ``model`` skip ``expert`` (a model whose expert gets no token)."""
    for layer in model.model.layers:
        router = layer.mlp.gate

        def hook(_m, _args, out):
            logits = out[0].clone()
            logits[:, expert] = float("-inf")
            probs = F.softmax(logits.float(), dim=-1)
            top, idx = torch.topk(probs, 2, dim=-1)
            return out[0], top / top.sum(-1, keepdim=True), idx

        router.register_forward_hook(hook)


def test_expert_without_tokens_gets_the_all_token_hessian():
    model = tiny_moe("mixtral")
    _never_route_to(model, 3)
    dense = copy.deepcopy(model)
    ids = random_ids(N, SEQ)
    report = compress(model, calibration=ids, nsamples=N, seqlen=SEQ, verbose=False,
                      sparsity=0.5, ignore=["self_attn"])
    rows = report.layers.set_index("layer")
    for b in range(2):
        for part in ("gate_proj", "up_proj", "down_proj"):
            row = rows.loc[f"model.layers.{b}.mlp.experts.3.{part}"]
            assert row.tokens == 0 and row.hessian == "all tokens (no routed token)"
            assert row.sparsity == 0.5 and 0 < row.rel_error < 1  # no NaN, a real error
        other = rows.loc[f"model.layers.{b}.mlp.experts.0.gate_proj"]
        assert other.tokens > 0 and other.hessian == "routed"
    seen = _routed_inputs(dense, ids)
    assert all(not (idx == 3).any() for _, idx in seen)
    ex, ex0 = model.model.layers[0].mlp.experts, dense.model.layers[0].mlp.experts
    inter = ex.down_proj.shape[2]
    expect = solve_layers([ex0.gate_up_proj.data[3, :inter]], factorize(_hessian(
        [x for x, _ in seen])), sparsity=0.5)
    torch.testing.assert_close(ex.gate_up_proj.data[3, :inter], expect[0].weight,
                               rtol=1e-4, atol=1e-5)


def test_overrides_and_ignore_by_expert_name():
    model = tiny_moe("qwen3_moe")
    before = copy.deepcopy(model)
    report = _compress(model, bits=4, group_size=32, ignore=[r"experts\.2\."],
                       overrides={r"experts\.3\.": {"bits": 8, "act_order": True}})
    rows = report.layers.set_index("layer")
    for b in range(2):
        ex, ex0 = model.model.layers[b].mlp.experts, before.model.layers[b].mlp.experts
        assert torch.equal(ex.gate_up_proj[2], ex0.gate_up_proj[2])
        assert torch.equal(ex.down_proj[2], ex0.down_proj[2])
        assert f"model.layers.{b}.mlp.experts.2.up_proj" not in rows.index
        assert rows.loc[f"model.layers.{b}.mlp.experts.3.down_proj"].bits == 8
        assert rows.loc[f"model.layers.{b}.mlp.experts.1.down_proj"].bits == 4
        assert ex.expert_compression["3.gate_proj"].settings.act_order
        assert "2.gate_proj" not in ex.expert_compression
    for ref in _layers(model):
        if isinstance(ref, ExpertRef) and ref.expert != 2:
            assert _on_grid(ref, 8 if ref.expert == 3 else 4), ref.name
    # size accounting: expert 2 dense, every other slice a compressed layer
    size = model_bytes(model)
    assert size["compressed_params"] == report.summary["params compressed"]
    assert size["total_params"] == sum(p.numel() for p in model.parameters())
    ex = model.model.layers[0].mlp.experts
    dense_expert2 = 2 * (ex.gate_up_proj[2].numel() + ex.down_proj[2].numel()) * 2  # 2 blocks
    assert size["dense_bytes"] >= dense_expert2


def test_joint_refine_and_act_order_static_groups_on_experts():
    model = tiny_moe("olmoe")
    report = _compress(model, sparsity=0.5, bits=4, group_size=16, act_order=True,
                       static_groups=True, refine_iters=5)
    for ref in _layers(model):
        w = ref.get_weight()
        assert int((w == 0).sum()) >= w.numel() // 2
        assert _on_grid(ref, 4), ref.name
    assert (report.layers.rel_error < 1).all()


def test_routers_dense_by_default_and_compressed_on_request():
    model = tiny_moe("qwen2_moe")
    gates = {n: p.clone() for n, p in model.named_parameters()
             if n.endswith(("mlp.gate.weight", "shared_expert_gate.weight"))}
    assert len(gates) == 4
    _compress(model, sparsity=0.5)
    for n, p in model.named_parameters():
        if n in gates:
            assert torch.equal(p, gates[n]), n
    model = tiny_moe("qwen2_moe")
    report = _compress(model, sparsity=0.5, routers=True)
    names = set(report.layers.layer)
    for n in gates:
        assert n[:-len(".weight")] in names
    assert "routers left dense" not in report.summary
    assert report.summary["method"].endswith("routers compressed")
    router = model.model.layers[0].mlp.gate.weight
    assert int((router == 0).sum()) == router.numel() // 2


# ---- per-expert nn.Linear modules -------------------------------------------------------------

def test_per_expert_linear_modules():
    model = list_moe_model()
    dense = copy.deepcopy(model)
    ids = random_ids(N, SEQ)
    report = compress(model, calibration=ids, nsamples=N, seqlen=SEQ, verbose=False,
                      sparsity=0.5, ignore=["self_attn"])
    layers = _layers(model)
    experts = [r for r in layers if isinstance(r, ExpertLinearRef)]
    assert len(experts) == 2 * 4 * 3
    assert set(report.layers.layer) == {r.name for r in layers if "self_attn" not in r.name}
    rows = report.layers.set_index("layer")
    for ref in experts:
        assert int((ref.get_weight() == 0).sum()) == ref.get_weight().numel() // 2
        assert rows.loc[ref.name].hessian == "routed"
    assert torch.equal(model.model.layers[0].mlp.gate.weight, dense.model.layers[0].mlp.gate.weight)
    # block 0, expert e: w1/w3 solved together on the routed tokens
    moe0, moe = dense.model.layers[0].mlp, model.model.layers[0].mlp
    xs, picks = [], []
    h = moe0.register_forward_pre_hook(lambda _m, a: xs.append(a[0].reshape(-1, 64).double()))
    with torch.no_grad():
        for row in ids:
            dense(row[None])
    h.remove()
    for x in xs:
        picks.append(torch.topk(F.softmax(moe0.gate(x.float()), -1), 2, -1).indices)
    for e in range(4):
        routed = [x[(idx == e).any(-1)] for x, idx in zip(xs, picks)]
        expect = solve_layers([moe0.experts[e].w1.weight.data, moe0.experts[e].w3.weight.data],
                              factorize(_hessian(routed)), sparsity=0.5)
        torch.testing.assert_close(moe.experts[e].w1.weight.data, expect[0].weight,
                                   rtol=1e-4, atol=1e-5)
        assert rows.loc[f"model.layers.0.mlp.experts.{e}.w1"].tokens == sum(
            r.shape[0] for r in routed)


def test_per_expert_linear_modules_all_tokens_and_unused_expert():
    model = list_moe_model()
    for layer in model.model.layers:  # expert 3 never chosen
        layer.mlp.gate.weight.data[3] = 0
        layer.mlp.gate.register_forward_hook(
            lambda _m, _a, out: out.index_fill(-1, torch.tensor([3]), float("-inf")))
    report = _compress(model, sparsity=0.5)
    rows = report.layers.set_index("layer")
    row = rows.loc["model.layers.1.mlp.experts.3.w2"]
    assert row.tokens == 0 and row.hessian == "all tokens (no routed token)"
    assert row.sparsity == 0.5
    model = list_moe_model()
    report = _compress(model, sparsity=0.5, expert_hessian="all")
    experts = report.layers.dropna(subset=["hessian"])
    assert set(experts.hessian) == {"all tokens"}
    for b in range(2):  # each expert's own routed count, top-2 of every token in all
        w1 = experts[(experts.block == b) & experts.layer.str.endswith(".w1")]
        assert len(w1) == 4 and int(w1.tokens.sum()) == 2 * N * SEQ
        assert w1.tokens.nunique() > 1


# ---- nothing left dense silently --------------------------------------------------------------

class FusedW13(nn.Module):
    """Experts stored under names the adapter table does not know (w13, w2)."""

    def __init__(self, n, hidden, inter):
        super().__init__()
        self.w13 = nn.Parameter(torch.randn(n, 2 * inter, hidden) * 0.05)
        self.w2 = nn.Parameter(torch.randn(n, hidden, inter) * 0.05)

    def forward(self, x, idx, weights):
        out = torch.zeros_like(x)
        for e in range(self.w13.shape[0]):
            tok, pos = torch.where(idx == e)
            g, u = F.linear(x[tok], self.w13[e]).chunk(2, -1)
            out.index_add_(0, tok, F.linear(F.silu(g) * u, self.w2[e]) * weights[tok, pos, None])
        return out


def test_unknown_fused_projection_raises_or_is_ignored_with_a_report_line():
    model = tiny_moe("mixtral")
    model.model.layers[1].mlp.experts = FusedW13(4, 64, 96)
    before = copy.deepcopy(model)
    with pytest.raises(UnsupportedWeights, match=r"model\.layers\.1\.mlp\.experts\.w13 "
                                                 r"\(4, 192, 64\).*experts\.w2 "):
        _compress(model, sparsity=0.5)
    for (k, v), v0 in zip(model.state_dict().items(), before.state_dict().values()):
        assert torch.equal(v, v0), k  # nothing changed
    report = _compress(model, sparsity=0.5, ignore=[r"layers\.1\.mlp\.experts\."])
    assert "model.layers.1.mlp.experts.w13 (4, 192, 64)" in report.summary["left dense by ignore"]


class MyProj(nn.Module):
    """A projection that is not an nn.Linear."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d, d) * 0.05)

    def forward(self, x):
        return F.linear(x, self.weight)


def test_non_linear_projection_in_a_dense_model_raises():
    model = tiny_model("llama")
    model.model.layers[0].self_attn.o_proj = MyProj(64)
    with pytest.raises(UnsupportedWeights, match=r"model\.layers\.0\.self_attn\.o_proj\.weight "
                                                 r"\(64, 64\) in MyProj"):
        _compress(model, sparsity=0.5)


class EinsumExperts(nn.Module):
    """Known parameter names, but a forward without per-expert products (like Llama 4's bmm)."""

    def __init__(self, n, hidden, inter):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(n, 2 * inter, hidden) * 0.05)
        self.down_proj = nn.Parameter(torch.randn(n, hidden, inter) * 0.05)

    def forward(self, x, idx, weights):
        dense = torch.zeros(x.shape[0], self.gate_up_proj.shape[0], dtype=x.dtype)
        dense.scatter_(1, idx, weights.to(x.dtype))
        g, u = torch.einsum("th,eoh->teo", x, self.gate_up_proj).chunk(2, -1)
        y = torch.einsum("tei,ehi->teh", F.silu(g) * u, self.down_proj)
        return (y * dense[..., None]).sum(1)


def test_experts_whose_forward_cannot_be_followed_raise():
    model = tiny_moe("mixtral")
    model.model.layers[0].mlp.experts = EinsumExperts(4, 64, 96)
    with pytest.raises(ExpertsError, match=r"model\.layers\.0\.mlp\.experts \(EinsumExperts\) "
                                           "ran without one recognisable per-expert"):
        _compress(model, sparsity=0.5)
    report = _compress(model, sparsity=0.5, method="magnitude")  # no calibration: fine
    assert (report.layers.sparsity == 0.5).all()


def test_owl_allocation_refused_on_experts():
    with pytest.raises(ValueError, match="allocation='owl' does not cover mixture-of-experts"):
        _compress(tiny_moe("mixtral"), sparsity=0.5, allocation="owl")


def test_phases_cut_to_the_hessian_budget_give_the_same_model(monkeypatch):
    """With room for one expert's Hessian at a time each expert takes its own pass: the same
    weights, bit for bit (the groups of a phase are independent)."""
    a, b = tiny_moe("olmoe"), tiny_moe("olmoe")
    _compress(a, sparsity=0.5, bits=4, group_size=32)
    monkeypatch.setenv("TOOLKIT_MOE_HESSIAN_BYTES", "1")
    _compress(b, sparsity=0.5, bits=4, group_size=32)
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(v, w), k


# ---- checkpoints ------------------------------------------------------------------------------

#: (family, compress keywords, what the standard layout stores the experts as, transformers'
#: plain and dequantizing loads of the standard file)
EXPORTS = {
    "mixtral 4-bit sym": ("mixtral", dict(bits=4, group_size=32, sym=True), "names",
                          ("loads", "loads")),
    "qwen3_moe 50%+4-bit asym": ("qwen3_moe", dict(sparsity=0.5, bits=4, group_size=32),
                                 "names", ("error", "error")),
    "olmoe 2:4": ("olmoe", dict(pattern="2:4"), "whole", ("loads", "error")),
    "qwen2_moe 50%+4-bit sym": ("qwen2_moe", dict(sparsity=0.5, bits=4, group_size=32,
                                                  sym=True), "names", ("loads", "loads")),
    "gpt_oss 4-bit sym": ("gpt_oss", dict(bits=4, group_size=32, sym=True), "toolkit",
                          ("error", "error")),
    "mixtral 4-bit sym, expert 2 ignored": ("mixtral", dict(bits=4, group_size=32, sym=True,
                                                            ignore=[r"experts\.2\."]),
                                            "toolkit", ("error", "error")),
}


def _data_bytes(folder) -> tuple[dict, int]:
    """The safetensors header (name -> info) and the bytes of its data section."""
    import json

    raw = (folder / "model.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = {k: v for k, v in json.loads(raw[8:8 + n]).items() if k != "__metadata__"}
    return header, len(raw) - 8 - n


def _transformers_load(folder, dequantize: bool):
    import warnings

    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    kw = dict(quantization_config=CompressedTensorsConfig(dequantize=True)) if dequantize else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(folder, **kw).eval()


@pytest.mark.parametrize("label", list(EXPORTS))
def test_checkpoint_round_trip_sizes_readers_and_info(label, tmp_path):
    """save_compressed / load_compressed with compressed fused experts, both layouts: equal
    logits bit for bit, the compression records back, the bytes of the file's data section
    exactly model_bytes, transformers' real loads as predicted (never wrong weights), and
    ``toolkit info`` listing every expert layer with its format and bytes."""
    from toolkit import load_compressed, save_compressed
    from toolkit.checkpoint.formats import EXPERTS_DENSE_FORMAT, EXPERTS_FORMAT
    from toolkit.checkpoint.saveload import checkpoint_readers, describe_checkpoint
    from toolkit.model.experts import RECORDS, checkpoint_names, fused_layers

    family, kw, stored, expect_tf = EXPORTS[label]
    model = tiny_moe(family)
    _compress(model, **kw)
    ids = random_ids(2, 16, seed=5)
    with torch.no_grad():
        ref = model(ids).logits
    moe = [(n, m) for n, m in model.named_modules() if getattr(m, RECORDS, None)]
    assert moe
    for layout in ("standard", "compact"):
        out = save_compressed(model, tmp_path / layout, layout=layout)  # float32: exact
        header, data = _data_bytes(out)
        assert data == model_bytes(model, dense_bits=32, layout=layout)["bytes"], layout
        loaded = load_compressed(out)
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, ref), layout
        for (_n, m), m2 in zip(moe, [loaded.get_submodule(n) for n, _ in moe]):
            recs, recs2 = getattr(m, RECORDS), getattr(m2, RECORDS)
            assert recs2.keys() == recs.keys()
            for k, rec in recs.items():
                assert recs2[k].settings == rec.settings, k
                if rec.scale is not None:
                    assert torch.equal(recs2[k].scale, rec.scale.float()), k
        assert model_bytes(loaded, dense_bits=32, layout=layout)["bytes"] == data
        # where the experts went
        n0, m0 = moe[0]
        fused_in_file = any(f"{n0}.{r.param}" in header for r in fused_layers(m0, n0))
        refs = fused_layers(m0, n0)
        if stored == "names" or (stored == "whole" and layout == "compact"):
            names = checkpoint_names(model, n0, m0) if stored == "names" else \
                {r.key: r.name for r in refs}
            assert not fused_in_file
            for r in refs:
                assert any(k.startswith(names[r.key] + ".") for k in header), r.name
        elif stored == "whole":
            assert f"{n0}.gate_up_proj" in header and f"{n0}.down_proj" in header
        else:
            assert not fused_in_file
            assert all(f"{r.name}.weight_packed" in header or f"{r.name}.weight" in header
                       for r in refs)
        # the readers: predicted = real, and never wrong weights
        readers = checkpoint_readers(out)
        assert readers["load_compressed"].status == "loads"
        for dequantize, key in ((False, "transformers"), (True, "dequantize")):
            try:
                with torch.no_grad():
                    got = "loads" if torch.equal(
                        _transformers_load(out, dequantize)(ids).logits, ref) else "wrong"
            except Exception:  # noqa: BLE001 - any refusal
                got = "error"
            assert got == readers[key].status, (layout, key, readers[key])
            if layout == "standard":
                assert got == expect_tf[dequantize], (key, got)
        if stored == "toolkit":  # the toolkit's own format names: every other reader refuses
            cfg = (out / "config.json").read_text()
            assert EXPERTS_FORMAT in cfg
            assert readers["vllm"].status == "error"
            assert (EXPERTS_DENSE_FORMAT in describe_checkpoint(out)) == ("ignored" in label)
        # toolkit info: one row per expert slice with its format and the bytes of its tensors
        info = describe_checkpoint(out)
        rows = [line.split() for line in info.splitlines() if " expert " in f" {line} "
                and line.strip().startswith("model.")]
        n_slices = sum(len(fused_layers(m, n)) for n, m in moe)
        assert len(rows) == n_slices, (layout, len(rows))
        for row in rows:
            name, fmt, nbytes = row[0], row[2], int(row[6].replace(",", ""))
            own = sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items()
                      if k.rsplit(".", 1)[0] == name)
            shape = [int(x) for x in row[1].split("x")]
            assert nbytes == (own or shape[0] * shape[1] * 4), (name, fmt)
        assert f"expert layers (slices of fused expert parameters): {n_slices}" in info


def test_per_expert_linear_modules_export_as_ordinary_layers(tmp_path):
    """nn.Linear experts are ordinary layers: pack-quantized in a standard config group, the
    router listed in ``ignore``, the file's data section exactly model_bytes. (No causal LM of
    transformers 5.24 keeps its experts as nn.Linear modules, so no from_pretrained load of
    such a file can be run here.)"""
    import json

    from toolkit import save_compressed

    model = list_moe_model()
    _compress(model, bits=4, group_size=16, sym=True)
    out = save_compressed(model, tmp_path / "ckpt")
    header, data = _data_bytes(out)
    assert data == model_bytes(model, dense_bits=32)["bytes"]
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    targets = {t for g in qc["config_groups"].values() for t in g["targets"]}
    for b in range(2):
        assert f"model.layers.{b}.mlp.gate" in qc["ignore"]
        for e in range(4):
            for w in ("w1", "w2", "w3"):
                name = f"model.layers.{b}.mlp.experts.{e}.{w}"
                assert name in targets and f"{name}.weight_packed" in header
