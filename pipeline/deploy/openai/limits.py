"""A request-body limit for the gateway, as pure ASGI middleware (Starlette's BaseHTTPMiddleware
would hide a streaming client's disconnect from the app).

A body whose ``Content-Length`` is over the limit is refused with 413 before a byte of it is read;
a chunked body is counted as it arrives and refused the moment it passes the limit, so no client
can make the server hold more than the limit of one request's body in memory.
"""

from __future__ import annotations

import json
from typing import Any

from pipeline.deploy.openai.errors import OpenAIError

Scope = dict[str, Any]
Message = dict[str, Any]


class BodyLimit:
    def __init__(self, app: Any, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            await self._refuse(send)
            return
        seen = 0
        refused = False

        async def counted_receive() -> Message:
            """Past the limit the client is answered at once, and the app is told the client left
            (an exception would be turned into a 400 by FastAPI's body parsing)."""
            nonlocal seen, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    refused = True
                    await self._refuse(send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            if not refused:  # after the 413 whatever the app says goes nowhere
                await send(message)

        await self.app(scope, counted_receive, guarded_send)

    async def _refuse(self, send: Any) -> None:
        message = f"the request body is larger than this server's limit of {self.limit} bytes"
        body = json.dumps(OpenAIError(413, message, "invalid_request_error", code="request_too_large").body()).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        headers.append((b"connection", b"close"))  # the rest of the body is not read
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})
