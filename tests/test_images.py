"""Image input for Qwen-VL (qwen_engine/images.py): the original code's PIL path (qwen-family.md §6.3, §6.5) and one
clear error for every input that is not a readable image."""

from __future__ import annotations

import base64
import io

import pytest
import torch
from PIL import Image

from qwen_engine.errors import QwenError
from qwen_engine.images import CLIP_MEAN, CLIP_STD, load_image, pixels


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_solid_colour_is_normalized_with_clips_mean_and_std() -> None:
    out = pixels(Image.new("RGB", (640, 300), (200, 100, 50)))
    assert out.shape == (3, 448, 448) and out.dtype == torch.float32  # aspect ratio not kept
    for channel, value in enumerate((200, 100, 50)):
        expected = (value / 255 - CLIP_MEAN[channel]) / CLIP_STD[channel]
        assert torch.allclose(out[channel], torch.full((448, 448), expected), atol=1e-6)


def test_the_resize_is_pillows_bicubic_on_8_bit_data() -> None:
    gradient = Image.frombytes("RGB", (64, 40), bytes((x * 4 + y) % 256 for y in range(40) for x in range(64) for _ in range(3)))
    resized = gradient.resize((448, 448), Image.Resampling.BICUBIC).tobytes()  # 8-bit RGB, row-major
    expected = torch.tensor(list(resized), dtype=torch.float32).reshape(448, 448, 3).permute(2, 0, 1) / 255
    mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
    assert torch.allclose(pixels(gradient), (expected - mean) / std, atol=1e-6)


def test_alpha_is_dropped_not_composited_and_palettes_are_converted() -> None:
    transparent = Image.new("RGBA", (10, 10), (10, 200, 30, 0))
    assert torch.allclose(pixels(transparent), pixels(Image.new("RGB", (10, 10), (10, 200, 30))))
    palette = Image.new("RGB", (10, 10), (10, 200, 30)).convert("P")
    assert torch.allclose(pixels(palette), pixels(palette.convert("RGB")))


def test_sources_and_digests(tmp_path) -> None:
    data = png(Image.new("RGB", (8, 6), (1, 2, 3)))
    path = tmp_path / "a.png"
    path.write_bytes(data)
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    loaded = [load_image(source) for source in (path, str(path), data, url)]
    assert {image.digest for image in loaded} == {loaded[0].digest} and loaded[0].size == (8, 6)
    assert load_image(png(Image.new("RGB", (8, 6), (1, 2, 4)))).digest != loaded[0].digest
    same = Image.new("RGB", (8, 6), (1, 2, 3))
    assert load_image(same).digest == load_image(same.copy()).digest != load_image(same.convert("L")).digest


@pytest.mark.parametrize(("make", "message"), [
    (lambda tmp: tmp / "missing.png", "image not found"),
    (lambda tmp: b"not an image at all", "not an image"),
    (lambda tmp: png(Image.new("RGB", (64, 64), (5, 5, 5)))[:60], "truncated"),
    (lambda tmp: "data:image/png;base64,@@@", "base64"),
    (lambda tmp: "data:image/png,plain", "base64"),
    (lambda tmp: 42, "path, bytes"),
])
def test_bad_inputs_are_one_clear_error(tmp_path, make, message: str) -> None:
    with pytest.raises(QwenError, match=message):
        load_image(make(tmp_path))


def test_the_pixel_limit_is_checked_before_decoding() -> None:
    with pytest.raises(QwenError, match="over the limit"):
        load_image(png(Image.new("L", (300, 300))), max_pixels=300 * 299)
