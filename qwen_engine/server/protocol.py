"""Request bodies of the OpenAI API (JSON, and the audio endpoints' multipart forms), validated: a field of the
wrong type or out of range is a 400 with the field's name, never a failure deeper in."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import File, Form, UploadFile
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..sampling_params import MAX_TOP_LOGPROBS

MAX_N = 16
MAX_STOP = 16


class _Request(BaseModel):
    # Unknown fields are ignored, as OpenAI's API ignores fields it does not use; known ones are checked strictly.
    model_config = ConfigDict(extra="ignore", strict=False)

    model: str
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=-1)] | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    seed: Annotated[int, Field(ge=0, lt=2**63)] | None = None
    stop: str | list[str] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0, le=10)] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    user: str | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None

    @field_validator("logit_bias")
    @classmethod
    def _bias_keys(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is not None and (len(value) > 300 or any(not key.isdigit() for key in value)):
            raise ValueError("logit_bias maps at most 300 token ids (as strings) to biases in [-100, 100]")
        return value

    def token_bias(self, vocab_size: int) -> dict[int, float] | None:
        if not self.logit_bias:
            return None
        bias = {int(key): value for key, value in self.logit_bias.items()}
        if any(token >= vocab_size for token in bias):
            raise ValueError(f"logit_bias token ids must lie in [0, {vocab_size})")
        return bias

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str] | None:
        stops = [value] if isinstance(value, str) else value
        if stops is not None and (len(stops) > MAX_STOP or any(not s for s in stops)):
            raise ValueError(f"stop takes at most {MAX_STOP} non-empty strings")
        return stops

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.get("include_usage"))

    def sampling(self) -> dict[str, Any]:
        """Fields for SamplingParams.updated (None keeps the model's default)."""
        return {
            "temperature": self.temperature, "top_p": self.top_p, "min_p": self.min_p, "seed": self.seed,
            "top_k": None if self.top_k is None else max(self.top_k, 0), "stop": self.stop,
            "presence_penalty": self.presence_penalty, "frequency_penalty": self.frequency_penalty,
            "repetition_penalty": self.repetition_penalty,
        }


class FunctionCall(BaseModel):
    name: str
    arguments: str | dict[str, Any] = "{}"


class ToolCall(BaseModel):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ImageUrl(BaseModel):
    model_config = ConfigDict(extra="ignore")
    url: str


class ImagePart(BaseModel):
    """OpenAI's image part: a `data:` URL, or where the operator allows it a remote URL or a file (server/media.py)."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["image_url"]
    image_url: ImageUrl


class InputAudio(BaseModel):
    # The `format` OpenAI's part names ("wav", "mp3") is not read: the decoder tells the container from the bytes.
    model_config = ConfigDict(extra="ignore")
    data: str  # base64 of the clip's file


class AudioPart(BaseModel):
    """OpenAI's input_audio part, for Qwen-Audio-Chat (server/media.py reads it under the audio limits)."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["input_audio"]
    input_audio: InputAudio


ContentPart = Annotated[TextPart | ImagePart | AudioPart, Field(discriminator="type")]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _has_content(self) -> ChatMessage:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs content")
        return self


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: Annotated[str, Field(min_length=1, max_length=64)]
    description: str | None = None
    parameters: dict[str, Any] | None = None


class ToolDefinition(BaseModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: dict[str, str]


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object"]


class ChatCompletionRequest(_Request):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    response_format: ResponseFormat | None = None

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Request):
    prompt: Annotated[str, Field(min_length=1)] | Annotated[list[int], Field(min_length=1)]
    logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    echo: bool = False

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens


AudioResponseFormat = Literal["json", "text", "srt", "vtt", "verbose_json"]


@dataclass(frozen=True)
class AudioForm:
    """The multipart form of /v1/audio/transcriptions and /v1/audio/translations, as `audio_form` read it."""

    file: UploadFile
    model: str
    language: str | None
    response_format: AudioResponseFormat


def audio_form(file: Annotated[UploadFile, File()], model: Annotated[str, Form()],
               language: Annotated[str | None, Form()] = None,
               response_format: Annotated[AudioResponseFormat, Form()] = "json",
               temperature: Annotated[float, Form(ge=0, le=1)] = 0.0,
               timestamp_granularities: Annotated[list[Literal["segment", "word"]] | None,
                                                  Form(alias="timestamp_granularities[]")] = None) -> AudioForm:
    """The form's fields, validated (a FastAPI dependency: a function, whose annotations every FastAPI version
    resolves). `temperature` and `timestamp_granularities` are checked as OpenAI checks them, then not needed
    (server/audio.py says why); fields not named here, as `prompt`, are accepted and ignored, as in the JSON
    bodies. An empty `language` is none, as form clients send an unset field."""
    return AudioForm(file, model, language or None, response_format)
