"""Audio for Qwen-Audio: read from a path, bytes, a `data:` URL or an (array, sample rate) pair, then turned into the
Whisper-style log-mel the encoder takes (qwen-family.md §7.3, §7.5).

Decoding: the original pipes every file through ffmpeg to mono 16 kHz s16. Here libsndfile decodes (WAV, FLAC, OGG,
MP3) to float, the channels are averaged ((L+R)/2), soxr resamples to 16 kHz (VHQ), and the result is quantized to
s16 as ffmpeg's output is (`round(x·32768)` clipped to int16, then /32768). So a 16 kHz mono 16-bit file gives the
original's samples exactly; elsewhere ffmpeg's own resampler and integer downmix are not reproduced (the downmix
differs by at most one s16 step).

Clips shorter than MIN_SAMPLES (30 ms), on which the original crashes (§7.5), are padded with zeros to MIN_SAMPLES:
they take the shortest span the original supports, 3.

The digest is of the input's bytes as given (or of an array's samples, rate and dtype): the prefix cache and the
encoder-output cache treat two clips as the same only when it matches.
"""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Union

from .errors import QwenError
from .media_bytes import media_bytes

if TYPE_CHECKING:
    import numpy as np
    import torch

    from .prompt import MediaItem

SAMPLE_RATE = 16000
N_FFT = 400
HOP = 160
N_MELS = 80
CHUNK_SAMPLES = 480_000  # 30 s: the encoder's window; longer clips are cut (qwen-family.md §7.3)
MIN_SAMPLES = 480  # the shortest clip the original encodes (span 3, §7.5)

AudioSource = Union[str, Path, bytes, tuple["np.ndarray", float], "LoadedAudio"]


# eq=False: equality and hashing by identity (comparing the sample arrays has no single truth value); the digest is
# what names a clip.
@dataclass(frozen=True, slots=True, eq=False)
class LoadedAudio:
    samples: np.ndarray  # float32, mono, SAMPLE_RATE, read-only; not cut to 30 s
    digest: bytes
    path: str | None = None  # the file it came from, if any

    @property
    def seconds(self) -> float:
        return len(self.samples) / SAMPLE_RATE

    @property
    def name(self) -> str:
        """How a prompt's <audio> span names it: its path as the original tokenizer writes it, else its digest."""
        return self.path if self.path is not None else f"audio:{self.digest.hex()}"

    @property
    def span(self) -> int:
        return audio_span(len(self.samples))


def load_audio(source: AudioSource, max_seconds: float | None = None) -> LoadedAudio:
    """The clip as the encoder's samples, and its digest; one clear QwenError for a missing or unreadable file, data
    that is not decodable audio, a bad data: URL or array, an empty clip, or one longer than `max_seconds` (checked
    before decoding where the file's header tells the length). A LoadedAudio is taken as it is."""
    import numpy as np

    if isinstance(source, LoadedAudio):
        return source
    path = None
    if isinstance(source, tuple):
        name = "the audio array"
        array, rate = _array_source(source)
        digest = _blake2b(np.ascontiguousarray(array).tobytes() + repr((rate, array.dtype.str, array.shape)).encode())
        frames = _pcm_to_float(array)
        _check_length(len(frames), rate, name, max_seconds)
    else:
        if not isinstance(source, (str, Path, bytes, bytearray, memoryview)):
            raise QwenError("audio is a path, bytes, a data: URL or an (array, sample_rate) pair "
                            f"(got {type(source).__name__})")
        data, path = media_bytes(source, "audio", "audio clip", "data:audio/wav;base64,…")
        name = path or "the audio"
        frames, rate = _decode(data, name, max_seconds)
        digest = _blake2b(data)
    if len(frames) == 0:
        raise QwenError(f"{name} holds no audio samples")
    if not np.isfinite(frames).all():
        raise QwenError(f"{name} holds NaN or infinite samples")
    mono = frames.mean(axis=1, dtype=np.float32) if frames.ndim == 2 else frames.astype(np.float32)  # (L+R)/2, §7.5
    if rate != SAMPLE_RATE:
        import soxr

        mono = soxr.resample(mono, rate, SAMPLE_RATE, quality="VHQ")
    samples = np.clip(np.rint(mono * 32768), -32768, 32767).astype(np.float32) / 32768  # ffmpeg's s16 (§7.3)
    if len(samples) < MIN_SAMPLES:
        samples = np.pad(samples, (0, MIN_SAMPLES - len(samples)))
    samples.setflags(write=False)  # shared by every cache that holds the clip
    return LoadedAudio(samples, digest, path)


def _blake2b(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def _decode(data: bytes, name: str, max_seconds: float | None) -> tuple[np.ndarray, float]:
    """libsndfile's float frames [frames, channels] and the sample rate."""
    import soundfile

    try:
        with soundfile.SoundFile(io.BytesIO(data)) as file:
            rate = float(file.samplerate)
            _check_length(file.frames, rate, name, max_seconds)  # before decoding a long file
            frames = file.read(dtype="float32", always_2d=True)
    except soundfile.SoundFileError as err:
        reason = getattr(err, "error_string", None) or str(err)
        raise QwenError(f"{name} is not in an audio format this engine can decode (WAV, FLAC, OGG, MP3; libsndfile: "
                        f"{reason})") from None
    return frames, rate


def _array_source(source: tuple) -> tuple[np.ndarray, float]:
    """An (array, rate) pair checked: 1-D mono or [frames, channels] as soundfile reads it, real numbers, rate > 0."""
    import numpy as np

    if len(source) != 2:
        raise QwenError(f"an audio array is given as (samples, sample_rate), a pair (got {len(source)} items)")
    array, rate = source
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "fiu" or array.ndim not in (1, 2):
        kind = f"{array.ndim}-D {array.dtype}" if isinstance(array, np.ndarray) else type(array).__name__
        raise QwenError(f"an audio array is a 1-D or [frames, channels] numpy array of floats or PCM ints (got {kind})")
    if array.ndim == 2 and array.shape[1] > array.shape[0]:
        raise QwenError(f"an audio array of shape {array.shape} has more channels than frames; give it as "
                        "[frames, channels] (transpose it)")
    if isinstance(rate, bool) or not isinstance(rate, (int, float, np.integer, np.floating)) \
            or not math.isfinite(rate) or rate <= 0:
        raise QwenError(f"an audio array's sample rate must be a positive number of Hz (got {rate!r})")
    return array, float(rate)


def _pcm_to_float(array: np.ndarray) -> np.ndarray:
    """Integer PCM to float in [-1, 1) (unsigned with its midpoint as zero, as 8-bit WAV stores it); floats as given."""
    import numpy as np

    if array.dtype.kind == "f":
        return array
    full_scale = float(2 ** (8 * array.dtype.itemsize - 1))
    offset = full_scale if array.dtype.kind == "u" else 0.0
    return ((array.astype(np.float64) - offset) / full_scale).astype(np.float32)


class TooLong(QwenError):
    """A clip over the `max_seconds` it was loaded with (a server names its flag)."""


def _check_length(frames: int, rate: float, name: str, max_seconds: float | None) -> None:
    if max_seconds is not None and frames / rate > max_seconds:
        raise TooLong(f"{name} is {frames / rate:.1f} s long, over the limit of {max_seconds:g} s; "
                        "give a shorter clip")


def encoder_frames(num_samples: int) -> tuple[int, int]:
    """(mel_len, after_cnn): the clip's own log-mel frames (10 ms each, at most 3000) and their number after conv2's
    stride 2 (qwen-family.md §7.3). The encoder reads the first 2·after_cnn frames of `log_mel`: with an odd mel_len
    one frame past the clip's own (§7.5)."""
    if num_samples < MIN_SAMPLES:
        raise ValueError(f"a clip has at least MIN_SAMPLES = {MIN_SAMPLES} samples (load_audio pads shorter ones)")
    mel_len = min(num_samples, CHUNK_SAMPLES) // HOP
    return mel_len, (mel_len - 1) // 2 + 1


def audio_span(num_samples: int) -> int:
    """Positions the clip takes in the prompt: its audio tokens (40 ms each after the average pooling) plus <audio>
    and </audio> (qwen-family.md §7.3); 752 for 30 s and longer."""
    _, after_cnn = encoder_frames(num_samples)
    return (after_cnn - 2) // 2 + 1 + 2


# qwen-family.md §7.5: `mel_filters.npz` is librosa's Slaney mel filterbank (htk=False, norm="slaney"); the helpers
# below repeat librosa's arithmetic, so the matrix comes out as that file's float32 values.
_F_SP = 200.0 / 3  # Hz per mel in the linear part
_MIN_LOG_HZ = 1000.0  # where the log part begins
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP
_LOGSTEP = math.log(6.4) / 27.0


def _hz_to_mel(hz: float) -> float:
    return _MIN_LOG_MEL + math.log(hz / _MIN_LOG_HZ) / _LOGSTEP if hz >= _MIN_LOG_HZ else hz / _F_SP


@lru_cache(maxsize=1)
def mel_filters() -> np.ndarray:
    """The [80, 201] float32 filterbank that maps an STFT power spectrum to mel bands (read-only)."""
    import numpy as np

    mels = np.linspace(_hz_to_mel(0.0), _hz_to_mel(SAMPLE_RATE / 2), N_MELS + 2)
    edges = np.where(mels >= _MIN_LOG_MEL, _MIN_LOG_HZ * np.exp(_LOGSTEP * (mels - _MIN_LOG_MEL)), _F_SP * mels)
    ramps = edges[:, None] - np.fft.rfftfreq(N_FFT, 1.0 / SAMPLE_RATE)[None, :]
    widths = np.diff(edges)
    rising, falling = -ramps[:-2] / widths[:-1, None], ramps[2:] / widths[1:, None]
    triangles = np.maximum(0, np.minimum(rising, falling)).astype(np.float32)  # librosa rounds here, then again
    weights = (triangles * (2.0 / (edges[2:] - edges[:-2]))[:, None]).astype(np.float32)  # Slaney: equal area
    weights.setflags(write=False)
    return weights


def log_mel(samples: np.ndarray) -> torch.Tensor:
    """The encoder's input [80, 3000] float32 for 16 kHz mono samples, as the original computes it (qwen-family.md
    §7.3, §7.5): the clip cut or zero-padded to 30 s, a centred, reflect-padded STFT with a periodic Hann window, the
    power spectrum without its last frame, the mel filterbank, log10, floored at the global maximum − 8, then scaled
    by (x + 4)/4. Silence gives −1.5 everywhere."""
    import numpy as np
    import torch

    chunk = np.zeros(CHUNK_SAMPLES, dtype=np.float32)
    kept = min(len(samples), CHUNK_SAMPLES)
    chunk[:kept] = samples[:kept]
    stft = torch.stft(torch.from_numpy(chunk), N_FFT, HOP, window=torch.hann_window(N_FFT), center=True,
                      pad_mode="reflect", return_complex=True)
    power = stft[:, :-1].abs() ** 2
    log = (torch.tensor(mel_filters()) @ power).clamp(min=1e-10).log10()
    log = torch.maximum(log, log.max() - 8.0)
    return (log + 4.0) / 4.0


def audio_items(ids: list[int], start_id: int, clips: list[LoadedAudio]) -> list[MediaItem]:
    """The clips of a prompt: the k-th `<audio>` (`start_id`) opens the k-th clip's span, which ends `span − 1` later
    with `</audio>` (start_id + 1); the item fills the whole span, both tags included (qwen-family.md §7.4)."""
    from .prompt import MediaItem

    starts = [i for i, token in enumerate(ids) if token == start_id]
    if len(starts) != len(clips):
        raise QwenError(f"the prompt holds {len(starts)} <audio> tags for {len(clips)} audio clips")
    items = []
    for start, clip in zip(starts, clips):
        end = start + clip.span - 1
        if end >= len(ids) or ids[end] != start_id + 1:
            raise QwenError(f"the <audio> span at position {start} does not hold the {clip.span} positions of "
                            f"{clip.name}")
        items.append(MediaItem("audio", clip.digest, start, clip.span, clip))
    return items
