"""The chat page at `/` (sources in webui/, built into qwen_engine/webui/ and shipped in the package: no Node.js for
users). Its files are read once at start and kept in memory with their gzip, so `/` costs no disk read; each response
carries a Content-Security-Policy that lets the page run only its own scripts and talk only to this server (model
output is sanitised by the page before it becomes HTML; the policy is the second wall)."""

from __future__ import annotations

import gzip
import hashlib
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import Response

from ..errors import QwenError
from .errors import ApiError

ROOT = Path(__file__).resolve().parents[1] / "webui"
CONTENT_SECURITY_POLICY = "; ".join([
    "default-src 'self'", "script-src 'self'", "style-src 'self'",
    "style-src-attr 'unsafe-inline'",  # KaTeX positions its glyphs with style attributes
    "img-src 'self' data: blob:", "font-src 'self'", "connect-src 'self'", "media-src 'self' data: blob:",
    "object-src 'none'", "base-uri 'none'", "frame-ancestors 'none'", "form-action 'none'",
])
HEADERS = {
    "content-security-policy": CONTENT_SECURITY_POLICY,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cross-origin-opener-policy": "same-origin",
    "cache-control": "no-cache",  # revalidated each load (ETag): a new install's page is never stale
}
MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
               ".css": "text/css; charset=utf-8", ".woff2": "font/woff2", ".svg": "image/svg+xml", ".png": "image/png"}
COMPRESSIBLE = frozenset({".html", ".js", ".css", ".svg"})


@dataclass(frozen=True, slots=True)
class Asset:
    body: bytes
    gzipped: bytes | None  # None where compressing gains nothing (fonts, images)
    media_type: str
    etag: str


def load_assets(root: Path = ROOT) -> dict[str, Asset]:
    """URL path → asset: `/` is index.html, `/assets/…` the files under assets/."""
    index = root / "index.html"
    if not index.is_file():
        raise QwenError(f"the chat page's files are missing from this installation ({index}); reinstall qwen-engine, "
                        "or start the server with --no-webui")
    files = {"/": index} | {f"/{path.relative_to(root).as_posix()}": path
                            for path in sorted((root / "assets").rglob("*")) if path.is_file()}
    assets = {}
    for url, path in files.items():
        if path.suffix not in MEDIA_TYPES:
            continue
        body = path.read_bytes()
        packed = gzip.compress(body, compresslevel=9, mtime=0) if path.suffix in COMPRESSIBLE else None
        assets[url] = Asset(body, packed, MEDIA_TYPES[path.suffix], f'"{hashlib.sha256(body).hexdigest()[:20]}"')
    return assets


def add_webui(app: FastAPI, assets: dict[str, Asset]) -> None:
    def respond(url: str, request: Request) -> Response:
        asset = assets.get(url)
        if asset is None:
            raise ApiError(404, f"no such file: {url}", "invalid_request_error", code="not_found")
        headers = dict(HEADERS, etag=asset.etag, vary="accept-encoding")
        if request.headers.get("if-none-match") == asset.etag:
            return Response(status_code=304, headers=headers)
        body = asset.body
        if asset.gzipped is not None and "gzip" in request.headers.get("accept-encoding", ""):
            body, headers["content-encoding"] = asset.gzipped, "gzip"
        return Response(body, media_type=asset.media_type, headers=headers)

    @app.get("/", include_in_schema=False)
    async def page(request: Request) -> Response:
        return respond("/", request)

    @app.get("/assets/{path:path}", include_in_schema=False)
    async def asset(path: str, request: Request) -> Response:
        return respond(f"/assets/{path}", request)
