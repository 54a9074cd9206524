"""The one engine under every path (engine/runner.py, serving.py, scheduler.py): per-sequence rotary frequencies in
one batch, media items in prompts (a stand-in encoder until the real ones land), the library's calls from two
threads, and the library's new request options."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tiny import hf_config, random_model, to_v1_state, v1_config, write_qwen_tiktoken

import qwen_engine
from qwen_engine.engine.serving import Request, ServingEngine
from qwen_engine.errors import QwenError
from qwen_engine.prompt import MediaItem, Prompt
from qwen_engine.sampling_params import SamplingParams

GREEDY = SamplingParams(max_tokens=4, temperature=0.0, repetition_penalty=1.0, ignore_eos=True)


def ids(count: int, seed: int) -> list[int]:
    return torch.randint(100, 5000, (count,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def v1_long(tmp_path_factory, gguf_arrays) -> qwen_engine.Model:
    """A tiny Qwen v1 checkpoint whose rotary frequencies depend on the prompt (dynamic NTK, LogN; seq_length 64)."""
    config = hf_config("qwen1.5", max_position_embeddings=512)
    directory = tmp_path_factory.mktemp("qwen-v1-ntk")
    save_file(to_v1_state(random_model(config, seed=3).state_dict()), str(directory / "model.safetensors"))
    raw = v1_config(config, seq_length=64, use_dynamic_ntk=True, use_logn_attn=True)
    (directory / "config.json").write_text(json.dumps(raw), encoding="utf-8")
    write_qwen_tiktoken(directory / "qwen.tiktoken", gguf_arrays[0])
    return qwen_engine.load(directory, dtype="float32")


@pytest.fixture(scope="module")
def tiny(tiny_gguf) -> qwen_engine.Model:
    return qwen_engine.load(tiny_gguf, dtype="float32")


def first_logits(engine: ServingEngine, prompts: dict[str, Prompt | list[int]]) -> dict[str, torch.Tensor]:
    """The logits each prompt's first token was picked from, all requests run together."""
    requests = [Request(name, prompt, GREEDY.updated(max_tokens=1), keep_logits=True) for name, prompt in prompts.items()]
    return {name: events[0][0].logits for name, events in engine.run(requests).items()}


def close(ours: torch.Tensor, reference: torch.Tensor, tolerance: float = 1e-4) -> bool:
    return bool((ours - reference).abs().max() <= tolerance * reference.abs().max())


# ------------------------------------------------------------------------------------- per-sequence positions


def test_a_served_v1_prompt_past_seq_length_matches_the_one_forward_path(v1_long) -> None:
    """150 tokens on a seq_length-64 v1 model (α = 7 from its own length) beside short prompts (α = 1) in the same
    forwards: each gives the logits of its own one-forward pass, and nothing of the long one leaks into the rest."""
    engine = v1_long.serving_engine(num_blocks=64)
    long, shorts = ids(150, seed=1), {f"short{i}": ids(20 + i, seed=10 + i) for i in range(3)}
    assert v1_long.decoder.rotary.choose(150) == (7, False) and v1_long.decoder.rotary.choose(22) == (1, False)
    mixed = []
    engine.on_step = lambda step, _: mixed.append({seq.rotary for seq, _ in step.prefills})
    served = first_logits(engine, {"long": long, **shorts})
    assert {(7, False), (1, False)} in mixed  # one forward held both choices
    assert close(served["long"], v1_long.logits(long)[-1])
    for name, prompt in shorts.items():
        assert close(served[name], v1_long.logits(prompt)[-1])
    # Short requests after it are as short requests before it.
    assert close(first_logits(engine, {"after": shorts["short0"]})["after"], v1_long.logits(shorts["short0"])[-1])


def test_prefixes_cached_under_one_rotary_choice_are_not_reused_under_another(v1_long) -> None:
    """Cached keys are stored rotated: a long prompt (α = 7) that starts like an earlier short one (α = 1) must not
    take the short one's blocks, nor the other way round."""
    shared = ids(48, seed=7)
    short, long = shared + ids(4, seed=8), shared + ids(110, seed=9)
    engine = v1_long.serving_engine(num_blocks=64)
    for name, prompt in (("short", short), ("long", long), ("short again", short)):
        hits = engine.stats()["prefix_hit_tokens"]
        assert close(first_logits(engine, {name: prompt})[name], v1_long.logits(prompt)[-1])
        assert engine.stats()["prefix_hit_tokens"] == hits + (48 if name == "short again" else 0)


def test_the_rotary_choice_holds_for_every_chunk_and_decoding_step(v1_long) -> None:
    """A 100-token prompt in chunks of 32 keeps α = 3 (from 100) through every chunk and step, although a fresh
    forward of its first chunk alone would choose α = 1, and of the whole sequence α = 7."""
    prompt, continuation = ids(100, seed=2), ids(40, seed=3)
    tokens = prompt + continuation
    engine = v1_long.serving_engine(num_blocks=64, prefill_tokens=32)
    request = Request("r", prompt, GREEDY.updated(max_tokens=len(continuation) + 1), forced=continuation, keep_logits=True)
    stepped = torch.stack([event.logits for event in engine.run([request])["r"][0]])
    assert v1_long.decoder.rotary.choose(len(tokens)) == (7, False)
    # Reference: the whole sequence in one forward with α fixed at 3, through the decoder's own gather of tables.
    decoder = v1_long.decoder
    with torch.inference_mode():
        hidden, residual = decoder.embed(torch.tensor([tokens])), None
        rope = decoder.rotary.gather((3, False), slice(0, len(tokens)), len(tokens), hidden.dtype)
        for layer in decoder.model.layers:
            hidden, residual = layer(hidden, residual, rope, None)
        reference = decoder.lm_head(decoder.model.norm(hidden, residual)[0])[0, len(prompt) - 1 :]
    assert close(stepped, reference)
    assert not close(stepped, v1_long.logits(tokens)[len(prompt) - 1 :], 1e-3)  # α = 7 differs


# ---------------------------------------------------------------------------------------------- media items


def stand_in_encoder(calls: list[bytes], hidden: int):
    """A fixed embedding per item, drawn from its digest (the real encoders replace this)."""
    def encode(item: MediaItem) -> torch.Tensor:
        calls.append(item.digest)
        seed = int.from_bytes(hashlib.blake2b(item.digest, digest_size=8).digest(), "little") % 2**63
        return torch.randn(item.length, hidden, generator=torch.Generator().manual_seed(seed))
    return encode


def with_item(token_ids: list[int], digest: bytes, offset: int, length: int) -> Prompt:
    return Prompt(list(token_ids), [MediaItem("stand-in", digest, offset, length)])


def item_engine(model, calls: list[bytes], **options) -> ServingEngine:
    runner = model.runner(options.pop("num_blocks", 64))
    runner.encoders["stand-in"] = stand_in_encoder(calls, model.config.hidden_size)
    return ServingEngine(runner, model.tokenizer, model.stop_token_ids, **options)


def one_forward_with_item(model, prompt: Prompt) -> torch.Tensor:
    """Logits of the last position, the item's embedding written over its positions by hand."""
    item = prompt.items[0]
    embedding = stand_in_encoder([], model.config.hidden_size)(item)
    with torch.inference_mode():
        hidden = model.decoder.embed(torch.tensor([prompt.token_ids]))
        hidden[0, item.offset : item.end] = embedding
        return model.decoder(inputs_embeds=hidden)[0, -1]


def test_item_embeddings_fill_their_positions_across_chunk_boundaries(tiny) -> None:
    """An item over positions 5…24 of a 30-token prompt, prefilled in chunks of 8 (boundaries at 8, 16, 24 inside
    it), gives the logits of one forward with the item written in; the encoder runs once."""
    prompt = with_item(ids(30, seed=4), b"picture-1", 5, 20)
    reference = one_forward_with_item(tiny, prompt)
    for chunk in (8, 512):
        calls = []
        logits = first_logits(item_engine(tiny, calls, prefill_tokens=chunk), {"p": prompt})["p"]
        assert close(logits, reference, 1e-5) and calls == [b"picture-1"]
        prompt.items[0].embedding = None  # the next engine computes it again
    assert not close(reference, tiny.logits(prompt.token_ids)[-1], 1e-3)  # the item does change the output


def test_prefix_cache_keeps_prompts_with_different_items_apart(tiny) -> None:
    """Equal ids, different item digests: no block is shared and the outputs differ. Equal digests: the blocks
    are reused, and the logits are those of the first."""
    token_ids = ids(60, seed=5)
    calls = []
    engine = item_engine(tiny, calls)
    first = first_logits(engine, {"a": with_item(token_ids, b"cat", 2, 10)})["a"]
    hits = engine.stats()["prefix_hit_tokens"]
    other = first_logits(engine, {"b": with_item(token_ids, b"dog", 2, 10)})["b"]
    assert engine.stats()["prefix_hit_tokens"] == hits  # "dog" shares no block with "cat"
    assert not close(first, other, 1e-3)
    again = first_logits(engine, {"c": with_item(token_ids, b"cat", 2, 10)})["c"]
    assert engine.stats()["prefix_hit_tokens"] >= hits + 48  # three full blocks of "cat" reused
    assert close(again, first, 1e-5)
    # The same item one position further on shares nothing either.
    before = engine.stats()["prefix_hit_tokens"]
    first_logits(engine, {"moved": with_item(token_ids, b"cat", 3, 10)})
    assert engine.stats()["prefix_hit_tokens"] == before
    # Text-only prompts with those ids share nothing with either.
    before = engine.stats()["prefix_hit_tokens"]
    first_logits(engine, {"text": token_ids})
    assert engine.stats()["prefix_hit_tokens"] == before


def test_preemption_keeps_encoder_outputs(tiny) -> None:
    """Too few blocks for three sequences at once: running ones are preempted and recomputed, their items' encoder
    outputs kept (one encoder call per item) and their outputs unchanged."""
    prompts = {f"p{i}": with_item(ids(40, seed=20 + i), f"item{i}".encode(), 3, 12) for i in range(3)}
    alone = {}
    for name, prompt in prompts.items():
        events = item_engine(tiny, []).run([Request(name, prompt, GREEDY.updated(max_tokens=20))])
        alone[name] = [e.token_id for e in events[name][0]]
        prompt.items[0].embedding = None
    calls, preempted = [], []
    tight = item_engine(tiny, calls, num_blocks=9)  # 4 blocks a sequence at its longest
    tight.on_step = lambda step, _: preempted.extend(step.preempted)
    results = tight.run([Request(name, prompt, GREEDY.updated(max_tokens=20)) for name, prompt in prompts.items()])
    assert preempted
    assert sorted(calls) == sorted(f"item{i}".encode() for i in range(3))
    assert {name: [e.token_id for e in events[0]] for name, events in results.items()} == alone


def test_stepwise_logits_at_the_full_context(tiny) -> None:
    """Ids that fill the context: every row a decoding step computes, the last (past the end) left out."""
    tokens = ids(tiny.config.context_length, seed=11)
    stepwise, full = tiny.stepwise_logits(tokens, 40), tiny.logits(tokens)
    assert close(stepwise[39:-1], full[39:-1], 1e-5) and not stepwise[-1].any()


def test_an_item_kind_without_an_encoder_is_refused(tiny) -> None:
    with pytest.raises(QwenError, match="no stand-in encoder"):
        tiny.generate(with_item(ids(10, seed=6), b"x", 2, 3), max_tokens=1)


# ------------------------------------------------------------------------------------------------ the library


def test_generate_is_safe_from_two_threads_at_once(tiny) -> None:
    prompts = [ids(30, seed=30 + i) for i in range(4)]
    options = dict(max_tokens=12, temperature=0, repetition_penalty=1.0, ignore_eos=True)
    expected = [tiny.generate(p, **options).token_ids for p in prompts]
    got: dict[int, list[int]] = {}
    failures: list[BaseException] = []

    def work(index: int) -> None:
        try:
            for _ in range(3):
                got[index] = tiny.generate(prompts[index], **options).token_ids
                assert got[index] == expected[index]
        except BaseException as err:  # noqa: BLE001 — reported below, on the test's thread
            failures.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures and [got[i] for i in range(len(prompts))] == expected


def test_library_n_logprobs_logit_bias_and_json_mode(tiny) -> None:
    prompt = ids(12, seed=40)
    result = tiny.generate(prompt, max_tokens=5, temperature=1.0, top_k=0, top_p=1.0, seed=3, n=3, logprobs=2)
    assert len(result.choices) == 3 and all(len(c.token_ids) == 5 for c in result.choices)
    assert len({tuple(c.token_ids) for c in result.choices}) > 1  # seeds 3, 4, 5
    chosen_only = tiny.generate(prompt, max_tokens=2, temperature=0, logprobs=0).logprobs
    assert len(chosen_only) == 2 and chosen_only[0].top == []
    entry = result.choices[0].logprobs[0]
    assert entry.token_id == result.choices[0].token_ids[0] and len(entry.top) == 2 and entry.logprob <= 0
    greedy = dict(max_tokens=3, temperature=0, repetition_penalty=1.0, ignore_eos=True)
    banned = tiny.generate(prompt, **greedy).token_ids[0]
    assert tiny.generate(prompt, logit_bias={banned: -100.0}, **greedy).token_ids[0] != banned
    forced = tiny.generate(prompt, logit_bias={7: 100.0}, **greedy)
    assert forced.token_ids == [7, 7, 7]
    reply = tiny.generate(prompt, response_format={"type": "json_object"}, max_tokens=40, temperature=1.0, seed=0)
    assert reply.text.lstrip().startswith("{")
    if reply.finish_reason == "stop":
        assert isinstance(json.loads(reply.text), dict)
    with pytest.raises(QwenError, match="response_format"):
        tiny.generate(prompt, response_format={"type": "yaml"})
    with pytest.raises(QwenError, match="stream"):
        next(iter(tiny.stream(prompt, n=2)))


def test_a_library_call_gets_blocks_for_its_own_request_only(tiny) -> None:
    """A one-off call is sized for its prompt and output, not for a server's share of the memory."""
    engine = tiny._engine_for(tiny.request([1, 2, 3], max_tokens=20))
    assert engine.stats()["kv_blocks_total"] == 3  # 24 tokens: 2 blocks, and one spare
