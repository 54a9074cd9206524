"""A decoder rank's collectives under tensor parallelism (torch.distributed; gloo on the CPU, NCCL on GPUs): the sum
after each row-parallel projection, the vocabulary-parallel embedding's sum and the head's gather (sharding.py says
what each rank holds)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class TensorParallel:
    size: int
    rank: int
    group: Any = None  # the process group; None: the default one

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of every rank's `x`, in place."""
        dist.all_reduce(x, group=self.group)
        return x

    def gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's `x` side by side along the last dimension (the head's vocabulary slices, in rank order)."""
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)


class VocabParallelEmbedding(nn.Module):
    """Rows rank·V/tp … (rank+1)·V/tp − 1 of the table: each rank looks up the ids it holds (zeros elsewhere) and the
    sum over ranks is every id's row."""

    def __init__(self, rows: int, width: int, parallel: TensorParallel) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rows, width), requires_grad=False)
        self.parallel, self.start = parallel, parallel.rank * rows

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        local = token_ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        rows = F.embedding(local.masked_fill(outside, 0), self.weight)
        return self.parallel.all_reduce(rows.masked_fill_(outside[..., None], 0))
