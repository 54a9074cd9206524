"""Tensor parallelism on this machine (gloo): `load(..., tensor_parallel=N)` splits the decoder over N processes
(sharding.py's rules, which the planner's per-GPU figures use too) and gives the logits and greedy tokens of one
process, for every layout: MHA untied, GQA tied, kv heads replicated (fewer than ranks), Qwen v1's fused c_attn,
sliding windows; a worker that dies makes the next call one clear error, and no process is left behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import quants as gguf_quants
from safetensors.torch import save_file
from tiny import SMALL_VOCAB_CONFIG, hf_config, random_model, to_v1_state, v1_config, write_hf_checkpoint, write_qwen_tiktoken

import qwen_engine
from qwen_engine.checkpoint import open_checkpoint
from qwen_engine.config import ModelConfig
from qwen_engine.errors import QwenError
from qwen_engine.kernels import cpu_kernels
from qwen_engine.sharding import RankSlices, rank_shapes, shard, shard_config, shard_shape

LAYOUTS = {  # name → (transformers config, tp)
    "mha-untied": (hf_config("qwen1.5"), 2),
    "gqa-tied": (hf_config("qwen2.5-0.5b"), 2),
    "kv-replicated-tp4": (hf_config("qwq", hidden_size=128, num_attention_heads=8, num_key_value_heads=2), 4),
    "sliding-window": (hf_config("qwen1.5", use_sliding_window=True, sliding_window=8, max_window_layers=1), 2),
}
PROMPT = list(range(1000, 1040))


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def same_numbers(path, tp: int) -> None:
    one = qwen_engine.load(path, dtype="float32")
    split = qwen_engine.load(path, dtype="float32", tensor_parallel=tp)
    try:
        assert relative(split.logits(PROMPT), one.logits(PROMPT)) <= 1e-5
        options = dict(max_tokens=12, temperature=0, ignore_eos=True)
        assert split.generate(PROMPT, **options).token_ids == one.generate(PROMPT, **options).token_ids
    finally:
        split.close()
    assert all(process.poll() is not None for process in split._ranks.processes)  # none left behind


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_gives_the_logits_of_one_process(layout, tmp_path, tokenizer_files) -> None:
    config, tp = LAYOUTS[layout]
    same_numbers(write_hf_checkpoint(tmp_path / layout, random_model(config, seed=3), tokenizer_files), tp)


def test_qwen_v1_fused_c_attn_splits_too(tmp_path, gguf_arrays) -> None:
    config = hf_config("qwen1.5", max_position_embeddings=128)
    save_file(to_v1_state(random_model(config, seed=4).state_dict()), str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(v1_config(config)), encoding="utf-8")
    write_qwen_tiktoken(tmp_path / "qwen.tiktoken", gguf_arrays[0])
    same_numbers(tmp_path, 2)


@pytest.mark.slow
def test_the_default_model_in_its_cpu_format_at_tp_2(default_gguf, default_model) -> None:
    """The real model in the CPU default at tp 2: the greedy continuation of one process."""
    split = qwen_engine.load(default_gguf, tensor_parallel=2)
    try:
        for prompt in ("def quicksort(xs):", "Write a haiku about the sea."):
            options = dict(max_tokens=32, temperature=0)
            assert split.generate(prompt, **options).token_ids == default_model.generate(prompt, **options).token_ids
    finally:
        split.close()


@pytest.mark.slow
def test_the_default_model_at_tp_2(default_gguf, engine_model) -> None:
    split = qwen_engine.load(default_gguf, dtype="float32", tensor_parallel=2)
    try:
        ids = engine_model.tokenizer.encode("def fib(n): return n if n < 2 else fib(n - 1) + fib(n - 2)")
        assert relative(split.logits(ids), engine_model.logits(ids)) <= 1e-5
        options = dict(max_tokens=24, temperature=0)
        assert split.generate("def quicksort(xs):", **options).token_ids == engine_model.generate("def quicksort(xs):", **options).token_ids
    finally:
        split.close()


# Shaped so that each rank's share of every matrix is whole rows of the kernels (multiples of 64 inputs) at tp 2.
BLOCKS_SHAPE = dict(intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=32)
STORED = {"attn_q": ("self_attn.q_proj", T.Q5_0), "attn_k": ("self_attn.k_proj", T.Q8_0),
          "attn_v": ("self_attn.v_proj", T.Q8_0), "attn_output": ("self_attn.o_proj", T.Q5_0),
          "ffn_gate": ("mlp.gate_proj", T.Q5_0), "ffn_up": ("mlp.up_proj", T.Q5_0), "ffn_down": ("mlp.down_proj", T.Q8_0)}


@pytest.fixture(scope="module")
def blocks_gguf(tiny_gguf_factory):
    """A tiny tied GGUF stored as real files are: Q5_0 and Q8_0 projections, a Q8_0 embedding (the head's too)."""
    config = hf_config("qwen2.5-0.5b", **SMALL_VOCAB_CONFIG, **BLOCKS_SHAPE)
    state = random_model(config).state_dict()  # the factory's model: same config, same seed
    raw = {"token_embd.weight": (gguf_quants.quantize(state["model.embed_tokens.weight"].numpy(), T.Q8_0), T.Q8_0)}
    for layer in range(config.num_hidden_layers):
        for gguf_name, (hf_name, qtype) in STORED.items():
            weight = state[f"model.layers.{layer}.{hf_name}.weight"].numpy()
            raw[f"blk.{layer}.{gguf_name}.weight"] = (gguf_quants.quantize(weight, qtype), qtype)
    return tiny_gguf_factory("tp-blocks.gguf", raw_tensors=raw, small_vocab=True, **BLOCKS_SHAPE)


def test_a_rank_reads_its_part_of_the_stored_blocks_bit_for_bit(blocks_gguf) -> None:
    """Q8_0/Q5_0 blocks cut on block boundaries, as stored: q/k/v, gate/up and the vocabulary by rows, o and down by
    columns; the ranks' parts put together are the whole tensor's blocks, and an embedding read from the file on
    demand gives each rank its rows."""
    checkpoint = open_checkpoint(blocks_gguf)
    slices = [RankSlices(checkpoint.config, 2, rank) for rank in range(2)]
    stored = [name for name, kind in checkpoint.stored_types().items() if kind in ("Q8_0", "Q5_0")]
    assert len(stored) == 1 + 7 * checkpoint.config.num_layers
    for name in stored:
        whole = checkpoint.stored_blocks(name)
        parts = [checkpoint.stored_blocks(name, rank) for rank in slices]
        dim = 1 if ("o_proj" in name or "down_proj" in name) else 0
        assert all(part.bits == whole.bits for part in parts), name
        assert torch.equal(torch.cat([part.codes for part in parts], dim), whole.codes), name
        assert torch.equal(torch.cat([part.scales for part in parts], dim), whole.scales), name
    table = checkpoint.stored_rows("model.embed_tokens.weight")
    half = checkpoint.config.vocab_size // 2
    for rank in slices:
        rows = checkpoint.stored_rows("model.embed_tokens.weight", rank)
        assert rows.shape == (half, checkpoint.config.hidden_size)
        assert torch.equal(rows([0, 5, half - 1]), table([rank.rank * half + i for i in (0, 5, half - 1)]))


def test_the_default_cpu_format_splits_too(blocks_gguf) -> None:
    """`--tp 2` in the CPU default (bfloat16, quant auto: the stored blocks kept, the fused native decoding step
    with its all-reduces called back per layer): every rank rounds where one process rounds (the row-parallel
    products are summed in float32 first), so the split's logits differ from one process's by summation order only,
    far less than bfloat16 itself differs from the float32 reference."""
    one = qwen_engine.load(blocks_gguf)
    reference = qwen_engine.load(blocks_gguf, dtype="float32", quant="none")
    split = qwen_engine.load(blocks_gguf, tensor_parallel=2)
    try:
        assert split.quant == one.quant == "auto"
        attention = split.decoder.model.layers[0].self_attn
        if cpu_kernels() is not None:  # the blocks as stored, the products left unrounded, the native step on
            assert type(attention.o_proj).__name__ == "BlockLinear" and attention.o_proj.partial_sums
            assert split.decoder.fused_decode is not None and one.decoder.fused_decode is not None
        prefill = split.logits(PROMPT)
        assert relative(prefill, one.logits(PROMPT)) <= relative(one.logits(PROMPT), reference.logits(PROMPT)) / 4
        steps = one.generate(PROMPT, max_tokens=12, temperature=0, ignore_eos=True).token_ids
        decoded = [model.stepwise_logits(PROMPT + steps, len(PROMPT))[len(PROMPT):] for model in (split, one, reference)]
        assert relative(decoded[0], decoded[1]) <= relative(decoded[1], decoded[2]) / 4
    finally:
        split.close()


def test_a_worker_killed_mid_request_is_one_clear_error(blocks_gguf) -> None:
    """A rank that dies while the others wait in a collective (here inside the native step's all-reduce) fails the
    request with one clear error within 30 s: nothing hangs, and the model says it must be loaded again."""
    import threading

    split = qwen_engine.load(blocks_gguf, tensor_parallel=2)
    failures: list[BaseException] = []
    started = threading.Event()

    def generate() -> None:
        try:
            for _ in split.stream(PROMPT, max_tokens=200, temperature=0, ignore_eos=True):
                started.set()
                time.sleep(0.01)  # a slow reader keeps the request going until the kill
        except BaseException as err:
            failures.append(err)

    worker = threading.Thread(target=generate)
    try:
        worker.start()
        assert started.wait(60)
        split._ranks.processes[0].kill()
        killed = time.monotonic()
        worker.join(30)
        assert not worker.is_alive() and time.monotonic() - killed < 30
        assert len(failures) == 1 and isinstance(failures[0], QwenError), failures
        assert "\n" not in str(failures[0]) and "rank" in str(failures[0])
        with pytest.raises(QwenError, match="tensor-parallel rank"):
            split.generate(PROMPT, max_tokens=2)
    finally:
        split.close()
    assert all(process.poll() is not None for process in split._ranks.processes)


def test_the_shards_cover_every_tensor_once() -> None:
    """Column-parallel rows, row-parallel columns and vocabulary rows put back together give the whole tensor;
    replicated kv heads are the ones each rank's queries read (query head h reads kv head h // group)."""
    config = ModelConfig(architecture="qwen2", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=1,
                         num_heads=8, num_kv_heads=2, head_dim=4)
    for tp in (2, 4):
        shard_shapes = rank_shapes(config, tp)
        for name, shape in config.checkpoint_shapes().items():
            whole = torch.arange(torch.Size(shape).numel(), dtype=torch.float32).reshape(shape)
            parts = [shard(name, whole, config, tp, rank) for rank in range(tp)]
            assert all(tuple(p.shape) == shard_shapes[name] for p in parts), name
            if "k_proj" in name or "v_proj" in name:
                group = config.num_heads // config.num_kv_heads
                for rank, part in enumerate(parts):
                    first_query = rank * config.num_heads // tp
                    kv = first_query // group
                    assert torch.equal(part, whole[kv * 4 : (kv + shard_config(config, tp).num_kv_heads) * 4]), (name, rank)
            elif any(key in name for key in ("q_proj", "gate_proj", "up_proj", "embed_tokens", "lm_head")):
                assert torch.equal(torch.cat(parts, dim=0), whole)
            elif "o_proj" in name or "down_proj" in name:
                assert torch.equal(torch.cat(parts, dim=1), whole)
            else:
                assert all(torch.equal(p, whole) for p in parts)
            assert shard_shape(name, shape, tp, shard_config(config, tp).num_kv_heads, 4) == shard_shapes[name]


def test_a_model_that_cannot_split_is_one_clear_error(tmp_path, tokenizer_files) -> None:
    directory = write_hf_checkpoint(tmp_path / "odd", random_model(hf_config("qwq"), seed=1), tokenizer_files)  # 10 heads
    with pytest.raises(QwenError, match=r"cannot run with --tp 4: attention heads 10 is not divisible by tp=4"):
        qwen_engine.load(directory, dtype="float32", tensor_parallel=4)
    mha = write_hf_checkpoint(tmp_path / "mha", random_model(hf_config("qwen1.5"), seed=1), tokenizer_files)  # MLP 176
    with pytest.raises(QwenError, match=r"down_proj input per rank 88 is not a multiple of q8_0's 32-weight groups"):
        qwen_engine.load(mha, tensor_parallel=2, quant="q8_0")


def test_a_worker_that_dies_is_one_clear_error(tmp_path, tokenizer_files) -> None:
    """The next call fails at once with one clear error (no hang), and a server on the model says 503 on /health."""
    import httpx
    from test_server import Running

    directory = write_hf_checkpoint(tmp_path / "m", random_model(hf_config("qwen1.5"), seed=2), tokenizer_files)
    split = qwen_engine.load(directory, dtype="float32", tensor_parallel=2)
    running = Running(split)
    try:
        split.generate(PROMPT, max_tokens=2)
        assert httpx.get(running.url + "/health").status_code == 200
        split._ranks.processes[0].kill()
        split._ranks.processes[0].wait(10)
        started = time.monotonic()
        with pytest.raises(QwenError, match="tensor-parallel rank"):
            split.generate(PROMPT, max_tokens=2)
        assert time.monotonic() - started < 30
        assert httpx.get(running.url + "/health").status_code == 503
    finally:
        running.close()
        split.close()


def test_qwen_generate_and_serve_at_tp_2(tmp_path, tokenizer_files, capsys) -> None:
    """`qwen generate --tp 2` prints what one process prints; `qwen serve`'s engine on a tp 2 model answers the
    openai client, 8 streams at once, each with the greedy text of one process."""
    import concurrent.futures

    from test_server import NAME, Running

    from qwen_engine import cli

    directory = write_hf_checkpoint(tmp_path / "m", random_model(hf_config("qwen2.5-0.5b"), seed=5), tokenizer_files)
    options = ["generate", "--model", str(directory), "--dtype", "float32", "--max-tokens", "8", "--temperature", "0",
               "Hello there"]
    assert cli.main(options) == 0
    alone = capsys.readouterr().out
    assert cli.main([*options, "--tp", "2"]) == 0
    assert capsys.readouterr().out == alone
    one = qwen_engine.load(directory, dtype="float32")
    prompts = [f"Count to {n}:" for n in range(8)]
    expected = [one.chat([{"role": "user", "content": p}], max_tokens=10, temperature=0).text for p in prompts]
    split = qwen_engine.load(directory, dtype="float32", tensor_parallel=2)
    running = Running(split)
    try:
        client = running.client()

        def stream(prompt: str) -> str:
            chunks = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": prompt}],
                                                    max_tokens=10, temperature=0, stream=True)
            return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            assert list(pool.map(stream, prompts)) == expected
    finally:
        running.close()
        split.close()


def _printed_by_one_process(directory, capsys) -> tuple[list[str], str]:
    """`qwen generate` options for a tiny checkpoint, and what one process prints for them."""
    from qwen_engine import cli

    options = ["generate", "--model", str(directory), "--dtype", "float32", "--max-tokens", "8", "--temperature", "0",
               "Hello there"]
    assert cli.main(options) == 0
    return options, capsys.readouterr().out


TORCHRUN = str(Path(sys.executable).parent / "torchrun")


def test_torchrun_gives_what_tp_2_gives(tmp_path, tokenizer_files, capsys) -> None:
    """`torchrun --nproc-per-node 2 -m qwen_engine generate --tp 2 …`: the launched ranks join torchrun's group
    instead of starting workers; rank 0 prints what one process prints, rank 1 only runs forwards."""
    directory = write_hf_checkpoint(tmp_path / "m", random_model(hf_config("qwen1.5"), seed=6), tokenizer_files)
    options, alone = _printed_by_one_process(directory, capsys)
    done = subprocess.run([TORCHRUN, "--standalone", "--nproc-per-node", "2", "-m", "qwen_engine", *options,
                           "--tp", "2"], capture_output=True, text=True, timeout=240,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout == alone
    wrong = subprocess.run([TORCHRUN, "--standalone", "--nproc-per-node", "2", "-m", "qwen_engine", *options,
                            "--tp", "4"], capture_output=True, text=True, timeout=240)
    assert wrong.returncode != 0 and "torchrun started 2 processes but --tp is 4; give --tp 2" in wrong.stderr


def test_torchrun_over_two_nodes_gives_what_tp_2_gives(tmp_path, tokenizer_files, capsys) -> None:
    """Two torchrun agents, as on two machines (`--nnodes 2`), meeting at one rendezvous endpoint (c10d, here on
    127.0.0.1): the command runs once, on the rank-0 process, with what one process prints; the other prints nothing."""
    from qwen_engine.distributed import free_port

    directory = write_hf_checkpoint(tmp_path / "m", random_model(hf_config("qwen2.5-0.5b"), seed=7), tokenizer_files)
    options, alone = _printed_by_one_process(directory, capsys)
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [subprocess.Popen([TORCHRUN, "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                               "--rdzv-endpoint", endpoint, "--rdzv-id", "tp-test", "-m", "qwen_engine", *options,
                               "--tp", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}) for _ in range(2)]
    try:
        outputs = [node.communicate(timeout=240) for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    assert [node.returncode for node in nodes] == [0, 0], [err[-2000:] for _, err in outputs]
    assert sorted(out for out, _ in outputs) == ["", alone]


def test_qwen_serve_at_tp_2_stops_every_rank_on_sigterm(tmp_path, tokenizer_files) -> None:
    """The real command: it serves, and SIGTERM ends it and its worker promptly, with no process left behind."""
    import signal

    from serve_command import ServeCommand

    directory = write_hf_checkpoint(tmp_path / "m", random_model(hf_config("qwen1.5"), seed=8), tokenizer_files)
    serve = ServeCommand(directory, "--served-model-name", "tiny", "--dtype", "float32", "--tp", "2", "--kv-cache-gb", "0.05")
    try:
        workers = [int(pid) for pid in open(f"/proc/{serve.process.pid}/task/{serve.process.pid}/children").read().split()]
        assert len(workers) == 1
        reply = serve.client().chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
        assert reply.usage.completion_tokens <= 4
        serve.process.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        assert serve.process.wait(timeout=30) == 0 and time.monotonic() - sent < 15
        deadline = time.monotonic() + 10
        while any(_running(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_running(pid) for pid in workers)
    finally:
        serve.close()


def _running(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/status").read().split("State:")[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False
