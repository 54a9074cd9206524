"""How tensor parallelism splits a model over `tp` ranks, the layout vLLM, nano-vllm and gpt-fast share: q/k/v and
gate/up split by output rows (column-parallel), o and down by input columns (row-parallel: an all-reduce sums the
ranks' parts), the embedding and the head by vocabulary rows. k and v keep whole heads; with fewer kv heads than
ranks each kv head is replicated on the ranks whose query heads read it.

One module for both: the planner's per-GPU figures (`qwen memory --tp`) and the loader's slices use these rules,
so what the planner promises is what a rank holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import QwenError

if TYPE_CHECKING:
    import torch

    from .config import ModelConfig
    from .weights.quants import BlockCodes

COLUMN_PARALLEL = ("q_proj.", "gate_proj.", "up_proj.", "embed_tokens.", "lm_head.")  # rows split
KV_PROJECTIONS = ("k_proj.", "v_proj.")  # whole heads per rank
ROW_PARALLEL = ("o_proj.", "down_proj.")  # columns split
ENCODERS = ("visual.", "audio.")  # replicated (they run on rank 0 only)


def kv_heads_per_rank(num_kv_heads: int, tp: int) -> int:
    return max(1, num_kv_heads // tp)


def first_kv_head(num_kv_heads: int, tp: int, rank: int) -> int:
    """The first kv head rank `rank` holds: its share, or with fewer heads than ranks the one its queries read."""
    return rank * num_kv_heads // tp if num_kv_heads < tp else rank * (num_kv_heads // tp)


def shard_shape(name: str, shape: tuple[int, ...], tp: int, kv_per_rank: int, head_dim: int) -> tuple[int, ...]:
    """A tensor's shape on one rank (HF names)."""
    if tp == 1 or name.startswith(ENCODERS):
        return shape
    if any(part in name for part in KV_PROJECTIONS):
        return (kv_per_rank * head_dim, *shape[1:])
    if any(part in name for part in COLUMN_PARALLEL):
        return (shape[0] // tp, *shape[1:])
    if any(part in name for part in ROW_PARALLEL):
        return (shape[0], shape[1] // tp)
    return shape


def split_problems(num_heads: int, num_kv_heads: int, intermediate: int, vocab: int, hidden: int, head_dim: int,
                   tp: int, block: int = 1, block_name: str = "") -> list[str]:
    """Why `tp` ranks (and a format's `block`-weight groups along the inputs) cannot split these shapes evenly."""
    checks = [("attention heads", num_heads), ("intermediate size", intermediate), ("vocabulary", vocab)]
    problems = [f"{what} {n} is not divisible by tp={tp}" for what, n in checks if n % tp]
    if num_kv_heads % tp and tp % num_kv_heads:
        problems.append(f"kv heads {num_kv_heads} neither divide nor are divided by tp={tp}")
    if block > 1:
        inputs = {"hidden size": hidden, "o_proj input per rank": num_heads * head_dim // tp,
                  "down_proj input per rank": intermediate // tp}
        problems += [f"{what} {n} is not a multiple of {block_name}'s {block}-weight groups"
                     for what, n in inputs.items() if n % block]
    return problems


def check_split(config: ModelConfig, tp: int, block: int = 1, block_name: str = "") -> None:
    """One clear error where the decoder cannot be split over `tp` ranks (and, for a format that stores weights in
    groups of `block` along the inputs, on group boundaries)."""
    problems = split_problems(config.num_heads, config.num_kv_heads, config.intermediate_size, config.vocab_size,
                              config.hidden_size, config.head_dim, tp, block, block_name)
    if config.moe is not None and tp > 1:
        raise QwenError(f"this model cannot run with --tp {tp}: tensor parallelism does not split mixture-of-experts "
                        "layers yet; run it with --tp 1")
    if problems:
        raise QwenError(f"this model cannot run with --tp {tp}: {'; '.join(problems)}; choose a tp that divides them"
                        + (f" or another --quant than {block_name}" if block > 1 else ""))


def rank_shapes(config: ModelConfig, tp: int) -> dict[str, tuple[int, ...]]:
    """Every decoder tensor's shape on one rank (HF names)."""
    kv = kv_heads_per_rank(config.num_kv_heads, tp)
    return {name: shard_shape(name, shape, tp, kv, config.head_dim) for name, shape in config.checkpoint_shapes().items()}


@dataclass(frozen=True)
class RankSlices:
    """What rank `rank` of `tp` keeps of each decoder tensor (HF names): a loader cuts tensors with it as it reads
    them, so a rank never holds the whole model."""

    config: ModelConfig
    tp: int
    rank: int

    def rows(self, name: str, total: int) -> tuple[int, int] | None:
        """(first row, rows) where the rank keeps a block of whole rows of a tensor of `total` rows (q/k/v, gate/up,
        the vocabulary): a quantized file's rows can then be read alone. None where it keeps other parts."""
        if self.tp == 1:
            return None
        if any(part in name for part in KV_PROJECTIONS):
            d, count = self.config.head_dim, kv_heads_per_rank(self.config.num_kv_heads, self.tp)
            return first_kv_head(self.config.num_kv_heads, self.tp, self.rank) * d, count * d
        if any(part in name for part in COLUMN_PARALLEL):
            return self.rank * (total // self.tp), total // self.tp
        return None

    def columns(self, name: str, total: int) -> tuple[int, int] | None:
        """(first column, columns) the rank keeps of a row-parallel matrix (o, down) of `total` columns; else None."""
        if self.tp == 1 or not any(part in name for part in ROW_PARALLEL):
            return None
        return self.rank * (total // self.tp), total // self.tp

    def __call__(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """The rank's part of a whole tensor, copied out (from a memory-mapped file only that part is read)."""
        rows = self.rows(name, tensor.shape[0])
        if rows is not None:
            return tensor.narrow(0, *rows).clone()
        columns = None if tensor.dim() < 2 else self.columns(name, tensor.shape[1])
        return tensor if columns is None else tensor.narrow(1, *columns).clone()

    def blocks(self, name: str, blocks: BlockCodes) -> BlockCodes:
        """The rank's columns of a row-parallel matrix stored in blocks of 32 weights (a GGUF Q8_0/Q5_0 tensor whose
        rows were read whole), bit for bit: the split falls on block boundaries (`check_split` with the format's
        block)."""
        columns = self.columns(name, blocks.codes.shape[1])
        if columns is None:
            return blocks
        first, count = columns
        return type(blocks)(blocks.codes.narrow(1, first, count).clone(),
                            blocks.scales.narrow(1, first // 32, count // 32).clone(), blocks.bits)


def shard(name: str, tensor: torch.Tensor, config: ModelConfig, tp: int, rank: int) -> torch.Tensor:
    """Rank `rank`'s part of a whole decoder tensor (HF name)."""
    return RankSlices(config, tp, rank)(name, tensor)


def shard_config(config: ModelConfig, tp: int) -> ModelConfig:
    """The config as one rank's modules see it: its heads, kv heads, MLP width and vocabulary rows (the KV cache and
    the weight shapes follow from it)."""
    import dataclasses

    if tp == 1:
        return config
    check_split(config, tp)
    return dataclasses.replace(config, num_heads=config.num_heads // tp, num_kv_heads=kv_heads_per_rank(config.num_kv_heads, tp),
                               intermediate_size=config.intermediate_size // tp, vocab_size=config.vocab_size // tp)
