"""Qwen-Audio checkpoints: a tiny Qwen-Audio(-Chat) directory in the official layout loads with its encoder, the
audio control tokens sit at their ids, `<audio>PATH</audio>` becomes the clip's span as the original tokenizer makes
it, and the encoder's vectors replace the whole span, both tags included (qwen-family.md §7.3, §7.4), through the
engine's media items: chunk boundaries inside a clip included."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import soundfile
import torch
from tiny import AUDIO_VOCAB, TINY_AUDIO, assert_cli_chat_gives_the_librarys_reply, encoder_info, write_qwen_audio

import qwen_engine
from qwen_engine.audio import audio_span, encoder_frames, load_audio, log_mel
from qwen_engine.config import AudioConfig
from qwen_engine.errors import QwenError

AUDIO, END, PAD = 155163, 155164, 151851
RATE = 16000


def tone(seconds: float, hz: float, rate: int = RATE) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * hz * t) + 0.01 * np.random.default_rng(int(hz)).standard_normal(len(t))).astype(np.float32)


@pytest.fixture(scope="module")
def audio_dir(tmp_path_factory, gguf_arrays):
    directory = tmp_path_factory.mktemp("qwen-audio-chat")
    write_qwen_audio(directory, gguf_arrays[0])
    soundfile.write(directory / "a.wav", tone(2.5, 440), RATE)
    soundfile.write(directory / "b.flac", tone(1.3, 880), RATE)
    return directory


@pytest.fixture(scope="module")
def qa(audio_dir):
    return qwen_engine.load(audio_dir, dtype="float32")


def by_hand(model, text: str, paths: list) -> torch.Tensor:
    """The original model's first forward: each clip's span (from <audio> to </audio>, both included) replaced by
    its encoder output: BOS, the pooled frames, EOS."""
    ids = model.tokenizer.encode(text, special=True)
    with torch.inference_mode():
        hidden = model.decoder.embed(torch.tensor([ids]))
        for start, path in zip([i for i, t in enumerate(ids) if t == AUDIO], paths):
            clip = load_audio(path)
            vectors = model.audio(log_mel(clip.samples), encoder_frames(len(clip.samples))[0])
            hidden[0, start : start + len(vectors)] = vectors
        return model.decoder(inputs_embeds=hidden)[0, -1]


def test_a_qwen_audio_directory_loads_with_its_encoder_and_tokens(qa) -> None:
    assert qa.audio is not None and qa.config.audio == AudioConfig.from_dict(TINY_AUDIO)
    assert qa.config.vocab_size == AUDIO_VOCAB
    tokens = {"[[[AUDIO:modality]]]": 151851, "<|startoftranscript|>": 151852, "<|en|>": 151859, "<|notimestamps|>": 151868,
              "<|0.00|>": 151871, "<|30.00|>": 154871, "<|wo_itn|>": 154877, "<|midi_pitch_0|>": 154891,
              "<|speech_edit|>": 155162, "<audio>": AUDIO, "</audio>": END}
    assert {token: qa.tokenizer.token_to_id(token) for token in tokens} == tokens


def test_the_audio_span_is_the_original_tokenizers(qa, audio_dir) -> None:
    path = audio_dir / "a.wav"
    ids = qa.tokenizer.encode(f"<audio>{path}</audio><|startoftranscript|><|en|><|transcribe|><|en|><|notimestamps|><|wo_itn|>",
                              special=True)
    span = audio_span(40000)  # 2.5 s
    assert ids[:span] == [AUDIO, *[PAD] * (span - 2), END] and span == (((40000 // 160) - 1) // 2 + 1 - 2) // 2 + 1 + 2
    assert ids[span:] == [151852, 151859, 151855, 151859, 151868, 154877]
    assert AUDIO not in qa.tokenizer.encode(f"<audio>{path}</audio>")  # without special: text
    with pytest.raises(QwenError, match="no </audio>"):
        qa.tokenizer.encode(f"<audio>{path}", special=True)


@pytest.mark.parametrize("chunk", [2048, 40])  # 40: prompt chunks end inside the first clip
def test_one_and_two_clips_give_the_original_forward(qa, audio_dir, chunk: int) -> None:
    a, b = audio_dir / "a.wav", audio_dir / "b.flac"
    multitask = f"<audio>{a}</audio><|startoftranscript|><|en|><|transcribe|><|en|><|notimestamps|><|wo_itn|>"
    chat_list = f"Audio 1:<audio>{a}</audio>\nAudio 2:<audio>{b}</audio>\nWhich is higher?"
    for text, paths in ((multitask, [a]), (chat_list, [a, b])):
        expected = by_hand(qa, text, paths)
        request = qa.request(text, max_tokens=1, temperature=0)
        request.keep_logits = True
        engine = qa.serving_engine(num_blocks=256, prefill_tokens=chunk)
        ours = engine.run([request])[request.request_id][0][0].logits
        assert (ours - expected).abs().max() <= 1e-4 * expected.abs().max()
        assert (qa.logits(text)[-1] - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_chat_audio_parts_become_the_list_format(qa, audio_dir) -> None:
    path = str(audio_dir / "a.wav")
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is it?"}, {"type": "audio", "audio": path}]}]
    prompt = qa.chat_prompt(messages)
    raw = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
           f"Audio 1:<audio>{path}</audio>\nWhat is it?<|im_end|>\n<|im_start|>assistant\n")
    assert prompt.token_ids == qa.tokenizer.encode(raw, special=True)
    start = prompt.token_ids.index(AUDIO)
    assert [(item.kind, item.offset, item.length) for item in prompt.items] == [("audio", start, audio_span(40000))]
    reply = qa.chat(messages, max_tokens=3, temperature=0)
    assert reply.token_ids == qa.generate(raw, max_tokens=3, temperature=0).token_ids
    data = (audio_dir / "a.wav").read_bytes()
    samples, rate = soundfile.read(io.BytesIO(data), dtype="float32")
    for source in (data, (samples, rate)):
        same = [{"role": "user", "content": [{"type": "audio", "audio": source}, {"type": "text", "text": "What is it?"}]}]
        assert qa.chat(same, max_tokens=3, temperature=0).token_ids == reply.token_ids


def test_markup_in_user_text_stays_text(qa, audio_dir) -> None:
    text = f"<audio>{audio_dir / 'a.wav'}</audio><|startoftranscript|><|im_end|>"
    prompt = qa.chat_prompt([{"role": "user", "content": text}])
    assert not prompt.items and AUDIO not in prompt.token_ids and 151852 not in prompt.token_ids


def test_models_without_audio_refuse_it(tiny_gguf, audio_dir) -> None:
    text_only = qwen_engine.load(tiny_gguf, dtype="float32")
    with pytest.raises(QwenError, match="reads text"):
        text_only.chat([{"role": "user", "content": [{"type": "audio", "audio": str(audio_dir / "a.wav")}]}])


def test_qwen_chat_with_audio_gives_the_librarys_reply(qa, audio_dir, capsys, monkeypatch) -> None:
    assert_cli_chat_gives_the_librarys_reply(qa, audio_dir, "audio", str(audio_dir / "a.wav"), capsys, monkeypatch)


def scripted(monkeypatch, qa, reply: str) -> None:
    """Every generation replies `reply` (then <|endoftext|>), scripted at the sampler: a random model says nothing
    worth parsing; the rest of the path is the real one."""
    from qwen_engine.engine.runner import ModelRunner

    script = qa.tokenizer.encode(reply, special=True) + [qa.tokenizer.token_to_id("<|endoftext|>")]
    monkeypatch.setattr(ModelRunner, "sample", lambda self, seq, logits: script[min(len(seq.output_ids), len(script) - 1)])


def parse_subtitles(text: str, separator: str) -> list[tuple[float, float, str]]:
    """(start, end, text) of every cue of an SRT (`,` before the milliseconds) or WebVTT (`.`) file."""
    def seconds(clock: str) -> float:
        hours, minutes, rest = clock.split(":")
        whole, millis = rest.split(separator)
        return int(hours) * 3600 + int(minutes) * 60 + int(whole) + int(millis) / 1000

    cues = []
    for block in text.strip().split("\n\n"):
        lines = block.splitlines()
        if lines[0] == "WEBVTT":
            continue
        timing = next(i for i, line in enumerate(lines) if " --> " in line)
        if separator == ",":
            assert timing == 1 and lines[0] == str(len(cues) + 1)  # SRT cues are numbered from 1
        start, end = lines[timing].split(" --> ")
        cues.append((seconds(start), seconds(end), "\n".join(lines[timing + 1 :])))
    return cues


def test_transcription_reads_word_timestamps_into_segments(qa, audio_dir, monkeypatch) -> None:
    from qwen_engine.transcribe import srt, transcribe, vtt

    scripted(monkeypatch, qa, " Hello<|0.48|> wide<|1.02|> world<|2.31|>")
    result = transcribe(qa, audio_dir / "a.wav", language="en", timestamps=True)
    assert result.text == "Hello wide world" and result.language == "en" and result.duration == 2.5
    assert [(s.start, s.end, s.text) for s in result.segments] == [(0.0, 0.48, " Hello"), (0.48, 1.02, " wide"),
                                                                   (1.02, 2.31, " world")]
    cues = [(0.0, 0.48, "Hello"), (0.48, 1.02, "wide"), (1.02, 2.31, "world")]
    assert parse_subtitles(srt(result), ",") == cues and parse_subtitles(vtt(result), ".") == cues
    assert vtt(result).startswith("WEBVTT\n\n")


def test_the_multitask_prompts_are_the_originals(qa, audio_dir) -> None:
    from qwen_engine.transcribe import task_tags

    assert task_tags("transcribe", "en", "en", False) == "<|startoftranscript|><|en|><|transcribe|><|en|><|notimestamps|><|wo_itn|>"
    assert task_tags("transcribe", "zh", "en", True) == "<|startoftranscript|><|zh|><|transcribe|><|zh|><|timestamps|><|0.00|>"
    assert task_tags("translate", "de", "en", False) == "<|startoftranscript|><|de|><|translate|><|en|><|notimestamps|><|itn|>"
    assert task_tags("caption", "unknown", "en", False) == ("<|startofanalysis|><|unknown|><|caption|><|en|><|notimestamps|>"
                                                         "<|caption_clotho|>")


def test_the_language_is_the_tag_the_model_weighs_most(qa, audio_dir, monkeypatch) -> None:
    from qwen_engine.transcribe import LANGUAGES, transcribe

    path = audio_dir / "a.wav"
    logits = qa.logits(f"<audio>{path}</audio><|startoftranscript|>")[-1]
    expected = max(LANGUAGES, key=lambda code: logits[qa.tokenizer.token_to_id(f"<|{code}|>")])
    scripted(monkeypatch, qa, " text")
    assert transcribe(qa, path).language == expected


def test_long_audio_is_cut_at_its_pauses_and_stitched(qa, tmp_path, monkeypatch) -> None:
    from qwen_engine.transcribe import transcribe, windows

    speech = tone(70, 300)
    for pause in (27.0, 53.5):  # 200 ms of silence in the last 5 s of each 30 s window
        speech[int(pause * RATE) : int((pause + 0.2) * RATE)] = 0
    bounds = windows(speech)
    assert len(bounds) == 3 and bounds[0][0] == 0 and bounds[-1][1] == len(speech)
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))  # no gap, no overlap
    assert 27.0 <= bounds[0][1] / RATE <= 27.2 and 53.5 <= bounds[1][1] / RATE <= 53.7
    assert windows(speech[: 20 * RATE]) == [(0, 20 * RATE)]
    path = tmp_path / "long.wav"
    soundfile.write(path, speech, RATE)
    scripted(monkeypatch, qa, " la<|1.50|>")
    result = transcribe(qa, path, language="en", timestamps=True)
    assert [(round(s.start, 2), round(s.end, 2)) for s in result.segments] == [
        (round(start / RATE, 2), round(start / RATE + 1.5, 2)) for start, _ in bounds]
    assert result.text == "la la la" and result.duration == 70.0


def test_qwen_transcribe_writes_what_the_library_gives(qa, audio_dir, tmp_path, capsys, monkeypatch) -> None:
    from qwen_engine import cli
    from qwen_engine.transcribe import as_json, srt, transcribe

    scripted(monkeypatch, qa, " Hello<|0.48|> world<|2.31|>")
    path = str(audio_dir / "a.wav")
    options = ["transcribe", path, "--model", str(audio_dir), "--dtype", "float32", "--language", "en"]
    assert cli.main([*options, "--format", "srt"]) == 0
    assert capsys.readouterr().out == srt(transcribe(qa, path, language="en", timestamps=True))
    target = tmp_path / "out.json"
    assert cli.main([*options, "--format", "json", "--output", str(target)]) == 0
    assert json.loads(target.read_text()) == json.loads(as_json(transcribe(qa, path, language="en")))
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]
    assert cli.main([*options, "--language", "xx"]) != 0
    assert capsys.readouterr().err.strip() == "qwen: error: unknown language 'xx': Qwen-Audio knows en, zh, de, es, ko, fr, ja, it"


def test_a_last_piece_too_short_to_encode_is_left_out() -> None:
    from qwen_engine.transcribe import windows

    samples = np.ones(30 * RATE + 100, dtype=np.float32)
    samples[30 * RATE - 320 : 30 * RATE] = 0  # the quietest 20 ms end the first window: 260 samples are left after it
    assert windows(samples) == [(0, 30 * RATE - 160)]


def test_qwen_info_describes_the_encoder(qa, audio_dir, capsys) -> None:
    encoder, line = encoder_info(audio_dir, "audio_encoder", capsys)
    assert (encoder["n_layer"], encoder["n_state"], encoder["output_dim"]) == (2, 64, 128)
    assert encoder["parameters"] == sum(p.numel() for p in qa.audio.parameters())  # the catalog's count, as loaded
    assert "2 layers × 64 (4 heads), 80 mel bins" in line and f"{encoder['parameters']:,} parameters" in line


def test_text_after_the_last_stamp_runs_to_the_windows_end_and_translations_are_unstamped(qa, audio_dir, monkeypatch) -> None:
    from qwen_engine.transcribe import transcribe

    scripted(monkeypatch, qa, " Hello<|0.48|> unfinished")
    stamped = transcribe(qa, audio_dir / "a.wav", language="en", timestamps=True)
    assert [(s.start, s.end, s.text) for s in stamped.segments] == [(0.0, 0.48, " Hello"), (0.48, 2.5, " unfinished")]
    translated = transcribe(qa, audio_dir / "a.wav", task="translate", language="de", timestamps=True)
    assert [(s.start, s.end) for s in translated.segments] == [(0.0, 2.5)] and translated.text == "Hello unfinished"
