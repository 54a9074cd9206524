"""Tiny random checkpoints for tests: HF directories written by transformers, and GGUF files written by gguf-py.

They reuse the default model's real tokenizer (and vocabulary size), so text round-trips through them as it does
through a real checkpoint, while the weights stay a few MB. Where the vocabulary is not the point (kernels, quantized
formats, file layouts), `small_vocabulary` cuts it to 2,048 rows: 150k embedding rows are most of a tiny model's
bytes, its writing, loading and converting.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFWriter

VOCAB = 151936

# A small vocabulary's layout: the first BPE tokens, then the real added tokens renumbered, then padding slots.
SMALL_VOCAB = 2048
SMALL_BPE_TOKENS = SMALL_VOCAB - 32
SMALL_IDS = {"bos_token_id": SMALL_BPE_TOKENS, "eos_token_id": SMALL_BPE_TOKENS + 2}  # <|endoftext|>, <|im_end|>
SMALL_VOCAB_CONFIG = {"vocab_size": SMALL_VOCAB, **SMALL_IDS}  # hf_config overrides for a small-vocabulary model
_BYTES = 256  # the first ids are the 256 byte tokens; the merge of rank k makes token 256 + k (qwen-family.md §1.6)
_ADDED_TYPES = (3, 4)  # GGUF token types: control, user-defined
_UNUSED_TYPE = 5

# Qwen2-architecture configs shaped like the real generations (qwen-family.md §2, §4, §5), scaled down.
SHAPES: dict[str, dict[str, Any]] = {
    # Qwen1.5: MHA, untied head.
    "qwen1.5": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=4, tie_word_embeddings=False, rms_norm_eps=1e-6),
    # Qwen2.5-0.5B: GQA 14/2, tied, head_dim 64.
    "qwen2.5-0.5b": dict(hidden_size=896 // 7, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=64, tie_word_embeddings=True, rms_norm_eps=1e-6),
    # QwQ-32B-Preview: GQA 40/8 scaled to 10/2, untied, eps 1e-5.
    "qwq": dict(hidden_size=80, intermediate_size=144, num_hidden_layers=3, num_attention_heads=10,
                num_key_value_heads=2, tie_word_embeddings=False, rms_norm_eps=1e-5),
}


def small_vocabulary(tokens: list[str], token_types: list[int], merges: list[str]) -> tuple[list[str], list[int], list[str]]:
    """GGUF tokenizer arrays cut to SMALL_VOCAB rows: the first BPE tokens with the merges that make them, the real
    added tokens (`<|im_start|>`, `<tool_call>` …) renumbered after them, padding slots to the end. Any text still
    encodes (down to bytes) and a chat template still finds its control tokens by name."""
    added = [(token, kind) for token, kind in zip(tokens, token_types) if kind in _ADDED_TYPES]
    padding = SMALL_VOCAB - SMALL_BPE_TOKENS - len(added)
    assert added[0][0] == "<|endoftext|>" and added[2][0] == "<|im_end|>" and padding >= 0  # SMALL_IDS
    kept_merges = merges[: SMALL_BPE_TOKENS - _BYTES]
    assert all("".join(m.split(" ", 1)) == tokens[_BYTES + k] for k, m in enumerate(kept_merges))
    small_tokens = [*tokens[:SMALL_BPE_TOKENS], *(token for token, _ in added),
                    *(f"[PAD{SMALL_VOCAB - padding + n}]" for n in range(padding))]
    small_types = [*token_types[:SMALL_BPE_TOKENS], *(kind for _, kind in added), *[_UNUSED_TYPE] * padding]
    return small_tokens, small_types, kept_merges


def hf_config(shape: str, **overrides: Any):
    from transformers import Qwen2Config

    fields = dict(vocab_size=VOCAB, max_position_embeddings=256, rope_theta=1e6, bos_token_id=151643,
                  eos_token_id=151645, use_sliding_window=False)
    fields.update(SHAPES[shape])
    fields.update(overrides)
    return Qwen2Config(**fields)


def random_model(config, seed: int = 0):
    """A transformers Qwen2ForCausalLM with random weights, biases included (zero-initialised ones are too easy)."""
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.normal_(0.0, 0.5 if "norm" not in name else 0.1).add_(1.0 if "norm" in name else 0.0)
    return model


def write_hf_checkpoint(directory: Path, model, tokenizer_files: Path, shard: bool = False) -> Path:
    """save_pretrained plus the real tokenizer files (tokenizer.json, tokenizer_config.json)."""
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, max_shard_size="2MB" if shard else "10GB", safe_serialization=True)
    for file in tokenizer_files.iterdir():
        (directory / file.name).write_bytes(file.read_bytes())
    return directory


def write_gguf(
    path: Path,
    state: dict[str, torch.Tensor],
    config: dict[str, Any],
    tokenizer: dict[str, Any],
    raw_tensors: dict[str, tuple[np.ndarray, GGMLQuantizationType]] | None = None,
    arch: str = "qwen2",
) -> Path:
    """A GGUF from HF-named (qwen2 layout) float tensors, stored F32, plus optional raw (already quantized) tensors
    under GGUF names, which replace the float tensor of the same name.

    arch "qwen" writes a v1 file (qwen-family.md §9.1): fused attn_qkv and the doubled feed_forward_length. A config
    with `num_experts` (Qwen2-MoE) writes llama.cpp's qwen2moe: each layer's experts stacked, the shared expert's
    gate a vector (a dense layer keeps its ffn_gate/up/down, which llama.cpp has no place for).
    """
    from qwen_engine.weights.gguf import _QWEN2_NAMES

    hf_to_gguf = {}
    for gguf_name, hf_name in _QWEN2_NAMES.items():
        for layer in range(config["num_hidden_layers"]):
            hf_to_gguf[hf_name.format(layer)] = gguf_name.format(layer)
    moe = "num_experts" in config
    if moe:
        state = dict(state)
        for layer in range(config["num_hidden_layers"]):
            mlp = f"model.layers.{layer}.mlp."
            for part in ("gate", "up", "down"):
                names = [f"{mlp}experts.{e}.{part}_proj.weight" for e in range(config["num_experts"])]
                if names[0] in state:
                    stacked = f"{mlp}experts.{part}_proj.weight"
                    state[stacked] = torch.stack([state.pop(name) for name in names])
                    hf_to_gguf[stacked] = f"blk.{layer}.ffn_{part}_exps.weight"
            if f"{mlp}shared_expert_gate.weight" in state:
                state[f"{mlp}shared_expert_gate.weight"] = state[f"{mlp}shared_expert_gate.weight"].reshape(-1)
        arch = "qwen2moe"
    if arch == "qwen":
        state = dict(state)
        for layer in range(config["num_hidden_layers"]):
            for kind in ("weight", "bias"):
                parts = [state.pop(f"model.layers.{layer}.self_attn.{p}_proj.{kind}") for p in "qkv"]
                state[f"model.layers.{layer}.self_attn.c_attn.{kind}"] = torch.cat(parts)
    writer = GGUFWriter(str(path), arch)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"] * (2 if arch == "qwen" else 1))
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_rope_freq_base(config["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    if moe:
        writer.add_expert_count(config["num_experts"])
        writer.add_expert_used_count(config["num_experts_per_tok"])
        writer.add_expert_feed_forward_length(config["moe_intermediate_size"])
        writer.add_expert_shared_feed_forward_length(config["shared_expert_intermediate_size"])
        writer.add_expert_weights_norm(config["norm_topk_prob"])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokenizer["tokens"])
    writer.add_token_types(tokenizer["token_types"])
    writer.add_token_merges(tokenizer["merges"])
    writer.add_eos_token_id(config["eos_token_id"])
    writer.add_bos_token_id(config["bos_token_id"])
    if tokenizer.get("chat_template"):
        writer.add_chat_template(tokenizer["chat_template"])
    for name, tensor in state.items():
        if hf_to_gguf[name] not in (raw_tensors or {}):
            writer.add_tensor(hf_to_gguf[name], tensor.detach().to(torch.float32).numpy())
    for name, (data, qtype) in (raw_tensors or {}).items():
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def hf_config_dict(config) -> dict[str, Any]:
    """config.json as written, with θ at the top level (transformers ≥ 5 nests it in rope_parameters)."""
    raw = json.loads(config.to_json_string())
    raw.setdefault("rope_theta", (raw.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    return raw


def to_v1_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Qwen2-layout (MHA) state dict in Qwen v1 names (qwen-family.md §1.2): fused c_attn, w2 = gate, w1 = up."""
    v1 = {
        "transformer.wte.weight": state["model.embed_tokens.weight"],
        "transformer.ln_f.weight": state["model.norm.weight"],
        "lm_head.weight": state["lm_head.weight"],
    }
    layers = {int(name.split(".")[2]) for name in state if name.startswith("model.layers.")}
    for i in layers:
        src, dst = f"model.layers.{i}.", f"transformer.h.{i}."
        attn = [state[f"{src}self_attn.{p}_proj.weight"] for p in "qkv"]
        bias = [state[f"{src}self_attn.{p}_proj.bias"] for p in "qkv"]
        v1.update({
            f"{dst}ln_1.weight": state[f"{src}input_layernorm.weight"],
            f"{dst}attn.c_attn.weight": torch.cat(attn),
            f"{dst}attn.c_attn.bias": torch.cat(bias),
            f"{dst}attn.c_proj.weight": state[f"{src}self_attn.o_proj.weight"],
            f"{dst}ln_2.weight": state[f"{src}post_attention_layernorm.weight"],
            f"{dst}mlp.w1.weight": state[f"{src}mlp.up_proj.weight"],
            f"{dst}mlp.w2.weight": state[f"{src}mlp.gate_proj.weight"],
            f"{dst}mlp.c_proj.weight": state[f"{src}mlp.down_proj.weight"],
        })
    return {name: tensor.detach().clone().contiguous() for name, tensor in v1.items()}


def v1_config(config, **overrides: Any) -> dict[str, Any]:
    """config.json of a Qwen v1 checkpoint with the shapes of a (MHA) Qwen2 config (qwen-family.md §1.1)."""
    raw = {
        "model_type": "qwen", "architectures": ["QWenLMHeadModel"], "hidden_size": config.hidden_size,
        "num_attention_heads": config.num_attention_heads, "kv_channels": config.hidden_size // config.num_attention_heads,
        "intermediate_size": 2 * config.intermediate_size, "num_hidden_layers": config.num_hidden_layers,
        "vocab_size": config.vocab_size, "rotary_emb_base": hf_config_dict(config)["rope_theta"],
        "layer_norm_epsilon": config.rms_norm_eps, "seq_length": 64, "max_position_embeddings": config.max_position_embeddings,
        "rotary_pct": 1.0, "use_dynamic_ntk": False, "use_logn_attn": False, "no_bias": True,
        "tie_word_embeddings": False, "scale_attn_weights": True,
    }
    raw.update(overrides)
    return raw


def write_qwen_tiktoken(path: Path, tokens: list[str]) -> Path:
    """qwen.tiktoken (base64 bytes, space, rank) for the first 151,643 tokens of a byte-level vocabulary."""
    import base64

    from qwen_engine.tokenizer import _byte_decoder

    byte_of = _byte_decoder()
    lines = [f"{base64.b64encode(bytes(byte_of[c] for c in token)).decode()} {rank}" for rank, token in enumerate(tokens[:151643])]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def official_state(config, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors of a Qwen-VL tower (a VisionConfig) under the checkpoint's `transformer.visual.*` names and
    shapes (qwen-family.md §6.2), prefix taken off."""
    from qwen_engine.model.vision import sincos_table

    g = torch.Generator().manual_seed(seed)
    w, d, m = config.width, config.output_dim, config.mlp_width

    def rand(*shape: int, scale: float = 0.05) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    state = {"conv1.weight": rand(w, 3, 14, 14), "positional_embedding": rand(256, w, scale=0.5),
             "ln_pre.weight": 1 + rand(w), "ln_pre.bias": rand(w)}
    for n in range(config.layers):
        block = f"transformer.resblocks.{n}."
        state |= {block + "ln_1.weight": 1 + rand(w), block + "ln_1.bias": rand(w),
                  block + "attn.in_proj.weight": rand(3 * w, w, scale=0.2), block + "attn.in_proj.bias": rand(3 * w),
                  block + "attn.out_proj.weight": rand(w, w, scale=0.2), block + "attn.out_proj.bias": rand(w),
                  block + "ln_2.weight": 1 + rand(w), block + "ln_2.bias": rand(w),
                  block + "mlp.c_fc.weight": rand(m, w, scale=0.2), block + "mlp.c_fc.bias": rand(m),
                  block + "mlp.c_proj.weight": rand(w, m, scale=0.2), block + "mlp.c_proj.bias": rand(w)}
    state |= {"attn_pool.query": rand(256, d, scale=0.5), "attn_pool.pos_embed": sincos_table(d, 16),
              "attn_pool.kv_proj.weight": rand(d, w, scale=0.2),
              "attn_pool.ln_q.weight": 1 + rand(d), "attn_pool.ln_q.bias": rand(d),
              "attn_pool.ln_kv.weight": 1 + rand(d), "attn_pool.ln_kv.bias": rand(d),
              "attn_pool.attn.in_proj_weight": rand(3 * d, d, scale=0.1), "attn_pool.attn.in_proj_bias": rand(3 * d),
              "attn_pool.attn.out_proj.weight": rand(d, d, scale=0.1), "attn_pool.attn.out_proj.bias": rand(d),
              "ln_post.weight": 1 + rand(d), "ln_post.bias": rand(d), "proj": rand(d, d, scale=0.1)}
    return state


TINY_VISUAL = {"image_size": 448, "patch_size": 14, "width": 48, "layers": 2, "heads": 4, "mlp_ratio": 2.5,
               "output_dim": 128, "image_start_id": 151857}  # patch and image size kept: the real preprocessing


def write_qwen_vl(directory: Path, tokens: list[str]) -> None:
    """A tiny Qwen-VL-Chat directory in the official layout: config.json with its `visual` sub-config, one
    model.safetensors with the v1 decoder and `transformer.visual.*`, qwen.tiktoken made of `tokens` (the default
    GGUF's vocabulary)."""
    from qwen_engine.config import VisionConfig

    config = hf_config("qwen1.5", hidden_size=128, intermediate_size=176, max_position_embeddings=2048)
    _write_multimodal(directory, tokens, config, 5, "visual", TINY_VISUAL, official_state(VisionConfig.from_dict(TINY_VISUAL)))


def _write_multimodal(directory: Path, tokens: list[str], config, seed: int, key: str, sub_config: dict[str, Any],
                      encoder: dict[str, torch.Tensor]) -> None:
    """A Qwen v1 checkpoint with an encoder: its tensors under `transformer.{key}.`, its config under `key`."""
    from safetensors.torch import save_file

    state = to_v1_state(random_model(config, seed=seed).state_dict())
    state |= {f"transformer.{key}.{name}": t for name, t in encoder.items()}
    directory.mkdir(parents=True, exist_ok=True)
    save_file(state, str(directory / "model.safetensors"))
    raw = v1_config(config, seq_length=2048, use_dynamic_ntk=True, use_logn_attn=True, **{key: sub_config})
    (directory / "config.json").write_text(json.dumps(raw), encoding="utf-8")
    write_qwen_tiktoken(directory / "qwen.tiktoken", tokens)


def official_audio_state(config, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors of a Qwen-Audio encoder (an AudioConfig) under the checkpoint's `transformer.audio.*` names and
    shapes (qwen-family.md §7.2), prefix taken off; the position table is the real sinusoids."""
    from qwen_engine.model.audio import sinusoids

    g = torch.Generator().manual_seed(seed)
    w, m, d = config.n_state, 4 * config.n_state, config.output_dim

    def rand(*shape: int, scale: float = 0.05) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    state = {"conv1.weight": rand(w, config.n_mels, 3), "conv1.bias": rand(w),
             "conv2.weight": rand(w, w, 3, scale=0.1), "conv2.bias": rand(w),
             "positional_embedding": sinusoids(config.n_ctx, w)}
    for n in range(config.n_layer):
        block = f"blocks.{n}."
        state |= {block + "attn_ln.weight": 1 + rand(w), block + "attn_ln.bias": rand(w),
                  block + "attn.query.weight": rand(w, w, scale=0.2), block + "attn.query.bias": rand(w),
                  block + "attn.key.weight": rand(w, w, scale=0.2),
                  block + "attn.value.weight": rand(w, w, scale=0.2), block + "attn.value.bias": rand(w),
                  block + "attn.out.weight": rand(w, w, scale=0.2), block + "attn.out.bias": rand(w),
                  block + "mlp_ln.weight": 1 + rand(w), block + "mlp_ln.bias": rand(w),
                  block + "mlp.0.weight": rand(m, w, scale=0.2), block + "mlp.0.bias": rand(m),
                  block + "mlp.2.weight": rand(w, m, scale=0.1), block + "mlp.2.bias": rand(w)}
    state |= {"ln_post.weight": 1 + rand(w), "ln_post.bias": rand(w),
              "proj.weight": rand(d, w, scale=0.2), "proj.bias": rand(d),
              "audio_bos_eos_token.weight": rand(2, d, scale=0.5)}
    return state


TINY_AUDIO = {"n_mels": 80, "n_ctx": 1500, "n_state": 64, "n_head": 4, "n_layer": 2, "output_dim": 128, "avg_pool": True,
              "add_audio_bos_eos_token": True, "audio_start_id": 155163}  # 80 mels kept: the real features
AUDIO_VOCAB = 155947  # Qwen-Audio's embedding rows (qwen-family.md §7.1)


def write_qwen_audio(directory: Path, tokens: list[str]) -> None:
    """A tiny Qwen-Audio(-Chat) directory in the official layout: config.json with its `audio` sub-config, one
    model.safetensors with the v1 decoder (155,947 embedding rows) and `transformer.audio.*`, qwen.tiktoken made of
    `tokens` (the default GGUF's vocabulary; the audio tokens come from the tokenizer itself)."""
    from qwen_engine.config import AudioConfig

    config = hf_config("qwen1.5", hidden_size=128, intermediate_size=176, max_position_embeddings=8192, vocab_size=AUDIO_VOCAB)
    _write_multimodal(directory, tokens, config, 7, "audio", TINY_AUDIO, official_audio_state(AudioConfig.from_dict(TINY_AUDIO)))


def assert_cli_chat_gives_the_librarys_reply(model, directory: Path, kind: str, path: str, capsys, monkeypatch) -> None:
    """`qwen chat --KIND PATH --once` and the interactive `/KIND PATH` both print the greedy reply the library gives
    to the same media part and text (KIND: image or audio)."""
    import io

    from qwen_engine import cli

    options = ["--model", str(directory), "--dtype", "float32", "--max-tokens", "3", "--temperature", "0"]
    expected = model.chat([{"role": "user", "content": [{"type": kind, kind: path}, {"type": "text", "text": "What?"}]}],
                          max_tokens=3, temperature=0)
    assert cli.main(["chat", *options, f"--{kind}", path, "--once", "What?"]) == 0
    assert capsys.readouterr().out == expected.text + "\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(f"/{kind} {path}\nWhat?\n"))
    assert cli.main(["chat", *options]) == 0
    assert capsys.readouterr().out == expected.text + "\n"


def encoder_info(directory: Path, key: str, capsys) -> tuple[dict[str, Any], str]:
    """`qwen info`'s facts on a checkpoint's encoder (`key`: vision_tower, audio_encoder): from --json, and the line
    the table prints."""
    from qwen_engine import cli

    assert cli.main(["info", "--json", "--model", str(directory)]) == 0
    facts = json.loads(capsys.readouterr().out)[key]
    assert cli.main(["info", "--model", str(directory)]) == 0
    label = key.replace("_", " ")
    return facts, next(line for line in capsys.readouterr().out.splitlines() if line.startswith(label))
