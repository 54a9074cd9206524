"""The decoder's own contracts: cached and chunked forwards equal the full forward, injected embeddings,
bfloat16 against float32, the context limit."""

from __future__ import annotations

import pytest
import torch

import qwen_engine
from qwen_engine.engine.kv_cache import StaticKVCache
from qwen_engine.errors import QwenError

IDS = [9707, 1879, 11, 419, 374, 264, 1273, 315, 279, 6233, 13, 1084, 5711, 1661, 2038, 30]


@pytest.fixture(scope="module")
def tiny(tiny_gguf):
    return qwen_engine.load(tiny_gguf, dtype="float32", device="cpu")


def test_chunked_prefill_and_decode_through_the_cache_equal_the_full_forward(tiny) -> None:
    full = tiny.logits(IDS)
    cache = StaticKVCache(tiny.config, max_len=32, dtype=torch.float32, device=torch.device("cpu"))
    with torch.inference_mode():
        first = tiny.decoder(torch.tensor([IDS[:5]]), cache=cache)[0]
        second = tiny.decoder(torch.tensor([IDS[5:11]]), start=5, cache=cache)[0]  # a chunk after a chunk: masked
        steps = [tiny.decoder(torch.tensor([[t]]), start=11 + i, cache=cache)[0, 0] for i, t in enumerate(IDS[11:])]
    stitched = torch.cat([first, second, torch.stack(steps)])
    torch.testing.assert_close(stitched, full, rtol=1e-5, atol=1e-5)


def test_last_only_computes_the_head_for_the_last_position(tiny) -> None:
    with torch.inference_mode():
        last = tiny.decoder(torch.tensor([IDS]), last_only=True)[0]
    assert last.shape == (1, tiny.config.vocab_size)
    torch.testing.assert_close(last[0], tiny.logits(IDS)[-1], rtol=1e-5, atol=1e-5)


def test_last_only_prefill_still_caches_every_position(tiny) -> None:
    """The last layer skips the positions whose outputs nobody reads, but their keys and values are cached."""
    full = tiny.logits(IDS)
    cache = StaticKVCache(tiny.config, max_len=32, dtype=torch.float32, device=torch.device("cpu"))
    with torch.inference_mode():
        last = tiny.decoder(torch.tensor([IDS[:10]]), cache=cache, last_only=True)[0, -1]
        steps = [tiny.decoder(torch.tensor([[t]]), start=10 + i, cache=cache, last_only=True)[0, -1] for i, t in enumerate(IDS[10:])]
    torch.testing.assert_close(torch.stack([last, *steps]), full[9:], rtol=1e-5, atol=1e-5)


def test_stepwise_logits_are_the_full_forward_logits(tiny) -> None:
    stepwise = tiny.stepwise_logits(IDS, prefill=6)
    torch.testing.assert_close(stepwise[5:], tiny.logits(IDS)[5:], rtol=1e-5, atol=1e-5)
    assert not stepwise[:5].any()  # not computed
    with pytest.raises(QwenError, match="prefill"):
        tiny.stepwise_logits(IDS, prefill=0)


def test_injected_embeddings_replace_token_embeddings(tiny) -> None:
    with torch.inference_mode():
        embeds = tiny.decoder.embed(torch.tensor([IDS]))
        same = tiny.decoder(inputs_embeds=embeds)[0]
        embeds[0, 3] = torch.randn(tiny.config.hidden_size)  # e.g. an image feature at position 3
        changed = tiny.decoder(inputs_embeds=embeds)[0]
    torch.testing.assert_close(same, tiny.logits(IDS))
    torch.testing.assert_close(changed[:3], same[:3])  # causal: earlier positions unaffected
    assert not torch.allclose(changed[3:], same[3:])


def test_bfloat16_tracks_float32(tiny, tiny_gguf) -> None:
    half = qwen_engine.load(tiny_gguf, dtype="bfloat16", device="cpu")
    assert half.dtype == torch.bfloat16
    ours, reference = half.logits(IDS), tiny.logits(IDS)
    assert ours.dtype == torch.float32
    assert (ours - reference).abs().max() <= 0.05 * reference.abs().max()
    assert (ours.argmax(-1) == reference.argmax(-1)).float().mean() >= 0.8


def test_generation_stops_at_the_context_limit(tiny) -> None:
    prompt = IDS * 3  # 48 of the 64 positions
    result = tiny.generate(prompt, max_tokens=100, temperature=0, stop_token_ids=[], repetition_penalty=1.0)
    assert result.finish_reason in {"length", "stop"}
    assert len(prompt) + len(result.token_ids) <= tiny.config.context_length


def test_prompt_filling_the_context_is_refused(tiny) -> None:
    with pytest.raises(QwenError, match="context"):
        tiny.generate(IDS * 4, max_tokens=1)
    with pytest.raises(QwenError, match="context"):
        tiny.logits(IDS * 5)
