"""Byte-level BPE tokenizer for every Qwen generation, built on `tokenizers`.

Three ways in: a Hugging Face checkpoint directory (Qwen2's files), Qwen v1's `qwen.tiktoken`, or the tokenizer
arrays of a GGUF file. Control tokens (`<|im_start|>` ...) never come from chat content: `encode` keeps their surface
forms plain text unless asked (`special=True`, for a raw prompt whose author writes the markup), so a user cannot
forge a turn boundary by typing one.
"""

from __future__ import annotations

import base64
import codecs
import json
import re
import unicodedata
from collections.abc import Callable, Sequence
from functools import cache, cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as _HFTokenizer

from .errors import QwenError

if TYPE_CHECKING:
    from .audio import LoadedAudio

# qwen-family.md §1.6: the pre-tokenizer regex, identical in Qwen v1 and Qwen2 (every digit is its own piece).
PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# GGUF `tokenizer.ggml.token_type` values (qwen-family.md §9.3).
_TYPE_CONTROL = 3
_TYPE_USER_DEFINED = 4
_TYPE_UNUSED = 5

# Inserted by `defuse` after the first character of a control-token surface form in user text. U+FFFF is a
# Unicode noncharacter, so no real text needs it; a U+FFFF the user typed is escaped by doubling it.
_MARK = "\uffff"
_UNMARK = re.compile(_MARK + "(" + _MARK + "?)")

# qwen-family.md §1.6: Qwen v1 numbers its control tokens after the 151,643 BPE ranks, from 151643 up.
V1_BPE_RANKS = 151643
V1_CONTROL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", *(f"<|extra_{n}|>" for n in range(205)))
# qwen-family.md §6.4: Qwen-VL's nine tokens after v1's 208 (ids 151851…151859); an image is written
# <img>PATH</img>, and the span between the tags is always IMAGE_POSITIONS ids: the path's bytes, then <imgpad>.
VL_IMAGE_TOKENS = ("<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>", "<img>", "</img>", "<imgpad>")
GROUNDING_TOKENS = VL_IMAGE_TOKENS[:6]
IMAGE_POSITIONS = 256
MAX_IMAGE_PATH_BYTES = 255  # the tokenizer takes 256, but the model's own reading of the ids fails at 256 (§6.5)
# qwen-family.md §7.4: Qwen-Audio's 3,314 tokens after v1's 208 (ids 151851…155164), in the original's order. An
# audio clip is written <audio>PATH</audio> and becomes <audio>, span − 2 pads, </audio> (span: the clip's length).
AUDIO_TIMESTAMPS = tuple(f"<|{n // 100}.{n % 100:02d}|>" for n in range(3001))  # <|0.00|> … <|30.00|>, 10 ms apart
AUDIO_TOKENS = (
    "[[[AUDIO:modality]]]", "<|startoftranscript|>", "<|startofanalysis|>",
    "<|translate|>", "<|transcribe|>", "<|caption|>", "<|keyword|>", "<|unknown|>",
    "<|en|>", "<|zh|>", "<|de|>", "<|es|>", "<|ko|>", "<|fr|>", "<|ja|>", "<|it|>", "<|zh_tr|>",
    "<|notimestamps|>", "<|sil|>", "<|timestamps|>", *AUDIO_TIMESTAMPS,
    "<|caption_audiocaps|>", "<|caption_clotho|>", "<|audioset_ontology|>", "<|caption_plain|>", "<|itn|>", "<|wo_itn|>",
    "<|startofentityvalue|>", "<|endofentityvalue|>", "<|startofentitytype|>", "<|endofentitytype|>",
    "<|named_entity_recognition|>", "<|audio_grounding|>", "<|startofword|>", "<|endofword|>", "<|delim|>",
    "<|emotion_recognition|>", "<|music_description|>", "<|note_analysis|>", "<|pitch|>",
    *(f"<|midi_pitch_{n}|>" for n in range(128)), "<|velocity|>", *(f"<|midi_velocity_{n}|>" for n in range(128)),
    "<|sonic|>", "<|instrument|>", "<|speaker_meta|>", "<|song_meta|>", "<|question|>", "<|answer|>", "<|choice|>",
    "<|scene|>", "<|event|>", "<|vocal_classification|>", "<|speech_understanding|>", "<|scenario|>", "<|action|>",
    "<|entities|>", "<|speech_edit|>", "<audio>", "</audio>",
)
AUDIO_PAD = AUDIO_TOKENS[0]
# Control tokens that output text keeps, so replies can be read for them: Qwen-VL's grounding boxes, Qwen-Audio's
# timestamps (its chat writes them as text too). User text still never becomes them.
OUTPUT_MARKUP = (*GROUNDING_TOKENS, *AUDIO_TIMESTAMPS)


def _byte_decoder() -> dict[str, int]:
    """Character -> byte of GPT-2's `bytes_to_unicode` alphabet (qwen-family.md §1.6, §8.1).

    Printable Latin-1 bytes stand for themselves; the other 68 bytes are shifted to U+0100 and up, in byte order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in printable]
    table = {chr(b): b for b in printable}
    table.update({chr(256 + n): b for n, b in enumerate(shifted)})
    return table


@cache
def _alphabet_to_latin1() -> dict[int, int]:
    """str.translate table: each alphabet character to the Latin-1 character of its byte, and the Latin-1 characters
    outside the alphabet to one that Latin-1 cannot encode, so that a token holding any of them fails to encode."""
    table = {ord(c): b for c, b in _byte_decoder().items()}
    return table | {i: 0xFFFF for i in range(256) if i not in table}


def _token_to_bytes(token: str) -> bytes:
    """A vocabulary token's raw bytes: one str.translate (a loop over the characters of 151K tokens took 0.6 s)."""
    try:
        return token.translate(_alphabet_to_latin1()).encode("latin-1")
    except UnicodeEncodeError:  # (ByteLevel passes a token with a character outside the alphabet as UTF-8)
        return token.encode("utf-8")


def _read_tiktoken(path: Path) -> dict[str, int]:
    """Token -> rank from a `qwen.tiktoken` file (qwen-family.md §1.6: `base64(bytes) rank` per line).

    Tokens are spelled in GPT-2's byte alphabet, one character per byte, as in Qwen2's vocab.json.
    """
    as_text = {byte: char for char, byte in _byte_decoder().items()}  # for str.translate of latin-1 text
    ranks: dict[str, int] = {}
    for number, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True).decode("latin-1").translate(as_text)] = int(rank)
        except ValueError:  # also binascii.Error
            raise QwenError(f"{path}:{number}: expected `base64-token rank`, got {line[:60]!r}") from None
    complete = len(ranks) == V1_BPE_RANKS and set(ranks.values()) == set(range(V1_BPE_RANKS))
    if not complete or any(char not in ranks for char in as_text.values()):
        raise QwenError(f"{path} is not Qwen v1's qwen.tiktoken: it must rank all 256 bytes and hold the ranks 0…{V1_BPE_RANKS - 1} once each")
    return ranks


def _merges_from_ranks(ranks: dict[str, int]) -> list[tuple[str, str]]:
    """BPE merges, in priority order, equivalent to tiktoken's rank-based BPE (tokens spelled in the byte alphabet).

    For each token, tiktoken's BPE is replayed on its bytes with only lower ranks allowed; the last two parts are the
    merge that creates it. That yields one merge per token, exactly Qwen2's merges.txt for the same vocabulary
    (checked in tests). The "every split into two known tokens" recipe gives twice as many merges, a third of them
    with parts that outrank the token they form.
    """
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        parts = list(token)
        if len(parts) == 1:
            continue
        # Rank of each adjacent pair's concatenation (`rank` itself stands for "not allowed"), updated per merge.
        pair_ranks = [ranks.get(a + b, rank) for a, b in zip(parts, parts[1:])]
        while len(parts) > 2:
            best = min(pair_ranks)
            if best >= rank:
                raise QwenError(f"token {token!r} (rank {rank}) cannot be built by BPE from lower ranks; the tiktoken file is damaged")
            i = pair_ranks.index(best)
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
            del pair_ranks[i]
            if i > 0:
                pair_ranks[i - 1] = ranks.get(parts[i - 1] + parts[i], rank)
            if i < len(pair_ranks):
                pair_ranks[i] = ranks.get(parts[i] + parts[i + 1], rank)
        merges.append((parts[0], parts[1]))
    return merges


def _qwen2_pipeline(vocab: dict[str, int], merges: list[tuple[str, str]]) -> _HFTokenizer:
    """The Qwen2 `tokenizer.json` pipeline (qwen-family.md §8.1), for sources that carry only vocab and merges."""
    tok = _HFTokenizer(models.BPE(vocab=vocab, merges=merges))  # no unk, no dropout, no byte_fallback
    tok.normalizer = normalizers.NFC()  # qwen-family.md §1.6: text is NFC-normalised before encoding
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


class Tokenizer:
    """Qwen2 byte-level BPE with user text and template markup kept apart.

    `encode` treats control-token surface forms as plain text (qwen-family.md §1.6: the chat helper encodes contents
    with `allowed_special=set()`) unless `special=True`; `encode_markup` turns the ones a chat template wrote into
    control ids.
    """

    def __init__(self, backend: _HFTokenizer, unused_ids: frozenset[int] = frozenset()) -> None:
        # Special added tokens are plain text to the backend; `encode_markup` finds them itself. The backend is
        # never mutated again, so calls to `encode` and `encode_markup` can interleave freely.
        backend.encode_special_tokens = True
        self._backend = backend
        self._unused_ids = unused_ids
        added = backend.get_added_tokens_decoder()
        self._control_by_text = {t.content: i for i, t in added.items() if t.special}
        self.control_ids: frozenset[int] = frozenset(self._control_by_text.values())
        markup = frozenset(self._control_by_text[t] for t in OUTPUT_MARKUP if t in self._control_by_text)
        self.hidden_ids: frozenset[int] = self.control_ids - markup  # what output text leaves out
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        # Longest first, so a form that is a prefix of another never wins (the backend matches leftmost-longest).
        forms = sorted(self._control_by_text, key=len, reverse=True)
        self._control_re = re.compile("|".join(map(re.escape, forms)) or "(?!)")

    @classmethod
    def from_hf_dir(cls, path: Path, media_tokens: Sequence[str] = ()) -> Tokenizer:
        """Load `tokenizer.json`, or else `vocab.json` + `merges.txt` with added tokens from `tokenizer_config.json`,
        or else Qwen v1's `qwen.tiktoken` (with a multimodal checkpoint's `media_tokens` after v1's own)."""
        path = Path(path)
        if (path / "tokenizer.json").is_file():
            return cls(_HFTokenizer.from_file(str(path / "tokenizer.json")))
        if not ((path / "vocab.json").is_file() and (path / "merges.txt").is_file()):
            if (path / "qwen.tiktoken").is_file():
                return cls.from_tiktoken(path / "qwen.tiktoken", media_tokens)
            raise QwenError(
                f"no tokenizer in {path}: expected tokenizer.json, vocab.json and merges.txt, or qwen.tiktoken; "
                "copy them from the model's Hugging Face repository"
            )
        vocab: dict[str, int] = json.loads((path / "vocab.json").read_text(encoding="utf-8"))
        # qwen-family.md §8.1: first line `#version: 0.2`, then `left right` in priority order.
        lines = (path / "merges.txt").read_text(encoding="utf-8").splitlines()
        merges = [tuple(line.split(" ", 1)) for line in lines if line and not line.startswith("#version")]
        config_file = path / "tokenizer_config.json"
        config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
        added = {int(i): spec for i, spec in config.get("added_tokens_decoder", {}).items()}
        # In the model vocabulary first, so that adding them below keeps the ids the checkpoint was trained with.
        vocab.update({spec["content"]: i for i, spec in added.items()})
        backend = _qwen2_pipeline(vocab, merges)
        backend.add_tokens(
            [
                AddedToken(
                    spec["content"],
                    special=spec.get("special", False),
                    normalized=spec.get("normalized", False),
                    lstrip=spec.get("lstrip", False),
                    rstrip=spec.get("rstrip", False),
                    single_word=spec.get("single_word", False),
                )
                for _, spec in sorted(added.items())
            ]
        )
        return cls(backend)

    @classmethod
    def from_gguf(cls, tokens: list[str], token_types: list[int], merges: list[str]) -> Tokenizer:
        """Build from `tokenizer.ggml.{tokens,token_type,merges}` (qwen-family.md §9.3).

        Control tokens (type 3) become special, user-defined ones (type 4, e.g. `<tool_call>`) added but not
        special, as transformers does. Unused padding slots (type 5, `[PAD151665]`...) stay in the vocabulary so
        the ids line up with the embedding rows, but decode to nothing: no merge reaches them, and their names are
        no text the model meant (llama.cpp prints nothing for them either).
        """
        backend = _qwen2_pipeline(
            {token: i for i, token in enumerate(tokens)}, [tuple(m.split(" ", 1)) for m in merges]
        )
        added = [
            AddedToken(token, special=kind == _TYPE_CONTROL, normalized=False)
            for token, kind in zip(tokens, token_types)
            if kind in (_TYPE_CONTROL, _TYPE_USER_DEFINED)
        ]
        backend.add_tokens(added)
        unused = frozenset(i for i, kind in enumerate(token_types) if kind == _TYPE_UNUSED)
        return cls(backend, unused)

    @classmethod
    def from_tiktoken(cls, path: Path, media_tokens: Sequence[str] = ()) -> Tokenizer:
        """Build from Qwen v1's `qwen.tiktoken` (qwen-family.md §1.6).

        v1 and Qwen2 share vocabulary, regex and NFC, so this is the Qwen2 pipeline with merges derived from the
        ranks (rank = id), plus v1's 208 control tokens as special tokens with ids 151643…151850, then
        `media_tokens` from 151851: Qwen-VL's nine (§6.4) or Qwen-Audio's 3,314 (§7.4).
        """
        vocab = _read_tiktoken(Path(path))
        backend = _qwen2_pipeline(vocab, _merges_from_ranks(vocab))
        controls = V1_CONTROL_TOKENS + tuple(media_tokens)
        backend.add_tokens([AddedToken(token, special=True, normalized=False) for token in controls])
        return cls(backend)

    def encode(self, text: str, special: bool = False, audio: list[LoadedAudio] | None = None,
               read_audio: Callable[[str], LoadedAudio] | None = None) -> list[int]:
        """Ids of text: NFC, non-special added tokens (`<tool_call>`) match. Control-token surface forms stay plain
        text, or with `special` become their ids, as transformers, vLLM, llama.cpp and Qwen v1's tokenizer
        (`allowed_special="all"`, qwen-family.md §1.6) encode a raw prompt. Qwen-Audio's `<audio>PATH</audio>` reads
        the clip for its length, as the original tokenizer does, through `read_audio` (by default `load_audio`; a
        server passes its media policy's); pass `audio` to collect the clips read."""
        if special:
            return self._encode_with_controls(text, self._encode_text, audio, read_audio)
        return self._encode_text(text)

    def encode_markup(self, text: str) -> list[int]:
        """Ids of a rendered chat template: control-token surface forms become control ids unless `defuse`d."""
        return self._encode_with_controls(text, self._encode_defused)

    def _encode_text(self, text: str) -> list[int]:
        # encode_batch releases the GIL while it works (encode holds it): a server tokenizing a long prompt on a
        # worker thread keeps answering meanwhile.
        return self._backend.encode_batch([text], add_special_tokens=False)[0].ids if text else []

    def _encode_with_controls(self, text: str, encode_between: Callable[[str], list[int]],
                              audio: list[LoadedAudio] | None = None,
                              read_audio: Callable[[str], LoadedAudio] | None = None) -> list[int]:
        """Control-token surface forms as their ids (leftmost-longest, before normalization, as the backend matches
        added tokens), the text between them through `encode_between`. Media spans become what the original
        tokenizers make of them: `<img>PATH</img>` the tags around the image span (`image_span`), `<audio>PATH</audio>`
        the clip's `audio_span` (the clip read, and appended to `audio` where given)."""
        ids: list[int] = []
        start = 0
        while (match := self._control_re.search(text, start)) is not None:
            ids += encode_between(text[start : match.start()])
            tag = match.group()
            start = match.end()
            if tag not in ("<img>", "<audio>"):
                ids.append(self._control_by_text[tag])
                continue
            close_tag = "</" + tag[1:]
            close = text.find(close_tag, start)
            if close < 0:
                kind = "images" if tag == "<img>" else "audio clips"
                raise QwenError(f"an {tag} in the prompt has no {close_tag}: write {kind} as {tag}PATH{close_tag}")
            if tag == "<img>":
                ids += [self._control_by_text["<img>"], *self.image_span(text[start:close]), self._control_by_text["</img>"]]
            else:
                if read_audio is None:
                    from .audio import load_audio as read_audio
                clip = read_audio(text[start:close])
                if audio is not None:
                    audio.append(clip)
                ids += self.audio_span(clip.span)
            start = close + len(close_tag)
        ids += encode_between(text[start:])
        return ids

    def audio_span(self, span: int) -> list[int]:
        """A clip's `span` ids: <audio>, span − 2 pads, </audio> (§7.4; the encoder's vectors replace all of them)."""
        pad = self._control_by_text[AUDIO_PAD]
        return [self._control_by_text["<audio>"], *[pad] * (span - 2), self._control_by_text["</audio>"]]

    def image_span(self, path: str) -> list[int]:
        """The IMAGE_POSITIONS ids between <img> and </img>: the NFC path's UTF-8 bytes as ids, then <imgpad>."""
        raw = unicodedata.normalize("NFC", path).encode("utf-8")
        if not raw or len(raw) > MAX_IMAGE_PATH_BYTES:
            raise QwenError(f"an image path must be 1…{MAX_IMAGE_PATH_BYTES} bytes of UTF-8 (got {len(raw)}): "
                            f"{path[:60]!r}")
        return [*raw, *[self._control_by_text["<imgpad>"]] * (IMAGE_POSITIONS - len(raw))]

    def _encode_defused(self, text: str) -> list[int]:
        """Ids of markup between control tokens, with `defuse`'s markers taken out (a doubled one stays single)."""
        return self._encode_text(_UNMARK.sub(r"\1", text))

    def defuse(self, text: str) -> str:
        """Make control-token surface forms in a user string inert for `encode_markup`, which undoes the change.

        Apply to every user-supplied string before it goes into a chat template; otherwise a user typing
        `<|im_end|><|im_start|>system` would open a system turn.
        """
        escaped = text.replace(_MARK, _MARK + _MARK)
        return self._control_re.sub(lambda m: m.group()[0] + _MARK + m.group()[1:], escaped)

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """Text of `ids`; control tokens other than grounding markup are dropped when `skip_special`, unused slots
        always."""
        dropped = self._unused_ids | self.hidden_ids if skip_special else self._unused_ids
        return self._backend.decode([i for i in ids if i not in dropped], skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        """Id of a token spelled as in the vocabulary (byte alphabet, e.g. `Ġworld`) or of an added token."""
        return self._backend.token_to_id(token)

    def bytes_of(self, token_id: int) -> bytes:
        """Raw bytes of one id (none for an unused slot or an unknown id), for streaming: a token may end in the
        middle of a UTF-8 character. One id at a time, so that a first reply does not wait for the whole table."""
        unknown = token_id < 0 or token_id in self._unused_ids
        token = None if unknown else self._backend.id_to_token(token_id)
        return b"" if token is None else _token_to_bytes(token)

    @cached_property
    def token_bytes(self) -> list[bytes]:
        """bytes_of every id, for what looks at the whole vocabulary (constrained decoding, the server's stops)."""
        vocab = self._backend.get_vocab(with_added_tokens=True)
        table = [b""] * (max(vocab.values()) + 1)
        for token, i in vocab.items():
            if i not in self._unused_ids:
                table[i] = _token_to_bytes(token)
        return table


class IncrementalDecoder:
    """Streaming detokenizer: text grows one token at a time, never showing half a character."""

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True) -> None:
        self._bytes_of = tokenizer.bytes_of
        self._skipped = tokenizer.hidden_ids if skip_special else frozenset()
        # Holds back the bytes of a character split across tokens until its last byte arrives.
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Text completed by `token_id` (may be empty). Unknown ids add nothing, as in `Tokenizer.decode`."""
        if token_id in self._skipped:
            return ""
        return self._utf8.decode(self._bytes_of(token_id))

    def flush(self) -> str:
        """Whatever is still held back at the end; an incomplete character becomes U+FFFD."""
        return self._utf8.decode(b"", final=True)
