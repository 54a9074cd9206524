"""Audio input for Qwen-Audio (qwen_engine/audio.py): decoding to the original's 16 kHz s16 samples, the span formulas
and the Whisper-style log-mel (qwen-family.md §7.3, §7.5) against independent computations, and one clear error for
every input that is not a usable clip."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import subprocess
import sys
from pathlib import Path

import librosa
import numpy as np
import pytest
import soundfile
import torch

from qwen_engine.audio import (
    CHUNK_SAMPLES,
    MIN_SAMPLES,
    SAMPLE_RATE,
    LoadedAudio,
    audio_items,
    audio_span,
    encoder_frames,
    load_audio,
    log_mel,
    mel_filters,
)
from qwen_engine.errors import QwenError


def encoded(samples: np.ndarray, rate: int = SAMPLE_RATE, format: str = "WAV", subtype: str = "PCM_16") -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, format=format, subtype=subtype)
    return buffer.getvalue()


def tone(frequency: float, seconds: float, rate: int = SAMPLE_RATE, amplitude: float = 0.5) -> np.ndarray:
    return amplitude * np.sin(2 * np.pi * frequency * np.arange(round(seconds * rate)) / rate)


def peak_hz(samples: np.ndarray) -> float:
    return float(np.argmax(np.abs(np.fft.rfft(samples))) * SAMPLE_RATE / len(samples))


def reference_log_mel(samples: np.ndarray) -> np.ndarray:
    """§7.3 in float64 numpy: frames of the reflect-padded 30 s chunk × periodic Hann, rfft power without the last
    frame, librosa's filterbank, log10 floored at the global max − 8, (x + 4)/4."""
    chunk = np.zeros(CHUNK_SAMPLES)
    chunk[: min(len(samples), CHUNK_SAMPLES)] = samples[:CHUNK_SAMPLES]
    padded = np.pad(chunk, 200, mode="reflect")
    starts = 160 * np.arange(1 + (len(padded) - 400) // 160)
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(400) / 400)
    power = np.abs(np.fft.rfft(padded[starts[:, None] + np.arange(400)] * window, axis=1)) ** 2
    mel = librosa.filters.mel(sr=16000, n_fft=400, n_mels=80).astype(np.float64) @ power[:-1].T
    log = np.log10(np.maximum(mel, 1e-10))
    return (np.maximum(log, log.max() - 8) + 4) / 4


# --- the filterbank and the log-mel ---------------------------------------------------------------------------------

def test_the_mel_filterbank_is_librosas_slaney_one() -> None:
    ours, theirs = mel_filters(), librosa.filters.mel(sr=16000, n_fft=400, n_mels=80, htk=False, norm="slaney")
    assert ours.shape == (80, 201) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=0)
    assert mel_filters() is ours and not ours.flags.writeable  # cached, and no caller can change the cached copy


def test_log_mel_matches_an_independent_numpy_computation() -> None:
    rng = np.random.default_rng(0)
    t = np.arange(7 * SAMPLE_RATE) / SAMPLE_RATE
    chirp = 0.4 * np.sin(2 * np.pi * (100 * t + 400 * t**2))  # 100 Hz → 5.7 kHz over 7 s
    samples = (chirp + 0.01 * rng.standard_normal(len(t))).astype(np.float32)
    out = log_mel(samples)
    assert out.shape == (80, 3000) and out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), reference_log_mel(samples), rtol=0, atol=1e-4)


def test_silence_is_minus_one_and_a_half_everywhere() -> None:
    assert torch.equal(log_mel(np.zeros(SAMPLE_RATE, np.float32)), torch.full((80, 3000), -1.5))


def test_the_floor_is_eight_decades_under_the_global_maximum() -> None:
    """A loud tone then a second of faint noise: the noise sits on the floor set by the tone (§7.5: the maximum over
    the whole 80×3000 log-mel), though on its own it lies above its own floor."""
    quiet = 1e-4 * np.random.default_rng(5).standard_normal(SAMPLE_RATE)
    both = np.concatenate([tone(1000, 1), quiet]).astype(np.float32)
    out = log_mel(both)
    np.testing.assert_allclose(out.numpy(), reference_log_mel(both), rtol=0, atol=1e-4)
    floor = out.max().item() - 2  # (max − 8 + 4)/4 = the scaled max − 2
    assert torch.equal(out[:, 102:], torch.full_like(out[:, 102:], floor))  # the noise and the padding after it
    alone = log_mel(quiet.astype(np.float32))[:, :98]
    assert alone.min() > alone.max() - 2 and alone.max() < floor  # unfloored alone, all raised beside the tone


def test_log_mel_takes_the_first_30_seconds() -> None:
    rng = np.random.default_rng(1)
    long = (0.1 * rng.standard_normal(45 * SAMPLE_RATE)).astype(np.float32)
    assert torch.equal(log_mel(long), log_mel(long[:CHUNK_SAMPLES]))
    clip = load_audio((long, SAMPLE_RATE))
    assert len(clip.samples) == 45 * SAMPLE_RATE and clip.span == 752  # the clip keeps its length; the span is capped
    log_mel(clip.samples)  # read-only samples are fine


# --- lengths --------------------------------------------------------------------------------------------------------

def spelled_out(num_samples: int) -> int:
    """§7.3 as written there."""
    mel_len = min(num_samples, 480000) // 160
    after_cnn = (mel_len - 1) // 2 + 1
    return (after_cnn - 2) // 2 + 1 + 2


@pytest.mark.parametrize(("seconds", "span"), [(0.03, 3), (0.5, 14), (1, 27), (1.01, 27), (1.02, 27), (1.04, 28),
                                               (29.98, 751), (29.99, 752), (30, 752), (45, 752)])
def test_audio_span_follows_the_formulas(seconds: float, span: int) -> None:
    num_samples = round(seconds * SAMPLE_RATE)
    assert audio_span(num_samples) == spelled_out(num_samples) == span


def test_encoder_frames_and_the_frame_past_an_odd_clip() -> None:
    assert encoder_frames(480) == (3, 2)  # the shortest clip: conv2 gives 2 frames, the pooling 1 token
    assert encoder_frames(16160) == (101, 51)  # odd: the encoder reads 2·51 = 102 frames, one past the clip's 101
    assert encoder_frames(SAMPLE_RATE) == (100, 50)
    assert encoder_frames(CHUNK_SAMPLES) == encoder_frames(2 * CHUNK_SAMPLES) == (3000, 1500)
    with pytest.raises(ValueError, match="at least MIN_SAMPLES"):
        audio_span(MIN_SAMPLES - 1)


# --- decoding -------------------------------------------------------------------------------------------------------

def test_a_16_bit_16_khz_wav_gives_the_originals_samples_exactly() -> None:
    pcm = np.random.default_rng(2).integers(-32768, 32768, 8000, dtype=np.int16)
    clip = load_audio(encoded(pcm))
    assert clip.samples.dtype == np.float32 and not clip.samples.flags.writeable
    np.testing.assert_array_equal(clip.samples, pcm / np.float32(32768))  # ffmpeg's s16 / 32768 (§7.3)
    assert clip.seconds == 0.5 and clip.span == 14


def test_float_audio_is_quantized_to_s16_as_ffmpeg_does() -> None:
    values = np.array([0.3, -0.3, 1e-6, 1.5, -1.5, 1.0, -1.0] * 100)
    expected = np.clip(np.rint(values * 32768), -32768, 32767) / 32768
    for source in (encoded(values, subtype="FLOAT"), (values, SAMPLE_RATE), (values.astype(np.float32), SAMPLE_RATE)):
        np.testing.assert_array_equal(load_audio(source).samples, expected.astype(np.float32))


def test_flac_is_lossless_and_ogg_and_mp3_keep_the_tone() -> None:
    x = tone(440, 1)
    flac = encoded(x, format="FLAC")
    stored, _ = soundfile.read(io.BytesIO(flac), dtype="int16")
    np.testing.assert_array_equal(load_audio(flac).samples, stored / np.float32(32768))
    for format, subtype in (("OGG", "VORBIS"), ("MP3", "MPEG_LAYER_III")):
        samples = load_audio(encoded(x, format=format, subtype=subtype)).samples
        assert abs(len(samples) - len(x)) <= 1152, format  # at most an MP3 frame of encoder padding
        assert peak_hz(samples) == 440 and np.corrcoef(samples[:16000], x[: len(samples)])[0, 1] > 0.999, format


def test_stereo_is_the_mean_of_the_channels() -> None:
    rng = np.random.default_rng(3)
    left, right = (rng.integers(-32768, 32768, 4000, dtype=np.int16) for _ in range(2))
    expected = np.rint((left.astype(np.float64) + right) / 2) / 32768  # (L+R)/2 (§7.5), to the nearest s16 step
    stereo = np.stack([left, right], axis=1)
    for source in (encoded(stereo), (stereo, SAMPLE_RATE)):
        np.testing.assert_array_equal(load_audio(source).samples, expected.astype(np.float32))
    five = np.stack([left, right, left, right, np.zeros_like(left)], axis=1).astype(np.float32) / 32768
    expected_five = np.rint(2 * (left.astype(np.float64) + right) / 5) / 32768
    np.testing.assert_allclose(load_audio((five, SAMPLE_RATE)).samples, expected_five, atol=1 / 32768)


@pytest.mark.parametrize(("rate", "frequency"), [(44100, 1000), (8000, 500), (22050, 3000)])
def test_other_rates_are_resampled_to_16_khz(rate: int, frequency: float) -> None:
    samples = load_audio(encoded(tone(frequency, 2, rate), rate, subtype="FLOAT")).samples
    assert len(samples) == 2 * SAMPLE_RATE and peak_hz(samples) == frequency
    ideal = tone(frequency, 2)
    assert np.abs(samples - ideal)[200:-200].max() < 1e-4  # away from the edges, the tone at 16 kHz to 1e-4


def test_pcm_arrays_are_scaled_by_their_width() -> None:
    cases = [(np.array([-128, 0, 64], np.int8), [-1, 0, 0.5]), (np.array([0, 128, 192], np.uint8), [-1, 0, 0.5]),
             (np.array([-32768, 16384], np.int16), [-1, 0.5]), (np.array([-(2**31), 2**30], np.int32), [-1, 0.5])]
    for array, expected in cases:
        samples = load_audio((array, SAMPLE_RATE)).samples
        np.testing.assert_array_equal(samples[: len(expected)], np.array(expected, np.float32),
                                      err_msg=str(array.dtype))


def test_short_clips_are_padded_with_zeros_to_the_shortest_span() -> None:
    pcm = np.full(100, 1000, np.int16)
    for source in (encoded(pcm), (pcm, SAMPLE_RATE), encoded(pcm[:1])):
        clip = load_audio(source)
        assert len(clip.samples) == MIN_SAMPLES and clip.span == 3
    clip = load_audio((pcm, SAMPLE_RATE))
    assert (clip.samples[:100] == 1000 / 32768).all() and not clip.samples[100:].any()


def test_audio_items_fill_each_span_tags_included() -> None:
    short, second = (load_audio((np.zeros(n, np.float32), SAMPLE_RATE)) for n in (MIN_SAMPLES, SAMPLE_RATE))
    start, end, pad = 155163, 155164, 151851
    ids = [1, 2, start, pad, end, 3, start, *[pad] * 25, end, 4]
    items = audio_items(ids, start, [short, second])
    assert [(item.kind, item.offset, item.length, item.end) for item in items] == [("audio", 2, 3, 5),
                                                                                   ("audio", 6, 27, 33)]
    assert items[0].payload is short and items[1].digest == second.digest
    with pytest.raises(QwenError, match=r"^the prompt holds 2 <audio> tags for 1 audio clips$"):
        audio_items(ids, start, [short])
    with pytest.raises(QwenError, match=r"^the <audio> span at position 2 does not hold the 27 positions of audio:"):
        audio_items(ids, start, [second, short])


# --- digests and names ----------------------------------------------------------------------------------------------

def test_path_bytes_and_data_url_of_the_same_file_share_a_digest(tmp_path: Path) -> None:
    data = encoded(tone(440, 0.5))
    path = tmp_path / "clip.wav"
    path.write_bytes(data)
    url = "data:audio/wav;base64," + base64.b64encode(data).decode()
    clips = [load_audio(path), load_audio(str(path)), load_audio(data), load_audio(bytearray(data)), load_audio(url)]
    assert {clip.digest for clip in clips} == {hashlib.blake2b(data, digest_size=16).digest()}
    for clip in clips[1:]:
        np.testing.assert_array_equal(clip.samples, clips[0].samples)
    assert clips[0].name == clips[1].name == clips[0].path == str(path)
    assert clips[2].path is None and clips[2].name == f"audio:{clips[2].digest.hex()}" == clips[4].name
    assert load_audio(encoded(tone(440, 0.5, amplitude=0.4))).digest != clips[0].digest


def test_an_arrays_digest_covers_its_samples_rate_and_dtype() -> None:
    pcm = np.random.default_rng(4).integers(-32768, 32768, 2000, dtype=np.int16)
    digest = load_audio((pcm, SAMPLE_RATE)).digest
    assert load_audio((pcm.copy(), 16000.0)).digest == digest
    assert load_audio((pcm[::-1].copy(), SAMPLE_RATE)).digest != digest
    assert load_audio((pcm, 8000)).digest != digest
    assert load_audio((pcm.view(np.uint16), SAMPLE_RATE)).digest != digest  # same bytes, other dtype
    assert load_audio((pcm.reshape(1000, 2), SAMPLE_RATE)).digest != digest  # same bytes, stereo
    wav = load_audio(encoded(pcm))
    np.testing.assert_array_equal(load_audio((pcm, SAMPLE_RATE)).samples, wav.samples)  # same samples as the file


def test_a_loaded_clip_is_frozen_and_passes_through() -> None:
    clip = load_audio((np.zeros(SAMPLE_RATE, np.float32), SAMPLE_RATE))
    assert load_audio(clip) is clip and {clip: 1}[clip] == 1  # hashable, by identity
    with pytest.raises(dataclasses.FrozenInstanceError):
        clip.path = "x.wav"  # type: ignore[misc]
    with pytest.raises(ValueError, match="read-only"):
        clip.samples[0] = 1


def test_importing_and_loading_stays_light() -> None:
    """The tokenizer reads clips for their span: neither the import nor load_audio may pull in torch."""
    script = ("import sys, numpy as np\n"
              "mods = lambda: [m for m in ('torch', 'soundfile', 'soxr') if m in sys.modules]\n"
              "import qwen_engine.audio as audio\nprint(mods())\n"
              "audio.load_audio((np.zeros(8000), 8000))\nprint(mods())\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["[]", "['soxr']"]


# --- errors ---------------------------------------------------------------------------------------------------------

def test_file_errors_are_one_clear_qwen_error_each(tmp_path: Path) -> None:
    with pytest.raises(QwenError, match=r"^audio not found: .*nope\.wav$"):
        load_audio(tmp_path / "nope.wav")
    with pytest.raises(QwenError, match=r"^cannot read the audio .* \(Is a directory\)$"):
        load_audio(str(tmp_path))
    text = tmp_path / "notes.wav"
    text.write_text("not audio at all")
    with pytest.raises(QwenError, match=r"notes\.wav is not in an audio format this engine can decode \(WAV, FLAC, OGG, MP3; "
                                         r"libsndfile: .*\)$"):
        load_audio(text)
    with pytest.raises(QwenError, match=r"^the audio is not in an audio format this engine can decode"):
        load_audio(b"RIFF\x00\x00\x00\x00WAVEjunk")


def test_empty_and_overlong_clips_are_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty.wav"
    empty.write_bytes(encoded(np.zeros(0)))
    with pytest.raises(QwenError, match=r"empty\.wav holds no audio samples$"):
        load_audio(empty)
    with pytest.raises(QwenError, match=r"^the audio array holds no audio samples$"):
        load_audio((np.zeros(0, np.float32), SAMPLE_RATE))
    long = encoded(tone(440, 2, 44100), 44100)
    assert load_audio(long, max_seconds=2).seconds == 2
    with pytest.raises(QwenError, match=r"^the audio is 2\.0 s long, over the limit of 1\.5 s; give a shorter clip$"):
        load_audio(long, max_seconds=1.5)
    with pytest.raises(QwenError, match=r"^the audio array is 3\.0 s long, over the limit of 1 s"):
        load_audio((np.zeros(24000), 8000), max_seconds=1)


@pytest.mark.parametrize(("url", "message"), [
    ("data:audio/wav,UklGRg==", r"^a data: URL audio clip must be base64 \(data:audio/wav;base64,…\)$"),
    ("data:audio/wav;base64", r"^a data: URL audio clip must be base64"),
    ("data:audio/wav;base64,@@not base64@@", r"^the audio data: URL's base64 does not decode$"),
    ("data:audio/wav;base64," + base64.b64encode(b"hello").decode(), r"^the audio is not in an audio format this engine can decode"),
])
def test_bad_data_urls_are_one_clear_error(url: str, message: str) -> None:
    with pytest.raises(QwenError, match=message):
        load_audio(url)


@pytest.mark.parametrize(("source", "message"), [
    (42, r"^audio is a path, bytes, a data: URL or an \(array, sample_rate\) pair \(got int\)$"),
    ((np.zeros(10), 16000, 1), r"^an audio array is given as \(samples, sample_rate\), a pair \(got 3 items\)$"),
    (([0.0, 0.1], 16000), r"\(got list\)$"),
    ((np.zeros((4, 4, 2)), 16000), r"^an audio array is a 1-D or \[frames, channels\] numpy array .*"
                                   r"\(got 3-D float64\)$"),
    ((np.zeros(4, np.complex64), 16000), r"\(got 1-D complex64\)$"),
    ((np.array(["a"]), 16000), r"\(got 1-D <U1\)$"),
    ((np.zeros((2, 16000)), 16000), r"^an audio array of shape \(2, 16000\) has more channels than frames"),
    ((np.zeros(10), 0), r"^an audio array's sample rate must be a positive number of Hz \(got 0\)$"),
    ((np.zeros(10), -8000), r"\(got -8000\)$"),
    ((np.zeros(10), float("nan")), r"\(got nan\)$"),
    ((np.zeros(10), "16000"), r"\(got '16000'\)$"),
    ((np.zeros(10), True), r"\(got True\)$"),
    ((np.array([0.0, np.nan]), 16000), r"^the audio array holds NaN or infinite samples$"),
    ((np.array([0.0, np.inf]), 16000), r"^the audio array holds NaN or infinite samples$"),
])
def test_bad_sources_are_one_clear_error(source: object, message: str) -> None:
    with pytest.raises(QwenError, match=message):
        load_audio(source)  # type: ignore[arg-type]


def test_a_float_file_holding_nan_is_refused() -> None:
    with pytest.raises(QwenError, match=r"^the audio holds NaN or infinite samples$"):
        load_audio(encoded(np.array([0.0, np.nan, 0.5]), subtype="FLOAT"))
