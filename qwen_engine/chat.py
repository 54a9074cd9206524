"""Chat prompts: a conversation becomes a `Prompt` through the checkpoint's chat format.

Two formats share one interface (`ChatFormat.prompt`, from contents given as strings or content parts): the
checkpoint's own jinja template (qwen-family.md §8.3), rendered in a sandbox, and Qwen v1's `make_context` (§1.7),
assembled from ids because v1 ships no template. Either way no string from the caller (message contents, names,
tool definitions) can become a control token: the template path defuses them before rendering, the v1 path encodes
them as plain text."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import QwenError
from .audio import LoadedAudio, audio_items, load_audio
from .images import LoadedImage, image_items, load_image
from .prompt import Prompt
from .tokenizer import Tokenizer

_MEDIA_TAGS = {"image": "<img>", "audio": "<audio>"}  # content part kind → the token that opens its span
_MEDIA_NAMES = {"image": "images", "audio": "audio"}


@dataclass
class _Media:
    """A conversation's images and audio clips in order (repeats included), as its list format numbers them."""

    images: list[tuple[str, LoadedImage]] = field(default_factory=list)
    clips: list[LoadedAudio] = field(default_factory=list)


# Used when a checkpoint ships no template: the ChatML layout every Qwen chat model is trained on.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

Message = dict[str, Any]
Tool = dict[str, Any]


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, indent: int | None = None, separators: Any = None, sort_keys: bool = False) -> str:
    # As HF templates expect: no HTML escaping, non-ASCII kept as is.
    return json.dumps(value, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)


def _defuse_all(value: Any, defuse: Callable[[str], str]) -> Any:
    if isinstance(value, str):
        return defuse(value)
    if isinstance(value, dict):
        # Keys too: a tool's parameter names reach the prompt through `tojson`.
        return {_defuse_all(key, defuse): _defuse_all(item, defuse) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_defuse_all(item, defuse) for item in value]
    return value


def _check_roles(messages: list[Message]) -> None:
    """Both formats index messages by role; a malformed one gets a clear error instead of a KeyError deep inside."""
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise QwenError(f"message {i} must be an object with a string 'role' (got {message!r:.80})")


class ChatFormat(ABC):
    """How a checkpoint turns a conversation into the prompt for the assistant's reply."""

    def prompt(self, messages: list[Message], tokenizer: Tokenizer, tools: list[Tool] | None = None) -> Prompt:
        """The prompt for a conversation whose contents are strings or lists of content parts (OpenAI's
        `{"type": "text", "text": …}`; image and audio parts come with the checkpoints that read them)."""
        _check_roles(messages)
        return Prompt(self.prompt_ids([_with_text_content(m, i) for i, m in enumerate(messages)], tokenizer, tools))

    @abstractmethod
    def prompt_ids(self, messages: list[Message], tokenizer: Tokenizer, tools: list[Tool] | None = None) -> list[int]:
        """Prompt ids ending where the assistant's reply begins (string contents); caller strings never become
        control ids."""


class ChatTemplate(ChatFormat):
    """A compiled chat template plus the special-token strings it may refer to."""

    def __init__(self, source: str | None, special_tokens: dict[str, str | None] | None = None) -> None:
        self.source = source or CHATML_TEMPLATE
        self.is_fallback = source is None
        self.special_tokens = special_tokens or {}
        environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        environment.filters["tojson"] = _tojson
        environment.globals["raise_exception"] = _raise_exception
        environment.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self._template = environment.from_string(self.source)
        except jinja2.exceptions.TemplateSyntaxError as err:
            raise QwenError(f"the model's chat template does not compile ({err}); fix tokenizer_config.json or the GGUF's chat template") from None

    def prompt_ids(self, messages: list[Message], tokenizer: Tokenizer, tools: list[Tool] | None = None) -> list[int]:
        """Rendered with every caller string defused, so only the template's own markup becomes control ids."""
        return tokenizer.encode_markup(self.render(messages, tokenizer.defuse, tools=tools))

    def render(
        self,
        messages: list[Message],
        defuse: Callable[[str], str],
        tools: list[Tool] | None = None,
        add_generation_prompt: bool = True,
    ) -> str:
        """The prompt text; caller-supplied strings pass through `defuse` first."""
        _check_roles(messages)
        try:
            return self._template.render(
                messages=_defuse_all(messages, defuse),
                tools=_defuse_all(tools, defuse) if tools else None,
                add_generation_prompt=add_generation_prompt,
                **self.special_tokens,
            )
        except (jinja2.exceptions.TemplateError, TypeError, ValueError, ArithmeticError, LookupError) as err:
            raise QwenError(f"the chat template rejected the messages: {err}") from None


class QwenV1ChatFormat(ChatFormat):
    """Qwen v1's `make_context` (qwen-family.md §1.7): ChatML built from ids, with v1's default system prompt.

    Role names and contents are encoded one by one and joined with "\n" and control ids, as v1 was trained. Encoding
    the same layout as one text would differ wherever a content starts with a line break: it would merge with the
    "\n" after the role name into a token the model never saw there. As `make_context` does, history goes oldest
    first once system and history reach the checkpoint's `max_window_size` tokens.
    """

    DEFAULT_SYSTEM = "You are a helpful assistant."
    DEFAULT_WINDOW = 6144  # make_context's default, and every v1 chat model's generation_config (§1.7)

    def __init__(self, max_window_size: int = DEFAULT_WINDOW) -> None:
        self.max_window_size = max_window_size

    def prompt(self, messages: list[Message], tokenizer: Tokenizer, tools: list[Tool] | None = None) -> Prompt:
        """make_context's prompt; a content may be a list of parts, images among them for Qwen-VL-Chat (§6.4) and
        audio for Qwen-Audio-Chat (§7.4), each written in its list format before the message's text: `Picture n:
        <img>…</img>\n` for the n-th image of the conversation (the span holds the image's path as the original
        tokenizer writes it, a digest for bytes, PIL images and data: URLs; its 256 vectors replace it), `Audio
        n:<audio>…</audio>\n` for the n-th clip (its encoder's vectors replace the whole span, tags included)."""
        media = _Media()
        ids = self._context(messages, tokenizer, tools, lambda i: self._content_ids(messages, i, tokenizer, media))
        items = []
        if media.images:
            items += image_items(ids, tokenizer.token_to_id("<img>"), dict(media.images).__getitem__)
        if media.clips:
            items += audio_items(ids, tokenizer.token_to_id("<audio>"), media.clips)
        return Prompt(ids, sorted(items, key=lambda item: item.offset))

    def prompt_ids(self, messages: list[Message], tokenizer: Tokenizer, tools: list[Tool] | None = None) -> list[int]:
        return self.prompt(messages, tokenizer, tools).token_ids

    def _content_ids(self, messages: list[Message], i: int, tokenizer: Tokenizer, media: _Media) -> list[int]:
        """A message's content as ids: a string as plain text (markup in it stays text), parts as the list format."""
        content = messages[i].get("content")
        if not isinstance(content, list):
            return tokenizer.encode(_content(messages, i))
        texts: list[str] = []
        ids: list[int] = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif kind in _MEDIA_TAGS:
                start = tokenizer.token_to_id(_MEDIA_TAGS[kind])
                if start is None or start not in tokenizer.control_ids:
                    reads = next((_MEDIA_NAMES[other] for other, tag in _MEDIA_TAGS.items()
                                  if tokenizer.token_to_id(tag) in tokenizer.control_ids), None)
                    raise QwenError(f"message {i} holds {'an image' if kind == 'image' else 'audio'}, but this model reads "
                                    f"{'text and ' + reads if reads else 'text only'}; give {_MEDIA_NAMES[kind]} to a "
                                    f"{'Qwen-VL' if kind == 'image' else 'Qwen-Audio'} checkpoint")
                lead = "\n" if ids else ""
                if kind == "image":
                    image = load_image(part.get("image"))
                    media.images.append((image.name, image))
                    ids += [*tokenizer.encode(lead + f"Picture {len(media.images)}: "), start,
                            *tokenizer.image_span(image.name), start + 1]
                else:
                    clip = load_audio(part.get("audio"))
                    media.clips.append(clip)
                    ids += [*tokenizer.encode(lead + f"Audio {len(media.clips)}:"), *tokenizer.audio_span(clip.span)]
            else:
                raise QwenError(f"message {i} has a content part that is not {{'type': 'text'|'image'|'audio', …}}: "
                                f"{part!r:.60}")
        return ids + tokenizer.encode(("\n" if ids else "") + "".join(texts))

    def _context(self, messages: list[Message], tokenizer: Tokenizer, tools: list[Tool] | None,
                 content_ids: Callable[[int], list[int]]) -> list[int]:
        if tools:
            raise QwenError("Qwen (v1) chat models have no tool calling; call them without tools")
        if not messages:
            raise QwenError("the conversation is empty; give at least one user message")
        _check_roles(messages)
        im_start, im_end = (_control_id(tokenizer, name) for name in ("<|im_start|>", "<|im_end|>"))
        newline = tokenizer.encode("\n")

        def turn(role: str, content: list[int]) -> list[int]:
            return [im_start, *tokenizer.encode(role), *newline, *content, im_end]

        has_system = messages[0]["role"] == "system"
        system = turn("system", content_ids(0) if has_system else tokenizer.encode(self.DEFAULT_SYSTEM))
        turns = []
        for i in range(1 if has_system else 0, len(messages)):
            role = messages[i]["role"]
            if role == "system":
                raise QwenError(f"message {i} is a system message: Qwen (v1) chat takes one, as the first message")
            if role not in ("user", "assistant"):
                raise QwenError(f"message {i} has role {role!r}: Qwen (v1) chat knows only system, user and assistant")
            turns.append((role, [*newline, *turn(role, content_ids(i))]))
        # make_context's history is (query, response) pairs, kept newest first while they fit; a message outside such
        # a pair goes alone. The last message is the query: always kept.
        history: list[int] = []
        end = len(turns) - 1
        while end > 0:
            paired = end >= 2 and (turns[end - 2][0], turns[end - 1][0]) == ("user", "assistant")
            start = end - 2 if paired else end - 1
            unit = [token for _, ids in turns[start:end] for token in ids]
            if len(system) + len(unit) + len(history) >= self.max_window_size:
                break
            history, end = unit + history, start
        return [*system, *history, *turns[-1][1], *newline, im_start, *tokenizer.encode("assistant"), *newline]


def _with_text_content(message: Message, i: int) -> Message:
    """The message with a list of text parts joined into one string content (as transformers' templates see it)."""
    content = message.get("content")
    if not isinstance(content, list):
        return message
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            shown = kind if isinstance(kind, str) else repr(part)[:60]
            raise QwenError(f"message {i} has a content part of type {shown}; this model reads text parts only "
                            "({'type': 'text', 'text': …})")
        texts.append(part["text"])
    return {**message, "content": "".join(texts)}


def _content(messages: list[Message], i: int) -> str:
    content = messages[i].get("content")
    if not isinstance(content, str):
        raise QwenError(f"message {i} needs a string 'content' (got {content!r:.80})")
    return content


def _control_id(tokenizer: Tokenizer, name: str) -> int:
    token_id = tokenizer.token_to_id(name)
    if token_id is None or token_id not in tokenizer.control_ids:
        raise QwenError(f"the tokenizer has no control token {name}, which Qwen (v1) chat needs")
    return token_id
