"""What chat and completion responses share: a choice's collected output, usage, and server-sent-event framing."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ..engine.serving import Request as EngineRequest

DONE = "data: [DONE]\n\n"


@dataclass
class Choice:
    """What one choice of a request collected."""

    text: str = ""
    completion_tokens: int = 0
    logprobs: list[Any] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None


def usage(request: EngineRequest, choices: list[Choice]) -> dict[str, int]:
    prompt, completion = len(request.prompt_ids), sum(choice.completion_tokens for choice in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def sse_error(message: str) -> str:
    """A stream cannot change its 200 status any more: the failure goes out as an error event (as vLLM sends it)."""
    return sse({"error": {"message": f"the engine failed while serving this request: {message}", "type": "server_error",
                          "param": None, "code": None}})
