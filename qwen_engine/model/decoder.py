"""The one decoder for every Qwen text generation (qwen-family.md §0, §3.2).

Checkpoints are validated against the HF qwen2 names (`model.layers.N.self_attn.q_proj.weight`, …); other layouts
(GGUF, Qwen v1) are mapped onto those names by the weight loaders. The decoder stores q/k/v and gate/up
concatenated (`qkv_proj`, `gate_up_proj`): one larger matmul reads the activations once and costs one kernel
launch instead of three. Every projection is a plain `nn.Linear`, so quantization can swap them for packed modules.
Qwen2-MoE is the same decoder with a sparse MLP (SparseMoE) in the layers its config makes sparse.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig, MoeConfig
from ..errors import QwenError
from ..kernels import CpuKernels, cpu_kernels
from ..sharding import shard_config
from ..weights.names import PACKED
from .parallel import TensorParallel
from .rope import RotaryChoice, RotaryEmbedding, RotaryTables, apply_rotary


class SequenceBatch(Protocol):
    """Several sequences' tokens side by side in one forward [1, T, …] (the engine's batches): each keeps its own
    keys and values, positions and rotary frequencies, and attention runs per sequence (engine/paged.py)."""

    positions: torch.Tensor  # [T] each token's position in its sequence
    rotary_segments: list[tuple[RotaryChoice, int]]  # each sequence's frequencies and how many of the tokens it has

    def each_sequence(
        self, layer: int, keys: torch.Tensor, values: torch.Tensor
    ) -> Iterator[tuple[slice, int, torch.Tensor, torch.Tensor]]:
        """Store keys/values [1, n_kv, T, d] of this batch's tokens; yield for each sequence the slice of its tokens,
        the position of the first, and all of its keys/values up to its last token [1, n_kv, end, d]."""
        ...

    def decode_layout(self) -> PagedLayout | None:
        """Where the keys and values live, for a native step, when every sequence brings one token; else None."""
        ...


class PagedLayout(NamedTuple):
    """A paged cache as native code reads it: keys/values [L, n_kv, slots, d]; the slot of every position of every
    sequence (concatenated) and where each sequence's start; each sequence's position in this step."""

    keys: torch.Tensor
    values: torch.Tensor
    slots: torch.Tensor
    slot_starts: torch.Tensor
    positions: torch.Tensor


def native_kernels(x: torch.Tensor) -> CpuKernels | None:
    """The native row kernels for bfloat16 activations on the CPU (kernels/layer_ops.c: one pass each instead of
    several PyTorch ops, with the same roundings), or None: PyTorch ops then."""
    return cpu_kernels() if x.dtype == torch.bfloat16 and x.device.type == "cpu" else None


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, cast back, then × weight (qwen-family.md §0)."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual), or with no residual (norm(x), x): the residual connection before a
        norm is taken here, so the native kernel does both in one pass (the layout vLLM's layers use). With a
        residual, x must be a temporary of the caller's (a layer's output): the sum is written over it, so a long
        prefill allocates no tensor for it."""
        kernels = native_kernels(x)
        if kernels is not None:
            normed = kernels.rms_norm(x, self.weight, self.eps) if residual is None else kernels.add_rms_norm_(x, residual, self.weight, self.eps)
            if normed is not None:
                return normed, x
        summed = x if residual is None else x.add_(residual)
        # F.rms_norm is x · rsqrt(mean(x²) + eps) in one pass, bit for bit the three-op form in float32.
        normalized = F.rms_norm(summed.to(torch.float32), self.weight.shape, eps=self.eps)
        return self.weight * normalized.to(x.dtype), summed


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, parallel: TensorParallel | None = None) -> None:
        """`config` as this rank sees it (sharding.shard_config): its heads; under tensor parallelism the ranks'
        o_proj outputs are partial sums, added up by `parallel`."""
        super().__init__()
        self.layer, self.parallel = layer, parallel
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=False)
        # qwen-family.md §3.2: layers from max_window_layers on see the last `sliding_window` keys only.
        windowed = config.sliding_window is not None and layer >= config.max_window_layers
        self.window: int | None = config.sliding_window if windowed else None

    def forward(self, x: torch.Tensor, rope: RotaryTables, batch: SequenceBatch | None,
                keep: torch.Tensor | None = None) -> torch.Tensor:
        """Attention output of whole sequences from position 0 [B, T, H] without a batch, else of the batch's tokens
        [1, T, H] over each one's cached keys and values (stored here first). With `keep`, only those positions'
        (keys and values are still stored for all); in a batch each kept position must be the last of its sequence,
        and only its query is attended (a prefill's last layer needs one row, not the whole causal square)."""
        sequences, length, _ = x.shape
        qkv = self.qkv_proj(x)
        q, k, v = qkv.split((self.q_size, self.kv_size, self.kv_size), dim=-1)
        q = q.view(sequences, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(sequences, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(sequences, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        # Queries rotate with their own tables, which carry the LogN factor when it is on (see rope.py).
        if not self._rotate_native(qkv, rope):
            q, k = apply_rotary(q, rope.q_cos, rope.q_sin), apply_rotary(k, rope.cos, rope.sin)
        if batch is None:
            out = self._attend(q, k, v, 0)
            if keep is not None:
                out = out[:, :, keep]
        else:
            kept = None if keep is None else set(keep.tolist())
            parts = []
            for tokens, first, keys, values in batch.each_sequence(self.layer, k, v):
                if kept is not None:  # the last query alone, or none
                    last = tokens.stop - 1
                    if last not in kept:
                        continue
                    tokens, first = slice(last, tokens.stop), first + last - tokens.start
                parts.append(self._attend(q[:, :, tokens], keys, values, first))
            if kept is not None and len(parts) != len(kept):
                raise ValueError("in a batch, only the last position of a sequence can be kept")
            if not parts:  # a prefill chunk whose outputs nobody reads
                return x[:, :0]
            out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
        projected = self.o_proj(out.transpose(1, 2).reshape(sequences, out.shape[2], self.q_size))
        return projected if self.parallel is None else self.parallel.all_reduce(projected, x.dtype)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
        """Attention of queries at positions start… over the keys held (those up to the last query)."""
        k, v, mask, causal = self._visible(k, v, start, q.shape[2])
        # GQA: kv head j serves query heads j·g … j·g+g−1 (qwen-family.md §3.2), which is SDPA's enable_gqa layout.
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)

    def _rotate_native(self, qkv: torch.Tensor, rope: RotaryTables) -> bool:
        """Rotary embedding of q and k in place in the projection output [1, T, q|k|v] with the native kernel;
        False (nothing changed) where it does not apply. Both calls take the same checks, so neither fails alone."""
        kernels = native_kernels(qkv)
        if kernels is None or qkv.shape[0] != 1:
            return False
        rows = qkv[0]
        return (kernels.rotate_(rows, self.num_heads, self.head_dim, rope.q_cos, rope.q_sin)
                and kernels.rotate_(rows[:, self.q_size :], self.num_kv_heads, self.head_dim, rope.cos, rope.sin))

    def _visible(
        self, k: torch.Tensor, v: torch.Tensor, start: int, length: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, bool]:
        """Keys, values, mask and causal flag for queries at positions start…start+length−1: the query at position i
        sees the keys at positions j ≤ i, and with a sliding window only those with i − w < j. `k` holds the keys of
        positions 0…start+length−1. Keys no query of this call can see are sliced off first, so a decode step needs
        no mask at all; a prefill that starts at 0 and stays within the window is plain causal attention."""
        end = start + length
        first = 0 if self.window is None else max(start - self.window + 1, 0)
        if first:
            k, v = k[:, :, first:], v[:, :, first:]
        if length == 1:
            return k, v, None, False
        if k.shape[2] == length and (self.window is None or length <= self.window):
            return k, v, None, True
        key_pos = torch.arange(first, end, device=k.device)
        query_pos = torch.arange(start, end, device=k.device)
        distance = query_pos[:, None] - key_pos[None, :]
        mask = distance >= 0
        if self.window is not None:
            mask &= distance < self.window
        return k, v, mask, False


class MLP(nn.Module):
    """SwiGLU: down(SiLU(gate(x)) · up(x)), no biases."""

    def __init__(self, hidden: int, intermediate: int, parallel: TensorParallel | None = None) -> None:
        super().__init__()
        self.parallel = parallel  # sums the ranks' partial down_proj outputs
        self.gate_up_proj = nn.Linear(hidden, 2 * intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._swiglu(x)
        return out if self.parallel is None else self.parallel.all_reduce(out, x.dtype)

    def _swiglu(self, x: torch.Tensor) -> torch.Tensor:
        # A block-quantized projection fuses the whole SwiGLU into its prefill product (quantized.py BlockLinear).
        fused = getattr(self.gate_up_proj, "swiglu", None)
        mixed = fused(x) if fused is not None else None
        if mixed is not None:
            return self.down_proj(mixed)
        gate_up = self.gate_up_proj(x)
        gate, up = gate_up.chunk(2, dim=-1)
        # In place (here or in the kernel): the gate/up product is a temporary of this call, and prefill's peak
        # memory is made of these.
        kernels = native_kernels(gate_up)
        if kernels is None or not kernels.silu_mul_(gate_up.flatten(0, -2)):
            F.silu(gate, inplace=True).mul_(up)
        return self.down_proj(gate)


class PlainLinear(nn.Module):
    """x · Wᵀ in the compute dtype, no bias. Not an nn.Linear, so the weight formats leave it as it is: MoE's
    routing weights, where a requantized router would pick other experts."""

    def __init__(self, inputs: int, outputs: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(outputs, inputs), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class Router(PlainLinear):
    """A sparse layer's expert choice: softmax over the experts in float32, the top k, their weights renormalized
    where the config says so, in the compute dtype (transformers' Qwen2MoeTopKRouter)."""

    def __init__(self, hidden: int, moe: MoeConfig) -> None:
        super().__init__(hidden, moe.num_experts)
        self.top_k, self.normalize = moe.experts_per_token, moe.norm_topk_prob

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, H] → (weights [N, k] in x's dtype, experts [N, k])."""
        probabilities = torch.softmax(super().forward(x), dim=-1, dtype=torch.float32)
        weights, experts = torch.topk(probabilities, self.top_k, dim=-1)
        if self.normalize:
            weights /= weights.sum(dim=-1, keepdim=True)
        return weights.to(x.dtype), experts


class SparseMoE(nn.Module):
    """Qwen2-MoE's MLP: each token through the experts its router picks, their outputs weighted and summed, plus the
    shared expert's output scaled by sigmoid(shared_expert_gate(x)) (transformers' Qwen2MoeSparseMoeBlock). Each
    expert runs once per forward, on the rows routed to it, so decoding reads only the experts its tokens picked."""

    def __init__(self, hidden: int, moe: MoeConfig) -> None:
        super().__init__()
        self.gate = Router(hidden, moe)
        self.experts = nn.ModuleList(MLP(hidden, moe.expert_size) for _ in range(moe.num_experts))
        self.shared_expert = MLP(hidden, moe.shared_expert_size) if moe.shared_expert_size else None
        self.shared_expert_gate = PlainLinear(hidden, 1) if moe.shared_expert_size else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        weights, experts = self.gate(rows)
        out = torch.zeros_like(rows)
        for expert in torch.unique(experts).tolist():  # ascending, as transformers adds them up
            token, slot = torch.where(experts == expert)
            out.index_add_(0, token, self.experts[expert](rows[token]) * weights[token, slot, None])
        if self.shared_expert is not None:
            out += torch.sigmoid(self.shared_expert_gate(rows)) * self.shared_expert(rows)
        return out.view_as(x)


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)); each residual add is taken by the norm after it."""

    def __init__(self, config: ModelConfig, layer: int, parallel: TensorParallel | None = None) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer, parallel)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        moe = config.moe
        self.mlp = (SparseMoE(config.hidden_size, moe) if moe is not None and moe.is_sparse(layer)
                    else MLP(config.hidden_size, config.intermediate_size, parallel))

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None, rope: RotaryTables, batch: SequenceBatch | None,
        keep: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(the MLP output, the residual stream before it): their sum is the layer's output. With `keep` only those
        positions' (as llama.cpp's last layer skips the positions whose outputs nobody reads); keys and values are
        still computed and cached for all."""
        normed, residual = self.input_layernorm(x, residual)
        attention = self.self_attn(normed, rope, batch, keep)
        if keep is not None:
            residual = residual[:, keep]
            if not attention.shape[1]:
                return attention, residual
        normed, residual = self.post_attention_layernorm(attention, residual)
        return self.mlp(normed), residual


class Backbone(nn.Module):
    """Embeddings, layers and final norm: the HF `model.` prefix."""

    def __init__(self, config: ModelConfig, parallel: TensorParallel | None = None) -> None:
        super().__init__()
        # An explicit (uninitialised) table skips the random init: on the meta device that alone costs a second
        # of imports, and checkpoint weights replace it anyway. Under tensor parallelism: the rank's rows.
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size,
                                         _weight=torch.empty(config.vocab_size, config.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(config, i, parallel) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class QwenDecoder(nn.Module):
    """Token ids (or precomputed embeddings) in, next-token logits out.

    Under tensor parallelism (`parallel`) the decoder is one rank's shard: its modules are built from `shard` (the
    config as the rank sees it, sharding.py), the collectives join the ranks' parts, and every rank gets the whole
    logits; `config` stays the model's.
    """

    def __init__(self, config: ModelConfig, parallel: TensorParallel | None = None) -> None:
        super().__init__()
        self.config, self.parallel = config, parallel
        self.shard = config if parallel is None else shard_config(config, parallel.size)
        self.model = Backbone(self.shard, parallel)
        self.lm_head = nn.Linear(config.hidden_size, self.shard.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(config)
        # Optional native path for batches of one token per sequence (model/fused.py): the hidden state after all
        # layers, or None to decline.
        self.fused_decode: Callable[[torch.Tensor, RotaryTables, SequenceBatch], torch.Tensor | None] | None = None

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (the norms keep it whatever format the projections and the embedding are stored in)."""
        return self.model.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings [B, T, H]; image/audio features are written into this before `forward(inputs_embeds=…)`."""
        if self.parallel is not None:
            return self.parallel.vocab_lookup(self.model.embed_tokens, token_ids, self.shard.vocab_size, self.dtype)
        return self.model.embed_tokens(token_ids).to(self.dtype)

    def forward(
        self,
        token_ids: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        batch: SequenceBatch | None = None,
        logits_at: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [B, T, V] of whole sequences at positions 0…T−1 (no cache); with a `batch`, of its tokens [1, T]
        over the keys and values it holds. `logits_at` picks the positions whose logits are wanted (of dimension 1;
        in a batch, last positions of sequences): [B, len(logits_at), V], and the last layer computes their outputs
        only."""
        hidden = self.embed(token_ids) if inputs_embeds is None else inputs_embeds
        length = hidden.shape[1]
        end = length if batch is None else int(batch.positions.max()) + 1
        if end > self.config.context_length:
            raise QwenError(
                f"sequence of {end} tokens exceeds the model's context of {self.config.context_length}; "
                "shorten the prompt or lower max_tokens"
            )
        if batch is None:
            rope = self.rotary(length, hidden.dtype)
        else:
            rope = self.rotary.at(batch.positions.to(hidden.device), batch.rotary_segments, hidden.dtype)
        fused = None if batch is None or self.fused_decode is None else self.fused_decode(hidden, rope, batch)
        if fused is not None:
            hidden, residual = fused, None
            if logits_at is not None:
                hidden = hidden[:, logits_at]
        else:
            last, residual = len(self.model.layers) - 1, None
            for index, layer in enumerate(self.model.layers):
                hidden, residual = layer(hidden, residual, rope, batch, logits_at if index == last else None)
        if not hidden.shape[1]:  # a prefill chunk that does not reach the end of its prompt
            return hidden.new_empty(hidden.shape[0], 0, self.config.vocab_size)
        logits = self.lm_head(self.model.norm(hidden, residual)[0])
        return logits if self.parallel is None else self.parallel.gather_last(logits)

    def load_weights(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        """Take ownership of checkpoint tensors (HF names), checking names and shapes first.

        Tied checkpoints carry no `lm_head.weight`; the head then shares the embedding matrix.
        """
        expected = self.shard.checkpoint_shapes()
        if self.config.tie_word_embeddings and "lm_head.weight" in tensors:  # stored anyway by some tied checkpoints
            expected["lm_head.weight"] = (self.shard.vocab_size, self.config.hidden_size)
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected))
        mismatched = [
            f"{name} {tuple(tensors[name].shape)} (expected {shape})"
            for name, shape in expected.items()
            if name in tensors and tuple(tensors[name].shape) != shape
        ]
        problems = []
        for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)):
            if names:
                shown = ", ".join(names[:8]) + (f" … ({len(names)} in all)" if len(names) > 8 else "")
                problems.append(f"{label}: {shown}")
        if problems:
            raise QwenError(f"{source} does not match the model config — " + "; ".join(problems))
        tensors = dict(tensors)
        for name in list(tensors):
            module, _, kind = name.rpartition(".")
            parent, _, last = module.rpartition(".")
            for packed, parts in PACKED.items():
                if last == parts[0]:
                    names = [f"{parent}.{part}.{kind}" for part in parts]
                    tensors[f"{parent}.{packed}.{kind}"] = torch.cat([tensors.pop(stored) for stored in names])
        for name, tensor in tensors.items():
            module_name, _, param_name = name.rpartition(".")
            setattr(self.get_submodule(module_name), param_name, nn.Parameter(tensor, requires_grad=False))
        self._finish_loading()

    def adopt_state(self, state: dict[str, torch.Tensor]) -> None:
        """Take a state saved from a loaded (possibly quantized) decoder of the same structure."""
        missing, unexpected = self.load_state_dict(state, strict=False, assign=True)
        if unexpected or set(missing) - {"lm_head.weight"}:
            raise QwenError("the converted-weights cache does not fit this model; delete it and load again")
        self._finish_loading()

    def _finish_loading(self) -> None:
        tied = self.config.tie_word_embeddings and isinstance(self.lm_head, nn.Linear)
        if tied and self.lm_head.weight.is_meta:  # tied checkpoints store no head
            self.lm_head.weight = self.model.embed_tokens.weight
        # Built on the meta device, the rotary table is made again where the weights now live.
        self.rotary = RotaryEmbedding(self.config).to(self.device)
