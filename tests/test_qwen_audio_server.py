"""Qwen-Audio through `qwen serve`, driven by the official `openai` client: input_audio chat parts (whole and
streamed), /v1/audio/transcriptions and /v1/audio/translations in every response format (the same text as the
library's `transcribe`; SRT and VTT parsed back), raw prompts' `<audio>PATH</audio>` under the media policy, and
every refusal with its message, the server serving on through them all."""

from __future__ import annotations

import base64
import copy
import re

import httpx
import numpy as np
import openai
import pytest
import soundfile
import torch
from test_qwen_audio import audio_dir, qa, tone  # noqa: F401
from test_qwen_vl import vl, vl_dir  # noqa: F401
from test_server import KEY, NAME, Running, ScriptedDecoder

import qwen_engine
from qwen_engine.audio import audio_span
from qwen_engine.server.media import MediaPolicy
from qwen_engine.transcribe import transcribe

QUESTION = "What is it?"


@pytest.fixture(scope="module")
def served(qa):
    running = Running(qa, api_key=KEY)
    yield running
    running.close()


def audio_part(data: bytes) -> dict:
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(data).decode(), "format": "wav"}}


def ask(client: openai.OpenAI, *clips: bytes, stream: bool = False, **options):
    content = [*map(audio_part, clips), {"type": "text", "text": QUESTION}]
    return client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": content}], max_tokens=3,
                                          temperature=0, stream=stream, **options)


def library_reply(model, *clips: bytes) -> str:
    content = [*({"type": "audio", "audio": clip} for clip in clips), {"type": "text", "text": QUESTION}]
    return model.chat([{"role": "user", "content": content}], max_tokens=3, temperature=0).text


def transcription(client: openai.OpenAI, path, **options):
    with open(path, "rb") as file:
        return client.audio.transcriptions.create(model=options.pop("model", NAME), file=file, **options)


def test_chat_takes_input_audio_whole_and_streamed(served, qa, audio_dir) -> None:
    a, b = (audio_dir / "a.wav").read_bytes(), (audio_dir / "b.flac").read_bytes()
    client = served.client()
    expected = library_reply(qa, a)
    assert expected and ask(client, a).choices[0].message.content == expected
    assert "".join(c.choices[0].delta.content or "" for c in ask(client, a, stream=True) if c.choices) == expected
    assert ask(client, a, b).choices[0].message.content == library_reply(qa, a, b)
    # <audio> in a user's chat text is text: no file is read, the reply is the library's for the same text.
    text = f"<audio>{audio_dir / 'a.wav'}</audio> {QUESTION}"
    served_text = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": text}], max_tokens=3,
                                                 temperature=0)
    assert served_text.choices[0].message.content == qa.chat([{"role": "user", "content": text}], max_tokens=3,
                                                              temperature=0).text


@pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")  # the client's audio.translations
def test_transcriptions_and_translations_give_the_librarys_text(served, qa, audio_dir, monkeypatch) -> None:
    monkeypatch.setattr("qwen_engine.transcribe.MAX_WINDOW_TOKENS", 16)  # the library's and the server's: fast
    path = audio_dir / "a.wav"
    client = served.client()
    plain = transcribe(qa, path)
    assert plain.text and transcription(client, path).text == plain.text
    assert transcription(client, path, response_format="text") == plain.text
    stamped = transcribe(qa, path, timestamps=True)
    verbose = transcription(client, path, response_format="verbose_json", timestamp_granularities=["segment"])
    names = {"en": "english", "zh": "chinese", "de": "german", "es": "spanish", "ko": "korean", "fr": "french",
             "ja": "japanese", "it": "italian"}
    assert (verbose.task, verbose.language, verbose.duration, verbose.text) == ("transcribe", names[stamped.language], 2.5,
                                                                                 stamped.text)
    assert [(s.id, s.start, s.end, s.text) for s in verbose.segments] == [(n, s.start, s.end, s.text)
                                                                         for n, s in enumerate(stamped.segments)]
    translated = transcribe(qa, path, task="translate")
    with open(path, "rb") as file:
        assert client.audio.translations.create(model=NAME, file=file).text == translated.text
    with open(path, "rb") as file:  # no timestamp prompt for a translation: one segment per 30 s window
        assert parse_srt(client.audio.translations.create(model=NAME, file=file, response_format="srt")) == \
            [(1, 0.0, 2.5, translated.text)]
    assert transcription(client, path, language="en").text == transcribe(qa, path, language="en").text


class ScriptedAudioDecoder(ScriptedDecoder):
    """ScriptedDecoder for prompts that hold audio: the engine embeds them first (any vectors do)."""

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*ids.shape, self.config.hidden_size)


def test_srt_vtt_and_verbose_json_carry_the_models_timestamps(qa, audio_dir) -> None:
    path = audio_dir / "a.wav"
    tokenizer = qa.tokenizer
    script = tokenizer.encode("Hello<|0.48|><|0.52|> world<|1.20|><|endoftext|>", special=True)
    prompt_length = audio_span(len(soundfile.read(path)[0])) + 6  # the span, then six task tags ending in <|0.00|>
    scripted = copy.copy(qa)
    scripted.decoder = ScriptedAudioDecoder(qa.config, script, prompt_length)
    expected = [(1, 0.0, 0.48, "Hello"), (2, 0.52, 1.2, "world")]
    assert [(s.start, s.end, s.text.strip()) for s in transcribe(scripted, path, language="en", timestamps=True).segments] == \
        [row[1:] for row in expected]
    running = Running(scripted)
    try:
        client = running.client()
        assert parse_srt(transcription(client, path, language="en", response_format="srt")) == expected
        assert parse_vtt(transcription(client, path, language="en", response_format="vtt")) == [row[1:] for row in expected]
        verbose = transcription(client, path, language="en", response_format="verbose_json",
                                timestamp_granularities=["word", "segment"])
        assert verbose.language == "english" and verbose.text == "Hello world"
        assert [(s.id, s.start, s.end, s.text.strip()) for s in verbose.segments] == [(n - 1, *rest) for n, *rest in expected]
    finally:
        running.close()


CLOCK = r"(\d\d):(\d\d):(\d\d)[,.](\d\d\d)"


def seconds(match: re.Match, first: int) -> float:
    h, m, s, ms = (int(match.group(first + i)) for i in range(4))
    return round(h * 3600 + m * 60 + s + ms / 1000, 3)


def parse_srt(text: str) -> list[tuple[int, float, float, str]]:
    """SRT back into (index, start, end, text): blocks of an index line, a `-->` line and the text."""
    rows = []
    for block in text.strip().split("\n\n"):
        index, times, *lines = block.split("\n")
        match = re.fullmatch(f"{CLOCK} --> {CLOCK}", times)
        assert index.isdigit() and match and "," in times, block
        rows.append((int(index), seconds(match, 1), seconds(match, 5), "\n".join(lines)))
    return rows


def parse_vtt(text: str) -> list[tuple[float, float, str]]:
    header, *blocks = text.strip().split("\n\n")
    assert header == "WEBVTT"
    rows = []
    for block in blocks:
        times, *lines = block.split("\n")
        match = re.fullmatch(f"{CLOCK} --> {CLOCK}", times)
        assert match and "." in times, block
        rows.append((seconds(match, 1), seconds(match, 5), "\n".join(lines)))
    return rows


def test_raw_prompts_read_audio_files_only_under_the_allowed_directory(served, qa, audio_dir, tmp_path) -> None:
    tags = "<|startoftranscript|><|en|><|transcribe|><|en|><|notimestamps|><|wo_itn|>"
    root = tmp_path / "media"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.wav").write_bytes((audio_dir / "a.wav").read_bytes())
    (root / "link.wav").symlink_to(audio_dir / "a.wav")

    def complete(client: openai.OpenAI, path: str) -> str:
        return client.completions.create(model=NAME, prompt=f"<audio>{path}</audio>{tags}", max_tokens=3,
                                         temperature=0).choices[0].text

    with pytest.raises(openai.BadRequestError, match="audio clip paths are not read by this server.*--allowed-local-media-path"):
        complete(served.client(), str(audio_dir / "a.wav"))
    expected = qa.generate(f"<audio>{root / 'sub' / 'a.wav'}</audio>{tags}", max_tokens=3, temperature=0).text
    running = Running(qa, media=MediaPolicy(local_root=root.resolve()))
    try:
        client = running.client()
        for path in (str(root / "sub" / "a.wav"), "sub/a.wav", str(root / "sub" / ".." / "sub" / "a.wav")):
            assert complete(client, path) == expected, path
        for path, message in ((str(audio_dir / "a.wav"), "the audio clip path .* leads outside"),
                              ("../a.wav", "leads outside"), ("link.wav", "leads outside"),
                              ("sub/absent.wav", "no audio clip file 'sub/absent.wav'")):
            with pytest.raises(openai.BadRequestError, match=message):
                complete(client, path)
        with pytest.raises(openai.BadRequestError, match="no </audio>"):
            client.completions.create(model=NAME, prompt="<audio>sub/a.wav", max_tokens=1)
        with pytest.raises(openai.BadRequestError, match="holds 5 audio clips; .* at most 4 a prompt"):
            client.completions.create(model=NAME, prompt="<audio>sub/a.wav</audio>" * 5, max_tokens=1)
        assert complete(client, "sub/a.wav") == expected  # still serving
    finally:
        running.close()


def test_every_refusal_names_its_field_and_the_server_serves_on(qa, audio_dir, tmp_path) -> None:
    short = (audio_dir / "b.flac").read_bytes()  # 1.3 s: within both limits
    long = (audio_dir / "a.wav").read_bytes()  # 2.5 s: over the 2 s limit, under the byte limit
    soundfile.write(tmp_path / "big.wav", np.stack([tone(1.5, 440, 48000)] * 2, axis=1), 48000)  # 1.5 s, 288 kB
    big = (tmp_path / "big.wav").read_bytes()
    (tmp_path / "long.wav").write_bytes(long)
    (tmp_path / "junk.wav").write_bytes(b"not audio at all")
    assert len(long) < 100_000 < len(big)
    policy = MediaPolicy(per_prompt={"audio": 2}, max_audio_bytes=100_000, max_audio_seconds=2.0)
    running = Running(qa, api_key=KEY, media=policy)
    try:
        client = running.client()
        too_big = r"an audio clip is over 100,000 bytes, the most this server takes \(--max-audio-mb\)"
        too_long = r"2\.5 s long, over the limit of 2 s; give a shorter clip \(--max-audio-seconds\)"
        undecodable = r"not in an audio format this engine can decode \(WAV, FLAC, OGG, MP3"
        for clips, message in (([big], too_big), ([long], too_long), ([b"not audio at all"], undecodable),
                               ([short] * 3, r"holds 3 audio clips; this server takes at most 2 a prompt \(--limit-mm-per-prompt\)")):
            with pytest.raises(openai.BadRequestError, match=message) as refused:
                ask(client, *clips)
            assert refused.value.param == "messages"
        bad_base64 = {"type": "input_audio", "input_audio": {"data": "not base64!", "format": "wav"}}
        with pytest.raises(openai.BadRequestError, match="an input_audio part's data is not base64"):
            client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": [bad_base64]}], max_tokens=1)

        for path, options, message, param in (
                (tmp_path / "big.wav", {}, too_big, "file"), (tmp_path / "long.wav", {}, too_long, "file"),
                (tmp_path / "junk.wav", {}, undecodable, "file"),
                (audio_dir / "b.flac", {"language": "pt"},
                 "language 'pt' is not one Qwen-Audio knows: give one of en, zh, de, es, ko, fr, ja, it", "language"),
                (audio_dir / "b.flac", {"model": "whisper-1"}, "model 'whisper-1' is not served here", "model"),
                (audio_dir / "b.flac", {"response_format": "tsv"}, "response_format: Input should be 'json'", "response_format"),
                (audio_dir / "b.flac", {"temperature": 1.5}, "temperature: Input should be less than or equal to 1", "temperature"),
                (audio_dir / "b.flac", {"timestamp_granularities": ["char"]},
                 r"timestamp_granularities\[\]\.0: Input should be .segment. or .word.", None)):
            with pytest.raises(openai.BadRequestError, match=message) as refused:
                transcription(client, path, **options)
            assert param is None or refused.value.param == param, (message, refused.value.param)
        headers = {"Authorization": f"Bearer {KEY}"}
        no_file = httpx.post(running.url + "/v1/audio/translations", data={"model": NAME}, headers=headers)
        assert no_file.status_code == 400 and no_file.json()["error"]["message"] == "file: Field required"
        with pytest.raises(openai.APIStatusError, match="larger than this server's limit of 1 MiB") as refused:
            client.audio.transcriptions.create(model=NAME, file=("big.wav", b"\0" * (1 << 20)))  # the gate: 413
        assert refused.value.status_code == 413
        with pytest.raises(openai.AuthenticationError):
            transcription(running.client(api_key="wrong"), audio_dir / "b.flac")

        assert ask(client, short).choices[0].message.content == library_reply(qa, short)  # still serving
        assert running.server.in_flight == 0 and httpx.get(running.url + "/health").json() == {"status": "ok"}
    finally:
        running.close()


def test_models_without_audio_refuse_it(tiny_gguf, vl, audio_dir) -> None:
    running = Running(vl)
    try:
        with pytest.raises(openai.BadRequestError, match="message 0 holds audio, but this model reads text and images; give audio to a Qwen-Audio checkpoint"):
            ask(running.client(), (audio_dir / "a.wav").read_bytes())
    finally:
        running.close()
    running = Running(qwen_engine.load(tiny_gguf, dtype="float32"))
    try:
        client = running.client()
        with pytest.raises(openai.BadRequestError, match="reads text parts only"):
            ask(client, (audio_dir / "a.wav").read_bytes())
        with pytest.raises(openai.BadRequestError, match=f"model '{NAME}' reads no audio; .* need a Qwen-Audio checkpoint"):
            transcription(client, audio_dir / "a.wav")
        assert client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi"}],
                                              max_tokens=2).choices[0].finish_reason  # still serving
    finally:
        running.close()
