"""The gate before every request: the API key, then the client's API version (ASGI middleware)."""
from __future__ import annotations

import hmac
from typing import Optional

from fastapi.responses import JSONResponse

from .. import __version__
from .wire import API_HEADER, API_VERSION, CLISC_HEADER, version_mismatch


class Gate:
    """ASGI middleware before everything else: the API key (constant-time comparison; never logged), then the
    client's API version. Every answer states the server's versions."""

    def __init__(self, app, api_key: Optional[str]) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        refusal = None
        if self.expected is not None and not hmac.compare_digest(headers.get(b"authorization", b""), self.expected):
            refusal = (401, "missing or wrong API key: send the server's key as 'Authorization: Bearer KEY'")
        elif headers.get(API_HEADER.lower().encode(), str(API_VERSION).encode()) != str(API_VERSION).encode():
            client_api = headers[API_HEADER.lower().encode()].decode(errors="replace")[:20]
            client_version = headers.get(CLISC_HEADER.lower().encode(), b"unknown").decode(errors="replace")[:40]
            refusal = (409, version_mismatch(client_api if client_api.isdigit() else 0, client_version,
                                                      API_VERSION, __version__))
        if refusal is None:
            async def stamped(message):
                if message["type"] == "http.response.start":
                    message["headers"] = list(message.get("headers", [])) + version_headers()
                await send(message)

            return await self.app(scope, receive, stamped)
        status, detail = refusal
        headers = {name.decode(): value.decode() for name, value in version_headers()}
        await JSONResponse({"detail": detail}, status, headers=headers)(scope, receive, send)


def version_headers() -> list:
    return [(API_HEADER.encode(), str(API_VERSION).encode()), (CLISC_HEADER.encode(), __version__.encode())]
