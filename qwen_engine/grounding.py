"""Qwen-VL's grounding output read into boxes and drawn (qwen-family.md §6.4): `<ref>phrase</ref>` followed by one
or more `<box>(x1,y1),(x2,y2)</box>` (or `<quad>` with four corners), coordinates on a [0, 1000) grid relative to
the image's width and height, mapped back to pixels with x·W/1000, y·H/1000 as the original tokenizer draws them.
A box with no `<ref>` before it has no label.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image as PILImage

_POINT = r"\((\d+),(\d+)\)"
_REGION = re.compile(rf"<ref>(?P<ref>.*?)</ref>|<(?P<kind>box|quad)>(?P<points>{_POINT}(?:,{_POINT})*)</(?P=kind)>", re.S)
_POINTS = re.compile(_POINT)


@dataclass(frozen=True, slots=True)
class Box:
    label: str | None  # the phrase of the <ref> before it
    kind: str  # "box": two corners; "quad": four
    points: tuple[tuple[float, float], ...]  # in the image's pixels

    @property
    def rectangle(self) -> tuple[float, float, float, float]:
        """(left, top, right, bottom) around the points."""
        xs, ys = [x for x, _ in self.points], [y for _, y in self.points]
        return min(xs), min(ys), max(xs), max(ys)


def read_boxes(text: str, size: tuple[int, int]) -> list[Box]:
    """The boxes of a reply, in the pixels of an image of `size` (width, height)."""
    width, height = size
    boxes, label = [], None
    for match in _REGION.finditer(text):
        if match.group("ref") is not None:
            label = match.group("ref")
            continue
        points = tuple((int(x) * width / 1000, int(y) * height / 1000) for x, y in _POINTS.findall(match.group("points")))
        if len(points) == (2 if match.group("kind") == "box" else 4):
            boxes.append(Box(label, match.group("kind"), points))
    return boxes


def draw_boxes(image: PILImage.Image, boxes: list[Box], colour: str = "red") -> PILImage.Image:
    """A copy of `image` with each box outlined and labelled."""
    from PIL import ImageDraw

    drawn = image.convert("RGB")
    pen = ImageDraw.Draw(drawn)
    for box in boxes:
        if box.kind == "box":
            pen.rectangle(box.rectangle, outline=colour, width=max(1, round(min(drawn.size) / 200)))
        else:
            pen.polygon(list(box.points), outline=colour)
        if box.label:
            left, top, _, _ = box.rectangle
            pen.text((left + 2, top + 2), box.label, fill=colour)
    return drawn
