"""The decoder's own contracts: cached and chunked forwards equal the full forward, injected embeddings,
bfloat16 against float32, the context limit."""

from __future__ import annotations

import pytest
import torch

import qwen_engine
from qwen_engine.engine.serving import Request, ServingEngine
from qwen_engine.errors import QwenError
from qwen_engine.sampling_params import SamplingParams

IDS = [9707, 1879, 11, 419, 374, 264, 1273, 315, 279, 6233, 13, 1084, 5711, 1661, 2038, 30]


@pytest.fixture(scope="module")
def tiny(tiny_gguf):
    return qwen_engine.load(tiny_gguf, dtype="float32", device="cpu")


def test_chunked_prefill_and_decode_through_the_paged_cache_equal_the_full_forward(tiny) -> None:
    """Chunks of 4 (the last of them masked after earlier ones), then one decoding step per token, on the engine."""
    full = tiny.logits(IDS)
    params = SamplingParams(max_tokens=len(IDS) - 11 + 1, temperature=0.0, repetition_penalty=1.0, ignore_eos=True)
    request = Request("r", IDS[:11], params, forced=IDS[11:], keep_logits=True)
    engine = ServingEngine(tiny.runner(8), tiny.tokenizer, tiny.stop_token_ids, prefill_tokens=4)
    events = engine.run([request])["r"][0]
    torch.testing.assert_close(torch.stack([event.logits for event in events]), full[10:], rtol=1e-5, atol=1e-5)


def test_logits_at_computes_the_head_for_the_chosen_positions(tiny) -> None:
    with torch.inference_mode():
        picked = tiny.decoder(torch.tensor([IDS]), logits_at=torch.tensor([3, len(IDS) - 1]))[0]
    assert picked.shape == (2, tiny.config.vocab_size)
    torch.testing.assert_close(picked, tiny.logits(IDS)[[3, -1]], rtol=1e-5, atol=1e-5)


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
    """A max_tokens not given is what the context leaves; one given that does not fit is refused, as the server does."""
    prompt = IDS * 3  # 48 of the 64 positions
    result = tiny.generate(prompt, temperature=0, repetition_penalty=1.0, ignore_eos=True)
    assert result.finish_reason == "length"
    assert len(prompt) + len(result.token_ids) == tiny.config.context_length
    with pytest.raises(QwenError, match="max_tokens"):
        tiny.generate(prompt, max_tokens=100)


def test_prompt_filling_the_context_is_refused(tiny) -> None:
    with pytest.raises(QwenError, match="context"):
        tiny.generate(IDS * 4, max_tokens=1)
    with pytest.raises(QwenError, match="context"):
        tiny.logits(IDS * 5)
