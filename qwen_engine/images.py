"""Images for Qwen-VL: read from a path, bytes, a PIL image or a `data:` URL, then preprocessed exactly as the
original code does (qwen-family.md §6.3, §6.5): `convert("RGB")` (alpha dropped, not composited; no EXIF rotation;
the first frame of an animation), Pillow's own bicubic resize to 448×448 on 8-bit data, then scaled to 0…1 and
normalized with CLIP's mean and std.

The digest is of the image's bytes as given (or of a PIL image's pixels): the prefix cache and the encoder-output
cache treat two images as the same only when it matches.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import TYPE_CHECKING, Union

from .errors import QwenError
from .media_bytes import media_bytes

if TYPE_CHECKING:
    import torch
    from PIL import Image as PILImage

    from .prompt import MediaItem

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_PIXELS = 50_000_000  # Pillow's decompression-bomb guard, as a clear error rather than a warning

ImageSource = Union[str, Path, bytes, "PILImage.Image", "LoadedImage"]


@dataclass(frozen=True, slots=True)
class LoadedImage:
    image: PILImage.Image  # as opened (its size is what grounding boxes are scaled to)
    digest: bytes
    path: str | None = None  # the file it came from, if any

    @property
    def name(self) -> str:
        """How a prompt's <img> span names it: its path as the original tokenizer writes it, else its digest."""
        return self.path if self.path is not None else f"image:{self.digest.hex()}"

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size


def load_image(source: ImageSource, max_pixels: int = MAX_PIXELS) -> LoadedImage:
    """The image and its digest; one clear QwenError for a missing, unreadable, truncated or non-image input, or one
    over `max_pixels`. An image already loaded (a server reads its own under its limits) is taken as it is."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, LoadedImage):
        return source
    if isinstance(source, Image.Image):
        return LoadedImage(source, hashlib.blake2b(source.tobytes() + repr((source.mode, source.size)).encode(),
                                                   digest_size=16).digest())
    if not isinstance(source, (str, Path, bytes, bytearray)):
        raise QwenError(f"an image is a path, bytes, a data: URL or a PIL image (got {type(source).__name__})")
    data, path = media_bytes(source, "image", "image", "data:image/png;base64,…")
    name = path or "the image"
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > max_pixels:
            raise QwenError(f"{name} has {width}×{height} pixels, over the limit of {max_pixels:,}; give a smaller image")
        image.load()  # decodes now: a truncated file fails here, not later inside a step
    except (UnidentifiedImageError, Image.DecompressionBombError) as err:
        raise QwenError(f"{name} is not an image this engine can read ({err})") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise QwenError(f"{name} is not a readable image; it may be truncated or corrupt ({err})") from None
    return LoadedImage(image, hashlib.blake2b(data, digest_size=16).digest(), path)


def pixels(image: PILImage.Image, size: int = 448) -> torch.Tensor:
    """Normalized float32 pixels [3, size, size], as Qwen-VL's `visual.py` makes them."""
    import numpy as np
    import torch
    from PIL import Image

    resized = image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    array = torch.from_numpy(np.asarray(resized, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255
    mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
    return (array - mean) / std


def image_items(ids: list[int], start_id: int, read: Callable[[ImageSource], LoadedImage] = load_image) -> list[MediaItem]:
    """The images of a prompt written in Qwen-VL's list format: the k-th `<img>` (`start_id`) pairs with the k-th
    `</img>` (start_id + 1), the path is the ids before the first `<imgpad>` (start_id + 2) between them, and the
    item fills the positions strictly between the tags (qwen-family.md §6.4, §6.5)."""
    from .prompt import MediaItem

    opens = [i for i, token in enumerate(ids) if token == start_id]
    closes = [i for i, token in enumerate(ids) if token == start_id + 1]
    if len(opens) != len(closes) or any(close <= start for start, close in zip(opens, closes)):
        raise QwenError("the prompt's <img> and </img> tags do not pair up")
    items = []
    for start, close in zip(opens, closes):
        span = ids[start + 1 : close]
        raw = span[: span.index(start_id + 2)] if start_id + 2 in span else span
        if any(token > 255 for token in raw):
            raise QwenError("an <img> span holds ids that are not path bytes; write images as <img>PATH</img>")
        try:
            path = bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            raise QwenError("an image path in the prompt is not UTF-8") from None
        image = read(path)
        items.append(MediaItem("image", image.digest, start + 1, len(span), image))
    return items
