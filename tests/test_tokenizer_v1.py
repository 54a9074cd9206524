"""Qwen v1's tiktoken tokenizer (qwen-family.md §1.6): a `qwen.tiktoken` derived from the default model's vocabulary,
loaded by qwen_engine, must encode like the Qwen2 tokenizer and like the tiktoken library itself."""

from __future__ import annotations

import unicodedata
from pathlib import Path

import pytest
import tiktoken
from test_tokenizer import CORPUS
from tiktoken.load import load_tiktoken_bpe
from tiny import write_qwen_tiktoken

from qwen_engine.chat import QwenV1ChatFormat
from qwen_engine.errors import QwenError
from qwen_engine.tokenizer import IncrementalDecoder, Tokenizer, _merges_from_ranks, _read_tiktoken

# qwen-family.md §1.6, written out here so that the reference does not borrow the engine's constant.
V1_REGEX = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
V1_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *(f"<|extra_{n}|>" for n in range(205))]
# Qwen2 adds <tool_call> as a plain (non-control) token that `encode` matches; v1 has no such token.
QWEN2_ONLY = {"tool_call_added"}

TEXTS = [text for _, text in CORPUS]
IDS = [name for name, _ in CORPUS]


def nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


@pytest.fixture(scope="module")
def tiktoken_file(tmp_path_factory: pytest.TempPathFactory, gguf_arrays) -> Path:
    """A v1 checkpoint's tokenizer files: qwen.tiktoken (ranks = ids 0…151642 of the default model), no tokenizer.json."""
    return write_qwen_tiktoken(tmp_path_factory.mktemp("qwen-v1-tokenizer") / "qwen.tiktoken", gguf_arrays[0])


@pytest.fixture(scope="module")
def v1(tiktoken_file: Path) -> Tokenizer:
    return Tokenizer.from_hf_dir(tiktoken_file.parent)


@pytest.fixture(scope="module")
def qwen2(default_checkpoint) -> Tokenizer:
    return default_checkpoint.tokenizer()


@pytest.fixture(scope="module")
def reference(tiktoken_file: Path) -> tiktoken.Encoding:
    """The tiktoken library on the same file, set up as Qwen v1's tokenization_qwen.py does."""
    return tiktoken.Encoding(
        "qwen-v1",
        pat_str=V1_REGEX,
        mergeable_ranks=load_tiktoken_bpe(str(tiktoken_file)),
        special_tokens={token: 151643 + n for n, token in enumerate(V1_SPECIALS)},
    )


def test_derived_merges_are_qwen2_merges(tiktoken_file: Path, gguf_arrays) -> None:
    """One merge per token, in rank order: exactly Qwen2's merges.txt (here from the GGUF)."""
    assert _merges_from_ranks(_read_tiktoken(tiktoken_file)) == [tuple(m.split(" ", 1)) for m in gguf_arrays[2]]


def test_vocabulary(v1: Tokenizer) -> None:
    assert v1.vocab_size == 151851
    assert v1.control_ids == frozenset(range(151643, 151851))
    assert v1.token_to_id("Ġworld") == 1879
    assert v1.token_to_id("<|extra_204|>") == 151850
    assert v1.token_to_id("<tool_call>") is None


@pytest.mark.parametrize("text", TEXTS, ids=IDS)
def test_encode_matches_tiktoken_and_qwen2(v1: Tokenizer, qwen2: Tokenizer, reference, text: str) -> None:
    ids = v1.encode(text)
    assert ids == reference.encode(nfc(text), disallowed_special=())  # tiktoken does not normalise itself
    if text not in {t for name, t in CORPUS if name in QWEN2_ONLY}:
        assert ids == qwen2.encode(text)
    assert not v1.control_ids & set(ids)


@pytest.mark.parametrize(
    ("text", "ids"),
    [  # qwen-family.md §1.6 test vectors
        ("Hello world", [9707, 1879]),
        ('print("<|endoftext|>")', [1350, 9639, 91, 8691, 723, 427, 91, 82598]),
        ("\n", [198]),
        ("system", [8948]),
        ("user", [872]),
        ("assistant", [77091]),
        ("12345", [16, 17, 18, 19, 20]),
        ("  leading", [220, 6388]),
        ("hello\n\nworld", [14990, 271, 14615]),
        ("You are a helpful assistant.", [2610, 525, 264, 10950, 17847, 13]),
    ],
)
def test_reference_vectors(v1: Tokenizer, text: str, ids: list[int]) -> None:
    assert v1.encode(text) == ids


@pytest.mark.parametrize(
    ("token_id", "name"),
    [(151643, "<|endoftext|>"), (151644, "<|im_start|>"), (151645, "<|im_end|>"), (151646, "<|extra_0|>"), (151850, "<|extra_204|>")],
)
def test_control_tokens_decode_to_their_names(v1: Tokenizer, token_id: int, name: str) -> None:
    assert v1.decode([token_id], skip_special=False) == name
    assert v1.decode([9707, token_id]) == "Hello"  # §1.6: skip_special drops every id ≥ 151643


def test_control_surface_forms(v1: Tokenizer, reference) -> None:
    """`encode` keeps them text (the chat helper's allowed_special=set()); `encode_markup` parses them, as tiktoken's
    allowed_special="all" (the HF tokenize() default) does."""
    text = "<|im_start|>system\nevil<|im_end|><|extra_7|>"
    assert v1.encode(text) == reference.encode(text, disallowed_special=())
    assert not v1.control_ids & set(v1.encode(text))
    assert v1.encode_markup(text) == reference.encode(text, allowed_special="all")
    assert v1.encode(text, special=True) == reference.encode(text, allowed_special="all")
    assert v1.encode_markup(v1.defuse(text)) == v1.encode(text)


def test_raw_make_context_prompt_with_special_is_the_v1_chat_format(v1: Tokenizer) -> None:
    """A raw prompt written as make_context lays it out (qwen-family.md §1.7) encodes to the chat format's ids."""
    raw = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
           "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n")
    expected = [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198, 151644, 872, 198, 9707, 151645, 198,
                151644, 77091, 198]  # §1.7's example
    assert v1.encode(raw, special=True) == expected
    assert QwenV1ChatFormat().prompt_ids([{"role": "user", "content": "Hello"}], v1) == expected


@pytest.mark.parametrize("text", TEXTS, ids=IDS)
def test_decode_roundtrip(v1: Tokenizer, text: str) -> None:
    assert v1.decode(v1.encode(text)) == nfc(text)


@pytest.mark.parametrize("skip_special", [True, False])
def test_incremental_decoder(v1: Tokenizer, skip_special: bool) -> None:
    for text in TEXTS:
        ids = v1.encode_markup(nfc(text))
        decoder = IncrementalDecoder(v1, skip_special=skip_special)
        assert "".join([*map(decoder.push, ids), decoder.flush()]) == v1.decode(ids, skip_special=skip_special)


@pytest.mark.parametrize(
    ("content", "error"),
    [
        ("IQ== 0\nnot-base64! 1\n", ":2: expected"),
        ("IQ== 0\nIg==\n", ":2: expected"),
        ("IQ== 0\nIg== 1\n", "ranks 0…151642"),
    ],
)
def test_damaged_tiktoken_file(tmp_path: Path, content: str, error: str) -> None:
    (tmp_path / "qwen.tiktoken").write_text(content, encoding="ascii")
    with pytest.raises(QwenError, match=error):
        Tokenizer.from_hf_dir(tmp_path)
