"""Speech to text with Qwen-Audio's base model: its multitask prompts (qwen-family.md §7.4, as the original's
evaluation scripts write them), the language tag it emits when none is given, word timestamps read into segments,
and audio longer than the encoder's 30 s cut into windows at their quietest moment and stitched back with their
offsets (the original model sees the first 30 s only).

`transcribe` is what `qwen transcribe` and the server's /v1/audio endpoints run; `srt`, `vtt` and `as_json` write
its result.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from .audio import CHUNK_SAMPLES, MIN_SAMPLES, SAMPLE_RATE, AudioSource, LoadedAudio, audio_items, load_audio
from .errors import QwenError
from .prompt import Prompt
from .tokenizer import AUDIO_TIMESTAMPS

if TYPE_CHECKING:
    from .llm import Model

TASKS = ("transcribe", "translate", "caption")
LANGUAGES = ("en", "zh", "de", "es", "ko", "fr", "ja", "it")  # the language tags Qwen-Audio knows (§7.4)
SEARCH_SAMPLES = 5 * SAMPLE_RATE  # a window ends at the quietest 20 ms of its last 5 s
QUIET_FRAME = SAMPLE_RATE // 50
MAX_WINDOW_TOKENS = 448  # per 30 s window: a fast speaker says ~150 words


@dataclass
class Segment:
    start: float  # seconds from the start of the audio
    end: float
    text: str


@dataclass
class Transcription:
    text: str
    language: str | None  # the source language: given, or the tag the model emitted
    duration: float  # seconds of audio
    segments: list[Segment] = field(default_factory=list)


def task_tags(task: str, language: str, target: str, timestamps: bool) -> str:
    """What follows `</audio>` in the base model's prompt for the task (QwenLM/Qwen-Audio eval_audio/*.py)."""
    if task == "transcribe":
        stamps = "<|timestamps|><|0.00|>" if timestamps else "<|notimestamps|><|wo_itn|>"
        return f"<|startoftranscript|><|{language}|><|transcribe|><|{language}|>{stamps}"
    if task == "translate":
        return f"<|startoftranscript|><|{language}|><|translate|><|{target}|><|notimestamps|><|itn|>"
    return "<|startofanalysis|><|unknown|><|caption|><|en|><|notimestamps|><|caption_clotho|>"


def windows(samples: Any, size: int = CHUNK_SAMPLES) -> list[tuple[int, int]]:
    """[start, end) sample ranges of at most `size`: each cut at the quietest 20 ms frame of its last 5 s, so a cut
    falls in a pause where there is one. A last piece under MIN_SAMPLES (30 ms, too short for the encoder) is left
    out."""
    import numpy as np

    bounds, start, total = [], 0, len(samples)
    while total - start > size:
        search = samples[start + size - SEARCH_SAMPLES : start + size]
        frames = search[: len(search) // QUIET_FRAME * QUIET_FRAME].reshape(-1, QUIET_FRAME)
        quietest = int(np.argmin((frames.astype(np.float64) ** 2).sum(axis=1)))
        end = start + size - SEARCH_SAMPLES + quietest * QUIET_FRAME + QUIET_FRAME // 2
        bounds.append((start, end))
        start = end
    if total - start >= MIN_SAMPLES or not bounds:
        bounds.append((start, total))
    return bounds


def transcribe(model: Model, audio: AudioSource, *, task: str = "transcribe", language: str | None = None,
               target: str = "en", timestamps: bool = False, max_seconds: float | None = None) -> Transcription:
    """Greedy transcription (or translation to `target`, or a caption) of the whole clip, window by window.
    `timestamps` applies to transcription, the task the model stamps; the others give a segment a window."""
    if task not in TASKS:
        raise QwenError(f"unknown task {task!r}: use {', '.join(TASKS)}")
    for name, value in (("language", language), ("target language", target)):
        if value is not None and value not in LANGUAGES:
            raise QwenError(f"unknown {name} {value!r}: Qwen-Audio knows {', '.join(LANGUAGES)}")
    if model.audio is None:
        raise QwenError("this model reads no audio; transcribe with a Qwen-Audio checkpoint")
    clip = load_audio(audio, max_seconds)
    timestamps = timestamps and task == "transcribe"
    stamp_ids = {model.tokenizer.token_to_id(tag): n / 100 for n, tag in enumerate(AUDIO_TIMESTAMPS)}
    texts, segments, detected = [], [], language
    for start, end in windows(clip.samples):
        window = LoadedAudio(clip.samples[start:end], hashlib.blake2b(clip.digest + repr((start, end)).encode(),
                                                                      digest_size=16).digest())
        offset = start / SAMPLE_RATE
        source = language or (_detect(model, window) if task != "caption" else "unknown")
        detected = detected or source
        result = model.generate(_prompt(model, window, task_tags(task, source, target, timestamps)), temperature=0,
                                repetition_penalty=1.0, max_tokens=MAX_WINDOW_TOKENS)
        pieces = _pieces(model, result.token_ids, stamp_ids, (end - start) / SAMPLE_RATE if timestamps else None)
        if timestamps:
            segments += [Segment(offset + a, offset + b, text) for a, b, text in pieces if text.strip()]
        text = "".join(text for _, _, text in pieces).strip()
        if not timestamps and text:
            segments.append(Segment(offset, end / SAMPLE_RATE, text))
        texts.append(text)
    return Transcription(" ".join(t for t in texts if t), detected if task != "caption" else None, clip.seconds, segments)


def _prompt(model: Model, clip: LoadedAudio, tags: str) -> Prompt:
    """The clip's span, then the task tags (control tokens parsed: this prompt is ours, not a user's)."""
    ids = model.tokenizer.audio_span(clip.span) + model.tokenizer.encode(tags, special=True)
    return Prompt(ids, audio_items(ids, model.config.audio.audio_start_id, [clip]))


def _detect(model: Model, clip: LoadedAudio) -> str:
    """The language tag the model gives most weight after `<|startoftranscript|>`, as it would emit it."""
    logits = model.logits(_prompt(model, clip, "<|startoftranscript|>"))[-1]
    ids = [model.tokenizer.token_to_id(f"<|{code}|>") for code in LANGUAGES]
    return LANGUAGES[int(logits[ids].argmax())]


def _pieces(model: Model, ids: list[int], stamp_ids: dict[int, float],
            window_s: float | None) -> list[tuple[float, float, str]]:
    """The reply cut at its timestamp tokens: (start, end, text) for the text between consecutive stamps, from the
    prompt's <|0.00|> on, when the window's length `window_s` is given. Without timestamps, one piece of all the
    text."""
    if window_s is None:
        return [(0.0, 0.0, model.tokenizer.decode([i for i in ids if i not in stamp_ids]))]
    pieces, start, pending = [], 0.0, []
    for token in ids:
        if token in stamp_ids:
            pieces.append((start, stamp_ids[token], model.tokenizer.decode(pending)))
            start, pending = stamp_ids[token], []
        else:
            pending.append(token)
    if pending:  # text after the last stamp (the reply cut off by the token limit): it runs to the window's end
        pieces.append((start, max(start, window_s), model.tokenizer.decode(pending)))
    return pieces


def _clock(seconds: float, separator: str) -> str:
    millis = round(seconds * 1000)
    return f"{millis // 3_600_000:02d}:{millis // 60_000 % 60:02d}:{millis // 1000 % 60:02d}{separator}{millis % 1000:03d}"


def srt(result: Transcription) -> str:
    return "".join(f"{n}\n{_clock(s.start, ',')} --> {_clock(s.end, ',')}\n{s.text.strip()}\n\n"
                   for n, s in enumerate(result.segments, start=1))


def vtt(result: Transcription) -> str:
    return "WEBVTT\n\n" + "".join(f"{_clock(s.start, '.')} --> {_clock(s.end, '.')}\n{s.text.strip()}\n\n"
                                  for s in result.segments)


def as_json(result: Transcription, verbose: bool = True) -> str:
    data = asdict(result) if verbose else {"text": result.text}
    return json.dumps(data, ensure_ascii=False)
