"""Chat prompts rendered by the checkpoint's own jinja template (qwen-family.md §8.3), in a sandbox.

Every string that comes from the caller (message contents, names, tool definitions) is defused by the tokenizer
before rendering, so only the template's own markup can become control tokens.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from typing import Any

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import QwenError

# Used when a checkpoint ships no template: the ChatML layout every Qwen chat model is trained on.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

Message = dict[str, Any]


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


class ChatTemplate:
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

    def render(
        self,
        messages: list[Message],
        defuse: Callable[[str], str],
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
    ) -> str:
        """The prompt text; caller-supplied strings pass through `defuse` first."""
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise QwenError(f"message {i} must be an object with a string 'role' (got {message!r:.80})")
        try:
            return self._template.render(
                messages=_defuse_all(messages, defuse),
                tools=_defuse_all(tools, defuse) if tools else None,
                add_generation_prompt=add_generation_prompt,
                **self.special_tokens,
            )
        except (jinja2.exceptions.TemplateError, TypeError, ValueError, ArithmeticError, LookupError) as err:
            raise QwenError(f"the chat template rejected the messages: {err}") from None
