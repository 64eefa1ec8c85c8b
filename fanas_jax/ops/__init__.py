"""Attention ops, the bottleneck that hosts them, and the network stems."""
from fanas_jax.ops.attention import local_attention
from fanas_jax.ops.layers import (AttentionStem, AxialAttention, Bottleneck,
                                  ConvStem, LocalAttention, NonLocal, OPS,
                                  ORIGINAL_OPS, OpOptions, OpSpec, STEMS,
                                  batch_norm)

__all__ = [
    "AttentionStem", "AxialAttention", "Bottleneck", "ConvStem",
    "LocalAttention", "NonLocal", "OPS", "ORIGINAL_OPS", "OpOptions", "OpSpec",
    "STEMS", "batch_norm", "local_attention",
]
