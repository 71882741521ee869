"""Security headers on every answer: a Content-Security-Policy that lets the console run
only its own scripts (no inline or injected ones, no eval), never framed, no sniffing,
no referrer, HSTS over TLS.

Styles may be inline: xterm.js and noVNC set element styles and add style elements at
run time; styles cannot run code. The API's documentation page (Swagger UI, served by
FastAPI from a CDN with one inline bootstrap script) gets that script allowed by a nonce
made for each answer, not by 'unsafe-inline'."""

from __future__ import annotations

import secrets

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

CONSOLE_CSP = "; ".join([
    "default-src 'self'",
    "script-src 'self'",
    "style-src 'self' 'unsafe-inline'",
    "img-src 'self' data: blob:",
    "font-src 'self' data:",
    "connect-src 'self'",
    "worker-src 'self' blob:",
    "object-src 'none'",
    "base-uri 'none'",
    "form-action 'self'",
    "frame-ancestors 'none'",
])
CDN = "https://cdn.jsdelivr.net"


def docs_csp(nonce: str) -> str:
    return "; ".join([
        "default-src 'self'", f"script-src 'self' 'nonce-{nonce}' {CDN}", f"style-src 'self' 'unsafe-inline' {CDN}",
        "img-src 'self' data: https://fastapi.tiangolo.com", "connect-src 'self'", "object-src 'none'",
        "base-uri 'none'", "frame-ancestors 'none'",
    ])


FIXED = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"permissions-policy", b"camera=(), microphone=(), geolocation=(), payment=(), usb=()"),
]


class SecurityHeadersMiddleware:
    """Adds the headers above to every HTTP answer (a route may set its own CSP)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        tls = scope.get("scheme") == "https"

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {k.lower() for k, _ in headers}
                headers += [(k, v) for k, v in FIXED if k not in present]
                if b"content-security-policy" not in present:
                    headers.append((b"content-security-policy", CONSOLE_CSP.encode()))
                if tls:
                    headers.append((b"strict-transport-security", b"max-age=31536000"))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, with_headers)


def install_docs(app: FastAPI, docs_url: str, openapi_url: str) -> None:
    """Swagger UI whose one inline script carries this answer's nonce."""

    @app.get(docs_url, include_in_schema=False)
    def docs() -> HTMLResponse:
        nonce = secrets.token_urlsafe(16)
        page = get_swagger_ui_html(openapi_url=openapi_url, title=f"{app.title} - docs")
        html = bytes(page.body).decode().replace("<script>", f'<script nonce="{nonce}">')
        return HTMLResponse(html, headers={"Content-Security-Policy": docs_csp(nonce)})
