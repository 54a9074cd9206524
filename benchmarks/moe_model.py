"""A random-weight Qwen2-MoE GGUF at Qwen1.5-MoE-A2.7B's shape (llama.cpp's qwen2moe, Q5_0 blocks), for timing MoE
decoding against llama.cpp on the same file:

    python benchmarks/moe_model.py /tmp/moe24.gguf
    python benchmarks/run.py --model /tmp/moe24.gguf --classes native=DIR --skip-perplexity --output /tmp/moe.md

The shape (hidden 2048, 16 heads, 60 experts of 1,408 of which 4 a token, a shared expert of 5,632: the
Qwen1.5-MoE-A2.7B config), all 24 layers by default (14.3 B parameters, 9.2 GiB; writing it peaks at 10.5 GB of
memory), or `--layers` fewer on a smaller machine. The tokenizer is the default model's, so both engines read the file
as they would a real one.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import quantize

HIDDEN, HEADS, EXPERTS, USED, EXPERT_SIZE, SHARED_SIZE, VOCAB = 2048, 16, 60, 4, 1408, 5632, 151936


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", type=Path)
    parser.add_argument("--layers", type=int, default=24)
    args = parser.parse_args()

    from qwen_engine.default_model import default_model_path
    from qwen_engine.weights.gguf import open_gguf

    meta = open_gguf(default_model_path(progress=False)).metadata
    rng = np.random.default_rng(0)

    def blocks(*shape: int) -> np.ndarray:  # weights of a trained model's scale, in Q5_0
        return quantize(rng.standard_normal(shape, dtype=np.float32) * 0.02, GGMLQuantizationType.Q5_0)

    partial = args.output.with_name(args.output.name + ".partial")
    writer = GGUFWriter(str(partial), "qwen2moe")
    writer.add_context_length(32768)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(args.layers)
    writer.add_feed_forward_length(5632)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(HEADS)
    writer.add_rope_freq_base(1e6)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_expert_count(EXPERTS)
    writer.add_expert_used_count(USED)
    writer.add_expert_feed_forward_length(EXPERT_SIZE)
    writer.add_expert_shared_feed_forward_length(SHARED_SIZE)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(meta["tokenizer.ggml.tokens"])
    writer.add_token_types(meta["tokenizer.ggml.token_type"])
    writer.add_token_merges(meta["tokenizer.ggml.merges"])
    writer.add_eos_token_id(meta["tokenizer.ggml.eos_token_id"])
    writer.add_bos_token_id(meta["tokenizer.ggml.bos_token_id"])
    q5 = GGMLQuantizationType.Q5_0
    writer.add_tensor("token_embd.weight", blocks(VOCAB, HIDDEN), raw_dtype=q5)
    writer.add_tensor("output.weight", blocks(VOCAB, HIDDEN), raw_dtype=q5)
    writer.add_tensor("output_norm.weight", np.ones(HIDDEN, dtype=np.float32))
    for layer in range(args.layers):
        block = f"blk.{layer}."
        for norm in ("attn_norm", "ffn_norm"):
            writer.add_tensor(block + norm + ".weight", np.ones(HIDDEN, dtype=np.float32))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            writer.add_tensor(block + name + ".weight", blocks(HIDDEN, HIDDEN), raw_dtype=q5)
        for name in ("attn_q", "attn_k", "attn_v"):
            writer.add_tensor(block + name + ".bias", rng.standard_normal(HIDDEN, dtype=np.float32) * 0.02)
        writer.add_tensor(block + "ffn_gate_inp.weight", rng.standard_normal((EXPERTS, HIDDEN), dtype=np.float32))
        writer.add_tensor(block + "ffn_gate_exps.weight", blocks(EXPERTS, EXPERT_SIZE, HIDDEN), raw_dtype=q5)
        writer.add_tensor(block + "ffn_up_exps.weight", blocks(EXPERTS, EXPERT_SIZE, HIDDEN), raw_dtype=q5)
        writer.add_tensor(block + "ffn_down_exps.weight", blocks(EXPERTS, HIDDEN, EXPERT_SIZE), raw_dtype=q5)
        writer.add_tensor(block + "ffn_gate_inp_shexp.weight", rng.standard_normal(HIDDEN, dtype=np.float32) * 0.02)
        writer.add_tensor(block + "ffn_gate_shexp.weight", blocks(SHARED_SIZE, HIDDEN), raw_dtype=q5)
        writer.add_tensor(block + "ffn_up_shexp.weight", blocks(SHARED_SIZE, HIDDEN), raw_dtype=q5)
        writer.add_tensor(block + "ffn_down_shexp.weight", blocks(HIDDEN, SHARED_SIZE), raw_dtype=q5)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    partial.replace(args.output)
    print(f"{args.output}: {args.output.stat().st_size / 2**30:.2f} GiB, {args.layers} layers")


if __name__ == "__main__":
    main()
