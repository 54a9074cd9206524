"""A static, preallocated key/value cache for one batch of sequences."""

from __future__ import annotations

import torch

from ..config import ModelConfig


class StaticKVCache:
    """Keys and values of every layer in two tensors [L, B, n_kv, max_len, d], written in place."""

    def __init__(self, config: ModelConfig, max_len: int, dtype: torch.dtype, device: torch.device, batch: int = 1) -> None:
        shape = (config.num_layers, batch, config.num_kv_heads, max_len, config.head_dim)
        self.max_len = max_len
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)

    def update(self, layer: int, start: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + keys.shape[2]
        self.keys[layer, :, :, start:end] = keys
        self.values[layer, :, :, start:end] = values
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]
