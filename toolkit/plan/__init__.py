"""Deciding what each layer gets, before the sweep: allocation rules (OWL: per-layer sparsity
with the total kept exact) and the size planner (the options each layer may take, their bytes,
the exact knapsack over a profile of measured errors, the plan). The walks that measure the
profile and apply the plan are in :mod:`toolkit.walk`.

May import :mod:`toolkit.checkpoint` (bytes of a layer as stored), :mod:`toolkit.config`,
:mod:`toolkit.measure`, :mod:`toolkit.model` and :mod:`toolkit.solver`.
"""
