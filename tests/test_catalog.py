"""The model catalog and the memory planner: exact parameter counts, KV bytes, tensor-parallel verdicts, fits, the
`qwen models` / `qwen memory` commands, and the prediction for this engine against its measured memory."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from qwen_engine.catalog import entries, resolve
from qwen_engine.cli import main
from qwen_engine.errors import QwenError
from qwen_engine.model.decoder import QwenDecoder
from qwen_engine.planner import GiB, fit, gpu_memory, plan


def test_exact_parameter_counts_match_the_reference() -> None:
    assert resolve("Qwen/Qwen2.5-7B-Instruct").parameters() == 7_615_616_512
    assert resolve("Qwen/Qwen-7B").parameters() == 7_721_324_544
    assert resolve("Qwen/Qwen-72B").parameters() == 72_287_920_128
    assert resolve("Qwen/Qwen-VL-Chat").encoder_parameters() == 1_935_610_624
    assert resolve("Qwen/Qwen-VL").parameters() == 7_721_324_544 + 1_935_610_624  # = bf16 index total_size / 2
    assert resolve("Qwen/Qwen-Audio-Chat").encoder_parameters() == 640_119_808
    assert resolve("Qwen/Qwen-Audio").parameters() - 640_119_808 == 7_754_182_656
    for entry in entries():
        if entry.reference_params is not None:
            assert entry.parameters() == entry.reference_params, entry.name


def test_official_rounded_counts() -> None:
    """The Qwen2.5 blog table (total / non-embedding, billions) against the computed counts (qwen-family.md §4)."""
    official = {"0.5B": (0.49, 0.36), "1.5B": (1.54, 1.31), "3B": (3.09, 2.77), "7B": (7.61, 6.53), "72B": (72.7, 70.0)}
    for size, (total, non_embedding) in official.items():
        entry = resolve(f"Qwen/Qwen2.5-{size}-Instruct")
        assert abs(entry.parameters() / 1e9 - total) < 0.01 * total, size
        assert abs((entry.parameters() - entry.embedding_parameters()) / 1e9 - non_embedding) < 0.01 * non_embedding, size
    moe = resolve("Qwen/Qwen2-57B-A14B-Instruct")
    assert moe.is_moe and abs(moe.parameters() / 1e9 - 57.41) < 0.01


# The official quantized releases' shards as Hugging Face lists them, in decimal GB to 2 decimals: the "Files and
# versions" pages huggingface.co/Qwen/Qwen2.5-7B-Instruct-{GPTQ-Int4,AWQ,GPTQ-Int8}/tree/main.
PUBLISHED_SHARDS_GB = {"gptq-int4": (4.00, 1.58), "awq": (4.00, 1.57), "gptq-int8": (3.98, 3.79, 1.09)}


@pytest.mark.parametrize("dtype", sorted(PUBLISHED_SHARDS_GB))
def test_packed_weights_match_the_official_files(dtype: str) -> None:
    """`qwen memory --dtype gptq-int4|awq|gptq-int8` on Qwen2.5-7B-Instruct (groups of 128, as the releases are) lands
    within the listing's rounding of its shards' sum: each shard is listed to ±0.005 GB, and the files' JSON headers
    (tens of kB) are the only bytes that are not weights."""
    shards = PUBLISHED_SHARDS_GB[dtype]
    weights = plan(resolve("Qwen/Qwen2.5-7B-Instruct"), dtype, group_size=128).weights / 1e9
    slack = 0.005 * len(shards)
    assert sum(shards) - slack <= weights <= sum(shards) + slack, (dtype, weights)


def test_names_resolve_and_unknown_names_suggest() -> None:
    assert resolve("qwen2.5-7b-instruct") is resolve("Qwen/Qwen2.5-7B-Instruct")
    assert resolve("qwq-32b-preview").name == "Qwen/QwQ-32B-Preview"
    assert resolve("qwen-1.8b-chat") is resolve("Qwen/Qwen-1_8B-Chat")
    with pytest.raises(QwenError, match="did you mean Qwen/Qwen2.5-7B-Instruct"):
        resolve("qwen2.5-7b-instrct")


def test_every_entry_builds_a_tiny_model() -> None:
    """Entries are the engine's own configs: scaled down, each one runs through the decoder."""
    for entry in entries():
        if entry.is_moe:
            continue
        config = entry.config
        group = config.num_heads // config.num_kv_heads
        tiny = dataclasses.replace(config, vocab_size=256, hidden_size=32, intermediate_size=48, num_layers=1,
                                   num_heads=2 * group, num_kv_heads=2, head_dim=16)
        torch.manual_seed(0)
        decoder = QwenDecoder(tiny).eval()
        with torch.no_grad():
            decoder.model.embed_tokens.weight.normal_()
            logits = decoder(torch.tensor([[1, 2, 3]]))
        assert logits.shape == (1, 3, 256) and torch.isfinite(logits).all(), entry.name


def test_kv_bytes_per_token_for_gqa_and_mha() -> None:
    gqa = plan(resolve("Qwen/Qwen2.5-7B-Instruct"), "bf16", context=1000)
    assert gqa.kv_cache == 2 * 28 * 4 * 128 * 2 * 1000  # 28 layers, 4 kv heads, d 128, bf16
    mha = plan(resolve("Qwen/Qwen1.5-7B-Chat"), "bf16", context=1000, kv_dtype="fp8")
    assert mha.kv_cache == 2 * 32 * 32 * 128 * 1 * 1000
    split = plan(resolve("Qwen/Qwen2.5-72B-Instruct"), "bf16", context=1000, tp=8)
    assert split.kv_cache == 2 * 80 * 1 * 128 * 2 * 1000  # 8 kv heads over 8 GPUs: one each


def test_tensor_parallel_verdicts() -> None:
    qwen2_72b = resolve("Qwen/Qwen2-72B-Instruct")
    problems = plan(qwen2_72b, "int4", context=4096, tp=8).problems
    assert any("3696" in p and "128" in p for p in problems)  # 29,568 / 8 = 3,696, not a multiple of 128
    assert plan(qwen2_72b, "bf16", context=4096, tp=8).problems == []
    assert any("7392" in p for p in plan(qwen2_72b, "int4", context=4096, tp=4).problems)  # 57.75 groups of 128
    assert plan(qwen2_72b, "int4", context=4096, tp=4, group_size=32).problems == []  # 231 groups of 32
    seven = resolve("Qwen/Qwen2.5-7B-Instruct")
    assert any("attention heads 28" in p for p in plan(seven, "bf16", context=4096, tp=8).problems)
    assert plan(seven, "bf16", context=4096, tp=4).problems == []  # 4 kv heads, one per GPU


def test_fits_and_the_cheapest_change() -> None:
    h100, rtx4090, t4 = gpu_memory("H100"), gpu_memory("RTX 4090"), gpu_memory("t4")
    assert 79 * GiB < h100 < 81 * GiB and 23 * GiB < rtx4090 <= 24 * GiB
    assert fit(resolve("Qwen/Qwen2.5-0.5B-Instruct"), t4, "bf16").fits
    big = fit(resolve("Qwen/Qwen2.5-72B-Instruct"), h100, "bf16", context=32768)
    assert not big.fits and big.suggestion.startswith("use int4")
    # 72B's intermediate size 29,568 splits over 2 GPUs into 14,784: not whole groups of 128, whole groups of 64.
    uneven = fit(resolve("Qwen/Qwen2.5-72B-Instruct"), 48 * GiB, "int4", context=32768, tp=2)
    assert not uneven.fits and uneven.suggestion.startswith("use int4 in groups of 64")
    two = fit(resolve("Qwen/Qwen2.5-72B-Instruct"), 48 * GiB, "int4", context=32768, tp=2, group_size=64)
    assert two.fits and two.max_context >= 32768
    long = fit(resolve("Qwen/Qwen2.5-7B-Instruct"), rtx4090, "int4", context=131072)
    assert not long.fits and 0 < long.max_context < 131072
    assert plan(resolve("Qwen/Qwen2.5-7B-Instruct"), "int4", long.max_context).per_gpu <= rtx4090


def test_fit_limits_are_exact_and_suggestions_cover_fewer_gpus() -> None:
    small = resolve("Qwen/Qwen2.5-0.5B-Instruct")
    limits = fit(small, 80 * GiB, "bf16", context=128)
    assert plan(small, "bf16", 128, batch=limits.max_batch).per_gpu <= 80 * GiB
    assert plan(small, "bf16", 128, batch=limits.max_batch + 1).per_gpu > 80 * GiB
    longest = fit(resolve("Qwen/Qwen2.5-7B-Instruct"), 20 * GiB, "bf16", batch=2)
    assert plan(resolve("Qwen/Qwen2.5-7B-Instruct"), "bf16", longest.max_context, batch=2).per_gpu <= 20 * GiB
    assert plan(resolve("Qwen/Qwen2.5-7B-Instruct"), "bf16", longest.max_context + 1, batch=2).per_gpu > 20 * GiB
    # 28 heads do not split over 8 GPUs; one 80 GB GPU holds the model.
    assert "tp=1" in fit(resolve("Qwen/Qwen2.5-7B-Instruct"), 80 * GiB, "bf16", tp=8).suggestion
    assert not fit(resolve("Qwen/Qwen2.5-72B-Instruct"), 8 * GiB, "auto", context=4096).fits  # no GPUs to add


def test_models_table_has_both_columns(capsys) -> None:
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "FP16 rule (2 B/param)" in out and "exact bf16 at full context" in out
    assert "Qwen/Qwen2.5-7B-Instruct" in out and "Qwen/Qwen-Audio-Chat" in out
    assert main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == len(entries())
    seven = next(r for r in rows if r["name"] == "Qwen/Qwen2.5-7B-Instruct")
    assert seven["parameters"] == 7_615_616_512 and seven["exact_bf16_gib"] > seven["rule_of_thumb_gib"]
    assert seven["active"] == seven["parameters"]
    moe = next(r for r in rows if r["name"] == "Qwen/Qwen2-57B-A14B")
    assert round(moe["parameters"] / 1e9, 2) == 57.41 and round(moe["active"] / 1e9, 2) == 14.25  # the "A14B"
    assert main(["models"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("Qwen/Qwen2-57B-A14B "))
    assert "57.41 B" in line and "14.25 B" in line


def test_memory_command_reports_fit_and_plot(tmp_path, capsys) -> None:
    png = tmp_path / "memory.png"
    assert main(["memory", "Qwen/Qwen2.5-72B-Instruct", "--dtype", "int4", "--group-size", "64", "--context", "32768",
                 "--tp", "2", "--vram", "48", "--plot", str(png), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["fits"] is True and report["tp"] == 2 and report["per_gpu"] < 48 * GiB
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["memory", "qwen2.5-7b-instruct", "--gpu", "rtx4090"]) == 0
    assert "to make it fit" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["memory", "qwen9-7b"], "unknown model"),
    (["memory", "qwen2.5-7b-instruct", "--context", "0"], "must be positive"),
    (["memory", "qwen2.5-7b-instruct", "--context", "-5"], "must be positive"),
    (["memory", "qwen2.5-7b-instruct", "--tp", "3"], "tensor-parallel degree 3"),
    (["memory", "qwen2.5-7b-instruct", "--dtype", "int3"], "unknown precision"),
    (["memory", "qwen2.5-7b-instruct", "--gpu", "voodoo2"], "unknown GPU"),
    (["memory", "qwen2.5-0.5b-instruct", "--context", "1000000"], "holds at most"),
])
def test_memory_bad_input_is_one_line(argv, message, capsys) -> None:
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("qwen: error:") and message in err


MEASURE = """
import json, sys
import torch
import qwen_engine
from qwen_engine.bench import bench_prompt
from qwen_engine.checkpoint import open_checkpoint

def status(key, path="/proc/self/status"):
    return next(int(line.split()[1]) * 1024 for line in open(path) if line.startswith(key))

tokenizer = open_checkpoint("default").tokenizer()
x = torch.randn(64, 896, dtype=torch.bfloat16)  # page in the matmul and attention kernels' code
torch.nn.functional.scaled_dot_product_attention(*[torch.nn.functional.linear(x, x).view(1, 1, 64, 64)] * 3, is_causal=True)
runtime = status("VmRSS")  # Python, PyTorch with its kernels and a tokenizer, before any weights
model = qwen_engine.load("default", tensor_parallel=int(sys.argv[2]))
tokens = int(sys.argv[1])
model.generate(bench_prompt(model.config.vocab_size, tokens), max_tokens=8, temperature=0, ignore_eos=True)
# VmHWM, not ru_maxrss: a child's ru_maxrss starts at its parent's (this test process, with models loaded).
workers = [status("VmHWM", f"/proc/{process.pid}/status") for process in model._ranks.processes] if model._ranks else []
print(json.dumps({"runtime": runtime, "peak": status("VmHWM"), "workers": workers}))
model.close()
"""


@pytest.fixture(scope="module")
def warm_caches(default_model, default_gguf) -> None:
    """The converted-weights caches warm, as on any second start: one process's (loaded by `default_model`) and
    each tp 2 rank's (loaded here once)."""
    import qwen_engine

    qwen_engine.load(default_gguf, tensor_parallel=2).close()


@pytest.mark.slow
@pytest.mark.usefixtures("warm_caches")
@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("tokens", [512, 4096])
def test_prediction_for_this_engine_matches_its_measured_memory(tokens: int, tp: int, default_gguf) -> None:
    """The planner's CPU figure for the default model in this engine's format, against the peak RSS of a fresh
    process that prefills `tokens` tokens and decodes a few; at tp 2, of rank 0 and of the worker rank, each against
    its own figure. What a process costs before any weights (Python, PyTorch's libraries, the tokenizer) depends on
    the installation and on how the OS maps library pages (0.29 and 0.37 GiB on two installs of this machine), so
    the planner's constant for it is replaced by the same process's own measurement; the rest is predicted."""
    from qwen_engine.planner import CPU_RUNTIME, memory_entry

    done = subprocess.run([sys.executable, "-c", MEASURE, str(tokens), str(tp)], capture_output=True, text=True, check=True)
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    result = plan(memory_entry(str(default_gguf)), "auto", context=tokens + 8, tp=tp)
    predicted = result.host_ram - CPU_RUNTIME + measured["runtime"]
    assert abs(predicted / measured["peak"] - 1) <= 0.10, (predicted / 2**20, measured)
    assert len(measured["workers"]) == tp - 1
    for worker in measured["workers"]:
        assert abs((result.host_ram_worker - CPU_RUNTIME + measured["runtime"]) / worker - 1) <= 0.10, (result, measured)
    assert abs(CPU_RUNTIME / measured["runtime"] - 1) <= 0.25  # the constant itself stays representative
