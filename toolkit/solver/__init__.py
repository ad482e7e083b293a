"""The math with no model: the layer Hessian and its inverse Cholesky factor, the shared column
sweep (SparseGPT, GPTQ, both), quantization grids, masks, baseline rules and the mask-fixed re-solve.

Works on tensors only. May import nothing from the rest of the toolkit: it is the bottom layer.
"""
