"""Rotary position embeddings, rotate-half ("NeoX") layout over the full head_dim (qwen-family.md §0, §3.2), and the
long-context variants that act through the rotary tables:

* YaRN (qwen-family.md §3.3): blended inverse frequencies and the attention factor m on cos and sin;
* dynamic NTK (Qwen v1, §1.4): base' = base·α^(d/(d−2)) with α chosen from the prompt's length;
* LogN attention scaling (Qwen v1, §1.5): the query at position p is multiplied by ln(p+1)/ln(S) once p+1 > S, which,
  RoPE being linear, is the same as rotating queries with cos and sin multiplied by that factor.

Everything is folded into precomputed tables, so a forward only slices them: with none of these enabled the tables
are the plain ones and a step costs exactly what it did before.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ..config import ModelConfig, RopeScaling


def _exponents(head_dim: int) -> torch.Tensor:
    """2i/d, i = 0 … d/2−1, in float32 as transformers computes them (from int64), so frequencies match bit for bit.
    On the CPU even while a decoder is built on the meta device (meta arithmetic imports torch._dynamo: ~1 s)."""
    return torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").to(torch.float32) / head_dim


def inverse_frequencies(config: ModelConfig, base: float | None = None) -> torch.Tensor:
    """ω_i = base^(−2i/d), i = 0 … d/2−1, in float32 (qwen-family.md §3.2); base defaults to θ."""
    return 1.0 / ((config.rope_theta if base is None else base) ** _exponents(config.head_dim))


def yarn_attention_factor(scaling: RopeScaling) -> float:
    """m = 0.1·ln(s) + 1 for s > 1, else 1, unless the config gives `attention_factor` (qwen-family.md §3.3, step 6)."""
    if scaling.attention_factor is not None:
        return float(scaling.attention_factor)
    return 0.1 * math.log(scaling.factor) + 1.0 if scaling.factor > 1 else 1.0


def yarn_correction_range(head_dim: int, base: float, scaling: RopeScaling) -> tuple[float, float]:
    """(low, high) of the ramp: D(r) = d·ln(L0/(2πr)) / (2 ln θ), floored/ceiled and clamped (§3.3, steps 2–3)."""

    def dimension(rotations: float) -> float:
        return head_dim * math.log(scaling.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(dimension(scaling.beta_fast)), 0)
    high = min(math.ceil(dimension(scaling.beta_slow)), head_dim - 1)
    return low, (high + 0.001 if low == high else high)


def yarn_frequencies(config: ModelConfig, scaling: RopeScaling, base: float | None = None) -> tuple[torch.Tensor, float]:
    """YaRN inverse frequencies ω'_i = ω_i·((1 − ρ_i) + ρ_i/s) and the attention factor m (qwen-family.md §3.3).

    Computed in the same float32 order as transformers' `_compute_yarn_parameters`, so both give the same bits.
    """
    d, base = config.head_dim, config.rope_theta if base is None else base
    low, high = yarn_correction_range(d, base, scaling)
    powers = base ** _exponents(d)
    extrapolation, interpolation = 1.0 / powers, 1.0 / (scaling.factor * powers)
    ramp = ((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)  # ρ_i
    return interpolation * ramp + extrapolation * (1 - ramp), yarn_attention_factor(scaling)


def ntk_alpha(length: int, seq_length: int) -> int:
    """Qwen v1 dynamic NTK: α = max(2^ceil(log2(L/S) + 1) − 1, 1) (qwen-family.md §1.4)."""
    return max(2 ** math.ceil(math.log2(length / seq_length) + 1) - 1, 1)


def ntk_base(base: float, alpha: float, head_dim: int) -> float:
    """base' = base·α^(d/(d−2)) (qwen-family.md §1.4)."""
    return base * alpha ** (head_dim / (head_dim - 2))


def logn_factors(positions: torch.Tensor, seq_length: int) -> torch.Tensor:
    """Qwen v1 LogN scale of the query at 0-based position p: ln(p+1)/ln(S) if p+1 > S else 1 (§1.5), as float32
    from float64 values like the original's table of Python floats."""
    count = positions.to(torch.float64) + 1
    return torch.where(count > seq_length, count.log() / math.log(seq_length), torch.ones_like(count)).to(torch.float32)


class RotaryTables(NamedTuple):
    """Slices for one forward: keys rotate with (cos, sin), queries with (q_cos, q_sin) — the same tensors unless
    LogN scaling is on."""

    cos: torch.Tensor
    sin: torch.Tensor
    q_cos: torch.Tensor
    q_sin: torch.Tensor


RotaryChoice = tuple[int, bool]  # (dynamic-NTK α, YaRN on?): the frequencies a sequence rotates with


class RotaryEmbedding(torch.nn.Module):
    """cos/sin tables for positions 0…n, one set per frequency choice, grown on demand, so each step only gathers
    rows.

    Length-dependent variants (dynamic NTK, YaRN with `only_long`) choose their frequencies per sequence, from the
    length of its prompt (`choose`); the caller keeps that choice with the sequence and passes it for every later
    chunk and decoding step, so sequences with different choices can share a batch. Nothing here depends on which
    sequence ran last.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("inv_freq", inverse_frequencies(config), persistent=False)
        scaling = config.rope_scaling
        self._yarn_always = scaling is not None and not scaling.only_long
        self._yarn_long = scaling.original_max_position_embeddings if scaling is not None and scaling.only_long else None
        self._ntk_length = (config.seq_length or config.max_position_embeddings) if config.use_dynamic_ntk else None
        self._logn_length = (config.seq_length or config.max_position_embeddings) if config.use_logn_attn else None
        # Per (choice, dtype): (cos, sin, q_cos, q_sin) for positions 0…rows−1. Replaced whole, never edited, so
        # threads sharing a decoder at most build the same tables twice.
        self._tables: dict[tuple[RotaryChoice, torch.dtype], RotaryTables] = {}

    def choose(self, prompt_length: int) -> RotaryChoice:
        """(α, YaRN on?) for a sequence whose prompt holds `prompt_length` tokens."""
        alpha = ntk_alpha(prompt_length, self._ntk_length) if self._ntk_length is not None else 1
        yarn = self._yarn_always or (self._yarn_long is not None and prompt_length > self._yarn_long)
        return alpha, yarn

    def frequencies(self, choice: RotaryChoice) -> tuple[torch.Tensor, float]:
        """Inverse frequencies (on the buffer's device) and the cos/sin factor for a choice."""
        alpha, yarn = choice
        base = ntk_base(self.config.rope_theta, alpha, self.config.head_dim) if alpha != 1 else self.config.rope_theta
        if yarn:
            inv_freq, factor = yarn_frequencies(self.config, self.config.rope_scaling, base)
            return inv_freq.to(self.inv_freq.device), factor
        if alpha != 1:
            return inverse_frequencies(self.config, base).to(self.inv_freq.device), 1.0
        return self.inv_freq, 1.0

    def forward(self, length: int, dtype: torch.dtype) -> RotaryTables:
        """Tables [length, d] for one whole sequence at positions 0…length−1, its frequencies chosen from its length."""
        return self.gather(self.choose(length), slice(0, length), length, dtype)

    def at(self, positions: torch.Tensor, segments: list[tuple[RotaryChoice, int]], dtype: torch.dtype) -> RotaryTables:
        """Tables [len(positions), d] for the tokens of several sequences side by side: `segments` gives each
        sequence's choice and how many of the positions (in order) are its."""
        if len({choice for choice, _ in segments}) == 1:
            return self.gather(segments[0][0], positions, int(positions.max()) + 1, dtype)
        parts, offset = [], 0
        for choice, count in segments:
            rows = positions[offset : offset + count]
            parts.append(self.gather(choice, rows, int(rows.max()) + 1, dtype))
            offset += count
        return RotaryTables(*(torch.cat(column) for column in zip(*parts)))

    def gather(self, choice: RotaryChoice, index: slice | torch.Tensor, end: int, dtype: torch.dtype) -> RotaryTables:
        """The rows `index` (all below `end`) of the tables for `choice`."""
        tables = self._tables.get((choice, dtype))
        if tables is None or tables.cos.shape[0] < end:
            size = max(end, 2 * (0 if tables is None else tables.cos.shape[0]), 256)
            tables = self._tables[choice, dtype] = self._build(choice, size, dtype)
        return RotaryTables(*(table[index] for table in tables))

    def _build(self, choice: RotaryChoice, size: int, dtype: torch.dtype) -> RotaryTables:
        inv_freq, factor = self.frequencies(choice)
        positions = torch.arange(size, device=inv_freq.device, dtype=torch.float32)
        freqs = positions[:, None] * inv_freq[None, :]
        angles = torch.cat((freqs, freqs), dim=-1)
        cos, sin = angles.cos(), angles.sin()
        if factor != 1.0:  # YaRN: both tables carry m, so q·k logits carry m² (qwen-family.md §3.3, step 6)
            cos, sin = cos * factor, sin * factor
        if self._logn_length is None:
            cos, sin = cos.to(dtype), sin.to(dtype)
            return RotaryTables(cos, sin, cos, sin)
        scale = logn_factors(torch.arange(size), self._logn_length).to(inv_freq.device)[:, None]
        return RotaryTables(cos.to(dtype), sin.to(dtype), (cos * scale).to(dtype), (sin * scale).to(dtype))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x·cos + rotate_half(x)·sin for x of shape [B, heads, T, d]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
