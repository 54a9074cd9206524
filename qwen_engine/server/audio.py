"""POST /v1/audio/transcriptions and /v1/audio/translations: OpenAI's multipart audio endpoints on Qwen-Audio's base
model prompts (qwen_engine/transcribe.py), so `client.audio.transcriptions.create(model=..., file=...)` works as
it is.

How the form's fields are read (protocol.py checks them):
- `file`: any WAV, FLAC, OGG or MP3 under the server's audio limits (--max-audio-mb, --max-audio-seconds), of any
  length: the library cuts it into 30 s windows.
- `language`: the source's ISO-639-1 code, one of the eight Qwen-Audio knows; without it the model's own language
  tag is taken.
- `response_format`: json and text use the plain prompt; srt, vtt and verbose_json the timestamp prompt, whose
  segments are the stretches between the timestamp tokens the model emits (the two prompts may give different text).
  A translation's prompt has no timestamps (transcribe.task_tags, as the original's evaluation writes it): its
  segments are its 30 s windows.
- `timestamp_granularities[]`: "segment" and "word" are accepted; both give the segments above (no separate list of
  words is made: the model's timestamp tokens are all there is).
- `prompt`: accepted and ignored: the base model's multitask prompt is the audio and its task tags, with no place
  for a text before the transcript (Whisper's previous-text prompt).
- `temperature`: accepted (0 to 1, as OpenAI takes it) and ignored: decoding is greedy (transcribe.py), so a
  transcript comes out the same each time.

A transcription runs in a worker thread on the library's own engines, whose steps take turns with the serving
engine's on the model's compute lock. It counts as a request in flight (the queue limit holds for it); once it
runs, a client that leaves does not stop it.
"""

from __future__ import annotations

import asyncio

from fastapi.responses import JSONResponse, PlainTextResponse, Response

from ..transcribe import LANGUAGES, Transcription, srt, transcribe, vtt
from .errors import ApiError
from .protocol import AudioForm
from .server import Server

LANGUAGE_NAMES = {"en": "english", "zh": "chinese", "de": "german", "es": "spanish", "ko": "korean", "fr": "french",
                  "ja": "japanese", "it": "italian"}  # as OpenAI's verbose_json names a language


async def audio_task(server: Server, form: AudioForm, task: str) -> Response:
    """`task` "transcribe", or "translate" (to English) for /v1/audio/translations."""
    server.check_model(form.model)
    if server.model.audio is None:
        raise ApiError(400, f"model '{server.name}' reads no audio; transcriptions and translations need a Qwen-Audio "
                       "checkpoint", param="model")
    if form.language is not None and form.language not in LANGUAGES:
        raise ApiError(400, f"language '{form.language}' is not one Qwen-Audio knows: give one of {', '.join(LANGUAGES)} "
                       "(ISO-639-1), or none to have it detected", param="language")
    timestamps = task == "transcribe" and form.response_format in ("srt", "vtt", "verbose_json")
    data = await form.file.read()
    server.admit()
    server.in_flight += 1
    try:
        result = await asyncio.to_thread(_run, server, data, task, form.language, timestamps)
    finally:
        server.in_flight -= 1
    return _response(result, task, form.response_format)


def _run(server: Server, data: bytes, task: str, language: str | None, timestamps: bool) -> Transcription:
    clip = server.media.audio(data, "file")  # decoding a long file takes a while: here, not on the event loop
    return transcribe(server.model, clip, task=task, language=language, target="en", timestamps=timestamps)


def _response(result: Transcription, task: str, response_format: str) -> Response:
    if response_format == "json":
        return JSONResponse({"text": result.text})
    if response_format == "verbose_json":
        segments = [{"id": n, "start": s.start, "end": s.end, "text": s.text} for n, s in enumerate(result.segments)]
        return JSONResponse({"task": task, "language": LANGUAGE_NAMES[result.language],
                             "duration": result.duration, "text": result.text, "segments": segments})
    writers = {"text": lambda r: r.text, "srt": srt, "vtt": vtt}
    return PlainTextResponse(writers[response_format](result))
