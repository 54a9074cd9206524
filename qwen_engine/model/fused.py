"""Decoding steps of a block-quantized decoder in one native call (qwen_engine/kernels/decode_layer.c).

A decoding step reads every weight once; the PyTorch path adds ~60 small operator calls a layer around those reads,
which on a small model cost as much as the reads themselves. The fused step runs the same layer arithmetic, with
the same bfloat16 roundings, without them. It serves steps of one token for each of any number of sequences (32 a
native call) on the engine's paged cache; every other call takes the PyTorch path. Under tensor parallelism it runs
the rank's shard and calls back into Python for the two all-reduces of each layer, so every rank enters the same
collectives in the same order as on the PyTorch path.
"""

from __future__ import annotations

import ctypes

import torch

from ..kernels import (MAX_ROWS, BlockMatrix, CpuKernels, DecodeLayer, DecodeShape, ReduceRows, cpu_kernels, matrix,
                       plain_bf16)
from .decoder import QwenDecoder, SequenceBatch
from .quantized import BlockLinear
from .rope import RotaryTables


def _block_matrix(linear: BlockLinear) -> BlockMatrix:
    return matrix(linear.codes, linear.high_bits, linear.scales, linear.bias)


class FusedDecodeStep:
    """Holds the pointers to a decoder's buffers; the decoder must stay as it is while this is in use."""

    def __init__(self, decoder: QwenDecoder, kernels: CpuKernels) -> None:
        config = decoder.shard  # the rank's heads and MLP columns under tensor parallelism
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
        self.reduce, self._failure = None, None
        if decoder.parallel is not None:
            self.reduce = ReduceRows(self._all_reduce)  # kept here: C holds only its address
            self._parallel = decoder.parallel

    def _all_reduce(self, address: int, count: int) -> int:
        """The ranks' sum of `count` float32 values at `address`, in place (called from the C step). An error (a
        rank gone) is kept for __call__ to raise, as the PyTorch path would."""
        try:
            rows = torch.frombuffer((ctypes.c_float * count).from_address(address), dtype=torch.float32)
            self._parallel.all_reduce(rows)
            return 0
        except BaseException as err:  # nothing may propagate through C
            self._failure = err
            return 1

    @classmethod
    def build(cls, decoder: QwenDecoder) -> FusedDecodeStep | None:
        """The fused step, or None unless the kernels run here and every projection is a block format in bfloat16."""
        kernels = cpu_kernels()
        config = decoder.shard
        if kernels is None or decoder.dtype != torch.bfloat16 or decoder.device.type != "cpu":
            return None
        if config.head_dim % 32 or config.head_dim > 512 or config.moe is not None:
            return None  # (a sparse layer's experts are picked per token: the PyTorch path takes those steps)
        projections = [p for layer in decoder.model.layers for p in (layer.self_attn.qkv_proj, layer.self_attn.o_proj,
                                                                       layer.mlp.gate_up_proj, layer.mlp.down_proj)]
        if not all(isinstance(p, BlockLinear) and p.in_features % 64 == 0 for p in projections):
            return None
        row_parallel = [p for layer in decoder.model.layers for p in (layer.self_attn.o_proj, layer.mlp.down_proj)]
        if decoder.parallel is not None and any(p.bias is not None for p in row_parallel):
            return None  # (the C step adds the ranks' sums without a bias; no Qwen layout has one there)
        for projection in projections:  # every decoding step is ours now: PyTorch runs prefills (_QuantizedLinear)
            projection.packed_max_rows = 0
        return cls(decoder, kernels)

    def __call__(self, hidden: torch.Tensor, rope: RotaryTables, batch: SequenceBatch) -> torch.Tensor | None:
        """hidden [1, B, H] after every layer for one token of each sequence of a paged batch, or None where this step
        does not apply (the caller runs PyTorch)."""
        if hidden.device.type != "cpu" or any(table.dtype != torch.bfloat16 for table in rope) or hidden.shape[0] != 1:
            return None  # (a decoder moved off the CPU after loading: the raw addresses would not be host memory)
        d, kv_heads = self.shape.head_dim, self.shape.kv_heads
        layout = batch.decode_layout()  # whether this step applies is settled before anything is copied
        if layout is None or not plain_bf16(layout.keys, layout.values) or layout.keys.shape[1::2] != (kv_heads, d):
            return None
        tables = tuple(table.contiguous() for table in (rope.cos, rope.sin, rope.q_cos, rope.q_sin))
        out = hidden[0].to(torch.bfloat16, copy=True).contiguous()
        strides = (layout.keys[0].numel(), d, layout.keys.shape[2] * d)  # (layer, slot, kv head)
        for rows in range(0, out.shape[0], MAX_ROWS):  # sequences are independent: any batch goes in slices
            part = slice(rows, rows + MAX_ROWS)
            try:
                self.kernels.decode_batch(self.layers, self.shape, out[part], layout.keys, layout.values, strides,
                                          layout.positions[part], tuple(table[part] for table in tables), layout.slots,
                                          layout.slot_starts[part], self.reduce)
            except ValueError:
                failure, self._failure = self._failure, None
                if failure is not None:
                    raise failure from None
                raise
        return out[None]
