"""Packed inference: compressed layers that stay compressed in memory and compute with it
(int4 and int8 kernels, 2:4 and bitmask sparse layers, dequantize-on-the-fly).

Reads what :mod:`toolkit.checkpoint` or ``compress`` produced and feeds nothing back.
May import every layer below it; none of them imports it.
"""
