"""Rotary position embeddings, rotate-half ("NeoX") layout over the full head_dim (qwen-family.md §0, §3.2)."""

from __future__ import annotations

import torch

from ..config import ModelConfig


def inverse_frequencies(config: ModelConfig) -> torch.Tensor:
    """ω_i = θ^(−2i/d), i = 0 … d/2−1, in float32 (qwen-family.md §3.2)."""
    exponents = torch.arange(0, config.head_dim, 2, dtype=torch.int64).to(torch.float32) / config.head_dim
    return 1.0 / (config.rope_theta**exponents)


class RotaryEmbedding(torch.nn.Module):
    """cos/sin tables for positions 0…n, grown on demand, so each step only slices them."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.register_buffer("inv_freq", inverse_frequencies(config), persistent=False)
        self._cos: torch.Tensor | None = None
        self._sin: torch.Tensor | None = None

    def forward(self, start: int, length: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [length, d] for positions start…start+length−1: computed in float32, cast to `dtype`."""
        end = start + length
        if self._cos is None or self._cos.shape[0] < end or self._cos.dtype != dtype:
            size = max(end, 2 * (0 if self._cos is None else self._cos.shape[0]), 256)
            positions = torch.arange(size, device=self.inv_freq.device, dtype=torch.float32)
            freqs = positions[:, None] * self.inv_freq[None, :]
            angles = torch.cat((freqs, freqs), dim=-1)
            self._cos, self._sin = angles.cos().to(dtype), angles.sin().to(dtype)
        return self._cos[start:end], self._sin[start:end]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x·cos + rotate_half(x)·sin for x of shape [B, heads, T, d]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
