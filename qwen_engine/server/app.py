"""The OpenAI-compatible HTTP API over the serving engine, assembled: /v1/models, /v1/chat/completions (chat.py),
/v1/completions (completions.py), /v1/audio/transcriptions and /v1/audio/translations (audio.py), /health and
/metrics (metrics.py) and the chat page at / (webui.py), behind the gate (gate.py: the API key and the body limit,
multipart uploads included).

Requests are validated before they reach the engine (protocol.py); every failure is an OpenAI-shaped JSON error
(errors.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from .audio import audio_task
from .chat import chat_completion
from .completions import completion
from .errors import ApiError, error_response
from .gate import Gate
from .protocol import AudioForm, ChatCompletionRequest, CompletionRequest, audio_form
from .server import Server
from .webui import add_webui, load_assets


def create_app(server: Server, webui: bool = True) -> FastAPI:
    """The app; `webui=False` (qwen serve --no-webui) leaves out the chat page."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        server.engine.stop()

    app = FastAPI(title="qwen-engine", lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> JSONResponse:
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        problems = err.errors()
        first = problems[0] if problems else {}
        where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
        message = f"{where}: {first.get('msg', 'invalid request')}" if where else str(first.get("msg", "invalid request"))
        return error_response(400, message, param=where or None, code=first.get("type"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        return error_response(err.status_code, str(err.detail), "not_found_error" if err.status_code == 404 else "invalid_request_error")

    @app.exception_handler(Exception)
    async def unexpected(request: Request, err: Exception) -> JSONResponse:
        return error_response(500, f"internal error: {type(err).__name__}: {err}", "server_error")

    @app.get("/health")
    async def health() -> Response:
        alive = server.engine.alive
        return JSONResponse({"status": "ok" if alive else "engine stopped"}, status_code=200 if alive else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {"id": server.name, "object": "model", "created": server.created, "owned_by": "qwen-engine",
                "max_model_len": server.model.config.context_length, "input_modalities": server.input_modalities}
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request) -> Response:
        return await chat_completion(server, body, request)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await completion(server, body, request)

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(form: Annotated[AudioForm, Depends(audio_form)]) -> Response:
        return await audio_task(server, form, "transcribe")

    @app.post("/v1/audio/translations")
    async def translations(form: Annotated[AudioForm, Depends(audio_form)]) -> Response:
        return await audio_task(server, form, "translate")

    if webui:
        add_webui(app, load_assets())
    app.add_middleware(Gate, server=server)
    return app
