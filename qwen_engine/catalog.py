"""The model catalog: every released Qwen model with its exact architecture, as data (qwen_engine/data/catalog.json,
values from qwen-family.md).

An entry holds the config.json its checkpoint ships; `config` turns it into the same `ModelConfig` the engine loads,
so shapes, parameter counts and memory plans come from one place, and a tiny model can be built from any entry by
scaling the config down. Vision and audio encoders and Qwen2-MoE's experts, which the text decoder does not cover,
are described by their tensor shapes (qwen-family.md §3.1, §6.2, §7.2).
"""

from __future__ import annotations

import difflib
import json
import math
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from .config import AudioConfig, ModelConfig, VisionConfig
from .errors import QwenError

DATA = Path(__file__).with_name("data")


@dataclass(slots=True, frozen=True)
class CatalogEntry:
    name: str  # the Hugging Face repo id
    family: str
    size: str
    variant: str  # base, chat or instruct
    context: int  # what the model card claims (with YaRN where the card says so)
    raw_config: dict[str, Any]
    reference_params: int | None  # an exact published count, where qwen-family.md gives one
    source: str
    # For a local checkpoint: its own config (a GGUF has no config.json) and how each tensor is stored.
    local_config: ModelConfig | None = None
    stored_types: dict[str, str] | None = None
    file_format: str | None = None  # "gguf" or "hf" for a local checkpoint

    @property
    def is_moe(self) -> bool:
        return self.config.moe is not None

    @property
    def config(self) -> ModelConfig:
        """The text decoder's config (Qwen2-MoE's experts included)."""
        if self.local_config is not None:
            return self.local_config
        return ModelConfig.from_hf(self.raw_config)

    def tensors(self) -> dict[str, tuple[int, ...]]:
        """Every tensor of the checkpoint in the engine's (qwen2) naming, encoders included."""
        shapes = self.config.checkpoint_shapes()
        if "visual" in self.raw_config:
            shapes.update(vision_shapes(VisionConfig.from_dict(self.raw_config["visual"])))
        if "audio" in self.raw_config:
            shapes.update(audio_shapes(AudioConfig.from_dict(self.raw_config["audio"]), self.config.hidden_size))
        return shapes

    def parameters(self) -> int:
        return sum(math.prod(shape) for shape in self.tensors().values())

    def embedding_parameters(self) -> int:
        """Input embedding and output head (the official "non-embedding" counts leave both out)."""
        tensors = self.tensors()
        return sum(math.prod(tensors[name]) for name in ("model.embed_tokens.weight", "lm_head.weight") if name in tensors)

    def encoder_parameters(self) -> int:
        return sum(math.prod(shape) for name, shape in self.tensors().items() if name.startswith(("visual.", "audio.")))


def vision_shapes(visual: VisionConfig) -> dict[str, tuple[int, ...]]:
    """Qwen-VL's ViT and resampler (qwen-family.md §6.2)."""
    width, patch, out, mlp = visual.width, visual.patch_size, visual.output_dim, visual.mlp_width
    queries = visual.n_queries
    grid = 16  # the learned 16×16 position table (interpolated to the 32×32 patch grid at 448 px)
    shapes: dict[str, tuple[int, ...]] = {
        "visual.conv1.weight": (width, 3, patch, patch),
        "visual.positional_embedding": (grid * grid, width),
        "visual.ln_pre.weight": (width,), "visual.ln_pre.bias": (width,),
        "visual.attn_pool.query": (queries, out), "visual.attn_pool.pos_embed": (queries, out),
        "visual.attn_pool.kv_proj.weight": (out, width),
        "visual.attn_pool.ln_q.weight": (out,), "visual.attn_pool.ln_q.bias": (out,),
        "visual.attn_pool.ln_kv.weight": (out,), "visual.attn_pool.ln_kv.bias": (out,),
        "visual.attn_pool.attn.in_proj_weight": (3 * out, out), "visual.attn_pool.attn.in_proj_bias": (3 * out,),
        "visual.attn_pool.attn.out_proj.weight": (out, out), "visual.attn_pool.attn.out_proj.bias": (out,),
        "visual.ln_post.weight": (out,), "visual.ln_post.bias": (out,),
        "visual.proj": (out, out),
    }
    for n in range(visual.layers):
        block = f"visual.transformer.resblocks.{n}."
        shapes.update({
            block + "ln_1.weight": (width,), block + "ln_1.bias": (width,),
            block + "attn.in_proj.weight": (3 * width, width), block + "attn.in_proj.bias": (3 * width,),
            block + "attn.out_proj.weight": (width, width), block + "attn.out_proj.bias": (width,),
            block + "ln_2.weight": (width,), block + "ln_2.bias": (width,),
            block + "mlp.c_fc.weight": (mlp, width), block + "mlp.c_fc.bias": (mlp,),
            block + "mlp.c_proj.weight": (width, mlp), block + "mlp.c_proj.bias": (width,),
        })
    return shapes


def audio_shapes(audio: AudioConfig, llm_hidden: int) -> dict[str, tuple[int, ...]]:
    """Qwen-Audio's Whisper-style encoder, pooling and projection (qwen-family.md §7.2); the fixed sinusoid
    position table is a buffer, not a parameter, and is left out."""
    width, mels = audio.n_state, audio.n_mels
    shapes: dict[str, tuple[int, ...]] = {
        "audio.conv1.weight": (width, mels, 3), "audio.conv1.bias": (width,),
        "audio.conv2.weight": (width, width, 3), "audio.conv2.bias": (width,),
        "audio.ln_post.weight": (width,), "audio.ln_post.bias": (width,),
        "audio.proj.weight": (audio.output_dim, width), "audio.proj.bias": (audio.output_dim,),
    }
    if audio.add_audio_bos_eos_token:
        shapes["audio.audio_bos_eos_token.weight"] = (2, llm_hidden)
    for n in range(audio.n_layer):
        block = f"audio.blocks.{n}."
        shapes.update({
            block + "attn_ln.weight": (width,), block + "attn_ln.bias": (width,),
            block + "attn.query.weight": (width, width), block + "attn.query.bias": (width,),
            block + "attn.key.weight": (width, width),
            block + "attn.value.weight": (width, width), block + "attn.value.bias": (width,),
            block + "attn.out.weight": (width, width), block + "attn.out.bias": (width,),
            block + "mlp_ln.weight": (width,), block + "mlp_ln.bias": (width,),
            block + "mlp.0.weight": (4 * width, width), block + "mlp.0.bias": (4 * width,),
            block + "mlp.2.weight": (width, 4 * width), block + "mlp.2.bias": (width,),
        })
    return shapes


@cache
def entries() -> tuple[CatalogEntry, ...]:
    raw = json.loads((DATA / "catalog.json").read_text(encoding="utf-8"))
    return tuple(
        CatalogEntry(
            name=item["name"], family=item["family"], size=item["size"], variant=item["variant"],
            context=int(item["context"]), raw_config=item["config"], reference_params=item.get("reference_params"),
            source=item.get("source", ""),
        )
        for item in raw["models"]
    )


def local_entry(path: str) -> CatalogEntry:
    """A checkpoint on disk (HF directory or GGUF file), described like a catalog entry from its own config."""
    from .checkpoint import open_checkpoint

    checkpoint = open_checkpoint(path)
    config = checkpoint.config
    raw = getattr(checkpoint, "raw_config", None) or {}
    return CatalogEntry(name=str(checkpoint.path), family="local", size="", variant="", context=config.context_length,
                        raw_config=raw, reference_params=None, source=str(checkpoint.path), local_config=config,
                        stored_types=checkpoint.stored_types(), file_format=checkpoint.format)


def _key(name: str) -> str:
    """What users type, normalised: case, an optional `Qwen/` prefix, and `_` for `.` in sizes (Qwen-1_8B)."""
    key = name.strip().lower()
    key = key.removeprefix("qwen/")
    return key.replace("_", ".")


@cache
def _index() -> dict[str, CatalogEntry]:
    return {_key(entry.name): entry for entry in entries()}


def resolve(name: str) -> CatalogEntry:
    """The entry for a repo id or its short form (`Qwen/Qwen2.5-7B-Instruct`, `qwen2.5-7b-instruct`); an unknown
    name is an error that suggests the closest ones."""
    index = _index()
    entry = index.get(_key(name))
    if entry is not None:
        return entry
    close = difflib.get_close_matches(_key(name), list(index), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(index[k].name for k in close)}?" if close else ""
    raise QwenError(f"unknown model {name!r}{hint} (`qwen models` lists the catalog)")
