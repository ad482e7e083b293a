"""Shared fixtures: offline data paths, the real SmolLM2-135M model, tiny random models."""

from __future__ import annotations

import copy
import os
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
WIKITEXT = REPO / "data" / "wikitext2"  # bundled with the project (data/README.md)


def wikitext_file(name: str) -> Path:
    return WIKITEXT / name


@pytest.fixture(scope="session")
def wikitext_valid() -> str:
    """Calibration text: the tokenized WikiText-2 validation split."""
    return wikitext_file("wiki.valid.tokens").read_text(encoding="utf-8").replace("\r\n", "\n")


@pytest.fixture(scope="session")
def wikitext_test() -> str:
    """Evaluation text: the raw WikiText-2 test split, line endings normalised."""
    return wikitext_file("wiki.test.raw").read_text(encoding="utf-8").replace("\r\n", "\n")


@pytest.fixture(scope="session")
def _smollm2():
    from toolkit.loading import load_model

    torch.manual_seed(0)
    return load_model("smollm2", dtype=torch.float32)


@pytest.fixture()
def smollm2(_smollm2):
    """A fresh copy of SmolLM2-135M-Instruct (float32, dequantized from Q4_1 GGUF) + tokenizer."""
    model, tok = _smollm2
    return copy.deepcopy(model), tok


@pytest.fixture(scope="session")
def smollm2_shared(_smollm2):
    """The session's SmolLM2 instance: read it, never modify it."""
    return _smollm2


TINY_FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "opt", "gpt2",
                 "gpt_neox", "bloom", "falcon"]


def tiny_config(family: str, hidden: int = 64, layers: int = 2, vocab: int = 128):
    """A 2-block, hidden-64 config of one family."""
    import transformers as tf

    common = dict(vocab_size=vocab, num_hidden_layers=layers, num_attention_heads=4)
    if family in ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3"):
        cls = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config,
               "qwen3": tf.Qwen3Config, "gemma": tf.GemmaConfig, "phi3": tf.Phi3Config}[family]
        extra = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_key_value_heads=2,
                     max_position_embeddings=256)
        if family in ("gemma", "qwen3"):
            extra["head_dim"] = hidden // 4
        if family == "phi3":
            extra.pop("num_key_value_heads")
            extra["pad_token_id"] = 0
        return cls(**common, **extra)
    if family == "opt":
        return tf.OPTConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                            num_attention_heads=4, ffn_dim=2 * hidden, word_embed_proj_dim=hidden,
                            max_position_embeddings=256)
    if family == "gpt2":
        return tf.GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=4,
                             n_positions=256)
    if family == "gpt_neox":
        return tf.GPTNeoXConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                                num_attention_heads=4, intermediate_size=2 * hidden,
                                max_position_embeddings=256)
    if family == "bloom":
        return tf.BloomConfig(vocab_size=vocab, hidden_size=hidden, n_layer=layers, n_head=4)
    if family == "falcon":
        return tf.FalconConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                               num_attention_heads=4, new_decoder_architecture=False,
                               max_position_embeddings=256)
    raise ValueError(family)


def tiny_model(family: str = "llama", seed: int = 0, **kw):
    """A tiny random causal LM of ``family`` (float32, eval mode)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(family, **kw)
    config.bos_token_id, config.eos_token_id, config.pad_token_id = 1, 2, 0
    model = AutoModelForCausalLM.from_config(config)
    return model.eval()


def tiny_moe(family: str, seed: int = 0, experts: int = 4, top_k: int = 2):
    """A 2-block, hidden-64 random MoE of ``family`` (float32, eval)."""
    import transformers as tf

    common = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1,
                  eos_token_id=2, pad_token_id=0)
    if family == "mixtral":
        cfg = tf.MixtralConfig(**common, intermediate_size=96, num_local_experts=experts,
                               num_experts_per_tok=top_k)
    elif family == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(**common, intermediate_size=96, moe_intermediate_size=32,
                                num_experts=experts, num_experts_per_tok=top_k, head_dim=16)
    elif family == "olmoe":
        cfg = tf.OlmoeConfig(**common, intermediate_size=32, num_experts=experts,
                             num_experts_per_tok=top_k)
    elif family == "qwen2_moe":  # a shared expert and its one-output gate
        cfg = tf.Qwen2MoeConfig(**common, intermediate_size=96, moe_intermediate_size=32,
                                shared_expert_intermediate_size=48, num_experts=experts,
                                num_experts_per_tok=top_k, decoder_sparse_step=1)
    elif family == "deepseek_v3":  # shared experts, first block dense, MLA attention
        cfg = tf.DeepseekV3Config(
            vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, intermediate_size=96, moe_intermediate_size=32,
            n_routed_experts=experts, num_experts_per_tok=top_k, n_shared_experts=1,
            first_k_dense_replace=1, n_group=1, topk_group=1, q_lora_rank=32, kv_lora_rank=16,
            qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, max_position_embeddings=256,
            bos_token_id=1, eos_token_id=2, pad_token_id=0)
    elif family == "gpt_oss":  # (experts, in, out) storage, interleaved gate/up, biases
        cfg = tf.GptOssConfig(**common, intermediate_size=32, num_local_experts=experts,
                              num_experts_per_tok=top_k, head_dim=16,
                              layer_types=["sliding_attention", "full_attention"])
    else:
        raise ValueError(family)
    torch.manual_seed(seed)
    return tf.AutoModelForCausalLM.from_config(cfg).eval()


def random_ids(n: int, seqlen: int, vocab: int = 128, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, seqlen), generator=g)


#: The real-model quality tests: calibration windows (WikiText-2 validation) and evaluation
#: windows (the first windows of the WikiText-2 test split).
SMOLLM2_CALIB = dict(nsamples=8, seqlen=256)
SMOLLM2_EVAL = dict(seqlen=256, max_windows=8)
#: The real-model quality tests compute in float64 (the model, the Hessians and the solver):
#: then the order of float sums, which the thread count, the CPU and the torch build set, cannot
#: move a mask or rounding choice in practice, and the recorded perplexities hold on any
#: machine. In float32 the same runs move by up to 10% between machines (2,048 calibration
#: tokens leave many choices near a tie): bench/quality_spread.py measures both.
SMOLLM2_DTYPE = torch.float64
#: The float32 real-model tests (per-layer error ratios, the one-line call) run with this many
#: torch threads.
SMOLLM2_THREADS = 2

#: The settings of ``smollm2_results`` (keywords of ``compress``), by name.
SMOLLM2_SETTINGS = {
    "sparsegpt 50%": dict(sparsity=0.5),
    "sparsegpt 2:4": dict(pattern="2:4"),
    "gptq 4-bit g128": dict(bits=4, group_size=128),
    "gptq 3-bit g128": dict(bits=3, group_size=128),
    "sparsegpt 50% + gptq 4-bit g128": dict(sparsity=0.5, bits=4, group_size=128),
    "magnitude 50%": dict(sparsity=0.5, method="magnitude"),
    "wanda 50%": dict(sparsity=0.5, method="wanda"),
    "rtn 4-bit g128": dict(bits=4, group_size=128, quant="rtn"),
}


@contextmanager
def torch_threads(n: int):
    """Run the body with ``n`` torch threads, then restore the previous count."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def smollm2_quality(model, tok, calibration: str, evaluation: str, *, threads: int | None = None,
                    deterministic: bool = False, dtype: torch.dtype = SMOLLM2_DTYPE,
                    **changes) -> dict[str, tuple[float, float]]:
    """``{setting: (perplexity, mean rel_error)}`` of SmolLM2 under :data:`SMOLLM2_SETTINGS`
    (and ``"dense"``), with ``threads`` torch threads (None: the session's count), computed in
    ``dtype`` (the model's copy and its Hessians): a fresh copy of ``model`` per setting,
    calibrated on :data:`SMOLLM2_CALIB` windows of ``calibration``, evaluated on
    :data:`SMOLLM2_EVAL` windows of ``evaluation``. The mean rel_error is the report's
    ``rel_error`` averaged over the compressed layers (NaN for the rules that use no Hessian:
    magnitude, RTN). ``changes`` alter every setting (e.g. ``percdamp=0.1``, ``nsamples=4``:
    the deliberate regressions of bench/quality_spread.py); ``deterministic`` runs with
    ``torch.use_deterministic_algorithms(True)``."""
    from toolkit import compress, perplexity

    calib = {**SMOLLM2_CALIB, **{k: v for k, v in changes.items() if k in SMOLLM2_CALIB}}
    extra = {k: v for k, v in changes.items() if k not in SMOLLM2_CALIB}
    hessian = {"hessian_dtype": str(dtype).removeprefix("torch.")}
    det_before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    model = copy.deepcopy(model).to(dtype)
    try:
        with torch_threads(threads or torch.get_num_threads()):
            out = {"dense": (perplexity(model, tok, evaluation, verbose=False, **SMOLLM2_EVAL),
                             float("nan"))}
            for name, kw in SMOLLM2_SETTINGS.items():
                m = copy.deepcopy(model)
                report = compress(m, tok, calibration=calibration, verbose=False, **calib,
                                  **{**hessian, **kw, **extra})
                out[name] = (perplexity(m, tok, evaluation, verbose=False, **SMOLLM2_EVAL),
                             float(report.layers["rel_error"].mean()))
                del m
    finally:
        torch.use_deterministic_algorithms(det_before)
    return out


@pytest.fixture(scope="session")
def smollm2_quality_results(_smollm2, wikitext_valid, wikitext_test):
    """:func:`smollm2_quality` of the session's SmolLM2, computed once per session in
    :data:`SMOLLM2_DTYPE` with the session's thread count. Every real-model quality test reads
    it."""
    model, tok = _smollm2
    out = smollm2_quality(model, tok, wikitext_valid, wikitext_test,
                          deterministic=torch.are_deterministic_algorithms_enabled())
    print("\nmeasured = {\n" + "".join(f"    {k!r}: ({p:.4f}, {e:.6f}),\n"
                                       for k, (p, e) in out.items()) + "}")
    return out


@pytest.fixture(scope="session")
def smollm2_results(smollm2_quality_results):
    """The perplexities of :func:`smollm2_quality_results`, ``{setting: perplexity}``."""
    return {k: p for k, (p, _e) in smollm2_quality_results.items()}


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same random state (torch, numpy, random), whatever ran before
    it: under ``pytest -n 2`` the files run in another order and another process than in a plain
    run, and a test that draws unseeded data must see the same data either way."""
    import random

    import numpy as np

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


def pytest_configure(config):
    """``TOOLKIT_DETERMINISTIC=1`` runs the session under
    ``torch.use_deterministic_algorithms(True)`` (the suite must pass either way).

    ``OMP_NUM_THREADS`` is set to the session's torch thread count, so that the command line
    (in-process or in a subprocess) computes with the same count as the tests' in-memory runs it
    is compared with, whatever the load (its default follows the load).

    Under ``pytest -n N`` (pytest-xdist, the README's command) each worker takes an equal share
    of the usable cores (at least one thread) unless ``OMP_NUM_THREADS`` was set: N processes
    with a thread per core each would spin on each other's cores."""
    if getattr(config.option, "numprocesses", None) and "PYTEST_XDIST_WORKER" not in os.environ:
        return  # the controller of `pytest -n N`: the workers choose their own count
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    given = os.environ.get("OMP_NUM_THREADS", "")
    if given.isdigit() and int(given) > 0:
        # the count asked for, in this process too (torch may start with fewer: it capped
        # OMP_NUM_THREADS=3 at the 2 cores, while the command line, which reads the variable,
        # used 3)
        torch.set_num_threads(int(given))
    elif workers > 1:
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // workers))
    os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
    if os.environ.get("TOOLKIT_DETERMINISTIC") == "1":
        torch.use_deterministic_algorithms(True)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """With TOOLKIT_FAIL_ON_SKIP=1 (set by CI) a skipped test is a failure: every dependency of
    the suite is installed there, so a skip would only hide a test that did not run."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("TOOLKIT_FAIL_ON_SKIP") == "1" and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped, and TOOLKIT_FAIL_ON_SKIP=1 forbids skips: {report.longrepr}"


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` need a GPU: they run only when the ``-m`` expression names the
    marker (``pytest -m cuda``, as bench/gpu.py does) and are deselected otherwise, so that no
    CPU run, CI included, counts them as skipped."""
    if "cuda" in (config.getoption("markexpr") or ""):
        return
    cuda = [item for item in items if item.get_closest_marker("cuda") is not None]
    if cuda:
        config.hook.pytest_deselected(items=cuda)
        items[:] = [item for item in items if item.get_closest_marker("cuda") is None]
