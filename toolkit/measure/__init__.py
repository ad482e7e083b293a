"""Measuring: calibration and evaluation text (the hub or the bundled WikiText-2) cut into token
windows, perplexity and decode speed, and the bitsandbytes baselines (NF4, FP4, LLM.int8).

May import :mod:`toolkit.model` and :mod:`toolkit.solver`.
"""
