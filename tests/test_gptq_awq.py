"""GPTQ and AWQ checkpoints: tiny ones built here by packing known integer codes in each official layout (the packers
below follow AutoGPTQ's and AutoAWQ's documented layouts, written independently of weights/gptq.py) load with the
float32 logits of transformers running the same model on the dequantized weights: GPTQ 4- and 8-bit, symmetric and
not, with act-order (a shuffled g_idx) and a group that is no multiple of 32, both zero-point conventions; AWQ 4-bit
in its GEMM column order."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import qwen_engine
from qwen_engine.errors import QwenError
from tiny import SMALL_VOCAB_CONFIG, hf_config, random_model, write_hf_checkpoint

REL_TOL = 1e-4
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ packs column AWQ_ORDER[i] of each 8 into nibble i


def pack_along_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """[R, C] small ints → int32 [R·bits/32, C]: value j of each word down the rows at bits j·bits (GPTQ's qweight)."""
    per_word = 32 // bits
    grouped = values.to(torch.int64).reshape(-1, per_word, values.shape[1])
    words = sum(grouped[:, j] << (j * bits) for j in range(per_word))
    return (words - ((words >> 31) << 32)).to(torch.int32)  # as the int32 the packers write (two's complement)


def pack_along_columns(values: torch.Tensor, bits: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """[R, C] → int32 [R, C·bits/32]: along the columns (GPTQ's qzeros), nibble i holding column order[i] (AWQ)."""
    per_word = 32 // bits
    order = order or tuple(range(per_word))
    grouped = values.to(torch.int64).reshape(values.shape[0], -1, per_word)
    words = sum(grouped[:, :, order[i]] << (i * bits) for i in range(per_word))
    return (words - ((words >> 31) << 32)).to(torch.int32)


def packed_layer(out_features: int, in_features: int, method: str, bits: int, group: int, act_order: bool, sym: bool,
                 v2: bool, generator: torch.Generator) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Random codes, zeros and scales in the layout of `method`, and the float weight [N, K] they stand for."""
    top = (1 << bits) - 1
    groups = -(-in_features // group)
    codes = torch.randint(0, top + 1, (in_features, out_features), generator=generator)
    zeros = torch.full((groups, out_features), 1 << (bits - 1)) if sym else torch.randint(1, top + 1, (groups, out_features), generator=generator)
    scales = (torch.rand(groups, out_features, generator=generator) * 0.02 + 0.005).to(torch.float16)
    if act_order:  # each input's group as GPTQ's act-order leaves them: the inputs permuted, groups in that order
        g_idx = (torch.randperm(in_features, generator=generator) // group).to(torch.int32)
    else:
        g_idx = (torch.arange(in_features) // group).to(torch.int32)
    weight = (scales.float()[g_idx.long()] * (codes - zeros[g_idx.long()]).float()).t().contiguous()
    if method == "awq":
        parts = {"qweight": pack_along_columns(codes, bits, AWQ_ORDER), "qzeros": pack_along_columns(zeros, bits, AWQ_ORDER),
                 "scales": scales}
    else:
        stored_zeros = zeros if v2 else (zeros - 1) & top  # the v1 packer's zero − 1
        parts = {"qweight": pack_along_rows(codes, bits), "qzeros": pack_along_columns(stored_zeros, bits), "scales": scales,
                 "g_idx": g_idx}
    return parts, weight


CASES = {
    "gptq-int4-sym": dict(method="gptq", bits=4, group=32, act_order=False, sym=True, v2=False),
    "gptq-int4-act-order-group-48": dict(method="gptq", bits=4, group=48, act_order=True, sym=False, v2=False),
    "gptq-int8": dict(method="gptq", bits=8, group=32, act_order=False, sym=True, v2=False),
    "gptq-int8-act-order-v2": dict(method="gptq", bits=8, group=64, act_order=True, sym=False, v2=True),
    "awq-int4": dict(method="awq", bits=4, group=32, act_order=False, sym=False, v2=False),
}


def quantization_config(case: dict) -> dict:
    if case["method"] == "awq":
        return {"quant_method": "awq", "bits": case["bits"], "group_size": case["group"], "version": "gemm", "zero_point": True}
    return {"quant_method": "gptq", "bits": case["bits"], "group_size": case["group"], "desc_act": case["act_order"],
            "sym": case["sym"], "checkpoint_format": "gptq_v2" if case["v2"] else "gptq"}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, small_tokenizer_files):
    """case → (directory, transformers model holding the dequantized weights)."""
    root = tmp_path_factory.mktemp("packed")
    made = {}
    for seed, (name, case) in enumerate(CASES.items()):
        model = random_model(hf_config("qwen2.5-0.5b", **SMALL_VOCAB_CONFIG), seed=seed)
        directory = write_hf_checkpoint(root / name, model, small_tokenizer_files)
        tensors = load_file(directory / "model.safetensors")
        generator = torch.Generator().manual_seed(seed)
        state = model.state_dict()
        for layer in range(model.config.num_hidden_layers):
            for projection in PROJECTIONS:
                prefix = f"model.layers.{layer}.{'mlp' if projection in ('gate_proj', 'up_proj', 'down_proj') else 'self_attn'}.{projection}"
                out_features, in_features = tensors[prefix + ".weight"].shape
                parts, weight = packed_layer(out_features, in_features, **case, generator=generator)
                del tensors[prefix + ".weight"]
                tensors |= {f"{prefix}.{part}": value for part, value in parts.items()}
                state[prefix + ".weight"].copy_(weight)  # the reference runs on what the codes stand for
        save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
        config = json.loads((directory / "config.json").read_text())
        config["quantization_config"] = quantization_config(case)
        (directory / "config.json").write_text(json.dumps(config))
        made[name] = (directory, model)
    return made


@pytest.mark.parametrize("name", list(CASES))
def test_float32_logits_match_transformers_on_the_dequantized_weights(checkpoints, name):
    directory, reference = checkpoints[name]
    engine = qwen_engine.load(directory, dtype="float32", device="cpu", quant="none")
    ids = engine.tokenizer.encode("def add(a, b):\n    return a + b  # 模型")
    with torch.no_grad():
        ref = reference(torch.tensor([ids])).logits[0]
    assert ((engine.logits(ids) - ref).abs().max() / ref.abs().max()).item() <= REL_TOL


def test_info_names_the_packed_format(checkpoints, capsys):
    from qwen_engine import cli

    for name, expected in (("gptq-int4-sym", "hf-gptq-int4"), ("gptq-int8", "hf-gptq-int8"), ("awq-int4", "hf-awq-int4")):
        assert cli.main(["info", "--json", "--model", str(checkpoints[name][0])]) == 0
        assert json.loads(capsys.readouterr().out)["format"] == expected


@pytest.mark.parametrize("name", ["gptq-int4-sym", "gptq-int4-act-order-group-48"])
def test_the_cpu_block_format_loads_a_packed_checkpoint(checkpoints, name):
    """The CPU default (bfloat16, blocks): kept as stored in groups of 32, requantized to 8-bit blocks with act-order
    or another group; both within the roundings of bfloat16 and the blocks (measured: 1.7% and 1.5% of the largest
    logit on these random models)."""
    directory, _ = checkpoints[name]
    exact = qwen_engine.load(directory, dtype="float32", device="cpu", quant="none")
    blocks = qwen_engine.load(directory, device="cpu")
    ids = exact.tokenizer.encode("Hello, world")
    got, ref = blocks.logits(ids).float(), exact.logits(ids)
    assert blocks.quant != "none" and ((got - ref).abs().max() / ref.abs().max()).item() < 0.05


@pytest.mark.parametrize(("config", "message"), [
    ({"quant_method": "gptq", "bits": 3, "group_size": 128}, "gptq with 3 bits"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"}, "AWQ version 'gemv'"),
    ({"quant_method": "bitsandbytes"}, "quantization method 'bitsandbytes'"),
])
def test_unsupported_packings_are_one_clear_error(checkpoints, tmp_path, config, message):
    source, _ = checkpoints["gptq-int4-sym"]
    target = tmp_path / "ckpt"
    target.mkdir()
    for file in source.iterdir():
        (target / file.name).symlink_to(file) if file.suffix == ".safetensors" else (target / file.name).write_bytes(file.read_bytes())
    raw = json.loads((target / "config.json").read_text())
    raw["quantization_config"] = config
    (target / "config.json").write_text(json.dumps(raw))
    with pytest.raises(QwenError, match=message):
        qwen_engine.load(target, dtype="float32", device="cpu", quant="none")


@pytest.fixture(scope="module")
def v1_int4(tmp_path_factory, gguf_arrays):
    """Qwen v1's Chat-Int4 layout (GPTQ on the fused c_attn, c_proj, w1, w2): a v1 checkpoint whose linear layers are
    packed, and the transformers model on the weights they stand for."""
    from tiny import to_v1_state, v1_config, write_qwen_tiktoken

    config = hf_config("qwen1.5", max_position_embeddings=128)
    model = random_model(config, seed=11)
    state, reference = to_v1_state(model.state_dict()), model.state_dict()
    generator = torch.Generator().manual_seed(11)
    case = dict(method="gptq", bits=4, group=32, act_order=False, sym=True, v2=False)
    for layer in range(config.num_hidden_layers):
        v1, qwen2 = f"transformer.h.{layer}.", f"model.layers.{layer}."
        for name, targets in (("attn.c_attn", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                              ("attn.c_proj", ("self_attn.o_proj",)), ("mlp.w1", ("mlp.up_proj",)),
                              ("mlp.w2", ("mlp.gate_proj",)), ("mlp.c_proj", ("mlp.down_proj",))):
            out_features, in_features = state[f"{v1}{name}.weight"].shape
            parts, weight = packed_layer(out_features, in_features, **case, generator=generator)
            del state[f"{v1}{name}.weight"]
            state |= {f"{v1}{name}.{part}": value for part, value in parts.items()}
            for target, piece in zip(targets, weight.chunk(len(targets))):
                reference[f"{qwen2}{target}.weight"].copy_(piece)
    directory = tmp_path_factory.mktemp("qwen-v1-int4")
    save_file(state, str(directory / "model.safetensors"))
    raw = v1_config(config) | {"quantization_config": quantization_config(case) | {"damp_percent": 0.01, "true_sequential": True}}
    (directory / "config.json").write_text(json.dumps(raw), encoding="utf-8")
    write_qwen_tiktoken(directory / "qwen.tiktoken", gguf_arrays[0])
    return directory, model


def test_qwen_v1_int4_loads_with_the_dequantized_logits(v1_int4):
    directory, reference = v1_int4
    engine = qwen_engine.load(directory, dtype="float32", device="cpu", quant="none")
    ids = [9707, 11, 1879, 0, 77091, 198]
    with torch.no_grad():
        ref = reference(torch.tensor([ids])).logits[0]
    assert ((engine.logits(ids) - ref).abs().max() / ref.abs().max()).item() <= REL_TOL


@pytest.mark.parametrize(("name", "bits"), [("gptq-int4-sym", 5), ("gptq-int8", 8), ("awq-int4", 5)])
def test_groups_of_32_go_into_the_cpu_blocks_bit_for_bit(checkpoints, name, bits):
    """Without act-order and in groups of 32 (or a multiple), the packed values are this engine's blocks as they stand:
    4-bit codes less their zero point in the 5-bit blocks, symmetric 8-bit in the 8-bit ones, the scales unchanged."""
    from qwen_engine.checkpoint import open_checkpoint
    from qwen_engine.model.quantized import BlockLinear

    directory, reference = checkpoints[name]
    checkpoint = open_checkpoint(directory)
    blocks = checkpoint.stored_blocks("model.layers.0.mlp.up_proj.weight")
    assert blocks is not None and blocks.bits == bits
    torch.testing.assert_close(blocks.dequantized(), reference.model.layers[0].mlp.up_proj.weight, rtol=0, atol=0)
    engine = qwen_engine.load(directory, device="cpu")  # the CPU default: 5-bit blocks where the values are
    projection = engine.decoder.model.layers[0].mlp.gate_up_proj  # (K = 128: the block kernels take it)
    assert isinstance(projection, BlockLinear) and (projection.high_bits is not None) == (bits == 5)


def test_act_order_is_requantized(checkpoints):
    from qwen_engine.checkpoint import open_checkpoint

    checkpoint = open_checkpoint(checkpoints["gptq-int4-act-order-group-48"][0])
    assert checkpoint.stored_blocks("model.layers.0.mlp.down_proj.weight") is None
    assert "model.layers.0.mlp.down_proj.weight" not in checkpoint.stored_types()


@pytest.mark.parametrize(("name", "dtype", "group"), [("gptq-int4-sym", "gptq-int4", 32), ("gptq-int8", "gptq-int8", 32),
                                                       ("awq-int4", "awq", 32)])
def test_the_planner_counts_a_packed_files_bytes(checkpoints, name, dtype, group):
    """`qwen memory --dtype gptq-int4|gptq-int8|awq`: its weights are the bytes of the packed tensors the file holds
    (qweight, qzeros, fp16 scales, GPTQ's g_idx; embeddings, head and norms 16-bit), here in float32 for the rest."""
    from safetensors import safe_open

    from qwen_engine.planner import memory_entry, plan

    directory, _ = checkpoints[name]
    packed = others = 0
    with safe_open(directory / "model.safetensors", framework="pt") as file:
        for key in file.keys():
            tensor = file.get_tensor(key)
            if key.rpartition(".")[2] in ("qweight", "qzeros", "scales", "g_idx"):
                packed += tensor.numel() * tensor.element_size()
            else:
                others += tensor.numel() * 2  # (16-bit in a release; this test file keeps them float32)
    assert plan(memory_entry(str(directory)), dtype, group_size=group).weights == packed + others


def test_qwen_v1_int4_goes_into_the_cpu_blocks_bit_for_bit(v1_int4, monkeypatch):
    """v1's GPTQ c_attn holds q, k and v: each third of its rows is blocks of 32 as it stands, as the other layers are."""
    from qwen_engine.checkpoint import open_checkpoint
    from qwen_engine.model.quantized import BlockLinear
    from qwen_engine.weights.gptq import PackedFormat

    directory, reference = v1_int4
    checkpoint = open_checkpoint(directory)
    attention = reference.model.layers[1].self_attn
    for part in ("q_proj", "k_proj", "v_proj"):
        name = f"model.layers.1.self_attn.{part}.weight"
        blocks = checkpoint.stored_blocks(name)
        assert checkpoint.stored_types()[name] == "Q5_0" and blocks is not None and blocks.bits == 5
        torch.testing.assert_close(blocks.dequantized(), getattr(attention, part).weight, rtol=0, atol=0)
    unpacked, unpack = [], PackedFormat.weight
    monkeypatch.setattr(PackedFormat, "weight", lambda self, parts, name: unpacked.append(name) or unpack(self, parts, name))
    engine = qwen_engine.load(directory, device="cpu")
    assert not [name for name in unpacked if "c_attn" in name]  # (taken as blocks, never unpacked to float)
    projection = engine.decoder.model.layers[1].self_attn.qkv_proj
    assert isinstance(projection, BlockLinear) and projection.high_bits is not None
