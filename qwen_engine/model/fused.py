"""Decoding steps of a block-quantized decoder in one native call (qwen_engine/kernels/decode_layer.c).

A decoding step reads every weight once; the PyTorch path adds ~60 small operator calls a layer around those reads,
which on a small model cost as much as the reads themselves. The fused step runs the same layer arithmetic, with
the same bfloat16 roundings, without them. It serves batch-1 steps on a dense KV cache; every other call takes the
PyTorch path.
"""

from __future__ import annotations

import torch

from ..kernels import CpuKernels, BlockMatrix, DecodeLayer, DecodeShape, cpu_kernels, matrix
from .decoder import KVStore, QwenDecoder
from .quantized import BlockLinear
from .rope import RotaryTables


def _block_matrix(linear: BlockLinear) -> BlockMatrix:
    return matrix(linear.codes, linear.high_bits, linear.scales, linear.bias)


class FusedDecodeStep:
    """Holds the pointers to a decoder's buffers; the decoder must stay as it is while this is in use."""

    def __init__(self, decoder: QwenDecoder, kernels: CpuKernels) -> None:
        config = decoder.config
        self.kernels = kernels
        self.shape = DecodeShape(config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim,
                                 config.intermediate_size, config.rms_norm_eps)
        layers = []
        for layer in decoder.model.layers:
            attention, mlp = layer.self_attn, layer.mlp
            layers.append(DecodeLayer(
                _block_matrix(attention.qkv_proj), _block_matrix(attention.o_proj),
                _block_matrix(mlp.gate_up_proj), _block_matrix(mlp.down_proj),
                layer.input_layernorm.weight.data_ptr(), layer.post_attention_layernorm.weight.data_ptr(),
                attention.window or 0,
            ))
        self.layers = (DecodeLayer * len(layers))(*layers)
        # The structures hold raw addresses: keep what they point into alive for as long as this step exists.
        self._buffers = [t for layer in decoder.model.layers for t in (*layer.buffers(), *layer.parameters())]
        self.num_layers = config.num_layers

    @classmethod
    def build(cls, decoder: QwenDecoder) -> FusedDecodeStep | None:
        """The fused step, or None unless the kernels run here and every projection is a block format in bfloat16."""
        kernels = cpu_kernels()
        config = decoder.config
        if kernels is None or decoder.dtype != torch.bfloat16 or decoder.device.type != "cpu":
            return None
        if config.head_dim % 32 or config.head_dim > 512:
            return None
        for layer in decoder.model.layers:
            projections = (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj)
            if not all(isinstance(p, BlockLinear) and p.in_features % 64 == 0 for p in projections):
                return None
        return cls(decoder, kernels)

    def __call__(self, hidden: torch.Tensor, rope: RotaryTables, cache: KVStore, start: int) -> torch.Tensor | None:
        """hidden [1, 1, H] after every layer, or None where this step does not apply (the caller runs PyTorch)."""
        keys, values = getattr(cache, "keys", None), getattr(cache, "values", None)
        if not isinstance(keys, torch.Tensor) or not isinstance(values, torch.Tensor) or hidden.shape[:2] != (1, 1):
            return None
        shape = (self.num_layers, 1, self.shape.kv_heads, keys.shape[3] if keys.dim() == 5 else -1, self.shape.head_dim)
        dense = all(t.shape == shape and t.dtype == torch.bfloat16 and t.is_contiguous() and t.device.type == "cpu"
                    for t in (keys, values))
        if not dense or any(table.dtype != torch.bfloat16 for table in rope):
            return None
        out = hidden.to(torch.bfloat16, copy=True).contiguous()
        tables = tuple(table.contiguous() for table in (rope.cos, rope.sin, rope.q_cos, rope.q_sin))
        self.kernels.decode_layers(self.layers, self.shape, out, keys[:, 0], values[:, 0], start, tables)
        return out
