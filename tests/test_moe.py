"""Qwen2-MoE in the one decoder: tiny Qwen2MoeForCausalLM checkpoints written by transformers (8 experts, top 2, a
shared expert, layer 1 dense through mlp_only_layers), with norm_topk_prob true and false, load with transformers'
float32 logits and greedy continuations; the CPU block formats keep the perplexity of a tiny MoE trained in the test.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import qwen_engine
from qwen_engine.config import ModelConfig
from qwen_engine.engine.perplexity import perplexity
from qwen_engine.errors import QwenError
from qwen_engine.sharding import check_split
from tiny import SMALL_VOCAB_CONFIG, hf_config_dict, write_gguf, write_hf_checkpoint

REL_TOL = 1e-4  # float32 against float32: max |Δ| ≤ REL_TOL · max |logit|
CORPUS = Path(__file__).resolve().parents[1] / "benchmarks" / "data" / "corpus.md"
SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
             num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64, shared_expert_intermediate_size=128,
             mlp_only_layers=[1], decoder_sparse_step=1, max_position_embeddings=256, rope_theta=1e6, rms_norm_eps=1e-6,
             tie_word_embeddings=False, use_sliding_window=False, **SMALL_VOCAB_CONFIG)


def moe_model(seed: int, **overrides):
    """A random Qwen2MoeForCausalLM. Router weights are drawn wide, so that no token's top-2 is a near-tie that a
    last-bit difference in the attention before it could flip; biases and norms off their trivial init."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(seed)
    model = Qwen2MoeForCausalLM(Qwen2MoeConfig(**(SHAPE | overrides))).to(torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                param.normal_(0.0, 1.0)
            elif name.endswith("bias"):
                param.normal_(0.0, 0.5)
            elif "norm" in name:
                param.normal_(1.0, 0.1)
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, small_tokenizer_files):
    """norm_topk_prob → (directory, transformers model)."""
    root = tmp_path_factory.mktemp("moe")
    made = {}
    for seed, norm in enumerate((False, True)):
        model = moe_model(seed, norm_topk_prob=norm)
        made[norm] = (write_hf_checkpoint(root / f"norm-{norm}", model, small_tokenizer_files), model)
    return made


@pytest.fixture(scope="module")
def prompt_ids(checkpoints):
    engine = qwen_engine.load(checkpoints[False][0], dtype="float32", device="cpu", quant="none")
    return [engine.tokenizer.encode(text) for text in ("Hello", "def add(a, b):\n    return a + b\n" * 3)]


def test_config_reads_the_moe_fields(checkpoints):
    _, model = checkpoints[True]
    config = ModelConfig.from_hf(hf_config_dict(model.config))
    moe = config.moe
    assert (moe.num_experts, moe.experts_per_token, moe.expert_size, moe.shared_expert_size) == (8, 2, 64, 128)
    assert moe.norm_topk_prob and [moe.is_sparse(i) for i in range(3)] == [True, False, True]
    assert config.parameter_count() == sum(p.numel() for p in model.parameters())
    assert not ModelConfig.from_hf(hf_config_dict(checkpoints[False][1].config)).moe.norm_topk_prob


@pytest.mark.parametrize("norm", [False, True])
def test_float32_logits_match_transformers(checkpoints, prompt_ids, norm):
    directory, reference = checkpoints[norm]
    engine = qwen_engine.load(directory, dtype="float32", device="cpu", quant="none")
    for ids in prompt_ids:
        got = engine.logits(ids)
        with torch.no_grad():
            ref = reference(torch.tensor([ids])).logits[0]
        assert ((got - ref).abs().max() / ref.abs().max()).item() <= REL_TOL


@pytest.mark.parametrize("norm", [False, True])
def test_greedy_continuation_matches_transformers(checkpoints, prompt_ids, norm):
    directory, reference = checkpoints[norm]
    engine = qwen_engine.load(directory, dtype="float32", device="cpu", quant="none")
    ids = prompt_ids[1]
    ours = engine.generate(ids, max_tokens=16, temperature=0.0, ignore_eos=True).token_ids
    with torch.no_grad():
        theirs = reference.generate(torch.tensor([ids]), max_new_tokens=16, min_new_tokens=16, do_sample=False)
    assert ours == theirs[0, len(ids):].tolist()


def test_the_sparse_layers_are_moe_and_the_dense_one_is_not(checkpoints):
    from qwen_engine.model.decoder import MLP, SparseMoE

    engine = qwen_engine.load(checkpoints[False][0], dtype="float32", device="cpu", quant="none")
    kinds = [type(layer.mlp) for layer in engine.decoder.model.layers]
    assert kinds == [SparseMoE, MLP, SparseMoE]


def test_tensor_parallelism_refuses_moe_in_one_line(checkpoints):
    config = ModelConfig.from_hf(hf_config_dict(checkpoints[False][1].config))
    with pytest.raises(QwenError, match="mixture-of-experts"):
        check_split(config, 2)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_tokenizer_files):
    """A tiny MoE trained for 120 steps on corpus.md's first part (a random model's perplexity is the vocabulary
    size whatever the format does), and the held-out rest."""
    from qwen_engine.tokenizer import Tokenizer

    ids = Tokenizer.from_hf_dir(small_tokenizer_files).encode(CORPUS.read_text(encoding="utf-8"))
    held_out = len(ids) * 4 // 5
    train = torch.tensor(ids[:held_out])
    model = moe_model(7).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(120):
        starts = torch.randint(0, len(train) - 65, (8,), generator=generator)
        batch = torch.stack([train[s : s + 65] for s in starts.tolist()])
        loss = model(batch[:, :-1], labels=batch[:, :-1]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return write_hf_checkpoint(tmp_path_factory.mktemp("moe-trained") / "trained", model, small_tokenizer_files), ids[held_out:]


def test_block_formats_keep_the_trained_models_perplexity(trained):
    directory, held_out = trained
    reference = qwen_engine.load(directory, dtype="float32", device="cpu", quant="none")
    blocks = qwen_engine.load(directory, device="cpu")  # the CPU default: bfloat16, 8-bit blocks
    assert blocks.quant != "none" and blocks.decoder.fused_decode is None  # (experts are picked per token)

    def score(model) -> float:
        return perplexity(lambda chunk: model.logits(chunk).float(), held_out, 128).perplexity

    float32 = score(reference)
    assert float32 < 300  # learned something: far below the 2,048 of a uniform guess
    assert abs(score(blocks) / float32 - 1) < 0.01


@pytest.fixture(scope="module")
def gguf_files(checkpoints, small_gguf_arrays, tmp_path_factory):
    """norm_topk_prob → the same checkpoint as llama.cpp's qwen2moe GGUF (F32, experts stacked), written with gguf-py."""
    from safetensors.torch import load_file

    tokens, token_types, merges = small_gguf_arrays
    root = tmp_path_factory.mktemp("moe-gguf")
    return {norm: write_gguf(root / f"norm-{norm}.gguf", load_file(directory / "model.safetensors"),
                             hf_config_dict(model.config), {"tokens": tokens, "token_types": token_types, "merges": merges})
            for norm, (directory, model) in checkpoints.items()}


@pytest.mark.parametrize("norm", [False, True])
def test_gguf_conversion_loads_with_the_same_logits(checkpoints, gguf_files, prompt_ids, norm):
    directory, reference = checkpoints[norm]
    engine = qwen_engine.load(gguf_files[norm], dtype="float32", device="cpu", quant="none")
    assert engine.config.moe == ModelConfig.from_hf(hf_config_dict(reference.config)).moe
    for ids in prompt_ids:
        with torch.no_grad():
            ref = reference(torch.tensor([ids])).logits[0]
        assert ((engine.logits(ids) - ref).abs().max() / ref.abs().max()).item() <= REL_TOL


def test_gguf_moe_runs_in_the_cpu_block_format(gguf_files, checkpoints, prompt_ids):
    """The default CPU format from the GGUF's F32 experts (bfloat16, 8-bit blocks): the float32 logits within the
    roundings of those (a random model's greedy text is not compared: its near-ties flip under bfloat16)."""
    blocks = qwen_engine.load(gguf_files[False], device="cpu")
    exact = qwen_engine.load(checkpoints[False][0], dtype="float32", device="cpu", quant="none")
    assert blocks.quant != "none"
    ids = prompt_ids[1]
    got, ref = blocks.logits(ids).float(), exact.logits(ids)
    assert ((got - ref).abs().max() / ref.abs().max()).item() < 0.05
    assert len(blocks.generate(ids, max_tokens=8, temperature=0.0, ignore_eos=True).token_ids) == 8


def test_info_names_the_format_and_the_experts(capsys, gguf_files, checkpoints):
    import json

    from qwen_engine import cli

    total = sum(p.numel() for p in checkpoints[True][1].parameters())
    active = total - 2 * (8 - 2) * 3 * 64 * 64  # two sparse layers, six of eight experts idle a token
    for path, kind in ((gguf_files[True], "gguf"), (checkpoints[True][0], "hf")):
        assert cli.main(["info", "--json", "--model", str(path)]) == 0
        facts = json.loads(capsys.readouterr().out)
        assert facts["format"] == kind and facts["parameters"] == total
        assert facts["experts"] == {"count": 8, "per_token": 2, "expert_size": 64, "shared_expert_size": 128,
                                    "norm_topk_prob": True, "dense_layers": [1], "active_parameters": active}
    assert cli.main(["info", "--model", str(gguf_files[True])]) == 0
    assert f"2 of 8 a token (width 64, renormalized) + a shared expert of 128; dense layers: 1; {active:,}" in capsys.readouterr().out


def test_qwen2_57b_a14b_is_14b_active():
    """The catalog's Qwen2-57B-A14B: 57.41 B parameters (the Qwen2 blog, qwen-family.md §3), 14.25 B of them read a
    token (eight of 64 experts of 2,560 in each of 28 layers)."""
    from qwen_engine.catalog import resolve

    config = resolve("Qwen/Qwen2-57B-A14B").config
    assert round(config.parameter_count() / 1e9, 2) == 57.41
    assert round(config.active_parameter_count() / 1e9, 2) == 14.25


def test_qwen15_moe_a27b_is_14_3b_with_2_7b_active():
    """The catalog's Qwen1.5-MoE-A2.7B: the model card's 14.3 B parameters and 2.7 B activated (its shared expert's
    width, 5,632, is what makes both come out)."""
    from qwen_engine.catalog import resolve

    for name in ("Qwen/Qwen1.5-MoE-A2.7B", "Qwen/Qwen1.5-MoE-A2.7B-Chat"):
        config = resolve(name).config
        assert round(config.parameter_count() / 1e9, 1) == 14.3 and round(config.active_parameter_count() / 1e9, 1) == 2.7
