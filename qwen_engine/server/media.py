"""Which images a request may bring, and reading them: the operator's media policy.

By default a server reads only what a request carries inline (`data:` URLs): one that fetched a URL or opened a
path because a request named it could be made to reach other hosts or read other files. The operator opts in to
either, vLLM's way: `--allow-remote-media` fetches http(s) URLs; `--allowed-local-media-path DIR` reads files under
DIR, resolved first, so neither `..` nor a symlink leads out of it. Every image also meets the limits on count,
bytes and pixels, each refused with a 400 that names the flag.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import QwenError
from ..images import DATA_URL, MAX_PIXELS, LoadedImage, load_image
from .errors import ApiError

FETCH_TIMEOUT_S = 10.0
MAX_REDIRECTS = 3
FILE_URL = "file://"


@dataclass(frozen=True)
class MediaPolicy:
    allow_remote: bool = False  # --allow-remote-media
    local_root: Path | None = None  # --allowed-local-media-path, resolved
    per_prompt: Mapping[str, int] = field(default_factory=lambda: {"image": 4})  # --limit-mm-per-prompt
    max_bytes: int = 20 << 20  # --max-image-mb
    max_pixels: int = MAX_PIXELS  # --max-image-pixels

    def check_count(self, kind: str, count: int, param: str) -> None:
        limit = self.per_prompt.get(kind, 0)
        if count > limit:
            raise ApiError(400, f"the request holds {count} {kind}s; this server takes at most {limit} a prompt "
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
        """A file named by a request, read only where it resolves (symlinks followed, `..` applied) to a regular
        file under the allowed directory; relative paths are taken from that directory."""
        if self.local_root is None:
            raise ApiError(400, "image paths are not read by this server (its operator can allow files under a "
                                "directory with --allowed-local-media-path DIR); send the image inline as a data: URL",
                           param=param)
        resolved = (self.local_root / path).resolve()
        if not resolved.is_relative_to(self.local_root):
            raise ApiError(400, f"the image path {path!r} leads outside the directory this server reads images from",
                           param=param)
        if not resolved.is_file():
            raise ApiError(400, f"no image file {path!r} in the directory this server reads images from", param=param)
        if os.path.getsize(resolved) > self.max_bytes:
            raise self._too_large(param)
        try:
            image = load_image(resolved.read_bytes(), self.max_pixels)
        except QwenError as err:
            raise ApiError(400, f"{path}: {err}", param=param) from None
        except OSError as err:
            raise ApiError(400, f"cannot read the image {path!r} ({err.strerror or err})", param=param) from None
        return LoadedImage(image.image, image.digest, path)  # its span names it as the request wrote it

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

    def _too_large(self, param: str) -> ApiError:
        size = f"{self.max_bytes / 2**20:g} MiB" if self.max_bytes >= 2**20 else f"{self.max_bytes:,} bytes"
        return ApiError(400, f"an image is over {size}, the most this server takes "
                             "(--max-image-mb); send a smaller one", param=param)


def _base64_bytes(payload: str) -> int:
    """How many bytes a base64 payload decodes to, without decoding it."""
    return len(payload) * 3 // 4 - payload.count("=", max(0, len(payload) - 2))
