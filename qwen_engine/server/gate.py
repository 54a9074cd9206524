"""The ASGI gate in front of every endpoint: the API key, the request body limit, and the count of responses by
path and status.

Plain ASGI: Starlette's BaseHTTPMiddleware would hide client disconnects from the endpoints, and a request whose
client left must be aborted.
"""

from __future__ import annotations

from typing import Any

from .errors import ApiError
from .server import Server

Message = dict[str, Any]


class Gate:
    PATHS = {"/", "/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/audio/transcriptions",
             "/v1/audio/translations"}

    def __init__(self, app: Any, server: Server) -> None:
        self.app, self.server = app, server

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        path = scope["path"]
        try:
            headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
            if path.startswith("/v1/"):
                self.server.check_auth(headers.get("authorization", ""))
            await self.app(scope, await self.limited(headers, receive), counted)
        except ApiError as err:
            await err.response()(scope, receive, counted)
        finally:
            self.server.metrics.http.labels(path if path in self.PATHS else "other", str(status)).inc()

    async def limited(self, headers: dict[str, str], receive: Any) -> Any:
        """`receive` for the app, once the body is known to be within the limit (413 otherwise). A declared length
        is checked before a byte is read; a chunked body is read here, counted as it comes, and given to the app
        whole (the app reads the whole body before it starts anyway)."""
        limit = self.server.max_request_bytes
        declared = headers.get("content-length", "")
        if declared.isdigit():
            if int(declared) > limit:
                raise self.too_large(f"{int(declared):,} bytes")
            return receive
        if "chunked" not in headers.get("transfer-encoding", "").lower():
            return receive
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left: the app sees it at its first read
                return _replay(message, receive)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise self.too_large(f"more than {limit:,} bytes")
            chunks.append(chunk)
            more = message.get("more_body", False)
        return _replay({"type": "http.request", "body": b"".join(chunks), "more_body": False}, receive)

    def too_large(self, size: str) -> ApiError:
        limit_mb = self.server.max_request_bytes / 2**20
        return ApiError(413, f"the request body ({size}) is larger than this server's limit of {limit_mb:g} MiB "
                        "(qwen serve --max-request-mb)", code="request_too_large")


def _replay(first: Message, receive: Any) -> Any:
    """A `receive` that hands out `first`, then whatever `receive` brings (a disconnect, later)."""
    pending = [first]

    async def replayed() -> Message:
        return pending.pop(0) if pending else await receive()

    return replayed
