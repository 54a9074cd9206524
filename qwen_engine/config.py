"""One configuration for every Qwen text generation, read from an HF `config.json` or from GGUF metadata.

The decoder is the same for Qwen1.5, Qwen2, Qwen2.5 and QwQ (qwen-family.md §0, §3.2); what differs between
checkpoints is captured by the fields below, so the model code never branches on the generation's name.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any, Self

from .errors import QwenError

SUPPORTED_ARCHITECTURES = ("qwen2", "qwen")  # "qwen" is the first generation (v1, qwen-family.md §1)


@dataclass(slots=True, frozen=True)
class RopeScaling:
    """YaRN context extension (qwen-family.md §3.3): s from `factor`, L0 from `original_max_position_embeddings`."""

    factor: float  # s
    original_max_position_embeddings: int  # L0
    only_long: bool = False  # apply only to sequences whose prefill is longer than L0 (static otherwise, as deployed)
    attention_factor: float | None = None  # m; default 0.1·ln(s) + 1
    beta_fast: float = 32.0
    beta_slow: float = 1.0

    def __post_init__(self) -> None:
        if not (self.factor >= 1 and self.original_max_position_embeddings > 0):
            raise QwenError(
                f"invalid rope scaling: factor={self.factor} must be ≥ 1 and original_max_position_embeddings="
                f"{self.original_max_position_embeddings} positive"
            )

    @classmethod
    def from_hf(cls, raw: dict[str, Any] | None, max_position_embeddings: int) -> RopeScaling | None:
        """From config.json's `rope_scaling`; None when absent or not YaRN (other kinds are refused)."""
        if not raw:
            return None
        kind = raw.get("rope_type", raw.get("type"))
        if kind in (None, "default"):
            return None
        if kind != "yarn":
            raise QwenError(f"unsupported rope_scaling type {kind!r}: qwen-engine implements yarn for the qwen2 family")
        return cls(
            factor=float(raw.get("factor", 1.0)),
            # The key the Qwen configs use; older files lack it, and L0 is then the trained context.
            original_max_position_embeddings=int(raw.get("original_max_position_embeddings") or max_position_embeddings),
            attention_factor=raw.get("attention_factor"),
            beta_fast=float(raw.get("beta_fast", 32.0)),
            beta_slow=float(raw.get("beta_slow", 1.0)),
        )

    @classmethod
    def parse(cls, spec: str, default_original: int) -> RopeScaling:
        """A command-line override: `yarn:FACTOR[:ORIGINAL][:long]`, e.g. `yarn:4` turns 32K into 128K."""
        parts = spec.split(":")
        try:
            if parts[0] != "yarn" or not 2 <= len(parts) <= 4:
                raise ValueError
            only_long = parts[-1] == "long"
            numbers = parts[1 : len(parts) - only_long]
            original = int(numbers[1]) if len(numbers) > 1 else default_original
            return cls(factor=float(numbers[0]), original_max_position_embeddings=original, only_long=only_long)
        except (ValueError, IndexError):
            raise QwenError(f"invalid rope scaling {spec!r}: use yarn:FACTOR[:ORIGINAL_CONTEXT][:long], e.g. yarn:4") from None


class EncoderConfig:
    """A multimodal checkpoint's encoder sub-config, read from config.json's dict: keys it does not know (they vary
    across revisions) are ignored, missing ones take the dataclass defaults."""

    __slots__ = ()

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Self:
        names = {field.name for field in fields(cls)}
        return cls(**{key: value for key, value in raw.items() if key in names})


@dataclass(frozen=True, slots=True)
class VisionConfig(EncoderConfig):
    """config.json's `visual` sub-config; unknown keys are ignored (defaults: Qwen-VL's, §6.1)."""

    image_size: int = 448
    patch_size: int = 14
    width: int = 1664
    layers: int = 48
    heads: int = 16
    mlp_ratio: float = 4.9231
    output_dim: int = 4096
    n_queries: int = 256
    image_start_id: int = 151857

    @property
    def grid(self) -> int:
        """Patches per side (32 at 448 px)."""
        return self.image_size // self.patch_size

    @property
    def mlp_width(self) -> int:
        return int(self.width * self.mlp_ratio)  # int(1664 · 4.9231) = 8192

    @property
    def pool_heads(self) -> int:
        return self.output_dim // 128  # the resampler's heads are 128 wide (§6.2)


@dataclass(frozen=True, slots=True)
class AudioConfig(EncoderConfig):
    """config.json's `audio` sub-config (Qwen-Audio's Whisper-large-v2 encoder, pooling and projection); unknown keys
    are ignored (defaults: Qwen-Audio's, qwen-family.md §7.1)."""

    n_mels: int = 80
    n_ctx: int = 1500  # positions of the sinusoid table: 30 s after conv2
    n_state: int = 1280
    n_head: int = 20
    n_layer: int = 32
    output_dim: int = 4096
    avg_pool: bool = True
    add_audio_bos_eos_token: bool = True
    audio_start_id: int = 155163  # <audio>; </audio> follows it (§7.4)


@dataclass(slots=True, frozen=True)
class MoeConfig:
    """Qwen2-MoE's sparse MLPs (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B; qwen-family.md §3.1, and transformers'
    `Qwen2MoeSparseMoeBlock` for the math): a router picks `experts_per_token` of `num_experts` SwiGLU experts per
    token, and a shared expert, gated by a sigmoid, runs for every token."""

    num_experts: int
    experts_per_token: int  # num_experts_per_tok
    expert_size: int  # moe_intermediate_size
    shared_expert_size: int  # shared_expert_intermediate_size (0: none)
    norm_topk_prob: bool = False  # the picked experts' probabilities renormalized to sum to 1
    sparse_step: int = 1  # decoder_sparse_step: layers i with (i + 1) % step == 0 are sparse
    dense_layers: tuple[int, ...] = ()  # mlp_only_layers: dense whatever the step

    def __post_init__(self) -> None:
        if not (0 < self.experts_per_token <= self.num_experts and self.expert_size > 0 and self.shared_expert_size >= 0
                and self.sparse_step > 0):
            raise QwenError(
                f"invalid MoE config: num_experts={self.num_experts}, num_experts_per_tok={self.experts_per_token}, "
                f"moe_intermediate_size={self.expert_size}, shared_expert_intermediate_size={self.shared_expert_size}, "
                f"decoder_sparse_step={self.sparse_step}; the checkpoint's config is damaged"
            )

    def is_sparse(self, layer: int) -> bool:
        return layer not in self.dense_layers and (layer + 1) % self.sparse_step == 0

    def mlp_shapes(self, hidden: int) -> dict[str, tuple[int, ...]]:
        """A sparse layer's MLP tensors, under `mlp.` (the HF names of the official checkpoints)."""
        f, shared = self.expert_size, self.shared_expert_size
        shapes: dict[str, tuple[int, ...]] = {"gate.weight": (self.num_experts, hidden)}
        for e in range(self.num_experts):
            shapes |= {f"experts.{e}.gate_proj.weight": (f, hidden), f"experts.{e}.up_proj.weight": (f, hidden),
                       f"experts.{e}.down_proj.weight": (hidden, f)}
        if shared:
            shapes |= {"shared_expert.gate_proj.weight": (shared, hidden), "shared_expert.up_proj.weight": (shared, hidden),
                       "shared_expert.down_proj.weight": (hidden, shared), "shared_expert_gate.weight": (1, hidden)}
        return shapes

    @classmethod
    def from_hf(cls, raw: dict[str, Any]) -> MoeConfig:
        return cls(
            num_experts=int(raw["num_experts"]),
            experts_per_token=int(raw["num_experts_per_tok"]),
            expert_size=int(raw["moe_intermediate_size"]),
            shared_expert_size=int(raw.get("shared_expert_intermediate_size") or 0),
            norm_topk_prob=bool(raw.get("norm_topk_prob", False)),
            sparse_step=int(raw.get("decoder_sparse_step") or 1),
            dense_layers=tuple(int(i) for i in raw.get("mlp_only_layers") or ()),
        )


@dataclass(slots=True, frozen=True)
class ModelConfig:
    """Shapes and constants of a decoder-only Qwen model (notation of qwen-family.md: H, n_h, n_kv, d, L, F, V)."""

    architecture: str
    vocab_size: int  # V: embedding rows (padded, larger than the tokenizer's vocabulary)
    hidden_size: int  # H
    intermediate_size: int  # F: the real SwiGLU width
    num_layers: int  # L
    num_heads: int  # n_h
    num_kv_heads: int  # n_kv
    head_dim: int  # d
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    qkv_bias: bool = True
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    rope_scaling: RopeScaling | None = None
    # Qwen v1 long context (qwen-family.md §1.4, §1.5): both keyed to the training length S = seq_length.
    use_dynamic_ntk: bool = False
    use_logn_attn: bool = False
    seq_length: int | None = None
    # Sliding-window attention (qwen-family.md §3.2): layers with index ≥ max_window_layers see the last
    # `sliding_window` keys only; None switches it off for every layer (all released configs).
    sliding_window: int | None = None
    max_window_layers: int = 0
    vision: VisionConfig | None = None  # Qwen-VL's visual tower (config.json's `visual`, qwen-family.md §6.1)
    audio: AudioConfig | None = None  # Qwen-Audio's encoder (config.json's `audio`, qwen-family.md §7.1)
    moe: MoeConfig | None = None  # Qwen2-MoE's experts (model_type qwen2_moe); None: every MLP dense

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise QwenError(
                f"unsupported architecture {self.architecture!r}: qwen-engine runs {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        sizes = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim")
        bad = [f"{name}={getattr(self, name)}" for name in sizes if not (isinstance(getattr(self, name), int) and getattr(self, name) > 0)]
        if bad:
            raise QwenError(f"invalid model config: {', '.join(bad)} (sizes must be positive integers); the checkpoint's config is damaged")
        if self.num_heads % self.num_kv_heads:
            raise QwenError(
                f"invalid model config: num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}; the checkpoint's config is damaged"
            )
        if self.head_dim % 2:
            raise QwenError(f"invalid model config: head_dim={self.head_dim} must be even for rotary embeddings")
        if not (self.rope_theta > 0 and self.rms_norm_eps > 0 and self.max_position_embeddings > 0):
            raise QwenError(
                f"invalid model config: rope_theta={self.rope_theta}, rms_norm_eps={self.rms_norm_eps}, "
                f"max_position_embeddings={self.max_position_embeddings} must all be positive"
            )

    @property
    def context_length(self) -> int:
        """Tokens a sequence may hold (prompt and completion together): YaRN extends L0 by its factor."""
        if self.rope_scaling is not None:
            scaled = int(self.rope_scaling.factor * self.rope_scaling.original_max_position_embeddings)
            return max(scaled, self.max_position_embeddings)
        return self.max_position_embeddings

    def checkpoint_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor a qwen2-layout checkpoint holds, with its PyTorch shape (qwen-family.md §3.2); a tied
        checkpoint stores no `lm_head.weight`."""
        h, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
        for i in range(self.num_layers):
            layer = {
                "input_layernorm.weight": (h,),
                "post_attention_layernorm.weight": (h,),
                "self_attn.q_proj.weight": (q, h),
                "self_attn.k_proj.weight": (kv, h),
                "self_attn.v_proj.weight": (kv, h),
                "self_attn.o_proj.weight": (h, q),
            }
            if self.moe is not None and self.moe.is_sparse(i):
                layer |= {f"mlp.{name}": shape for name, shape in self.moe.mlp_shapes(h).items()}
            else:
                layer |= {"mlp.gate_proj.weight": (f, h), "mlp.up_proj.weight": (f, h), "mlp.down_proj.weight": (h, f)}
            if self.qkv_bias:
                layer.update({"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,)})
            shapes.update({f"model.layers.{i}.{name}": shape for name, shape in layer.items()})
        if self.tie_word_embeddings:
            del shapes["lm_head.weight"]
        return shapes

    def parameter_count(self) -> int:
        """Exact tensor-element count (qwen-family.md §4, 'Computation')."""
        return sum(math.prod(shape) for shape in self.checkpoint_shapes().values())

    def active_parameter_count(self) -> int:
        """Every tensor but the experts a token's router leaves out: the "A14B" of Qwen2-57B-A14B (the parameter
        count itself for a dense model)."""
        if self.moe is None:
            return self.parameter_count()
        sparse = sum(self.moe.is_sparse(layer) for layer in range(self.num_layers))
        idle = (self.moe.num_experts - self.moe.experts_per_token) * 3 * self.hidden_size * self.moe.expert_size
        return self.parameter_count() - sparse * idle

    @classmethod
    def from_hf(cls, raw: dict[str, Any]) -> ModelConfig:
        """Build from a transformers `config.json` dict; unknown keys are ignored (they vary across revisions)."""
        model_type = raw.get("model_type", "")
        if model_type == "qwen":
            return cls._from_hf_v1(raw)
        if model_type not in ("qwen2", "qwen2_moe"):
            raise QwenError(
                f"unsupported model_type {model_type!r} in config.json: qwen-engine runs Qwen (v1) and the qwen2 family "
                "(Qwen1.5, Qwen2, Qwen2.5, QwQ, Qwen2-MoE)"
            )
        with _reading_config():
            hidden, heads = int(raw["hidden_size"]), int(raw["num_attention_heads"])
            eos = raw.get("eos_token_id")
            kv_heads, head_dim, rope_theta = raw.get("num_key_value_heads"), raw.get("head_dim"), raw.get("rope_theta")
            if rope_theta is None:
                # transformers ≥ 5 writes θ inside `rope_parameters`; the official configs have it at the top level.
                rope_parameters = raw.get("rope_parameters")
                rope_theta = rope_parameters.get("rope_theta") if isinstance(rope_parameters, dict) else None
            # Absent (None) values take their defaults; present ones, even 0, are validated by __post_init__.
            return cls(
                architecture="qwen2",
                vocab_size=int(raw["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(raw["intermediate_size"]),
                num_layers=int(raw["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(heads if kv_heads is None else kv_heads),
                head_dim=int(_derived_head_dim(hidden, heads) if head_dim is None else head_dim),
                rope_theta=float(10000.0 if rope_theta is None else rope_theta),
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
                max_position_embeddings=int(raw.get("max_position_embeddings", 32768)),
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                qkv_bias=bool(raw.get("attention_bias", True)),
                bos_token_id=raw.get("bos_token_id"),
                eos_token_ids=_as_id_tuple(eos),
                # transformers ≥ 5 writes the YaRN block as rope_parameters; the released configs as rope_scaling.
                rope_scaling=RopeScaling.from_hf(raw.get("rope_scaling") or raw.get("rope_parameters"),
                                                 int(raw.get("max_position_embeddings", 32768))),
                # qwen-family.md §3.2: the window exists only when use_sliding_window is true.
                sliding_window=int(raw["sliding_window"]) if raw.get("use_sliding_window") and raw.get("sliding_window") else None,
                max_window_layers=int(raw.get("max_window_layers") or 0),
                moe=MoeConfig.from_hf(raw) if model_type == "qwen2_moe" else None,
            )

    @classmethod
    def _from_hf_v1(cls, raw: dict[str, Any]) -> ModelConfig:
        """Qwen v1 keys (qwen-family.md §1.1): kv_channels is d, intermediate_size is twice the real MLP width."""
        if "n_embd" in raw and "hidden_size" not in raw:
            raise QwenError("this is a first-release Qwen-7B config (n_embd, n_head, …); use the v1.1 checkpoint (Sep 2023)")
        with _reading_config():
            if float(raw.get("rotary_pct", 1.0)) != 1.0:
                raise QwenError(f"rotary_pct={raw['rotary_pct']} is not supported: every released Qwen rotates all head dims")
            hidden, heads = int(raw["hidden_size"]), int(raw["num_attention_heads"])
            head_dim = raw.get("kv_channels")
            theta = raw.get("rope_theta", raw.get("rotary_emb_base", 10000.0))
            return cls(
                architecture="qwen",
                vocab_size=int(raw.get("padded_vocab_size") or raw["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(raw["intermediate_size"]) // 2,
                num_layers=int(raw["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=heads,
                head_dim=int(_derived_head_dim(hidden, heads) if head_dim is None else head_dim),
                rope_theta=float(theta),
                rms_norm_eps=float(raw.get("layer_norm_epsilon", 1e-6)),
                max_position_embeddings=int(raw.get("max_position_embeddings") or raw.get("seq_length") or 8192),
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                qkv_bias=True,  # c_attn always has a bias; no_bias concerns c_proj (qwen-family.md §1.2)
                bos_token_id=None,
                eos_token_ids=(151643,),  # <|endoftext|>, the v1 eod token (qwen-family.md §1.6)
                use_dynamic_ntk=bool(raw.get("use_dynamic_ntk", False)),
                use_logn_attn=bool(raw.get("use_logn_attn", False)),
                seq_length=int(raw.get("seq_length") or 2048),
                vision=VisionConfig.from_dict(raw["visual"]) if isinstance(raw.get("visual"), dict) else None,
                audio=AudioConfig.from_dict(raw["audio"]) if isinstance(raw.get("audio"), dict) else None,
            )

    @classmethod
    def from_gguf(cls, metadata: dict[str, Any]) -> ModelConfig:
        """Build from GGUF key/value metadata (qwen-family.md §9.3)."""
        arch = metadata.get("general.architecture", "")
        if arch not in (*SUPPORTED_ARCHITECTURES, "qwen2moe"):
            raise QwenError(f"unsupported GGUF architecture {arch!r}: qwen-engine runs {', '.join(SUPPORTED_ARCHITECTURES)} "
                            "and qwen2moe")

        def key(name: str, default: Any = None) -> Any:
            value = metadata.get(f"{arch}.{name}", default)
            if value is None:
                raise QwenError(f"GGUF metadata lacks {arch}.{name}; the file is incomplete or not a Qwen model")
            return value

        hidden, heads = int(key("embedding_length")), int(key("attention.head_count"))
        tokens = metadata.get("tokenizer.ggml.tokens")
        eos = metadata.get("tokenizer.ggml.eos_token_id")
        feed_forward = int(key("feed_forward_length"))
        scaling = None
        if metadata.get(f"{arch}.rope.scaling.type") == "yarn":
            scaling = RopeScaling(
                factor=float(metadata.get(f"{arch}.rope.scaling.factor", 1.0)),
                original_max_position_embeddings=int(metadata.get(f"{arch}.rope.scaling.original_context_length")
                                                     or key("context_length")),
            )
        moe = None
        if arch == "qwen2moe":  # llama.cpp's Qwen2-MoE: the qwen2 decoder with experts (the loader finds dense layers)
            moe = MoeConfig(
                num_experts=int(key("expert_count")),
                experts_per_token=int(key("expert_used_count")),
                expert_size=int(key("expert_feed_forward_length")),
                shared_expert_size=int(metadata.get(f"{arch}.expert_shared_feed_forward_length") or 0),
                norm_topk_prob=bool(metadata.get(f"{arch}.expert_weights_norm", False)),
            )
        return cls(
            architecture="qwen2" if moe is not None else arch,
            vocab_size=int(metadata.get(f"{arch}.vocab_size") or (len(tokens) if tokens else 0)),
            hidden_size=hidden,
            # qwen-family.md §9.1: for arch qwen (v1) the converter writes config's doubled intermediate_size.
            intermediate_size=feed_forward // 2 if arch == "qwen" else feed_forward,
            num_layers=int(key("block_count")),
            num_heads=heads,
            num_kv_heads=int(key("attention.head_count_kv", heads)),
            head_dim=int(metadata.get(f"{arch}.attention.key_length") or _derived_head_dim(hidden, heads)),
            rope_theta=float(key("rope.freq_base", 10000.0)),
            rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-6)),
            max_position_embeddings=int(key("context_length")),
            tie_word_embeddings=False,  # decided by the loader: true when the file has no output.weight
            bos_token_id=metadata.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=_as_id_tuple(eos),
            rope_scaling=scaling,
            moe=moe,
        )


@contextmanager
def _reading_config() -> Iterator[None]:
    """Missing keys and wrongly typed values in config.json become one clear error."""
    try:
        yield
    except KeyError as missing:
        raise QwenError(f"config.json lacks the required key {missing}; the checkpoint is incomplete") from None
    except (TypeError, ValueError) as err:
        raise QwenError(f"config.json has a value of the wrong type ({err}); the checkpoint's config is damaged") from None


def _derived_head_dim(hidden: int, heads: int) -> int:
    """H / n_h; 0 (rejected by validation with the offending sizes named) when n_h is not positive."""
    return hidden // heads if heads > 0 else 0


def _as_id_tuple(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    return (int(value),)
