"""The entry point: ``compress(model, tokenizer, sparsity=0.5, bits=4)``.

Every keyword of :func:`compress` is a field of :class:`~toolkit.config.options.CompressConfig`, a frozen
dataclass derived from the option table of :mod:`toolkit.config.options`, so a configuration can be
built, checked, stored and reused on its own.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from toolkit.checkpoint.gguf import reencodes_exactly
from toolkit.checkpoint.size import model_bytes
from toolkit.config.options import CompressConfig, options_doc
from toolkit.config.records import CompressionReport, build_report, config_dict
from toolkit.measure.text import calibration_plan, default_calibration_size, get_calibration
from toolkit.model import experts
from toolkit.model.layers import find_blocks
from toolkit.plan import budget
from toolkit.plan import gguf as gguf_plan
from toolkit.plan.allocation import apply_allocation
from toolkit.solver.gguf_grids import gguf_rtn
from toolkit.walk import budget as budget_walk
from toolkit.walk import distributed
from toolkit.walk.capture import allocate
from toolkit.walk.sweep import run_sweep

__all__ = ["compress", "CompressConfig", "CompressionReport", "default_calibration_size",
           "calibration_plan", "build_report", "config_dict"]

log = logging.getLogger("toolkit")


def _find_tokenizer(model):
    """The model's own tokenizer, loaded offline from where the model came from (or None)."""
    from transformers import AutoTokenizer

    config = getattr(model, "config", None)
    where = getattr(config, "_name_or_path", None) or getattr(model, "name_or_path", None)
    if not where:
        return None
    kwargs = {}
    qc = getattr(config, "quantization_config", None)
    gguf = getattr(qc, "gguf_file", None) if qc is not None else None
    if gguf is None and isinstance(qc, dict):
        gguf = qc.get("gguf_file")
    if gguf:
        kwargs["gguf_file"] = gguf
    try:
        return AutoTokenizer.from_pretrained(where, local_files_only=True, **kwargs)
    except Exception as e:  # noqa: BLE001 - any failure means "not found offline"
        log.debug("no tokenizer at %s: %s", where, e)
        return None


def compress(model: nn.Module, tokenizer=None, *, config: CompressConfig | None = None,
             profile: budget.BudgetProfile | None = None, **kwargs) -> CompressionReport:
    """Prune and/or quantize every linear layer inside the decoder blocks of ``model``, in place.

    Typical calls::

        compress(model, sparsity=0.5)              # SparseGPT, unstructured 50%
        compress(model, bits=4)                    # GPTQ 4-bit, groups of 128, asymmetric
        compress(model, sparsity=0.5, bits=4)      # both, in one sweep per layer
        compress(model, tok, pattern="2:4", calibration="wikitext2", nsamples=128, seqlen=2048)

    Keyword arguments: the options of :data:`toolkit.config.options.OPTIONS`, listed at the end of
    this docstring (``help(compress)``). ``overrides`` sets per-layer options by layer-name
    regex, e.g. ``{"down_proj": {"bits": 8}}`` or ``{"mlp": {"refine_iters": 20}}``;
    ``allocation="owl"`` moves sparsity between blocks, keeping the model's total pruned count
    exactly at ``sparsity`` (per-layer values in ``report.layers["sparsity"]``).

    Compress to a size instead of a setting: ``compress(model, tok, target_bits=3.2)`` (bits per
    weight of the budgeted layers) or ``target_size="60MB"`` (the whole checkpoint) profiles
    every layer's error for every option of ``budget_menu``, chooses one option per layer that
    minimises the summed error under the budget (bytes of ``budget_layout``, the layout the
    checkpoint will be saved in), then runs the sweep with those settings (see
    :mod:`toolkit.plan.budget`). ``report.budget`` holds the choices, bytes and profile; pass
    ``profile=report.budget.profile`` to another call on a fresh copy of the same model, with
    the same calibration and settings, to try another target without profiling again.

    Returns a :class:`CompressionReport`. Everything is checked before any weight changes; an
    error raised before the first block is solved leaves the model untouched.
    """
    if config is None:
        config = CompressConfig(**kwargs)
    elif kwargs:
        raise ValueError("pass either config=... or keyword settings, not both")
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch nn.Module (a transformers model), got "
                         f"{type(model).__name__}")
    planned = budget.wants_budget(config)
    if planned:
        budget.check_budget_config(config)
        if distributed.world_size() > 1:
            raise ValueError("target_bits/target_size cannot run under a process group yet")
    elif profile is not None:
        raise ValueError("profile= is only used with target_bits or target_size")
    t0 = time.perf_counter()
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    device = distributed.rank_device(device)  # cuda:LOCAL_RANK under a process group
    blocks_name, blocks = find_blocks(model)

    calibration, nsamples, seqlen = calibration_plan(config, model, device)
    if tokenizer is None and not isinstance(calibration, torch.Tensor):
        tokenizer = _find_tokenizer(model)
        if tokenizer is None:
            raise ValueError(
                "no tokenizer was given and none could be found offline where the model was "
                "loaded from: pass tokenizer=..., or calibration= a tensor of token ids"
            )
    ids = get_calibration(calibration, tokenizer, nsamples=nsamples, seqlen=seqlen,
                          seed=config.seed)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is not None and int(ids.max()) >= vocab:
        raise ValueError(f"calibration token id {int(ids.max())} is outside the model's "
                         f"vocabulary ({vocab}): wrong tokenizer?")

    settings = config.layer_settings
    # every weight of the blocks is a layer, a router, or ignored: else raise before any change
    notes = experts.check_layers(blocks_name, blocks, settings, routers=config.routers)
    layers = [r for b, blk in enumerate(blocks)
              for r in experts.find_layers(blk, f"{blocks_name}.{b}", routers=config.routers)]
    allocated = {}
    if config.allocation != "uniform" and any(experts.is_expert(r) for r in layers):
        raise ValueError(f"allocation={config.allocation!r} does not cover mixture-of-experts "
                         "experts yet; use allocation='uniform' (or overrides) on this model")
    for name in ("asymmetric", "reconstruct_steps"):
        if getattr(config, name) and (planned or any(experts.has_experts(b) for b in blocks)):
            raise ValueError(f"{name}={getattr(config, name)!r} does not cover " + (
                "target_bits/target_size" if planned else "mixture-of-experts models (the "
                "full-precision model routes tokens to other experts, so inputs do not pair)")
                + f" yet{'' if config.effort == 'default' else ' (effort=' + repr(config.effort) + ' sets it)'}"
                + "; leave it off here")
    if planned and config.expert_hessian != "routed" and \
            any(experts.is_expert(r) for r in layers):
        raise ValueError(f"target_bits/target_size profile each expert on the tokens routed to "
                         f"it: expert_hessian must be 'routed' (the default) with them, got "
                         f"{config.expert_hessian!r}")
    if config.allocation != "uniform" and not planned:  # per-layer sparsity, dense pre-pass
        allocated = allocate(model, ids, settings, allocation=config.allocation, device=device,
                             owl_m=config.owl_m, owl_lambda=config.owl_lambda)
        settings = apply_allocation(settings, allocated)

    gguf_notes = {}
    if gguf_plan.uses_gguf(config):  # one storable GGUF type per layer (presets, fallbacks)
        on_gguf = [r for r in layers if (s := settings(r.name)) is not None and s.gguf]
        wide = [r.name for r in on_gguf if r.get_weight().dtype != torch.float32]
        if wide:
            raise ValueError(f"gguf= puts weights on GGUF values, which only float32 holds "
                             f"exactly; {wide[0]} is {on_gguf[0].get_weight().dtype}: load the "
                             "model in float32 (load_model(..., dtype=torch.float32))")
        mc = getattr(model, "config", None)
        heads = getattr(mc, "num_attention_heads", None) or 1
        n_gqa = heads / (getattr(mc, "num_key_value_heads", None) or heads)
        settings, gguf_notes = gguf_plan.resolve_gguf(settings, on_gguf, len(blocks), n_gqa)

    active = [r.name for r in layers if (s := settings(r.name)) is not None and s.active]
    if not active and not planned:
        raise ValueError("nothing to do: give sparsity, pattern or bits (or overrides that set "
                         "them), and make sure ignore does not exclude every layer")

    before = model_bytes(model)
    was_training = model.training
    model.eval()
    try:
        if planned:  # profile, plan, then the sweep with each layer's chosen settings
            rows, result = budget_walk.budget_sweep(model, ids, config, device=device,
                                               profile=profile, verbose=config.verbose)
        else:
            rows = run_sweep(model, ids, settings, device=device, block_size=config.block_size,
                             percdamp=config.percdamp,
                             hessian_dtype=getattr(torch, config.hessian_dtype),
                             verbose=config.verbose and distributed.is_main(),
                             expert_hessian=config.expert_hessian, routers=config.routers,
                             schedule=config.schedule, memory_mb=config.sweep_memory_mb,
                             asymmetric=config.asymmetric,
                             reconstruct_steps=config.reconstruct_steps)
    finally:
        model.train(was_training)
    if config.settings.gguf is not None:  # embeddings and output head on the preset's types
        gguf_notes.update(_gguf_embeddings(
            model, config.settings.gguf, config.ignore,
            ids=ids if config.settings.quant == "gptq" else None, device=device,
            percdamp=config.percdamp, block_size=config.block_size))
        model.toolkit_gguf_preset = config.settings.gguf  # save_gguf's general.file_type
    after = model_bytes(model)
    extra = {
        "processes": distributed.world_size(),
        "refine_iters": config.refine_iters,
        "allocation": config.allocation + (
            f" (layer sparsity {min(allocated.values()):.3f}..{max(allocated.values()):.3f})"
            if allocated else ""),
        "bytes before (fp16)": before["bytes"],
        "bytes after": after["bytes"],
        "bits/weight (compressed)": after["bits_per_weight"],
        **notes,  # MoE routers left dense; tensors left dense by ignore
        **gguf_notes,  # GGUF types per layer, fallbacks, embeddings
        **(result.summary if planned else {}),
    }
    compact = model_bytes(model, layout="compact")
    if compact["bytes"] != after["bytes"]:  # pruned layers: save_compressed(layout="compact")
        extra["bytes after, compact"] = compact["bytes"]
    report = build_report(config, rows, calibration=calibration, nsamples=nsamples, seqlen=seqlen,
                          device=device, extra=extra)
    report.summary["seconds"] = time.perf_counter() - t0
    report.budget = result if planned else None
    summary = report.summary
    log.info("compressed %d layers (%s) in %.1fs", len(report.layers), summary["method"],
             summary["seconds"])
    return report


@torch.no_grad()
def _gguf_embeddings(model: nn.Module, gguf: str, ignore=(), ids=None, device=None,
                     percdamp: float = 0.01, block_size: int = 128) -> dict:
    """Put the token embeddings and the output head onto the GGUF types ``gguf`` (a type or a
    preset) gives them (:func:`toolkit.plan.gguf.embedding_types`), in place, so that
    ``save_gguf`` stores the model as it is in memory. With calibration windows ``ids`` (GPTQ
    runs) the output head (with tied embeddings, the shared matrix) is solved like a layer, on
    the Hessian of its inputs (the final hidden states of the already compressed model); the
    untied token embeddings, and everything under ``quant="rtn"``, are rounded to nearest. A
    matrix already exactly on a grid of its type (SmolLM2's Q8_0 embeddings) is kept as it is;
    one whose name an ``ignore`` regex matches is left alone (save_gguf then writes it in
    F16/F32 exactly). Returns the lines for the report's summary."""
    import re

    from toolkit.solver.layer import solve
    from toolkit.walk.capture import capture_hessians

    emb, out = model.get_input_embeddings(), model.get_output_embeddings()
    if emb is None:
        return {}
    tied = out is None or out.weight is emb.weight
    etype, otype = gguf_plan.embedding_types(gguf, tied, emb.weight.shape[1],
                                             None if tied else out.weight.shape[1])
    names = {id(m): n for n, m in model.named_modules()}
    notes = {}
    for what, module, t in (("embeddings", emb, etype), ("output head", out, otype)):
        if module is None or t is None or (what == "output head" and tied):
            continue
        name = names.get(id(module), what)
        if any(re.search(p, name) for p in ignore) or module.weight.dtype != torch.float32:
            notes[f"GGUF {what}"] = "left as it is (ignored, or not float32)"
            continue
        w = module.weight.data
        if reencodes_exactly(w, t):
            module.toolkit_gguf = t
            notes[f"GGUF {what}"] = f"{t} (already on its grid, unchanged)"
            continue
        is_head = what == "output head" or tied
        head_name = names.get(id(out)) if out is not None else None
        if is_head and ids is not None and head_name is not None:
            H = capture_hessians(model, [head_name], ids)[head_name].H
            dev = device if device is not None else w.device
            res = solve(w.to(dev), H.to(dev), gguf=t, percdamp=percdamp, block_size=block_size,
                        name=name)
            w.copy_(res.weight)
            grid, how = res.gguf.to("cpu"), "solved as the output head"
        else:
            new, _codes, grid = gguf_rtn(w, t, name=name)
            w.copy_(new)
            how = "round to nearest"
        module.toolkit_gguf = grid
        if tied and out is not None:
            out.toolkit_gguf = grid
        notes[f"GGUF {what}"] = f"{t} ({how})" + (", tied" if tied else "")
    return notes


compress.__doc__ += options_doc()
