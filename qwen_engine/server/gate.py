"""The ASGI gate in front of every endpoint: the API key, and the count of responses by path and status.

Plain ASGI: Starlette's BaseHTTPMiddleware would hide client disconnects from the endpoints, and a request whose
client left must be aborted.
"""

from __future__ import annotations

from typing import Any

from .errors import ApiError
from .server import Server


class Gate:
    PATHS = {"/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions"}

    def __init__(self, app: Any, server: Server) -> None:
        self.app, self.server = app, server

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def counted(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        path = scope["path"]
        try:
            if path.startswith("/v1/"):
                headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
                self.server.check_auth(headers.get("authorization", ""))
            await self.app(scope, receive, counted)
        except ApiError as err:
            await err.response()(scope, receive, counted)
        finally:
            self.server.metrics.http.labels(path if path in self.PATHS else "other", str(status)).inc()
