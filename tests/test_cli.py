"""The `qwen` command: outputs on the default model, and one clear line for every failure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType

from qwen_engine import cli


@pytest.fixture
def shared_model(monkeypatch: pytest.MonkeyPatch, engine_model):
    """Commands that load the default model get the session's already-loaded one."""
    monkeypatch.setattr(cli, "_load", lambda args: engine_model)
    return engine_model


def run_cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_generate_json(shared_model, capsys) -> None:
    code, out, err = run_cli(capsys, "generate", "--json", "--max-tokens", "12", "--temperature", "0", "def add(a, b):")
    assert code == 0, err
    payload = json.loads(out)
    assert set(payload) == {"text", "token_ids", "prompt_tokens", "completion_tokens", "finish_reason", "timings"}
    assert set(payload["timings"]) == {"load_s", "ttft_s", "decode_tok_s"}
    assert payload["completion_tokens"] == len(payload["token_ids"]) == 12
    assert payload["prompt_tokens"] == len(shared_model.tokenizer.encode("def add(a, b):"))
    assert payload["finish_reason"] == "length"
    assert payload["text"] == shared_model.tokenizer.decode(payload["token_ids"])
    assert payload["timings"]["ttft_s"] > 0 and payload["timings"]["decode_tok_s"] > 0


def test_generate_parses_markup_unless_no_special(shared_model, capsys) -> None:
    prompt = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    for flags, special in (((), True), (("--no-special",), False)):
        code, out, err = run_cli(capsys, "generate", "--json", "-n", "1", "-t", "0", *flags, prompt)
        assert code == 0, err
        assert json.loads(out)["prompt_tokens"] == len(shared_model.tokenizer.encode(prompt, special=special))
    assert len(shared_model.tokenizer.encode(prompt, special=True)) < len(shared_model.tokenizer.encode(prompt))


def test_generate_streams_text(shared_model, capsys) -> None:
    code, out, _ = run_cli(capsys, "generate", "-n", "8", "-t", "0", "The capital of France is")
    expected = shared_model.generate("The capital of France is", max_tokens=8, temperature=0).text
    assert code == 0 and out == expected + "\n"


def test_chat_once(shared_model, capsys) -> None:
    code, out, err = run_cli(capsys, "chat", "--once", "What is 2 + 3? Reply with the number only.", "-t", "0")
    assert code == 0, err
    assert "5" in out


def test_chat_from_a_pipe(shared_model, capsys, monkeypatch) -> None:
    import io

    script = 'What is 2 + 3? Reply with the number only.\n/reset\n"""\nName the colour of the clear daytime sky.\nOne word.\n"""\n/exit\nnever read\n'
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    code, out, err = run_cli(capsys, "chat", "-t", "0", "--system", "You are terse.")
    assert code == 0, err
    answers = out.strip().splitlines()
    assert "5" in answers[0]
    assert "blue" in out.lower()


def test_info_default_model(capsys, default_gguf) -> None:
    code, out, err = run_cli(capsys, "info", "--json", "--model", str(default_gguf))
    assert code == 0, err
    facts = json.loads(out)
    assert facts["architecture"] == "qwen2"
    assert facts["layers"] == 24 and facts["attention_heads"] == 14 and facts["kv_heads"] == 2
    assert facts["context_length"] == 32768
    assert facts["tensor_types"] == {"Q5_0": 133, "F32": 121, "Q8_0": 13, "Q6_K": 12, "Q4_K": 12}
    assert facts["chat_template"] is True
    # Qwen2.5-0.5B computed total (qwen-family.md §4) plus this file's untied output matrix.
    assert facts["parameters"] == 494_032_768 + 151936 * 896
    from qwen_engine.cpu import VARIANTS, kernel_variant

    assert facts["kernels"] == kernel_variant() and facts["kernels"] in VARIANTS


@pytest.mark.slow
def test_installed_command_answers_with_the_default_model() -> None:
    """End to end through the console script, as `make run` uses it."""
    qwen = Path(sys.executable).with_name("qwen")
    done = subprocess.run(
        [str(qwen), "chat", "--once", "Reply with the word yes and nothing else.", "--temperature", "0"],
        capture_output=True, text=True, timeout=300, env=os.environ | {"PYTHONUNBUFFERED": "1"},
    )
    assert done.returncode == 0, done.stderr
    assert "yes" in done.stdout.lower()


def test_the_package_imports_torch_only_when_a_model_is_loaded() -> None:
    """`import qwen_engine` stays light (PEP 562): `load` and `Model` come, with torch, on first use."""
    probe = ("import sys, qwen_engine; assert 'torch' not in sys.modules, 'torch at import'; qwen_engine.SamplingParams; "
             "qwen_engine.load; assert 'torch' in sys.modules")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


# Failures: one line on stderr, a non-zero exit, no traceback.


def test_missing_model_file(capsys, tmp_path) -> None:
    code, _, err = run_cli(capsys, "generate", "--model", str(tmp_path / "absent.gguf"), "hi")
    assert_one_line_error(code, err, "not found", "absent.gguf")


def test_corrupt_gguf(capsys, tmp_path) -> None:
    bad = tmp_path / "corrupt.gguf"
    bad.write_bytes(b"this is not a model file at all" * 100)
    code, _, err = run_cli(capsys, "generate", "--model", str(bad), "hi")
    assert_one_line_error(code, err, "not a valid GGUF", "corrupt.gguf")


def test_truncated_gguf(capsys, tiny_gguf, tmp_path) -> None:
    cut = tmp_path / "cut.gguf"
    data = tiny_gguf.read_bytes()
    cut.write_bytes(data[: len(data) - 1000])
    code, _, err = run_cli(capsys, "generate", "--model", str(cut), "hi")
    assert_one_line_error(code, err, "truncated")


def test_truncated_in_header(capsys, tiny_gguf, tmp_path) -> None:
    cut = tmp_path / "header.gguf"
    cut.write_bytes(tiny_gguf.read_bytes()[:5000])
    code, _, err = run_cli(capsys, "info", "--model", str(cut))
    assert_one_line_error(code, err, "header.gguf")


def test_unsupported_tensor_type(capsys, tiny_gguf_factory) -> None:
    # One extra tensor stored as Q2_K (84 bytes per 256 weights), which the engine does not dequantize.
    q2k = np.zeros((4, 84), dtype=np.uint8)
    path = tiny_gguf_factory("q2k.gguf", raw_tensors={"blk.0.extra.weight": (q2k, GGMLQuantizationType.Q2_K)})
    code, _, err = run_cli(capsys, "generate", "--model", str(path), "hi")
    assert_one_line_error(code, err, "Q2_K", "blk.0.extra.weight")


def test_prompt_longer_than_context(capsys, tiny_gguf) -> None:
    code, _, err = run_cli(capsys, "generate", "--model", str(tiny_gguf), "word " * 100)
    assert_one_line_error(code, err, "context", "64")


@pytest.mark.parametrize(
    ("option", "value", "fragment"),
    [
        ("--temperature", "-1", "temperature"),
        ("--top-p", "1.5", "top_p"),
        ("--top-k", "-3", "top_k"),
        ("--max-tokens", "0", "max-tokens"),
        ("--max-tokens", "many", "max-tokens"),
        ("--min-p", "2", "min_p"),
        ("--dtype", "int3", "dtype"),
    ],
)
def test_bad_option_values(capsys, option: str, value: str, fragment: str) -> None:
    code, _, err = run_cli_exit(capsys, "generate", option, value, "hi")
    assert_one_line_error(code, err, fragment)


def test_unknown_device(capsys) -> None:
    code, _, err = run_cli(capsys, "generate", "--device", "tpu9", "hi")
    assert_one_line_error(code, err, "device")


def test_debug_shows_the_traceback(capsys, tmp_path) -> None:
    with pytest.raises(Exception, match="not found"):
        cli.main(["--debug", "generate", "--model", str(tmp_path / "absent.gguf"), "hi"])


def run_cli_exit(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    """Like run_cli, for errors argparse reports by exiting."""
    try:
        code = cli.main(list(argv))
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def test_rope_scaling_override_extends_the_context(capsys, default_gguf) -> None:
    # qwen-family.md §3.3: YaRN ×4 from L0 = 32768 gives 131,072 tokens.
    code, out, err = run_cli(capsys, "info", "--json", "--model", str(default_gguf), "--rope-scaling", "yarn:4")
    assert code == 0, err
    facts = json.loads(out)
    assert facts["context_length"] == 131072 and facts["rope_scaling"] == "yarn ×4 from 32768"


@pytest.mark.parametrize("spec", ["yarn", "yarn:x", "linear:2", "yarn:0.5", "yarn:4:abc"])
def test_bad_rope_scaling_is_one_clear_error(capsys, default_gguf, spec: str) -> None:
    code, _, err = run_cli(capsys, "info", "--model", str(default_gguf), "--rope-scaling", spec)
    assert_one_line_error(code, err, "rope scaling")


def test_rope_scaling_spec_forms() -> None:
    from qwen_engine.config import RopeScaling

    assert RopeScaling.parse("yarn:4", 32768) == RopeScaling(4.0, 32768)
    assert RopeScaling.parse("yarn:4:long", 32768) == RopeScaling(4.0, 32768, only_long=True)
    assert RopeScaling.parse("yarn:2:16384:long", 32768) == RopeScaling(2.0, 16384, only_long=True)


def test_bench_json(capsys, tiny_gguf) -> None:
    code, out, err = run_cli(capsys, "bench", "--json", "--model", str(tiny_gguf), "--prompt-tokens", "16", "--gen-tokens", "8")
    assert code == 0, err
    result = json.loads(out)
    assert result["prompt_tokens"] == 16 and result["gen_tokens"] == 8  # generation ignores end-of-turn tokens
    assert result["prefill_tok_s"] > 0 and result["decode_tok_s"] > 0 and result["peak_rss_mb"] > 0
    assert 0 < result["load_s"] <= result["start_to_first_token_s"]
    assert (result["quant"], result["dtype"]) == ("auto", "bfloat16")
    from qwen_engine.kernels import cpu_kernels

    assert result["kernels"] == ("none" if cpu_kernels() is None else cpu_kernels().variant)


def test_perplexity_command(capsys, tiny_gguf, tmp_path) -> None:
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20, encoding="utf-8")
    code, out, err = run_cli(capsys, "perplexity", str(text), "--model", str(tiny_gguf), "--context", "32", "--json",
                             "--dtype", "float32")
    assert code == 0, err
    result = json.loads(out)
    assert result["perplexity"] > 1 and result["chunks"] == result["tokens"] // 32
    assert result["tokens_scored"] == result["chunks"] * 15
    # Through decoding steps (as generation computes): the same perplexity in float32, chunk count capped.
    code, out, err = run_cli(capsys, "perplexity", str(text), "--model", str(tiny_gguf), "--context", "32", "--json",
                             "--dtype", "float32", "--decode-path", "--max-chunks", "2")
    assert code == 0, err
    stepwise = json.loads(out)
    assert stepwise["chunks"] == 2 and stepwise["tokens_scored"] == 30
    code, out, err = run_cli(capsys, "perplexity", str(text), "--model", str(tiny_gguf), "--context", "32", "--json",
                             "--dtype", "float32", "--max-chunks", "2")
    assert abs(stepwise["perplexity"] / json.loads(out)["perplexity"] - 1) < 1e-4
    code, _, err = run_cli(capsys, "perplexity", str(tmp_path / "missing.txt"), "--model", str(tiny_gguf))
    assert_one_line_error(code, err, "cannot read")
