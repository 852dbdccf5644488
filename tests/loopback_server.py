"""A real OpenAI-compatible HTTP server on 127.0.0.1 for tests and benchmarks.

litellm talks to it over real HTTP exactly as it would to a provider. A *responder*
decides each answer: normal completions, or the failures providers really produce (429
with ``Retry-After``, 5xx, slow answers, truncated JSON, 401/404).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class Reply:
    """What the server sends: a status, a JSON body (or raw bytes), headers, a delay."""

    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


def completion(
    texts: list[str],
    model: str = "gpt-4o-mini",
    prompt_tokens: int = 100,
    completion_tokens: int = 50,
) -> dict:
    """An OpenAI chat-completion body with one choice per text."""
    return {
        "id": "chatcmpl-loopback",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": i, "finish_reason": "stop", "message": {"role": "assistant", "content": t}}
            for i, t in enumerate(texts)
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def error(status: int, message: str, kind: str = "api_error", **headers: str) -> Reply:
    """An OpenAI-style error reply."""
    return Reply(
        status, {"error": {"message": message, "type": kind, "code": str(status)}}, headers
    )


Responder = Callable[[dict, int], Reply]


class LoopbackServer:
    """Serve ``/v1/chat/completions`` from ``responder(request_body, request_index)``.

    ``requests`` holds every body received, ``headers`` their HTTP headers (in the same
    order), ``answered`` the bodies of completed 200s.
    ``threaded=True`` runs the responder off the event loop (for slow model generation).
    """

    def __init__(self, responder: Responder, threaded: bool = False):
        self.responder = responder
        self.threaded = threaded
        self.requests: list[dict] = []
        self.headers: list[dict[str, str]] = []
        self.answered: list[dict] = []
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        with self._lock:
            index = len(self.requests)
            self.requests.append(body)
            self.headers.append(dict(request.headers))
        if self.threaded:
            reply = await asyncio.to_thread(self.responder, body, index)
        else:
            reply = self.responder(body, index)
        if reply.delay:
            await asyncio.sleep(reply.delay)
        if isinstance(reply.body, (bytes, str)):
            raw = reply.body.encode() if isinstance(reply.body, str) else reply.body
            resp = web.Response(
                status=reply.status,
                body=raw,
                headers=reply.headers,
                content_type="application/json",
            )
        else:
            resp = web.json_response(reply.body, status=reply.status, headers=reply.headers)
        if reply.status == 200:
            with self._lock:
                self.answered.append(body)
        return resp

    async def _start(self) -> None:
        app = web.Application(client_max_size=64 * 2**20)
        app.router.add_post("/v1/chat/completions", self._handle)
        app.router.add_post("/chat/completions", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, backlog=1024)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]

    def __enter__(self) -> LoopbackServer:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(30)
        return self

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def last_user_text(body: dict) -> str:
    """The text of the last user message of a chat request."""
    return next(m["content"] for m in reversed(body["messages"]) if m["role"] == "user")


def request_json(body: dict) -> str:
    """A canonical string of a request, to compare requests across runs."""
    return json.dumps(body, sort_keys=True)
