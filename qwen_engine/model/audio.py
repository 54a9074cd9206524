"""Qwen-Audio's audio encoder (qwen-family.md §7.2): Whisper-large-v2's encoder, a 2× average pooling and a projection
to the LLM's width. One clip's log-mel becomes its span: the learned audio-BOS row, one row per 40 ms of audio, the
audio-EOS row, which the engine writes over the clip's `<audio>` … `</audio>` positions, both tags included (§7.4).

Module names follow the checkpoint's `transformer.audio.*` tensors, so a stripped state dict loads as it is.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import AudioConfig
from ..errors import QwenError

LAYER_NORM_EPS = 1e-5  # Whisper's LayerNorms are nn.LayerNorm's default (§7.2)
SAMPLES_PER_FRAME = 160  # the log-mel hop: 10 ms at 16 kHz (§7.3)
MIN_MEL_FRAMES = 3  # the shortest clip the original encodes (480 samples, span 3); shorter ones crash it (§7.5)


def sinusoids(length: int, channels: int) -> torch.Tensor:
    """Whisper's fixed position table [length, channels] (§7.2): row t = [sin(t·ω_k)…, cos(t·ω_k)…] with
    ω_k = exp(−k·ln(10000)/(channels/2 − 1)), k < channels/2. Computed in float32, as the original computes the table
    its checkpoints store. Checkpoints carry it (the model reads the stored values, §7.5); this makes it for new ones."""
    half = channels // 2
    frequencies = torch.exp(-math.log(10000) / (half - 1) * torch.arange(half, dtype=torch.float32))
    angles = torch.arange(length, dtype=torch.float32)[:, None] * frequencies[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class AudioAttention(nn.Module):
    """Whisper's self-attention: separate q/k/v projections, the key without a bias (§7.2)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width, bias=False)
        self.value = nn.Linear(width, width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        length, width = x.shape
        q, k, v = (project(x).view(length, self.heads, -1).transpose(0, 1) for project in (self.query, self.key, self.value))
        # The original scales q and k each by d^(−1/4) (§7.2): the same 1/√d on the scores as SDPA's default scale.
        # No mask: one clip alone has no padded frames, which is all the original masks.
        # With a batch dimension: the CPU's fused attention kernel takes 4-D input only (3-D falls back to the
        # generic path, 17× slower here, benchmarks/audio.py).
        out = F.scaled_dot_product_attention(q[None], k[None], v[None])[0]
        return self.out(out.transpose(0, 1).reshape(length, width))


class AudioBlock(nn.Module):
    """Pre-LN: x + attn(attn_ln(x)), then x + mlp(mlp_ln(x)); `mlp` is Linear, exact (erf) GELU, Linear (§7.2, §7.5)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.attn_ln = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.attn = AudioAttention(width, heads)
        self.mlp_ln = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_ln(x))
        return x + self.mlp(self.mlp_ln(x))


class AudioEncoder(nn.Module):
    """One clip's log-mel [n_mels, frames] in, its span [tokens + 2, output_dim] out (§7.2, §7.3).

    Clips are encoded one at a time, so that a clip's output can be cached by its digest. The original encodes all
    clips of a conversation as one padded batch, where a shorter clip's last conv frame reads the padding log-mel
    beside it; alone, it reads its own log-mel's next frame (§7.5)."""

    def __init__(self, config: AudioConfig) -> None:
        super().__init__()
        if not (config.avg_pool and config.add_audio_bos_eos_token):
            # The original's span (§7.3: pooled rows + BOS + EOS) only adds up with both; Qwen-Audio has both.
            raise QwenError("the audio encoder needs avg_pool and add_audio_bos_eos_token (as Qwen-Audio's config has)")
        self.config = config
        width = config.n_state
        self.conv1 = nn.Conv1d(config.n_mels, width, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(width, width, kernel_size=3, stride=2, padding=1)
        self.register_buffer("positional_embedding", sinusoids(config.n_ctx, width))  # persistent: checkpoints store it
        self.blocks = nn.ModuleList(AudioBlock(width, config.n_head) for _ in range(config.n_layer))
        self.ln_post = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.proj = nn.Linear(width, config.output_dim)
        self.audio_bos_eos_token = nn.Embedding(2, config.output_dim)  # row 0: audio-BOS, row 1: audio-EOS

    def forward(self, mel: torch.Tensor, mel_len: int) -> torch.Tensor:
        """`mel_len`: the clip's valid frames (samples // 160). Returns rows in the module's dtype."""
        length = (mel_len - 1) // 2 + 1  # frames after conv2 (§7.3)
        if mel_len < MIN_MEL_FRAMES or 2 * length > mel.shape[1] or length > self.config.n_ctx:
            raise QwenError(f"audio of {mel_len * SAMPLES_PER_FRAME} samples cannot be encoded: Qwen-Audio takes "
                            f"{MIN_MEL_FRAMES * SAMPLES_PER_FRAME} samples (30 ms) to 30 s at 16 kHz")
        weight = self.conv1.weight
        # The first 2·length frames: with an odd mel_len, one past the audio, as the original reads (§7.5).
        x = mel[:, : 2 * length].to(dtype=weight.dtype, device=weight.device)
        x = F.gelu(self.conv2(F.gelu(self.conv1(x)))).T  # [length, n_state]
        x = x + self.positional_embedding[:length]
        for block in self.blocks:
            x = block(x)
        x = F.avg_pool1d(x.T, kernel_size=2, stride=2).T  # 40 ms a row: (length − 2)//2 + 1 rows (§7.2, §7.3)
        tokens = self.proj(self.ln_post(x))
        bos, eos = self.audio_bos_eos_token.weight
        return torch.cat([bos[None], tokens, eos[None]])
