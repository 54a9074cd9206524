"""A checkpoint on disk, whatever its format: config, tokenizer, chat template, generation defaults and tensors.

`open_checkpoint` reads only headers and small files, without torch, so `qwen info` is instant; `tensors()` does the
heavy work.
"""

from __future__ import annotations

import dataclasses
import functools
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .chat import ChatFormat, ChatTemplate, QwenV1ChatFormat
from .config import ModelConfig, RopeScaling
from .default_model import default_model_path
from .sampling_params import SamplingDefaults, SamplingParams
from .errors import QwenError
from .sharding import RankSlices
from .tokenizer import AUDIO_TOKENS, VL_IMAGE_TOKENS, Tokenizer
from .weights.gguf import GGUFCheckpoint, StoredRows, hf_name, open_gguf
from .weights.gptq import PARTS, PackedFormat, PackedLayers
from .weights.safetensors import load_weights, read_json, shard_files, stored_dtypes
from .weights.v1 import fused_parts, split_fused_qkv, v1_name

if TYPE_CHECKING:
    import torch

    from .weights.quants import BlockCodes

Progress = Callable[[Iterator], Iterator]



@dataclass(slots=True)
class ModelInfo:
    """What `qwen info` reports."""

    source: str
    format: str
    config: ModelConfig
    tensor_types: dict[str, int]
    has_chat_template: bool
    sampling_defaults: SamplingDefaults


class Checkpoint(ABC):
    """Common surface of the checkpoint formats."""

    path: Path
    format: str
    config: ModelConfig
    chat_template_source: str | None
    generation_config: Mapping[str, Any] | None = None  # generation_config.json; None where there is none (a GGUF)

    @abstractmethod
    def tokenizer(self) -> Tokenizer:
        ...

    def chat_template(self, tokenizer: Tokenizer) -> ChatFormat:
        """The checkpoint's jinja template; Qwen v1 ships none and has its own layout (qwen-family.md §1.7)."""
        if self.chat_template_source is None and self.config.architecture == "qwen":
            window = (self.generation_config or {}).get("max_window_size", QwenV1ChatFormat.DEFAULT_WINDOW)
            return QwenV1ChatFormat(window)
        return ChatTemplate(self.chat_template_source, self.template_tokens(tokenizer))

    @abstractmethod
    def template_tokens(self, tokenizer: Tokenizer) -> dict[str, str | None]:
        """The special-token strings a template may refer to (`bos_token`, `eos_token`, …)."""

    def sampling_defaults(self) -> SamplingParams:
        """What a request leaves out (`info().sampling_defaults` also says where each value comes from)."""
        return SamplingDefaults.of(self.generation_config).params

    @abstractmethod
    def stored_types(self) -> dict[str, str]:
        """Checkpoint tensor name (HF layout) → how it is stored: a GGUF type ("Q5_0") or a dtype ("BF16")."""

    def stored_blocks(self, name: str, shard: RankSlices | None = None) -> BlockCodes | None:
        """The tensor's Q8_0/Q5_0 blocks as stored (HF name), for formats that keep them bit for bit; else None.
        With `shard`: a tensor-parallel rank's part of them."""
        return None

    def stored_rows(self, name: str, shard: RankSlices | None = None) -> StoredRows | None:
        """A matrix whose rows can be read from the file on demand (HF name); None where the format has no reader.
        With `shard`: the rank's rows of it."""
        return None

    def tensor_types(self) -> dict[str, int]:
        return dict(Counter(self.stored_types().values()))

    @abstractmethod
    def files(self) -> list[Path]:
        """The files the weights come from."""

    def fingerprint(self) -> str:
        """Changes when any source file is replaced or modified."""
        return "|".join(f"{f.resolve()}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in self.files())

    @abstractmethod
    def tensors(self, dtype: torch.dtype, device: torch.device, progress: Progress = iter,
                placeholders: frozenset[str] = frozenset(), shard: RankSlices | None = None) -> dict[str, torch.Tensor]:
        """Every tensor under its HF name; `placeholders` may come back as meta tensors (not read) where the format
        lets a caller read them another way (`stored_blocks`, `stored_rows`); `shard` keeps a rank's slice of each
        (taken as each tensor is read, so a rank never holds the whole model)."""

    def info(self) -> ModelInfo:
        return ModelInfo(str(self.path), self.format, self.config, self.tensor_types(), self.chat_template_source is not None,
                         SamplingDefaults.of(self.generation_config))


class GGUFSource(Checkpoint):
    format = "gguf"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.gguf: GGUFCheckpoint = open_gguf(path)
        meta = self.gguf.metadata
        # GGUF files of tied models carry no output.weight (qwen-family.md §9.1).
        config = ModelConfig.from_gguf(meta)
        if config.moe is not None:  # a layer with a dense MLP (mlp_only_layers) stores ffn_gate, not experts
            dense = tuple(i for i in range(config.num_layers) if self.gguf.has_tensor(f"blk.{i}.ffn_gate.weight"))
            config = dataclasses.replace(config, moe=dataclasses.replace(config.moe, dense_layers=dense))
        self.config = dataclasses.replace(config, tie_word_embeddings=not self.gguf.has_tensor("output.weight"))
        self.chat_template_source = meta.get("tokenizer.chat_template")
        self._entries = {hf_name(entry.name): entry for entry in self.gguf.entries}  # by HF name

    def tokenizer(self) -> Tokenizer:
        meta = self.gguf.metadata
        if "tokenizer.ggml.tokens" not in meta or "tokenizer.ggml.merges" not in meta:
            raise QwenError(f"{self.path} carries no tokenizer (tokenizer.ggml.tokens/merges); use a GGUF converted with its tokenizer")
        types = meta.get("tokenizer.ggml.token_type") or [1] * len(meta["tokenizer.ggml.tokens"])
        return Tokenizer.from_gguf(meta["tokenizer.ggml.tokens"], types, meta["tokenizer.ggml.merges"])

    def template_tokens(self, tokenizer: Tokenizer) -> dict[str, str | None]:
        def text(token_id: int | None) -> str | None:
            return None if token_id is None else tokenizer.decode([token_id], skip_special=False)

        eos = self.config.eos_token_ids[0] if self.config.eos_token_ids else None
        return {"bos_token": text(self.config.bos_token_id), "eos_token": text(eos)}

    def stored_types(self) -> dict[str, str]:
        return {name: entry.qtype.name for name, entry in self._entries.items()}

    def stored_blocks(self, name: str, shard: RankSlices | None = None) -> BlockCodes | None:
        from .weights.quants import block_codes  # torch: only where the blocks are read

        entry = self._entries.get(name)
        if entry is None:
            return None
        # Read with os.pread, not through the mapping: the file's pages then stay out of this process's memory (a
        # first start peaked 0.5 GB higher, the whole file mapped in). A tensor-parallel rank reads its rows only,
        # then keeps its columns.
        first, count = (None if shard is None else shard.rows(name, entry.shape[0])) or (0, entry.shape[0])
        blocks = block_codes(self.gguf.read_rows(entry, first, count), entry.qtype, (count, *entry.shape[1:]))
        return blocks if blocks is None or shard is None else shard.blocks(name, blocks)

    def stored_rows(self, name: str, shard: RankSlices | None = None) -> StoredRows | None:
        entry = self._entries.get(name)
        if entry is None or len(entry.shape) != 2:
            return None
        span = None if shard is None else shard.rows(name, entry.shape[0])
        if span is not None:
            row_bytes = entry.nbytes // entry.shape[0]
            entry = dataclasses.replace(entry, offset=entry.offset + span[0] * row_bytes, shape=(span[1], entry.shape[1]),
                                        nbytes=span[1] * row_bytes)
        return StoredRows(self.path, entry)

    def files(self) -> list[Path]:
        return [self.path]

    def tensors(self, dtype: torch.dtype, device: torch.device, progress: Progress = iter,
                placeholders: frozenset[str] = frozenset(), shard: RankSlices | None = None) -> dict[str, torch.Tensor]:
        # Unfused tensors split by rows are read row by row from the file (v1's fused attn_qkv is split first).
        rows = None if shard is None or self.config.architecture == "qwen" else shard.rows
        return self.gguf.tensors(dtype, device, progress, placeholders, _each(lambda name: name, shard), rows)


class HFSource(Checkpoint):
    format = "hf"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tokenizer_config = self._optional_json("tokenizer_config.json") or {}
        self.generation_config = self._optional_json("generation_config.json")
        self.raw_config = read_json(path / "config.json")  # as shipped, for the catalog's view of a local model
        config = ModelConfig.from_hf(self.raw_config)
        eos = (self.generation_config or {}).get("eos_token_id")
        if eos is not None:
            extra = tuple(eos) if isinstance(eos, list) else (eos,)
            config = dataclasses.replace(config, eos_token_ids=tuple(dict.fromkeys(config.eos_token_ids + extra)))
        self.config = config
        self.chat_template_source = self._chat_template_source()
        # GPTQ/AWQ releases: config.json's quantization_config, or quantize_config.json beside it (older GPTQ files)
        packing = self.raw_config.get("quantization_config") or self._optional_json("quantize_config.json")
        self.packed = PackedFormat.from_config(packing) if packing else None
        self._last_blocks: tuple[str | None, BlockCodes | None] = (None, None)  # stored_blocks' last layer
        if self.packed is not None:
            self.format = f"hf-{self.packed.name}"

    def _optional_json(self, name: str) -> dict[str, Any] | None:
        return read_json(self.path / name) if (self.path / name).exists() else None

    def _chat_template_source(self) -> str | None:
        """From chat_template.jinja (newer transformers) or tokenizer_config.json (a string or named templates)."""
        jinja_file = self.path / "chat_template.jinja"
        if jinja_file.exists():
            return jinja_file.read_text(encoding="utf-8")
        template = self.tokenizer_config.get("chat_template")
        if isinstance(template, list):
            named = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, dict)}
            return named.get("default") or next(iter(named.values()), None)
        return template

    def tokenizer(self) -> Tokenizer:
        media = VL_IMAGE_TOKENS if self.config.vision is not None else AUDIO_TOKENS if self.config.audio is not None else ()
        return Tokenizer.from_hf_dir(self.path, media)

    def template_tokens(self, tokenizer: Tokenizer) -> dict[str, str | None]:
        def content(value: Any) -> str | None:  # written as a string or as {"content": …}
            return value.get("content") if isinstance(value, dict) else value

        names = ("bos_token", "eos_token", "pad_token", "unk_token")
        return {name: content(self.tokenizer_config.get(name)) for name in names}

    def _checkpoint_name(self, name: str) -> str:
        """qwen2-layout name of a stored tensor (v1 checkpoints use their own names, qwen-family.md §1.2)."""
        return v1_name(name) if self.config.architecture == "qwen" else name

    def stored_types(self) -> dict[str, str]:
        types = {self._checkpoint_name(name): dtype for name, dtype in stored_dtypes(self.path).items()}
        if self.packed is not None and self.packed.block_type:
            # A GPTQ/AWQ layer whose values are blocks of 32 as they stand: the CPU formats keep them (stored_blocks),
            # v1's fused c_attn as the blocks of its q, k and v rows.
            types |= dict.fromkeys(self._packed_layer_of, self.packed.block_type)
        return types

    def stored_blocks(self, name: str, shard: RankSlices | None = None) -> BlockCodes | None:
        if self.packed is None or shard is not None:
            return None  # (a rank's part is requantized from the float weight)
        found = self._packed_layer_of.get(name)
        if found is None:
            return None
        layer, index, count = found
        if count == 1:
            return self.packed.blocks(self._packed_parts[layer], layer)
        if self._last_blocks[0] != layer:  # v1's q, k and v: asked for one after another, unpacked once
            self._last_blocks = (layer, self.packed.blocks(self._packed_parts[layer], layer))
        blocks = self._last_blocks[1]
        if blocks is None:
            return None
        rows = slice(index * len(blocks.codes) // count, (index + 1) * len(blocks.codes) // count)
        return type(blocks)(blocks.codes[rows], blocks.scales[rows], blocks.bits)

    @functools.cached_property
    def _packed_parts(self) -> dict[str, dict[str, torch.Tensor]]:
        """Every packed layer's parts (memory-mapped) under its stored name, read once for all of stored_blocks' calls."""
        layers: dict[str, dict[str, torch.Tensor]] = {}
        for name, tensor in load_weights(self.path, None, "cpu", keep=lambda stored: stored.rpartition(".")[2] in PARTS).items():
            layer, _, part = name.rpartition(".")
            layers.setdefault(layer, {})[part] = tensor
        return layers

    @functools.cached_property
    def _packed_layer_of(self) -> dict[str, tuple[str, int, int]]:
        """HF weight name → (the stored packed layer that holds it, which of its parts, how many: v1's fused c_attn
        holds q, k and v), from the files' headers."""
        found = {}
        for stored in stored_dtypes(self.path):
            if stored.endswith(".qweight"):
                layer = stored.removesuffix(".qweight")
                parts = fused_parts(self._checkpoint_name(layer + ".weight"))
                found |= {part: (layer, index, len(parts)) for index, part in enumerate(parts)}
        return found

    def files(self) -> list[Path]:
        return [self.path / "config.json", *shard_files(self.path)]

    def tensors(self, dtype: torch.dtype, device: torch.device, progress: Progress = iter,
                placeholders: frozenset[str] = frozenset(), shard: RankSlices | None = None) -> dict[str, torch.Tensor]:
        """The decoder's tensors (a Qwen-VL tower's and a Qwen-Audio encoder's are `encoder_tensors`); a GPTQ or AWQ
        layer's packed parts become its float weight (weights/gptq.py)."""
        each = _each(self._checkpoint_name, shard)
        if self.packed is None:
            return load_weights(self.path, dtype, device, progress, keep=lambda name: not name.startswith(ENCODER_PREFIXES),
                                each=each)
        packed = PackedLayers(self.packed)
        loaded = load_weights(self.path, dtype, device, progress, keep=lambda name: not name.startswith(ENCODER_PREFIXES),
                              each=lambda name, tensor: {} if packed.add(name, tensor) else each(name, tensor))
        # Layers a caller takes as blocks (stored_blocks, whole only) are never unpacked to float.
        def as_blocks(name: str) -> bool:
            return shard is None and all(part in placeholders for part in fused_parts(self._checkpoint_name(name)))

        for name, weight in packed.weights(as_blocks).items():
            loaded |= {part: tensor if tensor.is_meta else tensor.to(device=device, dtype=dtype)
                       for part, tensor in each(name, weight).items()}
        return loaded

    def encoder_tensors(self, prefix: str, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
        """An encoder's tensors under its module names, `prefix` taken off: Qwen-VL's tower (VISION_PREFIX,
        qwen-family.md §6.2), Qwen-Audio's encoder (AUDIO_PREFIX, §7.2)."""
        loaded = load_weights(self.path, dtype, device, keep=lambda name: name.startswith(prefix))
        return {name[len(prefix):]: tensor for name, tensor in loaded.items()}


def _each(rename: Callable[[str], str], shard: RankSlices | None) -> Callable[[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A stored tensor under its HF name(s), v1's fused c_attn split into q/k/v, each part cut to the rank's slice."""
    def each(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = split_fused_qkv({rename(name): tensor})
        return parts if shard is None else {part: shard(part, piece) for part, piece in parts.items()}
    return each


VISION_PREFIX = "transformer.visual."  # Qwen-VL's tower in a v1 checkpoint
AUDIO_PREFIX = "transformer.audio."  # Qwen-Audio's encoder
ENCODER_PREFIXES = (VISION_PREFIX, AUDIO_PREFIX)


def open_checkpoint(model: str | Path, progress: bool = False, rope_scaling: str | None = None) -> Checkpoint:
    """`model` is "default", a GGUF file or an HF checkpoint directory; `rope_scaling` overrides the config's."""
    checkpoint = _open(model, progress)
    if rope_scaling is not None:
        if checkpoint.config.architecture != "qwen2":
            raise QwenError("--rope-scaling applies to the qwen2 family; Qwen v1 extends its context with dynamic NTK")
        scaling = RopeScaling.parse(rope_scaling, checkpoint.config.max_position_embeddings)
        checkpoint.config = dataclasses.replace(checkpoint.config, rope_scaling=scaling)
    return checkpoint


def _open(model: str | Path, progress: bool) -> Checkpoint:
    if str(model) == "default":
        return GGUFSource(default_model_path(progress=progress))
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise QwenError(f"{path} is a directory without config.json; point --model at an HF checkpoint directory or a .gguf file")
        return HFSource(path)
    if path.is_file():
        return GGUFSource(path)
    raise QwenError(f"model {str(model)!r} not found: pass 'default', a .gguf file or an HF checkpoint directory")
