"""Request-body limits: refuse oversized or stalled bodies before they are held or parsed."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Sequence

from fastapi import FastAPI, HTTPException, Request
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send


async def read_body(request: Request, limit: int, idle_timeout_s: float | None = 30.0) -> bytes:
    """The request body, refusing (413) anything over ``limit`` bytes before holding it all.

    A declared Content-Length over the limit is refused without reading; a body that lies about
    its length (or is chunked) is cut off as soon as it crosses the limit. A sender that stops
    sending mid-body (a stalled link, a slowloris) gets 408 after ``idle_timeout_s`` without a
    byte, instead of holding a server task forever; one that hangs up gets 400. Either way
    nothing partial reaches the caller, so nothing partial can be stored.
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise HTTPException(413, f"body of {declared} bytes exceeds the {limit}-byte limit")
        except ValueError as exc:
            raise HTTPException(400, "Content-Length is not an integer") from exc
    chunks, size = [], 0
    stream = request.stream().__aiter__()
    while True:
        try:
            chunk = await asyncio.wait_for(stream.__anext__(), idle_timeout_s)
        except StopAsyncIteration:
            break
        except asyncio.TimeoutError:
            raise HTTPException(408, f"no body bytes for {idle_timeout_s:g} s; send the request again",
                                headers={"Connection": "close"}) from None
        except ClientDisconnect:
            raise HTTPException(400, "the client disconnected before the body was complete") from None
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"body exceeds the {limit}-byte limit")
        chunks.append(chunk)
    body = b"".join(chunks)
    if not body:
        raise HTTPException(400, "request body is empty")
    return body


SMALL_BODY_BYTES = 64 * 1024


class BodyLimit:
    """ASGI middleware: a request-body size limit per endpoint, declared or streamed (413).

    FastAPI parses a JSON body before the endpoint (and its auth check) runs, so without this
    an unauthenticated caller could make any JSON endpoint buffer an arbitrarily large body.
    ``rules`` are (method, path regex, limit); the first match wins, else ``default``. A
    declared Content-Length over the limit is answered at once without reading; a chunked or
    lying body is cut off as soon as it crosses the limit.
    """

    def __init__(self, app: ASGIApp, rules: Sequence[tuple[str, str, int]] = (),
                 default: int = SMALL_BODY_BYTES) -> None:
        self.app = app
        self.rules = [(method.upper(), re.compile(pattern), limit) for method, pattern, limit in rules]
        self.default = default

    def limit_for(self, method: str, path: str) -> int:
        for rule_method, pattern, limit in self.rules:
            if rule_method == method.upper() and pattern.fullmatch(path):
                return limit
        return self.default

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["method"], scope["path"])
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                await _reply(send, 400, "Content-Length is not an integer")
                return
            if int(declared) > limit:
                await _reply(send, 413, f"body of {int(declared)} bytes exceeds the {limit}-byte limit "
                                        f"of {scope['method']} {scope['path']}")
                return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # An HTTPException reaches the app's exception handling as a 413 response.
                    raise HTTPException(413, f"body exceeds the {limit}-byte limit", headers={"Connection": "close"})
            return message

        await self.app(scope, limited, send)


async def _reply(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]})
    await send({"type": "http.response.body", "body": body})


def limit_bodies(app: FastAPI, rules: Sequence[tuple[str, str, int]] = (), default: int = SMALL_BODY_BYTES) -> None:
    """Install :class:`BodyLimit` on ``app`` (before it starts)."""
    app.add_middleware(BodyLimit, rules=rules, default=default)


class RequestDeadline:
    """ASGI middleware: every request ends within ``seconds``, answered 504 if nothing was sent yet.

    Body timeouts catch a sender that stalls; this catches everything else that would hold a
    connection and its task forever (a slow trickle of bytes, a handler stuck on a dependency).
    A response already under way is cut off instead, which the client sees as a broken transfer.
    """

    def __init__(self, app: ASGIApp, seconds: float) -> None:
        self.app, self.seconds = app, seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await asyncio.wait_for(self.app(scope, receive, tracked), self.seconds)
        except asyncio.TimeoutError:
            if not started:
                await _reply(send, 504, f"the request did not complete within {self.seconds:g} s")
