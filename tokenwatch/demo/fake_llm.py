"""An offline OpenAI- and Anthropic-compatible LLM server that bills real token counts."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import anyio
from aiohttp import web

from tokenwatch.core.tokens import count_text
from tokenwatch.demo import fake_anthropic, fake_gemini, fake_openai
from tokenwatch.demo.fake_exchange import (
    FAULT_HEADER,
    BadRequest,
    ClientGone,
    CountedCall,
    ErrorBody,
    Exchange,
    Fault,
    Settings,
    StreamCut,
    new_id,
    parse_fault,
    retry_after_headers,
)
from tokenwatch.demo.fake_reply import PromptCache

__all__ = [
    "CountedCall",
    "FakeLLM",
    "fake_llm_in_thread",
    "fake_llm_process",
    "running_fake_llm",
]

log = logging.getLogger("tokenwatch.fake_llm")
READY_LINE = re.compile(r"^fake-llm listening on (http://\S+)$")
MAX_BODY_BYTES = 32 * 1024 * 1024
SHUTDOWN_GRACE_S = 0.25

Handler = Callable[[Exchange], Awaitable[web.StreamResponse]]


@dataclasses.dataclass(frozen=True, slots=True)
class _Provider:
    name: str
    error_body: ErrorBody
    headers: Callable[[Exchange], dict[str, str]]
    request_id: Callable[[], str]


OPENAI = _Provider(
    "openai", fake_openai.error_body, fake_openai.headers, lambda: new_id("req_", 32)
)
ANTHROPIC = _Provider(
    "anthropic", fake_anthropic.error_body, fake_anthropic.headers, fake_anthropic.new_request_id
)
GEMINI = _Provider(
    "gemini", fake_gemini.error_body, fake_gemini.headers, fake_gemini.new_request_id
)
_MESSAGES = {
    401: "You didn't provide an API key.",
    429: "Rate limit reached (injected by fake-llm). Please try again later.",
    500: "The server had an error while processing your request (injected by fake-llm).",
}


class FakeLLM:
    """The fake provider: create, `await tg.start(fake.serve, name="fake-llm")`, point SDKs at `fake.url + "/v1"`."""

    def __init__(
        self,
        *,
        latency_ms: float = 0,
        chunk_ms: float = 0,
        fail_every: int = 0,
        fail_status: int = 500,
        cut_every: int = 0,
        cut_after: int = 2,
        retry_after_s: float = 1.0,
        reply_to_last: bool = False,
        anthropic_min_cache_tokens: int = 1024,
    ) -> None:
        self.settings = Settings(
            latency_ms=latency_ms,
            chunk_ms=chunk_ms,
            fail_every=fail_every,
            fail_status=fail_status,
            cut_every=cut_every,
            cut_after=cut_after,
            retry_after_s=retry_after_s,
            reply_to_last=reply_to_last,
        )
        self.cache = PromptCache(anthropic_min_cache_tokens)
        self.calls: list[CountedCall] = []
        """Billed calls in arrival order, appended when each response is complete."""
        self.url = ""
        """`http://127.0.0.1:PORT` once serving (no /v1 suffix)."""
        self._requests = 0
        self._streams = 0

    def statistics(self) -> dict[str, int]:
        return {"requests": self._requests, "calls": len(self.calls)}

    def reset(self) -> None:
        """Forget the counted calls and the prompt caches."""
        self.calls.clear()
        self.cache.clear()

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        routes = [
            ("/v1/chat/completions", OPENAI, fake_openai.chat_completions),
            ("/v1/completions", OPENAI, fake_openai.completions),
            ("/v1/responses", OPENAI, fake_openai.responses),
            ("/v1/embeddings", OPENAI, fake_openai.embeddings),
            ("/v1/messages", ANTHROPIC, fake_anthropic.messages),
            ("/v1/messages/count_tokens", ANTHROPIC, fake_anthropic.count_tokens),
        ]
        for path, provider, handler in routes:
            app.router.add_post(path, self._route(path, provider, handler))
        gemini = self._route(fake_gemini.ENDPOINT, GEMINI, fake_gemini.dispatch)
        app.router.add_post("/v1beta/models/{target}", gemini)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/_fake/calls", self._calls)
        app.router.add_post("/_fake/reset", self._reset)
        return app

    async def serve(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        task_status: anyio.abc.TaskStatus[str] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until cancelled; reports the base URL to `task_status` once listening."""
        # load the tokenizer now, in a thread, so the first request does not stall the loop
        await anyio.to_thread.run_sync(count_text, "warm up")
        # stopping cancels in-flight handlers at once: a `slow` request must not hold teardown
        runner = web.AppRunner(
            self.app(), access_log=None, handle_signals=False, shutdown_timeout=SHUTDOWN_GRACE_S
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, port)
            await site.start()
            bound = runner.addresses[0]
            shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
            self.url = f"http://{shown}:{bound[1]}"
            task_status.started(self.url)
            await anyio.sleep_forever()
        finally:
            with anyio.CancelScope(shield=True):
                await runner.cleanup()

    def _route(self, endpoint: str, provider: _Provider, handler: Handler) -> Any:
        async def handle(request: web.Request) -> web.StreamResponse:
            return await self._handle(request, endpoint, provider, handler)

        return handle

    async def _handle(
        self, request: web.Request, endpoint: str, provider: _Provider, handler: Handler
    ) -> web.StreamResponse:
        self._requests += 1
        started = time.monotonic()
        ex = Exchange(request, self.settings, self.cache, provider.request_id())
        billed = endpoint != "/v1/messages/count_tokens" and fake_gemini.billed(request.path)
        try:
            if not _authorised(request):
                raise BadRequest(_MESSAGES[401], 401)
            body = await self._body(request)
            ex.take(body, self._plan(request, body))
            delay = self.settings.latency_ms + ex.fault.delay_ms
            if delay:
                await anyio.sleep(delay / 1000)
            if ex.fault.status:
                raise BadRequest(_MESSAGES.get(ex.fault.status, "error"), ex.fault.status)
            response = await handler(ex)
        except BadRequest as refused:
            self._record(ex, endpoint, refused.status, billed, started)
            return self._error(provider, ex.request_id, refused.status, str(refused))
        except StreamCut as cut:
            self._record(ex, endpoint, 200, billed, started, cut)
            raise asyncio_cancelled() from None
        self._record(ex, endpoint, response.status, billed, started)
        return response

    def _record(
        self,
        ex: Exchange,
        endpoint: str,
        status: int,
        billed: bool,
        started: float,
        cut: StreamCut | None = None,
    ) -> None:
        """Add the call to `calls` (if billed) and log it, never with its headers."""
        call = ex.counted(endpoint, status)
        if cut is not None:
            call.complete = False
        if billed:
            self.calls.append(call)
        how = "" if cut is None else " client hung up" if isinstance(cut, ClientGone) else " cut"
        log.info(
            "%s %s %s%s model=%s stream=%s in=%d out=%d cached=%d %.0fms",
            ex.request.method,
            endpoint,
            status,
            how,
            ex.model,
            ex.stream,
            call.input_tokens,
            call.output_tokens,
            call.cache_read_tokens,
            (time.monotonic() - started) * 1000,
        )

    async def _body(self, request: web.Request) -> dict[str, Any]:
        try:
            body = json.loads(await request.read() or b"null")
        except (ValueError, UnicodeDecodeError):
            raise BadRequest("the body of the request is not valid JSON") from None
        if not isinstance(body, dict):
            raise BadRequest("the body of the request must be a JSON object")
        return body

    def _plan(self, request: web.Request, body: dict[str, Any]) -> Fault:
        """The header's fault, else the server-wide `fail_every` / `cut_every` schedule."""
        header = request.headers.get(FAULT_HEADER)
        if header:
            try:
                return parse_fault(header)
            except ValueError as exc:
                raise BadRequest(str(exc)) from None
        s = self.settings
        if s.fail_every and self._requests % s.fail_every == 0:
            return Fault(status=s.fail_status)
        if body.get("stream"):
            self._streams += 1
            if s.cut_every and self._streams % s.cut_every == 0:
                return Fault(cut_after=s.cut_after)
        return Fault()

    def _error(self, provider: _Provider, rid: str, status: int, message: str) -> web.Response:
        headers = {"x-request-id" if provider is OPENAI else "request-id": rid}
        if status in (429, 503, 529):
            headers.update(retry_after_headers(self.settings.retry_after_s))
        body = provider.error_body(status, message, "")
        return web.json_response(body, status=status, headers=headers)

    async def _models(self, request: web.Request) -> web.Response:
        if not _authorised(request):
            return self._error(OPENAI, new_id("req_", 32), 401, _MESSAGES[401])
        return web.json_response(fake_openai.models_list())

    async def _calls(self, request: web.Request) -> web.Response:
        return web.json_response([dataclasses.asdict(c) for c in self.calls])

    async def _reset(self, request: web.Request) -> web.Response:
        self.reset()
        return web.json_response({"ok": True})


def asyncio_cancelled() -> BaseException:
    """What a handler raises after hanging up, so aiohttp drops the response quietly."""
    import asyncio

    return asyncio.CancelledError()


def _authorised(request: web.Request) -> bool:
    auth = request.headers.get("authorization", "")
    key = request.headers.get("x-api-key") or request.headers.get("x-goog-api-key")
    return bool(key or auth.removeprefix("Bearer ").strip())


@asynccontextmanager
async def running_fake_llm(**kwargs: Any) -> AsyncIterator[FakeLLM]:
    """An in-process fake LLM on 127.0.0.1 for async tests; stopped on exit."""
    fake = FakeLLM(**kwargs)
    async with anyio.create_task_group() as tg:
        await tg.start(fake.serve, name="fake-llm")
        try:
            yield fake
        finally:
            tg.cancel_scope.cancel()


@contextmanager
def fake_llm_in_thread(**kwargs: Any) -> Iterator[FakeLLM]:
    """An in-process fake LLM running its own event loop in a thread, for sync SDK tests."""
    fake = FakeLLM(**kwargs)
    ready = threading.Event()
    stop: list[Callable[[], None]] = []
    failure: list[BaseException] = []

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            await tg.start(fake.serve, name="fake-llm")
            token = anyio.lowlevel.current_token()
            stop.append(lambda: anyio.from_thread.run_sync(tg.cancel_scope.cancel, token=token))
            ready.set()

    def run() -> None:
        try:
            anyio.run(main)
        except BaseException as exc:
            failure.append(exc)
            ready.set()

    thread = threading.Thread(target=run, name="fake-llm", daemon=True)
    thread.start()
    ready.wait(30)
    if failure or not stop:
        raise RuntimeError(f"fake-llm did not start: {failure[0] if failure else 'timeout'}")
    try:
        yield fake
    finally:
        stop[0]()
        thread.join(30)


@contextmanager
def fake_llm_process(*args: str) -> Iterator[str]:
    """`python -m tokenwatch fake-llm --port 0 ARGS` as a subprocess; yields its base URL."""
    cmd = [sys.executable, "-m", "tokenwatch", "fake-llm", "--port", "0", *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    try:
        url = _read_ready_line(proc)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout:
            proc.stdout.close()


def _read_ready_line(proc: subprocess.Popen[str], timeout: float = 60) -> str:
    lines: list[str] = []
    reader = threading.Thread(
        target=lambda: lines.append(proc.stdout.readline() if proc.stdout else "")
    )
    reader.start()
    reader.join(timeout)
    line = lines[0].strip() if lines else ""
    match = READY_LINE.match(line)
    if not match:
        proc.kill()
        raise RuntimeError(f"fake-llm did not start (exit {proc.poll()}, said {line!r})")
    return match.group(1)
