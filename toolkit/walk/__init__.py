"""Walking a model: the block-by-block sweep (capture block inputs, accumulate one Hessian per
distinct input, solve, re-run the block), capture of activations and Hessians (OWL statistics,
routed experts, the size planner's profile), streaming from shards, and several processes.

May import every layer below it: :mod:`toolkit.plan`, :mod:`toolkit.checkpoint`, :mod:`toolkit.config`,
:mod:`toolkit.measure`, :mod:`toolkit.model`, :mod:`toolkit.solver`.
"""
