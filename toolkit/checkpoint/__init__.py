"""Checkpoints: the compressed-tensors format as written and read (``save_compressed``,
``load_compressed``, ``describe_checkpoint``), which readers load which files, and size
accounting (the bytes a checkpoint of a model needs).

May import :mod:`toolkit.config`, :mod:`toolkit.measure`, :mod:`toolkit.model` and
:mod:`toolkit.solver`.
"""
