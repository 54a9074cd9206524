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


def original_pixels(data: bytes) -> torch.Tensor:
    """Qwen-VL's visual.py path spelled out (§6.5): Image.open, convert("RGB"), Pillow's 448² bicubic, ToTensor and
    Normalize."""
    image = Image.open(io.BytesIO(data)).convert("RGB").resize((448, 448), Image.Resampling.BICUBIC)
    array = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(448, 448, 3).permute(2, 0, 1) / 255
    return (array - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def animated() -> bytes:
    frames = [Image.new("RGB", (24, 16), colour) for colour in ((250, 0, 0), (0, 0, 250))]
    return encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° to display; the original code does not
    gradient = Image.frombytes("RGB", (60, 30), bytes((x * 4) % 256 for y in range(30) for x in range(60) for _ in range(3)))
    return encoded(gradient, "JPEG", exif=exif)


def sixteen_bit() -> bytes:
    image = Image.frombytes("I;16", (20, 10), b"".join((v * 300).to_bytes(2, "little") for v in range(200)))
    return encoded(image, "PNG")


def palette_with_transparency() -> bytes:
    image = Image.new("RGB", (12, 12), (30, 160, 90)).convert("P")
    return encoded(image, "PNG", transparency=0)


@pytest.mark.parametrize("make", [animated, exif_rotated, sixteen_bit, palette_with_transparency,
                                  lambda: encoded(Image.new("CMYK", (9, 7), (10, 200, 30, 5)), "JPEG"),
                                  lambda: encoded(Image.new("LA", (9, 7), (120, 0)), "PNG")])
def test_every_kind_of_image_is_read_as_the_original_code_reads_it(make) -> None:
    data = make()
    assert torch.equal(pixels(load_image(data).image), original_pixels(data))


def test_animations_give_their_first_frame_and_exif_rotation_is_not_applied() -> None:
    first = pixels(load_image(animated()).image)
    assert torch.allclose(first, pixels(Image.new("RGB", (24, 16), (250, 0, 0))), atol=0.05)
    rotated = load_image(exif_rotated())
    assert rotated.size == (60, 30) and rotated.image.getexif()[0x0112] == 6  # as stored: landscape
    wide = load_image(sixteen_bit()).image
    # Pillow clips 16-bit values to 8 bits (300 → 255), it does not scale them (300 → 1): the original does the same.
    assert wide.mode.startswith("I") and [wide.convert("RGB").getpixel((x, 0)) for x in (0, 1)] == [(0, 0, 0), (255, 255, 255)]
