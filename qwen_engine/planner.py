"""What a model needs: weights, KV cache, activations and encoders for a precision, context, batch and tensor-parallel
degree; whether that fits a GPU, and the cheapest change that makes it fit.

Weights are counted tensor by tensor from the exact shapes (catalog.py), per GPU after the tensor-parallel split, so
quantization blocks, scales and divisibility are exact. The rest follows the formulas in `MemoryPlan`'s fields.
"""

from __future__ import annotations

import difflib
import json
import math
import os
from dataclasses import dataclass, field
from functools import cache
from typing import Callable

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from .catalog import DATA, CatalogEntry, local_entry, resolve
from .config import ModelConfig
from .errors import QwenError
from .runtime import DEFAULT_PREFILL_TOKENS
from .sharding import kv_heads_per_rank, shard_config, shard_shape, split_problems
from .weights.names import packed_with

GiB = 1 << 30
# Per GPU, beyond tensors: CUDA context, cuBLAS/cuDNN workspaces and allocator slack (typically 0.5–1 GiB).
GPU_OVERHEAD = 768 << 20
# The process itself on the CPU: Python, PyTorch with its kernels paged in, and the tokenizer (measured here: 0.29–0.37
# GiB, depending on how the kernel maps library pages), plus a loaded model's Python-side structures (~50 MB).
CPU_RUNTIME = 300 << 20
CPU_LOADED_MODEL = 50 << 20
# What a tensor-parallel worker rank lacks of those: the tokenizer (55 MB), the library's front end, the engine's
# sampling and detokenizing state (measured here: a worker peaks about 100 MB below rank 0).
CPU_FRONT_END = 100 << 20
MASK_BYTES = 1 + 4  # a prefill chunk's attention mask, per (query, key): bool, then float32
TP_DEGREES = (1, 2, 4, 8)
PRECISION_LADDER = ("fp32", "bf16", "int8", "int4")
PREFILL_PIECE = 1 << 24  # weights the CPU engine dequantizes at once in prefill (model/quantized.py)


@dataclass(slots=True, frozen=True)
class WeightFormat:
    """How a weight matrix is stored: bytes of a [rows, columns] matrix and of a vector."""

    name: str
    matrix_bytes: Callable[[int, int], int]
    vector_bytes: int  # per element (norms, biases)
    block: int = 1  # the columns of a quantized matrix must be a multiple of this (group or GGUF block)
    quantizes_embedding: bool = False  # GGUF files quantize the token embedding too; int8/int4 keep it 16-bit
    quantizes_head: bool = True  # the GPTQ/AWQ releases keep lm_head 16-bit
    activation_bytes: int = 2


def weight_format(text: str, group_size: int = 128) -> WeightFormat:
    """bf16, fp16, fp32, int8 (per output channel, a 16-bit scale per row), int4 (groups of `group_size` with a 16-bit
    scale and zero each), gptq-int4, gptq-int8 and awq (the official GPTQ/AWQ files, in groups of `group_size`) or
    gguf:<TYPE> (llama.cpp's block formats, e.g. gguf:Q4_K)."""
    name = text.lower()
    if name in ("bf16", "bfloat16", "fp16", "float16", "f16"):
        return WeightFormat(name, lambda r, c: 2 * r * c, 2)
    if name in ("fp32", "float32", "f32"):
        return WeightFormat(name, lambda r, c: 4 * r * c, 4, activation_bytes=4)
    if name == "int8":
        return WeightFormat(name, lambda r, c: r * c + 2 * r, 2)
    if name == "int4":
        return WeightFormat(name, lambda r, c: r * c // 2 + r * math.ceil(c / group_size) * 4, 2, block=group_size)
    if name in ("gptq-int4", "gptq-int8", "awq"):
        # The official releases' tensors (weights/gptq.py): qweight, qzeros (bits per value), fp16 scales per group
        # and output, and GPTQ's int32 g_idx per input.
        bits = 8 if name == "gptq-int8" else 4
        index = 0 if name == "awq" else 4

        def packed(r: int, c: int) -> int:
            groups = math.ceil(c / group_size)
            return c * r * bits // 8 + groups * r * bits // 8 + groups * r * 2 + c * index

        return WeightFormat(name, packed, 2, block=group_size, quantizes_head=False)
    if name.startswith("gguf:"):
        qtype = name.split(":", 1)[1].upper()
        try:
            block, size = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
        except KeyError:
            known = ", ".join(t.name for t in GGMLQuantizationType if t.name.startswith(("Q", "F", "BF")))
            raise QwenError(f"unknown GGUF type {qtype!r}: use one of {known}") from None
        return WeightFormat(name, lambda r, c: r * math.ceil(c / block) * size, 4, block=block, quantizes_embedding=True)
    raise QwenError(f"unknown precision {text!r}: use bf16, fp16, fp32, int8, int4, gptq-int4, gptq-int8, awq or "
                    "gguf:<TYPE> (e.g. gguf:Q4_K)")


KV_BYTES = {"bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "fp32": 4, "float32": 4, "fp8": 1, "int8": 1}


def kv_bytes(text: str) -> int:
    if text.lower() not in KV_BYTES:
        raise QwenError(f"unknown KV-cache dtype {text!r}: use {', '.join(sorted(KV_BYTES))}")
    return KV_BYTES[text.lower()]


@dataclass(slots=True)
class MemoryPlan:
    model: str
    precision: str
    context: int
    batch: int
    tp: int
    weights: int  # per GPU: every tensor's share after the tensor-parallel split
    kv_cache: int  # per GPU: 2 · L · (kv heads per GPU) · d · tokens · batch · bytes
    activations: int  # per GPU: a prefill of the whole context: gate/up, q/k/v and hidden rows, plus float32 logits
    encoders: int  # per GPU: vision/audio towers, replicated, 16-bit
    overhead: int  # per GPU: GPU_OVERHEAD
    host_ram: int  # this engine on the CPU, per process (rank 0 with --tp): CPU_RUNTIME + CPU_LOADED_MODEL + the above, prefill by DEFAULT_PREFILL_TOKENS
    host_ram_worker: int  # with --tp on the CPU, each other rank: host_ram without the encoders and CPU_FRONT_END
    host_ram_gpu_load: int  # loading onto GPUs: CPU_RUNTIME + the largest tensor in float32 (converted one at a time)
    problems: list[str] = field(default_factory=list)  # what cannot be split evenly: over the GPUs, or into the blocks
    per_token: int = 0  # KV and activation bytes per token of context (per GPU, per sequence)

    @property
    def per_gpu(self) -> int:
        return self.weights + self.kv_cache + self.activations + self.encoders + self.overhead

    @property
    def total_gpu(self) -> int:
        return self.per_gpu * self.tp


def _engine_cpu_bytes(entry: CatalogEntry, name: str, shape: tuple[int, ...]) -> int:
    """This engine's CPU default (`quant=auto`, bfloat16): a GGUF's Q5_0 blocks kept (all parts of a packed
    projection Q5_0), every other matrix in 8-bit blocks, vectors in bfloat16, and an untied GGUF embedding left in
    the file (model/quantized.py)."""
    if len(shape) == 1:
        return 2 * shape[0]
    stored = entry.stored_types or {}
    if "embed_tokens" in name and entry.file_format == "gguf" and not entry.config.tie_word_embeddings:
        return 0
    bits5 = all(stored.get(part) == "Q5_0" for part in packed_with(name))
    return shape[0] * (shape[1] // 32) * (22 if bits5 else 34)


def _packed_layer_matrices(config: ModelConfig) -> list[tuple[int, int]]:
    """The engine's per-layer matrices ([rows, columns]; q/k/v and gate/up packed, model/decoder.py)."""
    h, f, d = config.hidden_size, config.intermediate_size, config.head_dim
    return [((config.num_heads + 2 * config.num_kv_heads) * d, h), (h, config.num_heads * d), (2 * f, h), (h, f)]


def _prefill_piece(shape: tuple[int, int]) -> int:
    """Weights of the largest piece prefill dequantizes at once from this matrix (BlockLinear._dense_matmul)."""
    rows, columns = shape
    pieces = -(-rows * columns // PREFILL_PIECE)
    return -(-rows // pieces) * columns


def divisibility(entry: CatalogEntry, tp: int, fmt: WeightFormat) -> list[str]:
    """Why `tp` GPUs or the format's blocks cannot split this model evenly (empty when they can): sharding.py's
    rules, the loader's own."""
    config = entry.config
    width = config.intermediate_size if config.moe is None else config.moe.expert_size
    return split_problems(config.num_heads, config.num_kv_heads, width, config.vocab_size, config.hidden_size,
                          config.head_dim, tp, fmt.block, fmt.name)


def plan(entry: CatalogEntry, precision: str = "bf16", context: int | None = None, batch: int = 1,
         kv_dtype: str | None = None, tp: int = 1, group_size: int = 128) -> MemoryPlan:
    config = entry.config
    context = entry.context if context is None else context
    if context <= 0 or batch <= 0:
        raise QwenError(f"context ({context}) and batch ({batch}) must be positive")
    if tp not in TP_DEGREES:
        raise QwenError(f"tensor-parallel degree {tp} is not supported: use one of {', '.join(map(str, TP_DEGREES))}")
    if context > entry.context:
        raise QwenError(f"{entry.name} holds at most {entry.context} tokens; ask for --context ≤ {entry.context}")
    fmt = weight_format("gguf:Q8_0" if precision == "auto" else precision, group_size)
    kv_size = kv_bytes(kv_dtype) if kv_dtype else fmt.activation_bytes
    kv_per_gpu = kv_heads_per_rank(config.num_kv_heads, tp)
    weights = encoders = 0
    tensors = entry.tensors()
    for name, shape in tensors.items():
        local = shard_shape(name, shape, tp, kv_per_gpu, config.head_dim)
        if name.startswith(("visual.", "audio.")):  # encoders run unquantized, in the compute dtype
            encoders += math.prod(local) * fmt.activation_bytes
        elif precision == "auto":
            weights += _engine_cpu_bytes(entry, name, local)
        elif len(local) == 1:
            weights += local[0] * fmt.vector_bytes
        elif "embed_tokens" in name and not fmt.quantizes_embedding or name == "lm_head.weight" and not fmt.quantizes_head:
            weights += math.prod(local) * fmt.activation_bytes
        else:
            weights += fmt.matrix_bytes(local[0], math.prod(local[1:]))
    moe = config.moe
    mlp = 2 * (config.intermediate_size if moe is None else moe.shared_expert_size + moe.experts_per_token * moe.expert_size)
    qkv = (config.num_heads // tp + 2 * kv_per_gpu) * config.head_dim  # per GPU
    kv_token = 2 * config.num_layers * kv_per_gpu * config.head_dim * kv_size
    # The widest prefill temporaries at once: gate/up, q/k/v and two hidden rows, plus RMSNorm's float32 copies.
    act_token = (mlp // tp + qkv + 2 * config.hidden_size) * fmt.activation_bytes + 2 * config.hidden_size * 4
    logits = batch * config.vocab_size * 4
    problems = divisibility(entry, tp, fmt)
    rank_matrices = _packed_layer_matrices(shard_config(config, tp) if tp > 1 and not problems else config)
    workspace = 2 * max(map(_prefill_piece, rank_matrices)) if precision == "auto" else 0
    # Prompts go in chunks; a chunk after the first attends to the keys before it through a mask of chunk × context
    # (bool, and the float32 copy attention makes of it: measured, it is what a 4096-token prompt adds over 2048).
    chunk = min(context * batch, DEFAULT_PREFILL_TOKENS)
    mask = chunk * context * MASK_BYTES if context > DEFAULT_PREFILL_TOKENS else 0
    cpu_activations = act_token * chunk + logits + workspace + mask
    result = MemoryPlan(
        model=entry.name, precision="auto (this engine's CPU format)" if precision == "auto" else fmt.name, context=context, batch=batch, tp=tp, weights=weights,
        kv_cache=kv_token * context * batch, activations=act_token * context * batch + logits + workspace, encoders=encoders,
        overhead=GPU_OVERHEAD, host_ram=0, host_ram_worker=0, host_ram_gpu_load=CPU_RUNTIME + 4 * max(map(math.prod, tensors.values())),
        problems=problems, per_token=kv_token + act_token,
    )
    # On the CPU, per process: with --tp each rank holds its shard, its KV cache and the whole logits (gathered);
    # rank 0 also the encoders, the tokenizer and the front end.
    result.host_ram = CPU_RUNTIME + CPU_LOADED_MODEL + weights + result.kv_cache + cpu_activations + encoders
    result.host_ram_worker = result.host_ram - encoders - CPU_FRONT_END if tp > 1 else 0
    return result


@dataclass(slots=True)
class Fit:
    fits: bool
    max_context: int  # the longest context that fits at this batch (0: not even one token)
    max_batch: int  # the largest batch that fits at this context
    suggestion: str  # the cheapest change that makes it fit ("" when it fits)


def fit(entry: CatalogEntry, memory: int, precision: str = "bf16", context: int | None = None, batch: int = 1,
        kv_dtype: str | None = None, tp: int = 1, group_size: int = 128) -> Fit:
    """Against `memory` bytes per GPU. When it does not fit (or cannot be split evenly), the cheapest change is the
    first of these that works: another precision or smaller quantization groups (no new hardware, no lost context),
    a shorter context, then more GPUs."""
    base = plan(entry, precision, context, batch, kv_dtype, tp, group_size)
    per_sequence_logits = entry.config.vocab_size * 4
    shared = base.per_gpu - (base.per_token * base.context + per_sequence_logits) * batch  # grows with neither
    max_context = min(entry.context, max(0, (memory - shared - per_sequence_logits * batch) // (base.per_token * batch)))
    max_batch = max(0, (memory - shared) // (base.per_token * base.context + per_sequence_logits))
    if base.per_gpu <= memory and not base.problems:
        return Fit(True, max_context, max_batch, "")

    def works(candidate: MemoryPlan) -> bool:
        return candidate.per_gpu <= memory and not candidate.problems

    changes: list[tuple[str, Callable[[], MemoryPlan]]] = []
    if precision == "int4":
        changes += [(f"use int4 in groups of {g}", lambda g=g: plan(entry, "int4", base.context, batch, kv_dtype, tp, g))
                    for g in (64, 32) if g < group_size]
    if precision in PRECISION_LADDER:
        changes += [(f"use {other} weights", lambda other=other: plan(entry, other, base.context, batch, kv_dtype, tp, group_size))
                    for other in PRECISION_LADDER[PRECISION_LADDER.index(precision) + 1 :]]
    for description, candidate in changes:
        if works(result := candidate()):
            return Fit(False, max_context, max_batch, f"{description} ({result.per_gpu / GiB:.1f} GiB per GPU)")
    if max_context >= 1 and not base.problems:
        return Fit(False, max_context, max_batch, f"shorten the context to {max_context:,} tokens")
    if precision != "auto":  # auto is one CPU process: no GPUs to add
        for other_tp in TP_DEGREES:  # fewer GPUs first: a degree that splits evenly may need fewer, not more
            if other_tp != tp and works(result := plan(entry, precision, base.context, batch, kv_dtype, other_tp, group_size)):
                return Fit(False, max_context, max_batch,
                           f"use {other_tp} GPU{'s' if other_tp > 1 else ''} (tp={other_tp}: {result.per_gpu / GiB:.1f} GiB each)")
    reason = f" ({base.problems[0]})" if base.problems else ""
    return Fit(False, max_context, max_batch, f"no precision, context or up to 8 such GPUs makes it fit{reason}")


def memory_entry(model: str) -> CatalogEntry:
    """A catalog name, or a checkpoint on disk (its own config)."""
    from pathlib import Path

    if Path(model).expanduser().exists() or model == "default":
        return local_entry(model)
    return resolve(model)


@cache
def _gpus() -> dict[str, int]:
    raw = json.loads((DATA / "gpus.json").read_text(encoding="utf-8"))
    table = {}
    for gpu in raw["gpus"]:
        for name in (gpu["name"], *gpu.get("aliases", ())):
            table[_gpu_key(name)] = int(gpu["memory_mib"]) << 20
    return table


def _gpu_key(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def gpu_memory(name: str) -> int:
    """Bytes of memory of a GPU named in qwen_engine/data/gpus.json (names and aliases, case and spacing ignored)."""
    table = _gpus()
    key = _gpu_key(name)
    if key in table:
        return table[key]
    close = difflib.get_close_matches(key, list(table), n=3, cutoff=0.5)
    hint = f"; close: {', '.join(close)}" if close else ""
    raise QwenError(f"unknown GPU {name!r}{hint}; give its memory with --vram GB instead")


def plot_memory(entry: CatalogEntry, path: str, capacity: int | None, batch: int = 1, tp: int = 1, group_size: int = 128) -> None:
    """Memory per GPU against context length, one line per precision, and the GPU's capacity as a line."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise QwenError("--plot needs matplotlib: pip install matplotlib") from None
    contexts = sorted({max(1, entry.context * i // 64) for i in range(1, 65)})
    figure, axes = plt.subplots(figsize=(8, 5))
    for precision in ("fp32", "bf16", "int8", "int4"):
        usage = [plan(entry, precision, c, batch, None, tp, group_size).per_gpu / GiB for c in contexts]
        axes.plot(contexts, usage, label=precision)
    if capacity:
        axes.axhline(capacity / GiB, color="black", linestyle="--", label=f"GPU memory ({capacity / GiB:.0f} GiB)")
    axes.set(xlabel="context (tokens)", ylabel="memory per GPU (GiB)", title=f"{entry.name} (batch {batch}, tp={tp})")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    partial = f"{path}.partial.png"
    figure.savefig(partial, dpi=100)
    plt.close(figure)
    os.replace(partial, path)
