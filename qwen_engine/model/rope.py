"""Rotary position embeddings, rotate-half ("NeoX") layout over the full head_dim (qwen-family.md §0, §3.2)."""

from __future__ import annotations

import torch

from ..config import ModelConfig


def inverse_frequencies(config: ModelConfig) -> torch.Tensor:
    """ω_i = θ^(−2i/d), i = 0 … d/2−1, in float32 (qwen-family.md §3.2)."""
    exponents = torch.arange(0, config.head_dim, 2, dtype=torch.int64).to(torch.float32) / config.head_dim
    return 1.0 / (config.rope_theta**exponents)


class RotaryEmbedding(torch.nn.Module):
    """Turns positions into the cos/sin tables every attention layer applies to q and k."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.register_buffer("inv_freq", inverse_frequencies(config), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [T, d], computed in float32 and cast to the activation dtype."""
        freqs = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x·cos + rotate_half(x)·sin for x of shape [B, heads, T, d]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
