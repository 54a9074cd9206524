"""Sampling (qwen_engine.engine.sampling), stop strings (engine.text.StopStringFilter) on small fake logits,
and a few short end-to-end generations on the default model (qwen-family.md §8.4 for the defaults)."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch

from qwen_engine.engine.text import StopStringFilter
from qwen_engine.results import GenerationResult
from qwen_engine.engine.sampling import Sampler
from qwen_engine.sampling_params import SamplingParams
from qwen_engine.errors import QwenError

CPU = torch.device("cpu")
# Plain sampling: temperature 1 and every filter off, so probabilities are softmax(logits).
PLAIN = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0)
PROBS = [0.5, 0.3, 0.15, 0.05]  # cumulative 0.5, 0.8, 0.95, 1.0


def log_probs(probs: list[float]) -> torch.Tensor:
    return torch.tensor([math.log(p) for p in probs])


def sample_many(params: SamplingParams, logits: torch.Tensor, n: int = 2000, seed: int = 0) -> set[int]:
    sampler = Sampler(params.updated(seed=seed), [], logits.shape[-1], CPU)
    return {sampler(logits) for _ in range(n)}


def capturing(sampler: Sampler, picks: Iterator[int]) -> list[torch.Tensor]:
    """Make `sampler` record the logits that reach its sampling step and pick the scripted tokens."""
    seen: list[torch.Tensor] = []

    def fake_sample(logits: torch.Tensor) -> int:
        seen.append(logits.clone())
        return next(picks)

    sampler._sample = fake_sample
    return seen


# --- the sampler ---------------------------------------------------------------------------------------------------


def test_temperature_zero_is_argmax() -> None:
    torch.manual_seed(0)
    sampler = Sampler(SamplingParams(temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0), [], 1000, CPU)
    for _ in range(50):
        logits = torch.randn(1000) * 3
        assert sampler(logits) == int(logits.argmax())
    assert sampler(torch.tensor([1.0, 3.0, -2.0, 3.0])) == 1  # the first of equals, as torch.argmax
    strided = torch.randn(1000, 2)[:, 1]  # a column of the batch's logits
    assert sampler(strided) == int(strided.argmax())


@pytest.mark.parametrize("temperature", [0.3, 1.0, 5.0, 100.0])
def test_top_k_one_is_greedy_at_any_temperature(temperature: float) -> None:
    torch.manual_seed(1)
    sampler = Sampler(SamplingParams(temperature=temperature, top_k=1, top_p=1.0, seed=3, repetition_penalty=1.0), [], 500, CPU)
    for _ in range(100):
        logits = torch.randn(500)
        assert sampler(logits) == int(logits.argmax())


@pytest.mark.parametrize(
    ("top_p", "expected"),
    [(0.3, {0}), (0.49, {0}), (0.51, {0, 1}), (0.75, {0, 1}), (0.85, {0, 1, 2}), (0.96, {0, 1, 2, 3}), (1.0, {0, 1, 2, 3})],
)
def test_top_p_keeps_smallest_set_covering_p(top_p: float, expected: set[int]) -> None:
    assert sample_many(PLAIN.updated(top_p=top_p), log_probs(PROBS)) == expected


def test_top_p_applies_after_temperature() -> None:
    # At temperature 1, top_p 0.7 keeps {0, 1}. At temperature 2 the probabilities flatten to ≈ [0.38, 0.29, 0.21,
    # 0.12], so it keeps three tokens; at temperature 0.25 they sharpen to ≈ [0.88, 0.11, ...], so one.
    assert sample_many(PLAIN.updated(top_p=0.7), log_probs(PROBS)) == {0, 1}
    assert sample_many(PLAIN.updated(top_p=0.7, temperature=2.0), log_probs(PROBS)) == {0, 1, 2}
    assert sample_many(PLAIN.updated(top_p=0.7, temperature=0.25), log_probs(PROBS)) == {0}


@pytest.mark.parametrize(("top_k", "expected"), [(1, {0}), (2, {0, 1}), (3, {0, 1, 2}), (0, {0, 1, 2, 3}), (10, {0, 1, 2, 3})])
def test_top_k(top_k: int, expected: set[int]) -> None:
    assert sample_many(PLAIN.updated(top_k=top_k), log_probs(PROBS), n=1000) == expected


@pytest.mark.parametrize(
    ("min_p", "expected"),
    # threshold = min_p × 0.5: 0.05 → 0.025 keeps all; 0.2 → 0.1 drops 0.05; 0.5 → 0.25 keeps 0.5, 0.3; 0.7 → 0.35
    [(0.05, {0, 1, 2, 3}), (0.2, {0, 1, 2}), (0.5, {0, 1}), (0.7, {0}), (1.0, {0})],
)
def test_min_p_removes_tokens_below_min_p_times_max(min_p: float, expected: set[int]) -> None:
    assert sample_many(PLAIN.updated(min_p=min_p), log_probs(PROBS)) == expected


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens() -> None:
    logits = torch.tensor([2.0, -1.0, 3.0, -2.0, 0.5, 0.0])
    sampler = Sampler(PLAIN.updated(repetition_penalty=2.0), [0, 1, 1], 6, CPU)  # prompt tokens count
    seen = capturing(sampler, iter([2, 3, 3]))
    sampler(logits)
    torch.testing.assert_close(seen[-1], torch.tensor([1.0, -2.0, 3.0, -2.0, 0.5, 0.0]), rtol=0, atol=0)
    sampler(logits)  # token 2 was generated: now seen too
    torch.testing.assert_close(seen[-1], torch.tensor([1.0, -2.0, 1.5, -2.0, 0.5, 0.0]), rtol=0, atol=0)
    sampler(logits)  # token 3 as well; once per token however often it occurred
    torch.testing.assert_close(seen[-1], torch.tensor([1.0, -2.0, 1.5, -4.0, 0.5, 0.0]), rtol=0, atol=0)


def test_repetition_penalty_changes_the_greedy_choice() -> None:
    greedy = SamplingParams(temperature=0.0, repetition_penalty=2.0)
    # Positive: 2.0 / 2 = 1.0 falls below 1.5.
    assert Sampler(greedy, [0], 3, CPU)(torch.tensor([2.0, 1.5, -5.0])) == 1
    assert Sampler(greedy, [2], 3, CPU)(torch.tensor([2.0, 1.5, -5.0])) == 0
    # Negative: -1.0 × 2 = -2.0 falls below -1.5 (dividing would have raised it to -0.5).
    assert Sampler(greedy, [0], 3, CPU)(torch.tensor([-1.0, -1.5, -5.0])) == 1
    # An output token is penalised from the next step on (then both are seen: 1.0 against 0.75).
    sampler = Sampler(greedy, [], 3, CPU)
    assert [sampler(torch.tensor([2.0, 1.5, -5.0])) for _ in range(3)] == [0, 1, 0]


def test_presence_and_frequency_penalties_subtract_per_output_occurrence() -> None:
    logits = torch.zeros(5)
    sampler = Sampler(PLAIN.updated(presence_penalty=0.5, frequency_penalty=0.25), [0, 4, 4], 5, CPU)
    seen = capturing(sampler, iter([1, 1, 2, 1]))
    for _ in range(4):
        sampler(logits)
    expected = [
        [0.0, 0.0, 0.0, 0.0, 0.0],  # prompt tokens are not penalised
        [0.0, -0.75, 0.0, 0.0, 0.0],  # 1 once: presence 0.5 + frequency 0.25
        [0.0, -1.0, 0.0, 0.0, 0.0],  # 1 twice: 0.5 + 2 × 0.25
        [0.0, -1.0, -0.75, 0.0, 0.0],
    ]
    for got, want in zip(seen, expected, strict=True):
        torch.testing.assert_close(got, torch.tensor(want), rtol=0, atol=0)


def test_penalties_change_the_greedy_choice() -> None:
    sampler = Sampler(SamplingParams(temperature=0.0, presence_penalty=-1.0, repetition_penalty=1.0), [], 3, CPU)
    assert [sampler(torch.tensor([1.0, 0.5, 0.9])) for _ in range(3)] == [0, 0, 0]
    sampler = Sampler(SamplingParams(temperature=0.0, frequency_penalty=0.3, repetition_penalty=1.0), [], 3, CPU)
    assert [sampler(torch.tensor([1.0, 0.5, 0.9])) for _ in range(3)] == [0, 2, 0]


def test_same_seed_same_samples_different_seeds_differ() -> None:
    logits = torch.zeros(1000)

    def draws(seed: int | None) -> list[int]:
        sampler = Sampler(PLAIN.updated(seed=seed), [], 1000, CPU)
        return [sampler(logits) for _ in range(40)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)
    assert draws(None) != draws(None)  # no seed: fresh entropy each time
    # The default filters (top-k 20, top-p 0.8) sample reproducibly too.
    random_logits = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    runs = [Sampler(SamplingParams(seed=5), [], 1000, CPU) for _ in range(2)]
    assert [runs[0](random_logits) for _ in range(30)] == [runs[1](random_logits) for _ in range(30)]


# --- SamplingParams ------------------------------------------------------------------------------------------------


def test_defaults_are_qwen_chat_settings() -> None:
    """qwen-family.md §8.4: Qwen2.5-Instruct ships temperature 0.7, top_p 0.8, top_k 20, repetition_penalty 1.05."""
    params = SamplingParams()
    assert (params.temperature, params.top_p, params.top_k, params.repetition_penalty) == (0.7, 0.8, 20, 1.05)


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("temperature", -1),
        ("top_p", 0),
        ("top_p", 1.5),
        ("top_k", -1),
        ("top_k", 2.5),
        ("min_p", 2),
        ("min_p", -0.1),
        ("max_tokens", 0),
        ("max_tokens", 1.5),
        ("repetition_penalty", 0),
        ("repetition_penalty", -1.0),
        ("presence_penalty", 3),
        ("frequency_penalty", -2.5),
        ("stop", ("",)),
        ("stop", ("ok", "")),
    ],
)
def test_bad_option_is_rejected_by_name(option: str, value: object) -> None:
    with pytest.raises(QwenError, match=option):
        SamplingParams(**{option: value})
    with pytest.raises(QwenError, match=option):
        SamplingParams().updated(**{option: value})


def test_empty_stop_string_via_updated() -> None:
    with pytest.raises(QwenError, match="stop"):
        SamplingParams().updated(stop="")


def test_updated() -> None:
    base = SamplingParams()
    changed = base.updated(temperature=0.2, stop="###", stop_token_ids=[1, 2], max_tokens=None, seed=None)
    assert changed.temperature == 0.2 and changed.stop == ("###",) and changed.stop_token_ids == (1, 2)
    assert changed.max_tokens == base.max_tokens and changed.seed is None  # None keeps
    assert base.updated(stop=["a", "b"]).stop == ("a", "b")
    assert base.temperature == 0.7  # frozen: the original is untouched
    with pytest.raises(QwenError, match="temprature"):
        base.updated(temprature=0.5)
    with pytest.raises(QwenError, match="unknown sampling option"):
        base.updated(top_p=0.9, beams=4)


# --- stop strings --------------------------------------------------------------------------------------------------


def run_filter(stops: tuple[str, ...], pieces: list[str]) -> tuple[list[str], bool]:
    """Push pieces until a stop hits; then the emitted chunks and whether it stopped (flushing otherwise)."""
    f = StopStringFilter(stops)
    emitted = []
    for piece in pieces:
        text, hit = f.push(piece)
        emitted.append(text)
        if hit:
            return emitted, True
    emitted.append(f.flush())
    return emitted, False


def test_stop_string_split_across_pushes() -> None:
    emitted, hit = run_filter(("<END>",), ["Hello wor", "ld <", "E", "N", "D> tail", "never"])
    assert hit and "".join(emitted) == "Hello world "
    assert emitted == ["Hello wor", "ld ", "", "", ""]  # the "<", "<E", "<EN" were held back


def test_stop_string_inside_one_push() -> None:
    assert run_filter(("STOP",), ["abc STOP def"]) == (["abc "], True)
    assert run_filter(("STOP",), ["STOP"]) == ([""], True)
    assert run_filter(("\n\n",), ["line\n", "\nnext"]) == (["line", ""], True)


def test_partial_matches_are_released() -> None:
    emitted, hit = run_filter(("STOP",), ["a S", "T", "AR", "t ST", "x", "S"])
    assert not hit and "".join(emitted) == "a STARt STxS"
    assert emitted == ["a ", "", "STAR", "t ", "STx", "", "S"]  # the trailing "S" comes out at flush
    # A repeated prefix: "aa" + "a" can still end in the stop "aab", so only the first "a" is released.
    assert run_filter(("aab",), ["aa", "a", "b"]) == (["", "a", ""], True)
    assert run_filter(("aab",), ["aa", "a", "c"]) == (["", "a", "aac", ""], False)


def test_no_stop_strings_passes_everything() -> None:
    f = StopStringFilter(())
    assert f.push("<|im_end|> anything") == ("<|im_end|> anything", False)
    assert f.flush() == ""


def test_earliest_stop_string_wins() -> None:
    # Both complete in one push: the one that starts first wins.
    assert run_filter(("world", "lo w"), ["hello world"]) == (["hel"], True)
    assert run_filter(("lo w", "world"), ["hello world"]) == (["hel"], True)
    # Across pushes: the first stop to complete wins, even though a longer one started earlier.
    assert run_filter(("abcd", "bc"), ["ab", "c", "d"]) == (["", "a"], True)
    # Held text is checked against every stop string.
    emitted, hit = run_filter(("###", "END"), ["x #", "#E", "ND", "###"])
    assert hit and "".join(emitted) == "x ##"


# --- end to end on the default model ---------------------------------------------------------------------------

CODE_PROMPT = "def fibonacci(n):"
STORY_PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def greedy_code(engine_model) -> GenerationResult:
    result = engine_model.generate(CODE_PROMPT, temperature=0.0, max_tokens=12)
    assert result.finish_reason == "length" and len(result.token_ids) == 12  # the function goes on
    return result


@pytest.fixture(scope="module")
def seeded_story(engine_model) -> GenerationResult:
    return engine_model.generate(STORY_PROMPT, seed=1234, temperature=0.8, max_tokens=8)


def test_same_seed_same_generation(engine_model, seeded_story: GenerationResult) -> None:
    again = engine_model.generate(STORY_PROMPT, seed=1234, temperature=0.8, max_tokens=8)
    assert again.token_ids == seeded_story.token_ids and again.text == seeded_story.text
    assert seeded_story.prompt_tokens == len(engine_model.tokenizer.encode(STORY_PROMPT))


def test_different_seed_differs(engine_model, seeded_story: GenerationResult) -> None:
    for seed in (1, 2, 3):  # one differing seed suffices; each further one is a very unlikely case
        if engine_model.generate(STORY_PROMPT, seed=seed, temperature=0.8, max_tokens=8).token_ids != seeded_story.token_ids:
            return
    pytest.fail("three other seeds all gave the same sample as seed 1234")


def test_stream_concatenates_to_generate(engine_model, seeded_story: GenerationResult) -> None:
    pieces = list(engine_model.stream(STORY_PROMPT, seed=1234, temperature=0.8, max_tokens=8))
    assert pieces and all(pieces)
    assert "".join(pieces) == seeded_story.text


def test_max_tokens_gives_length(engine_model, greedy_code: GenerationResult) -> None:
    result = engine_model.generate(CODE_PROMPT, temperature=0.0, max_tokens=5)
    assert result.finish_reason == "length"
    assert result.token_ids == greedy_code.token_ids[:5]  # the same greedy path, cut short
    assert result.text == engine_model.tokenizer.decode(result.token_ids)
    assert greedy_code.text == engine_model.tokenizer.decode(greedy_code.token_ids)


def test_stop_string_across_token_boundary(engine_model, greedy_code: GenerationResult) -> None:
    tok = engine_model.tokenizer
    pieces = [tok.decode([i]) for i in greedy_code.token_ids]
    assert "".join(pieces) == greedy_code.text
    # A stop string made of the end of one token and the start of the next, whose first occurrence is there.
    for k in range(1, len(pieces)):
        boundary = len("".join(pieces[:k]))
        left, right = min(2, len(pieces[k - 1])), min(2, len(pieces[k]))
        stop = greedy_code.text[boundary - left : boundary + right]
        halves_are_text = not stop[:left].isspace() and not stop[left:].isspace()
        if left + right >= 3 and halves_are_text and greedy_code.text.find(stop) == boundary - left:
            break
    else:
        pytest.fail(f"no usable token boundary in {pieces}")
    result = engine_model.generate(CODE_PROMPT, temperature=0.0, max_tokens=12, stop=stop)
    assert result.finish_reason == "stop"
    assert result.text == greedy_code.text[: boundary - left]
    assert result.token_ids == greedy_code.token_ids[: k + 1]  # ends on the token that completed the stop string


def test_stop_token_ids(engine_model, greedy_code: GenerationResult) -> None:
    stop_id = greedy_code.token_ids[4]
    first = greedy_code.token_ids.index(stop_id)
    result = engine_model.generate(CODE_PROMPT, temperature=0.0, max_tokens=12, stop_token_ids=[stop_id])
    assert result.finish_reason == "stop"
    assert result.token_ids == greedy_code.token_ids[: first + 1]
    assert result.text == engine_model.tokenizer.decode(greedy_code.token_ids[:first])


def test_chat_reply_ends_with_im_end(engine_model) -> None:
    im_end = engine_model.tokenizer.token_to_id("<|im_end|>")
    assert im_end in engine_model.stop_token_ids
    messages = [{"role": "user", "content": "Answer with one word: what color is the sky on a clear day?"}]
    result = engine_model.chat(messages, temperature=0.0, max_tokens=24)
    assert result.finish_reason == "stop"
    assert result.token_ids[-1] == im_end and im_end not in result.token_ids[:-1]
    assert "<|im_end|>" not in result.text and result.text.strip()
    assert result.text == engine_model.tokenizer.decode(result.token_ids[:-1])
    assert result.prompt_tokens == len(engine_model.chat_prompt(messages))


def test_prompt_longer_than_context_is_rejected(engine_model) -> None:
    context = engine_model.config.context_length
    # A prompt that fills the whole context leaves no room for a token either.
    for length in (context + 1, context):
        with pytest.raises(QwenError, match="context"):
            engine_model.generate([198] * length, max_tokens=1)
        with pytest.raises(QwenError, match="context"):
            list(engine_model.stream([198] * length, max_tokens=1))


def test_empty_prompt_is_rejected(engine_model) -> None:
    for prompt in ("", []):
        with pytest.raises(QwenError, match="empty"):
            engine_model.generate(prompt, max_tokens=1)
        with pytest.raises(QwenError, match="empty"):
            list(engine_model.stream(prompt, max_tokens=1))


def test_bad_prompt_ids_and_options_are_rejected(engine_model) -> None:
    with pytest.raises(QwenError, match="token ids"):
        engine_model.generate([1, engine_model.config.vocab_size], max_tokens=1)
    with pytest.raises(QwenError, match="token ids"):
        engine_model.generate([-1], max_tokens=1)
    with pytest.raises(QwenError, match="max_tokens"):
        engine_model.generate("hi", max_tokens=0)
    with pytest.raises(QwenError, match="unknown sampling option"):
        engine_model.generate("hi", max_token=1)


def test_extreme_temperatures_and_penalties_never_break_sampling() -> None:
    """Found by the server's fuzz test: temperature 1e-245 overflowed the logits into NaN probabilities."""
    logits = torch.tensor([1.0, 3.0, 2.0, -1.0])
    assert Sampler(SamplingParams(temperature=1e-245, top_k=0, top_p=1.0), [], 4, torch.device("cpu"))(logits) == 1
    crushing = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1e-300)
    assert Sampler(crushing, [1], 4, torch.device("cpu"))(logits) == 1  # 3 / 1e-300 overflows to inf: its limit wins
