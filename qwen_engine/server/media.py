"""Which images and audio clips a request may bring, and reading them: the operator's media policy.

By default a server reads only what a request carries inline (`data:` URLs): one that fetched a URL or opened a
path because a request named it could be made to reach other hosts or read other files. The operator opts in to
either, vLLM's way: `--allow-remote-media` fetches http(s) URLs; `--allowed-local-media-path DIR` reads files under
DIR, resolved first, so neither `..` nor a symlink leads out of it. Every image also meets the limits on count,
bytes and pixels, each refused with a 400 that names the flag.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..audio import LoadedAudio, TooLong, load_audio
from ..errors import QwenError
from ..images import MAX_PIXELS, LoadedImage, load_image
from ..media_bytes import DATA_URL
from .errors import ApiError

FETCH_TIMEOUT_S = 10.0
MAX_REDIRECTS = 3
FILE_URL = "file://"
PLURALS = {"image": "images", "audio": "audio clips"}  # the media kinds, as check_count names them


@dataclass(frozen=True)
class MediaPolicy:
    allow_remote: bool = False  # --allow-remote-media
    local_root: Path | None = None  # --allowed-local-media-path, resolved
    per_prompt: Mapping[str, int] = field(default_factory=lambda: {"image": 4, "audio": 4})  # --limit-mm-per-prompt
    max_bytes: int = 20 << 20  # --max-image-mb
    max_pixels: int = MAX_PIXELS  # --max-image-pixels
    max_audio_bytes: int = 25 << 20  # --max-audio-mb (OpenAI's upload limit)
    max_audio_seconds: float = 1800.0  # --max-audio-seconds

    def check_count(self, kind: str, count: int, param: str) -> None:
        limit = self.per_prompt.get(kind, 0)
        if count > limit:
            raise ApiError(400, f"the request holds {count} {PLURALS[kind]}; this server takes at most {limit} a prompt "
                                "(--limit-mm-per-prompt)", param=param)

    def image(self, url: str, param: str = "messages") -> LoadedImage:
        """An image part's URL read under the policy: a data: URL, an http(s) URL where fetching is allowed, a file
        (a path or file:// URL) under the allowed directory."""
        if url.startswith(DATA_URL):
            if _base64_bytes(url.partition(",")[2]) > self.max_bytes:
                raise self._too_large(param)
            return self._decoded(url, param)
        if url.startswith(("http://", "https://")):
            if not self.allow_remote:
                raise ApiError(400, "remote image URLs are not fetched by this server (its operator can allow that with "
                                    "--allow-remote-media); send the image inline as a data: URL", param=param)
            return self._decoded(self._fetch(url, param), param)
        return self.local_image(url.removeprefix(FILE_URL), param)

    def local_image(self, path: str, param: str = "prompt") -> LoadedImage:
        """An image file a request names (see `_local_file`)."""
        data = self._local_file(path, "image", self.max_bytes, param)
        try:
            image = load_image(data, self.max_pixels)
        except QwenError as err:
            raise ApiError(400, f"{path}: {err}", param=param) from None
        return LoadedImage(image.image, image.digest, path)  # its span names it as the request wrote it

    def local_audio(self, path: str, param: str = "prompt") -> LoadedAudio:
        """An audio file a request names (a raw prompt's <audio>PATH</audio>; see `_local_file`)."""
        clip = self.audio(self._local_file(path, "audio clip", self.max_audio_bytes, param), param)
        return LoadedAudio(clip.samples, clip.digest, path)

    def audio(self, data: bytes, param: str) -> LoadedAudio:
        """Audio bytes a request carries (an input_audio part, an uploaded file) under the limits."""
        if len(data) > self.max_audio_bytes:
            raise self._too_large(param, "audio clip", self.max_audio_bytes, "--max-audio-mb")
        try:
            return load_audio(data, self.max_audio_seconds)
        except TooLong as err:
            raise ApiError(400, f"{err} (--max-audio-seconds)", param=param) from None
        except QwenError as err:
            raise ApiError(400, str(err), param=param) from None

    def inline_audio(self, payload: str, param: str = "messages") -> LoadedAudio:
        """An input_audio part's base64 data (checked for size before it is decoded)."""
        if _base64_bytes(payload) > self.max_audio_bytes:
            raise self._too_large(param, "audio clip", self.max_audio_bytes, "--max-audio-mb")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, "an input_audio part's data is not base64", param=param) from None
        return self.audio(data, param)

    def _local_file(self, path: str, kind: str, limit: int, param: str) -> bytes:
        """The bytes of a file a request names, read only where it resolves (symlinks followed, `..` applied) to a
        regular file under the allowed directory; relative paths are taken from that directory."""
        if self.local_root is None:
            raise ApiError(400, f"{kind} paths are not read by this server (its operator can allow files under a "
                                f"directory with --allowed-local-media-path DIR); send the {kind} inline", param=param)
        resolved = (self.local_root / path).resolve()
        if not resolved.is_relative_to(self.local_root):
            raise ApiError(400, f"the {kind} path {path!r} leads outside the directory this server reads media from",
                           param=param)
        if not resolved.is_file():
            raise ApiError(400, f"no {kind} file {path!r} in the directory this server reads media from", param=param)
        if os.path.getsize(resolved) > limit:
            raise self._too_large(param, kind, limit, "--max-image-mb" if kind == "image" else "--max-audio-mb")
        try:
            return resolved.read_bytes()
        except OSError as err:
            raise ApiError(400, f"cannot read the {kind} {path!r} ({err.strerror or err})", param=param) from None

    def _decoded(self, source: str | bytes, param: str) -> LoadedImage:
        try:
            image = load_image(source, self.max_pixels)
        except QwenError as err:
            raise ApiError(400, str(err), param=param) from None
        return image

    def _fetch(self, url: str, param: str) -> bytes:
        """The URL's body, at most max_bytes of it (streamed: a larger one is cut off, not read whole)."""
        import httpx

        try:
            with httpx.Client(follow_redirects=True, max_redirects=MAX_REDIRECTS, timeout=FETCH_TIMEOUT_S) as client:
                with client.stream("GET", url) as response:
                    if response.status_code != 200:
                        raise ApiError(400, f"fetching the image {url} gave HTTP {response.status_code}", param=param)
                    body = bytearray()
                    for piece in response.iter_bytes():
                        body += piece
                        if len(body) > self.max_bytes:
                            raise self._too_large(param)
                    return bytes(body)
        except httpx.HTTPError as err:
            raise ApiError(400, f"could not fetch the image {url} ({type(err).__name__}: {err})", param=param) from None

    def _too_large(self, param: str, kind: str = "image", limit: int | None = None, flag: str = "--max-image-mb") -> ApiError:
        limit = self.max_bytes if limit is None else limit
        size = f"{limit / 2**20:g} MiB" if limit >= 2**20 else f"{limit:,} bytes"
        return ApiError(400, f"an {kind} is over {size}, the most this server takes ({flag}); send a smaller one",
                        param=param)


def _base64_bytes(payload: str) -> int:
    """How many bytes a base64 payload decodes to, without decoding it."""
    return len(payload) * 3 // 4 - payload.count("=", max(0, len(payload) - 2))
