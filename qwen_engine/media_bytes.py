"""The bytes of a media input as a caller names it — a path, raw bytes or a base64 `data:` URL — with one clear
QwenError for each way that fails; images.py and audio.py decode what this reads."""

from __future__ import annotations

import base64
import binascii
from pathlib import Path

from .errors import QwenError

DATA_URL = "data:"


def media_bytes(source: str | Path | bytes | bytearray | memoryview, what: str, noun: str,
                example: str) -> tuple[bytes, str | None]:
    """The input's bytes, and its path where it is a file. `what` names the kind in messages ("image"), `noun` what
    one item is called ("audio clip"), `example` a well-formed data: URL's start."""
    if isinstance(source, (str, Path)) and str(source).startswith(DATA_URL):
        header, comma, payload = str(source).partition(",")
        if not comma or not header.endswith(";base64"):
            raise QwenError(f"a data: URL {noun} must be base64 ({example})")
        try:
            return base64.b64decode(payload, validate=True), None
        except (binascii.Error, ValueError):
            raise QwenError(f"the {what} data: URL's base64 does not decode") from None
    if isinstance(source, (str, Path)):
        try:
            return Path(source).read_bytes(), str(source)
        except FileNotFoundError:
            raise QwenError(f"{what} not found: {source}") from None
        except OSError as err:
            raise QwenError(f"cannot read the {what} {source} ({err.strerror or err})") from None
    return bytes(source), None
