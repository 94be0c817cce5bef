"""The network (:mod:`.network`) and its attention kernels (:mod:`.attention`), above the config.

Imports torch; nothing here knows about AnnData, checkpoints or devices.
"""

from .attention import (
    Attend,
    AttentionInputs,
    BiasMode,
    ChunkedAttention,
    DenseAttention,
    FlexAttention,
    Kernel,
    chunked_attention,
    dense_attention,
    flex_attention,
)
from .network import Encoded, EncoderLayer, KVCache, LayerCache, TranscriptFormer

__all__ = [
    "Attend",
    "AttentionInputs",
    "BiasMode",
    "ChunkedAttention",
    "DenseAttention",
    "Encoded",
    "EncoderLayer",
    "FlexAttention",
    "KVCache",
    "Kernel",
    "LayerCache",
    "TranscriptFormer",
    "chunked_attention",
    "dense_attention",
    "flex_attention",
]
