"""Attention ops, the bottleneck that hosts them, and the network stems."""
from fanas_jax.ops.attention import BORDERS, IMPLEMENTATIONS, local_attention
from fanas_jax.ops.costs import Cost, batch_norm_cost, conv_cost
from fanas_jax.ops.layers import (AttentionStem, AxialAttention, Bottleneck,
                                  ConvStem, LocalAttention, NonLocal, OPS,
                                  ORIGINAL_OPS, OpOptions, OpSpec, STEMS,
                                  StemSpec, batch_norm)

__all__ = [
    "AttentionStem", "AxialAttention", "BORDERS", "Bottleneck", "ConvStem",
    "Cost", "IMPLEMENTATIONS", "LocalAttention", "NonLocal", "OPS",
    "ORIGINAL_OPS", "OpOptions", "OpSpec", "STEMS", "StemSpec", "batch_norm",
    "batch_norm_cost", "conv_cost", "local_attention",
]
