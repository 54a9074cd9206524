"""What a request asks the model to continue: token ids, plus the media items (images, audio) that fill some of
their positions.

The chat format makes a `Prompt` from structured content parts; it travels unchanged from the request through the
sequence and the scheduler to the model runner. An item's ids are placeholders: the runner writes the item's
encoder output over the positions it fills, and the prefix cache mixes the item's digest into the hashes of the
blocks it touches, so two prompts with equal ids but different media never share keys and values. A leaf module
(no torch): payloads and embeddings are whatever the encoder of that kind takes and gives.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(eq=False)
class MediaItem:
    """One image or audio clip in a prompt."""

    kind: str  # which encoder reads it ("image", "audio")
    digest: bytes  # a hash of the content: equal digests mean equal encoder outputs
    offset: int  # index in the prompt ids of the first position it fills
    length: int  # how many positions it fills
    payload: Any = None  # what the encoder reads (pixels, samples)
    embedding: Any = None  # the encoder output [length, hidden] once computed; kept across preemption

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(eq=False)
class Prompt:
    token_ids: list[int]
    items: list[MediaItem] = field(default_factory=list)

    def __post_init__(self) -> None:
        for item in self.items:
            if not 0 <= item.offset < item.end <= len(self.token_ids):
                raise ValueError(f"a {item.kind} item at {item.offset}…{item.end} lies outside the prompt's "
                                 f"{len(self.token_ids)} ids")

    def __len__(self) -> int:
        return len(self.token_ids)

    def items_in(self, start: int, end: int) -> list[MediaItem]:
        """The items that fill any position in start…end−1."""
        return [item for item in self.items if item.offset < end and start < item.end]

    def digests_in(self, start: int, end: int) -> bytes:
        """What a prefix-cache block over positions start…end−1 mixes into its hash besides the ids: each item's
        digest, and where it lies relative to the block."""
        return b"".join(item.digest + (item.offset - start).to_bytes(8, "little", signed=True)
                        + item.length.to_bytes(8, "little") for item in self.items_in(start, end))
