"""Attention ops, the bottleneck that hosts them, and the network stems."""
from fanas_jax.ops.attention import local_attention
from fanas_jax.ops.layers import (AttentionStem, Bottleneck, ConvStem,
                                  LocalAttention, NonLocal, OPS, ORIGINAL_OPS,
                                  OpSpec, STEMS, batch_norm)

__all__ = [
    "AttentionStem", "Bottleneck", "ConvStem", "LocalAttention", "NonLocal",
    "OPS", "ORIGINAL_OPS", "OpSpec", "STEMS", "batch_norm", "local_attention",
]
