"""The serving engine: block allocation and prefix reuse, continuous batching, chunked prefill and preemption
(engine/paged.py, engine/scheduler.py, engine/serving.py), on the default model."""

from __future__ import annotations

import pytest

from qwen_engine.engine.paged import BLOCK_SIZE, ROOT, BlockAllocator
from qwen_engine.engine.serving import Request, ServingEngine

GREEDY = dict(temperature=0.0, repetition_penalty=1.0, ignore_eos=True)


def prompts(model, count: int) -> list[list[int]]:
    topics = ["binary search", "a linked list", "quicksort", "a hash map", "regular expressions", "recursion",
              "a stack", "merge sort", "Dijkstra's algorithm", "a trie", "bit manipulation", "a heap", "dynamic programming",
              "a queue", "string reversal", "matrix multiplication", "BFS", "DFS", "a ring buffer", "memoization"]
    return [model.chat_prompt([{"role": "user", "content": f"Explain {topics[i % len(topics)]} in one paragraph."}])
            for i in range(count)]


def outputs(engine: ServingEngine, model, prompt_lists: list[list[int]], max_tokens: int = 16, logprobs: int | None = None,
            **sampling) -> list[list[int]] | list[list[tuple[int, list[tuple[int, float]]]]]:
    """Each prompt's generated ids (with `logprobs`: (id, the top alternatives) pairs)."""
    params = model.defaults.updated(max_tokens=max_tokens, **{**GREEDY, **sampling})
    requests = [Request(f"r{i}", ids, params, logprobs=logprobs) for i, ids in enumerate(prompt_lists)]
    results = engine.run(requests)
    events = [[e for e in results[f"r{i}"][0] if e.token_id is not None] for i in range(len(requests))]
    if logprobs is None:
        return [[e.token_id for e in sequence] for sequence in events]
    return [[(e.token_id, e.logprob.top) for e in sequence] for sequence in events]


def assert_same_up_to_near_ties(ours, reference, margin: float = 0.25) -> None:
    """Greedy outputs equal, or equal until a step where the reference's two likeliest tokens were within `margin`
    nats of each other and ours took the other one (bfloat16 noise decides such ties; vLLM's tests use this
    criterion too)."""
    for mine, theirs in zip(ours, reference, strict=True):
        for (token, _), (expected, top) in zip(mine, theirs):
            if token != expected:
                (first, best), (second, runner_up) = top[:2]
                assert {token, expected} == {first, second} and best - runner_up < margin, (token, expected, top)
                break
        else:
            assert [t for t, _ in mine] == [t for t, _ in theirs]


def test_allocator_reuses_registered_prefixes_and_counts_references() -> None:
    allocator = BlockAllocator(8, block_size=4)
    tokens = list(range(10))
    first = [allocator.allocate() for _ in range(3)]
    chain = ROOT
    for i in range(2):  # two full blocks registered
        chain = allocator.register(first[i], chain, tokens[i * 4 : (i + 1) * 4])
    assert allocator.cached_prefix(tokens) == (first[:2], chain)  # the blocks, and the digest to chain on from
    assert allocator.cached_prefix(tokens[:8])[0] == first[:1]  # the block holding the last token is recomputed
    assert allocator.cached_prefix([99] + tokens[1:])[0] == []
    allocator.release(first)
    assert allocator.num_free == 8 and allocator.cached_prefix(tokens)[0] == first[:2]  # freed blocks stay reusable
    allocator.take(first[0])
    assert allocator.ref_counts[first[0]] == 1 and allocator.num_free == 7
    while allocator.num_free:  # handing blocks out again forgets what they held
        allocator.allocate()
    assert allocator.cached_prefix(tokens)[0] == [first[0]]


def test_greedy_output_is_the_same_alone_and_batched_with_15_others(default_model) -> None:
    engine = default_model.serving_engine(num_blocks=512)
    batch = prompts(default_model, 16)
    alone = outputs(engine, default_model, batch[:1])[0]
    together = outputs(default_model.serving_engine(num_blocks=512), default_model, batch)
    assert together[0] == alone
    assert len({tuple(o) for o in together}) > 8  # different prompts, different answers
    assert engine.stats()["kv_blocks_used"] == 0


def test_prefix_cache_chunked_prefill_and_preemption_keep_the_output(default_model) -> None:
    """Reused blocks, prompts in chunks and recomputation after preemption change which tokens a forward computes
    together, and with it the matmul path (int8 activations for a few rows, bfloat16 for many) and summation
    orders: outputs agree up to near ties."""
    def answers(engine: ServingEngine, prompt_lists: list[list[int]]) -> list:
        return outputs(engine, default_model, prompt_lists, max_tokens=24, logprobs=2)

    system = "You are a careful assistant. " * 30  # a long shared system prompt: several full blocks
    convo = [default_model.chat_prompt([{"role": "system", "content": system}, {"role": "user", "content": q}])
             for q in ("Name a prime number.", "Name a colour.", "Name a planet.", "Name a metal.")]
    reference = [answers(default_model.serving_engine(num_blocks=256), [ids])[0] for ids in convo]

    cached = default_model.serving_engine(num_blocks=256)
    assert answers(cached, convo[:1]) == reference[:1]  # nothing cached yet: the very same computation
    assert_same_up_to_near_ties(answers(cached, convo[1:]), reference[1:])
    shared = (len(convo[0].token_ids) - 40) // BLOCK_SIZE * BLOCK_SIZE  # the system prompt's full blocks
    assert cached.stats()["prefix_hit_tokens"] >= 3 * shared

    chunked = default_model.serving_engine(num_blocks=256, prefill_tokens=24)
    assert_same_up_to_near_ties(answers(chunked, convo), reference)

    # Room for about two sequences at once: the others wait, and running ones get preempted and recomputed.
    blocks_each = -(-(len(convo[0].token_ids) + 24) // BLOCK_SIZE)
    tight = default_model.serving_engine(num_blocks=2 * blocks_each + 1)
    preempted = []
    tight.on_step = lambda step, seconds: preempted.extend(step.preempted)
    assert_same_up_to_near_ties(answers(tight, convo), reference)
    assert preempted and tight.stats()["kv_blocks_used"] == 0


def test_requests_that_cannot_fit_are_refused(default_model) -> None:
    from qwen_engine.errors import QwenError

    engine = default_model.serving_engine(num_blocks=4)
    with pytest.raises(QwenError, match="KV cache"):
        engine.add(Request("big", list(range(100)), default_model.defaults.updated(max_tokens=16)))
    with pytest.raises(QwenError, match="context"):
        engine.add(Request("long", [1], default_model.defaults.updated(max_tokens=default_model.config.context_length)))


def test_more_sequences_than_one_native_step_takes(default_model) -> None:
    """40 decoding at once: the fused step takes them 32 at a time, each the same as alone."""
    engine = default_model.serving_engine(num_blocks=1024, max_seqs=40)
    batch = prompts(default_model, 40)
    together = outputs(engine, default_model, batch, max_tokens=3)
    assert together[33] == outputs(default_model.serving_engine(num_blocks=64), default_model, batch[33:34], max_tokens=3)[0]
