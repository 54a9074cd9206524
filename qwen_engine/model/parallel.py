"""A decoder rank's collectives under tensor parallelism (torch.distributed; gloo on the CPU, NCCL on GPUs): the sum
after each row-parallel projection, the vocabulary-parallel embedding's sum and the head's gather (sharding.py says
what each rank holds)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class TensorParallel:
    size: int
    rank: int
    group: Any = None  # the process group; None: the default one

    def all_reduce(self, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The sum of every rank's `x`, in place, then in `dtype` where given (partial products kept in float32 by
        a block format are rounded once, after the sum, as one process rounds the whole product)."""
        dist.all_reduce(x, group=self.group)
        return x if dtype is None else x.to(dtype)

    def gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's `x` side by side along the last dimension (the head's vocabulary slices, in rank order)."""
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)

    def vocab_lookup(self, table: nn.Module, token_ids: torch.Tensor, rows: int, dtype: torch.dtype) -> torch.Tensor:
        """Embeddings of `token_ids` from a vocabulary-parallel table (this rank holds rows rank·rows … (rank+1)·rows
        − 1, in any format): each rank looks up the ids it holds, zeros elsewhere, and the sum over ranks is every
        id's row (adding zeros changes no bit)."""
        local = token_ids - self.rank * rows
        outside = (local < 0) | (local >= rows)
        found = table(local.masked_fill(outside, 0)).to(dtype)
        return self.all_reduce(found.masked_fill_(outside[..., None], 0))
