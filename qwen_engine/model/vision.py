"""Qwen-VL's visual tower (qwen-family.md §6.2): a ViT-bigG-style encoder and a one-layer resampler that turn a
448×448 image into 256 vectors of the LLM's width, which the engine writes over an image's 256 prompt positions.

Module names follow the checkpoint's `transformer.visual.*` tensors, so a stripped state dict loads as it is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VisionConfig

LAYER_NORM_EPS = 1e-6  # every LayerNorm of the tower (§6.2)
LEARNED_POSITIONS = 256  # the tower's learned position table: a 16×16 grid (trained at 224 px), resized (§6.2)


def resize_grid(table: torch.Tensor, side: int) -> torch.Tensor:
    """A [n², C] table laid out on an n×n grid, resized to side×side by bicubic interpolation in float32
    (align_corners=False) and flattened row-major (§6.2), in the table's dtype."""
    source = int(round(table.shape[0] ** 0.5))
    if source == side:
        return table
    grid = table.float().reshape(1, source, source, -1).permute(0, 3, 1, 2)
    resized = F.interpolate(grid, size=(side, side), mode="bicubic", align_corners=False)
    return resized.permute(0, 2, 3, 1).flatten(0, 2).to(table.dtype)


def sincos_table(dim: int, side: int) -> torch.Tensor:
    """The resampler's fixed 2-D sin-cos table [side², dim] (MAE's recipe, §6.2): the first half of the channels
    encodes the column, the second the row, each half [sin(p·ω_k)…, cos(p·ω_k)…] with ω_k = 10000^(−k/(dim/4)).
    Checkpoints store it (the model reads the stored values); this makes it for new ones."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    rows, columns = torch.meshgrid(torch.arange(side, dtype=torch.float64), torch.arange(side, dtype=torch.float64),
                                   indexing="ij")

    def encode(positions: torch.Tensor) -> torch.Tensor:
        angles = positions.flatten()[:, None] * omega[None, :]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(columns), encode(rows)], dim=1).float()


class VisualAttention(nn.Module):
    """Self-attention whose fused projection is interleaved per head: output features h·3d … h·3d+3d−1 are head h's
    q, k and v (§6.2), unlike the LLM's [all q | all k | all v]."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.in_proj = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.in_proj(x).view(batch, length, self.heads, 3 * self.head_dim).transpose(1, 2).chunk(3, dim=-1)
        out = F.scaled_dot_product_attention(q, k, v)  # no mask: every patch sees every patch
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, width))


class VisualMLP(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))  # exact (erf) GELU, as nn.GELU()


class VisualBlock(nn.Module):
    """Pre-LN: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.width, eps=LAYER_NORM_EPS)
        self.attn = VisualAttention(config.width, config.heads)
        self.ln_2 = nn.LayerNorm(config.width, eps=LAYER_NORM_EPS)
        self.mlp = VisualMLP(config.width, config.mlp_width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class VisualTransformer(nn.Module):
    """The `transformer.resblocks.N` prefix of the checkpoint."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(VisualBlock(config) for _ in range(config.layers))


class Resampler(nn.Module):
    """256 learned queries cross-attend the patches (§6.2 step 3): keys carry the sin-cos table resized to the patch
    grid, values none; queries carry it at its own 16×16 size."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        dim = config.output_dim
        self.query = nn.Parameter(torch.empty(config.n_queries, dim))
        self.pos_embed = nn.Parameter(torch.empty(config.n_queries, dim), requires_grad=False)
        self.kv_proj = nn.Linear(config.width, dim, bias=False)
        self.ln_q = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.ln_kv = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = nn.MultiheadAttention(dim, config.pool_heads, batch_first=True)
        self.grid = config.grid

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        kv = self.ln_kv(self.kv_proj(patches))
        keys = kv + resize_grid(self.pos_embed, self.grid)
        queries = (self.ln_q(self.query) + self.pos_embed).expand(patches.shape[0], -1, -1)
        return self.attn(queries, keys, kv, need_weights=False)[0]


class VisionTower(nn.Module):
    """Normalized pixels [B, 3, 448, 448] in, image embeddings [B, 256, output_dim] out (§6.2)."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.conv1 = nn.Conv2d(3, config.width, config.patch_size, stride=config.patch_size, bias=False)
        self.positional_embedding = nn.Parameter(torch.empty(LEARNED_POSITIONS, config.width))
        self.ln_pre = nn.LayerNorm(config.width, eps=LAYER_NORM_EPS)
        self.transformer = VisualTransformer(config)
        self.attn_pool = Resampler(config)
        self.ln_post = nn.LayerNorm(config.output_dim, eps=LAYER_NORM_EPS)
        self.proj = nn.Parameter(torch.empty(config.output_dim, config.output_dim))  # used as x @ proj: [in, out]

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.conv1(pixels.to(self.conv1.weight.dtype)).flatten(2).transpose(1, 2)  # [B, grid², width], row-major
        x = self.ln_pre(x + resize_grid(self.positional_embedding, self.config.grid))
        for block in self.transformer.resblocks:
            x = block(x)
        return self.ln_post(self.attn_pool(x)) @ self.proj
