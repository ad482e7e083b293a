"""Finding the parts of any decoder-only ``transformers`` model: the list of blocks, the linear
layers in a block (``nn.Linear`` and GPT-2 style ``Conv1D``) and the experts of mixture-of-experts
blocks, stored one module per expert or fused in 3-D parameters.

May import :mod:`toolkit.solver` only.
"""
