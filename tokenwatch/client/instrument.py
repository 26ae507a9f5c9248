"""`instrument()`: wraps the openai SDK's resource classes so every call is admitted and reported."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import logging
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, cast

from tokenwatch import environ
from tokenwatch.client import gate, prompt, tracking
from tokenwatch.client.body import JsonBody, SseEvents
from tokenwatch.client.openai_usage import Counted, StreamReading, counted, field
from tokenwatch.client.reporter import LinkState
from tokenwatch.client.session import current_reporter
from tokenwatch.client.signals import InFlight, wire_of
from tokenwatch.core import conversation
from tokenwatch.core.models import Status, UsageEvent

log = logging.getLogger("tokenwatch")

CALL_ID_HEADER = "x-tokenwatch-call-id"
PROXY_URL_ENV = environ.PROXY_URL
PROVIDER = "openai"
RESPONSES = "/v1/responses"
_STREAMED = frozenset({"APIResponse", "AsyncAPIResponse"})
"""What `with_streaming_response` returns: the body is read later, by the agent."""


@dataclass(frozen=True, slots=True)
class Target:
    """One SDK method tokenwatch wraps."""

    module: str
    cls: str
    method: str
    endpoint: str


_CHAT = "openai.resources.chat.completions.completions"
_RESPONSES = "openai.resources.responses.responses"
_EMBEDDINGS = "openai.resources.embeddings"
_LEGACY = "openai.resources.completions"
TARGETS: tuple[Target, ...] = (
    Target(_CHAT, "Completions", "create", "/v1/chat/completions"),
    Target(_CHAT, "AsyncCompletions", "create", "/v1/chat/completions"),
    Target(_CHAT, "Completions", "parse", "/v1/chat/completions"),
    Target(_CHAT, "AsyncCompletions", "parse", "/v1/chat/completions"),
    Target(_RESPONSES, "Responses", "create", RESPONSES),
    Target(_RESPONSES, "AsyncResponses", "create", RESPONSES),
    Target(_RESPONSES, "Responses", "parse", RESPONSES),
    Target(_RESPONSES, "AsyncResponses", "parse", RESPONSES),
    Target(_EMBEDDINGS, "Embeddings", "create", "/v1/embeddings"),
    Target(_EMBEDDINGS, "AsyncEmbeddings", "create", "/v1/embeddings"),
    Target(_LEGACY, "Completions", "create", "/v1/completions"),
    Target(_LEGACY, "AsyncCompletions", "create", "/v1/completions"),
)
"""`.stream()` helpers, `with_raw_response` and `with_streaming_response` go through these
`create` methods too."""

_MAX_OUTPUT_PARAMS = ("max_completion_tokens", "max_output_tokens", "max_tokens")
_ORIGINAL = "__tokenwatch_original__"

_lock = threading.Lock()
_patched: dict[tuple[type, str], Any] = {}
_inside: contextvars.ContextVar[bool] = contextvars.ContextVar("tokenwatch_inside", default=False)
_flying = InFlight()


def instrument() -> bool:
    """Wrap the openai SDK so its calls are reported; a no-op when already done.

    Returns False when the openai package is not importable (nothing to wrap).
    """
    with _lock:
        if _patched:
            return True
        try:
            importlib.import_module("openai")
        except ImportError:
            log.debug("tokenwatch: openai is not installed; nothing to instrument")
            return False
        for target in TARGETS:
            _patch(target)
        return bool(_patched)


def uninstrument() -> None:
    """Restore the openai SDK's own methods."""
    with _lock:
        for (cls, method), original in _patched.items():
            setattr(cls, method, original)
        _patched.clear()


def instrumented() -> bool:
    return bool(_patched)


def _patch(target: Target) -> None:
    try:
        cls = getattr(importlib.import_module(target.module), target.cls)
    except (ImportError, AttributeError):
        log.debug("tokenwatch: %s.%s not in this openai version", target.module, target.cls)
        return
    original = cls.__dict__.get(target.method)
    if original is None or hasattr(original, _ORIGINAL):
        return
    # Decorators like `required_args` hide coroutine functions: go by the class, as the SDK does.
    make = _wrap_async if target.cls.startswith("Async") else _wrap_sync
    wrapper = make(original, target.endpoint)
    setattr(wrapper, _ORIGINAL, original)
    setattr(cls, target.method, wrapper)
    _patched[(cls, target.method)] = original


def _wrap_sync(original: Callable[..., Any], endpoint: str) -> Callable[..., Any]:
    @functools.wraps(original)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        call = Call.begin(endpoint, self, kwargs)
        if call is None:
            return original(self, *args, **kwargs)
        token = _inside.set(True)
        try:
            if call.gated:
                with _only_denials_raise():
                    call.ticket = gate.admit_sync(call.admit_fields())
            call.sent()
            try:
                result = original(self, *args, **call.kwargs)
            except BaseException as exc:
                call.failed(exc)
                raise
            return call.observe(result)
        finally:
            _inside.reset(token)

    return wrapper


def _wrap_async(original: Callable[..., Any], endpoint: str) -> Callable[..., Any]:
    @functools.wraps(original)
    async def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        call = Call.begin(endpoint, self, kwargs)
        if call is None:
            return await original(self, *args, **kwargs)
        token = _inside.set(True)
        try:
            if call.gated:
                with _only_denials_raise():
                    call.ticket = await gate.admit_async(call.admit_fields())
            call.sent()
            try:
                result = await original(self, *args, **call.kwargs)
            except BaseException as exc:
                call.failed(exc)
                raise
            return call.observe(result)
        finally:
            _inside.reset(token)

    return wrapper


@contextlib.contextmanager
def _only_denials_raise() -> Iterator[None]:
    """Admission trouble lets the call go; only a budget's deny reaches the agent."""
    try:
        yield
    except gate.BudgetExceeded:
        raise
    except Exception:
        log.debug("tokenwatch: admission failed; letting the call go", exc_info=True)


def _base_url(resource: Any) -> str:
    client = getattr(resource, "_client", None)
    return str(getattr(client, "base_url", "") or "")


def _through_proxy(resource: Any) -> bool:
    """True when this client goes through tokenwatch's proxy, which records the call itself."""
    proxy = os.environ.get(PROXY_URL_ENV, "")
    return bool(proxy) and _base_url(resource).startswith(proxy)


class Call:
    """One instrumented call, from before it is sent to its UsageEvent."""

    def __init__(self, endpoint: str, kwargs: dict[str, Any], proxied: bool) -> None:
        self.endpoint = endpoint
        self.kwargs = kwargs
        self.model = str(kwargs.get("model") or "")
        self.proxied = proxied
        self.call_id = str(uuid.uuid4())
        self.ts = time.time()
        self.t0 = time.perf_counter()
        self.ticket = gate.Ticket()
        self.ttft_ms: float | None = None
        self.done = False
        self._prompt_tokens: tuple[int, bool] | None = None
        self._prompt_hash: str | None = None
        self.wire = wire_of(endpoint)
        self.answer: list[list[Any]] = []
        """What the model answered (core.conversation parts), once read."""
        self.overlap: int | None = None
        self._add_call_id_header()

    @classmethod
    def begin(cls, endpoint: str, resource: Any, kwargs: dict[str, Any]) -> Call | None:
        """A Call for these arguments, or None to pass the call through untouched."""
        if _inside.get():
            return None  # an instrumented method calling another: the outer one reports
        try:
            for name in ("messages", "input"):
                # An iterator would be used up by hashing: the SDK must still see every message.
                value = kwargs.get(name)
                if value is not None and not isinstance(value, str | list | tuple | dict):
                    kwargs[name] = list(value)
            return cls(endpoint, dict(kwargs), _through_proxy(resource))
        except Exception:
            log.debug("tokenwatch: not tracking a call", exc_info=True)
            return None

    def _add_call_id_header(self) -> None:
        headers = dict(self.kwargs.get("extra_headers") or {})
        self.call_id = str(headers.setdefault(CALL_ID_HEADER, self.call_id))
        self.kwargs["extra_headers"] = headers

    @property
    def gated(self) -> bool:
        """Ask the supervisor first? Not through the proxy (it gates), nor when nobody answers."""
        if self.proxied:
            return False
        rep = current_reporter()
        reachable = rep is None or rep.state is not LinkState.DOWN
        return reachable and gate.admission_wanted()

    def admit_fields(self) -> dict[str, Any]:
        # A reservation only: a rough count now beats a first tokenizer load on the agent's call.
        tokens, _ = prompt.count_prompt(
            self.endpoint, self.kwargs, self.model, wait_for_tokenizer=False
        )
        max_output = next(
            (self.kwargs[p] for p in _MAX_OUTPUT_PARAMS if isinstance(self.kwargs.get(p), int)),
            None,
        )
        fields = gate.admit_fields(self.model, PROVIDER, tokens, 0, self.prompt_hash())
        if max_output is None:
            del fields["max_output_tokens"]
        else:
            fields["max_output_tokens"] = max_output
        return fields

    def prompt(self) -> Any:
        if "messages" in self.kwargs:
            return self.kwargs["messages"]
        if self.endpoint == RESPONSES:
            return {
                "instructions": self.kwargs.get("instructions"),
                "input": self.kwargs.get("input"),
            }
        return self.kwargs.get("input", self.kwargs.get("prompt", ""))

    def prompt_hash(self) -> str:
        if self._prompt_hash is None:
            self._prompt_hash = prompt.prompt_hash(self.prompt())
        return self._prompt_hash

    def prompt_tokens(self) -> tuple[int, bool]:
        if self._prompt_tokens is None:
            self._prompt_tokens = prompt.count_prompt(self.endpoint, self.kwargs, self.model)
        return self._prompt_tokens

    def sent(self) -> None:
        self.t0 = time.perf_counter()
        self.overlap = _flying.take_off(self.prompt_hash())

    def observe(self, result: Any) -> Any:
        """Record the call from its result (now, or at the end of a stream); returns it unchanged."""
        try:
            self._observe(result)
        except Exception:
            log.debug("tokenwatch: could not read usage", exc_info=True)
        return result

    def _observe(self, result: Any) -> None:
        if _is_streamed_response(result):
            return _follow_body(result, self)
        http_status = 200
        parsed = result
        if _is_raw_response(result):
            http_status = int(getattr(result, "status_code", 200))
            parsed = result.parse()
        if self._will_estimate(parsed):
            prompt.tokenizer_ready(self.model)  # load it while the stream runs, not at its end
        if _is_stream(parsed, "Stream"):
            _watch_sync(parsed, StreamWatch(self, http_status))
        elif _is_stream(parsed, "AsyncStream"):
            _watch_async(parsed, StreamWatch(self, http_status))
        else:
            self.answer = conversation.answer_of(self.wire, parsed)
            self.finish(counted(field(parsed, "usage")), field(parsed, "model"), http_status)

    def _will_estimate(self, result: Any) -> bool:
        """A stream that will carry no usage: chat or legacy completions without include_usage."""
        if self.endpoint == RESPONSES or not hasattr(result, "_iterator"):
            return False
        options = self.kwargs.get("stream_options")
        return not (isinstance(options, dict) and options.get("include_usage"))

    def failed(self, exc: BaseException) -> None:
        status = Status.ERROR if isinstance(exc, Exception) else Status.CANCELLED
        http_status = getattr(exc, "status_code", None)
        self.finish(
            Counted(), None, http_status if isinstance(http_status, int) else None, status=status
        )

    def first_token(self) -> None:
        if self.ttft_ms is None:
            self.ttft_ms = (time.perf_counter() - self.t0) * 1000

    def finish(
        self,
        usage: Counted | None,
        model: Any,
        http_status: int | None,
        *,
        status: Status = Status.OK,
        output_text: str = "",
    ) -> None:
        """Build the UsageEvent once; estimate locally when the provider gave no usage."""
        if self.done:
            return
        self.done = True
        if self.overlap is not None:
            _flying.land(self.prompt_hash())
        try:
            event = self._event(usage, model, http_status, status, output_text)
            tracking.record(event, reservation=self.ticket.reservation, deliver=not self.proxied)
        except Exception:
            log.debug("tokenwatch: could not record a call", exc_info=True)

    def _event(
        self,
        usage: Counted | None,
        model: Any,
        http_status: int | None,
        status: Status,
        output_text: str,
    ) -> UsageEvent:
        model_name = model if isinstance(model, str) and model else self.model
        estimated = False
        if usage is None:
            prompt_tokens, _ = self.prompt_tokens()
            output_tokens, _ = prompt.count_output(output_text, model_name)
            usage = Counted(input_tokens=prompt_tokens, output_tokens=output_tokens)
            estimated = True
        return tracking.new_event(
            ts=self.ts,
            provider=PROVIDER,
            model=model_name,
            endpoint=self.endpoint,
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            cache_read_tokens=usage.cache_read_tokens,
            reasoning_tokens=usage.reasoning_tokens,
            latency_ms=(time.perf_counter() - self.t0) * 1000,
            ttft_ms=self.ttft_ms,
            wait_ms=self.ticket.wait_s * 1000,
            status=status.value,
            http_status=http_status,
            prompt_hash=self.prompt_hash(),
            prompt_shape=prompt.prompt_shape_hash(self.prompt()),
            estimated=estimated,
            call_id=self.call_id,
            answer_hash=conversation.answer_hash(self.answer) if status is Status.OK else "",
            overlap=self.overlap or 0,
            **asdict(conversation.request_signals(self.wire, self.kwargs)),
        )


class StreamWatch:
    """Follows a stream as the agent reads it and records the call when it ends or is closed."""

    def __init__(self, call: Call, http_status: int) -> None:
        self.call = call
        self.http_status = http_status
        self.reading = StreamReading()
        self.answer = conversation.StreamAnswer(call.wire)

    def see(self, item: Any) -> None:
        try:
            self.answer.feed(item)
            if self.reading.see(item):
                self.call.first_token()
        except Exception:
            log.debug("tokenwatch: unreadable stream item", exc_info=True)

    @contextlib.contextmanager
    def following(self) -> Iterator[None]:
        """Around the agent's reading: the call ends ok, in error, or cancelled (closed early)."""
        status = Status.CANCELLED
        try:
            yield
            status = Status.OK
        except Exception:
            status = Status.ERROR
            raise
        finally:
            self.end(status)

    def end(self, status: Status) -> None:
        reading = self.reading
        self.call.answer = self.answer.parts()
        self.call.finish(
            reading.usage,
            reading.model,
            self.http_status,
            status=status if reading.usage is None else Status.OK,
            output_text=reading.text,
        )


class BodyWatch(StreamWatch):
    """Follows a body the agent reads itself (`with_streaming_response`): server-sent events as
    a stream's items, or a JSON document read at its end."""

    def __init__(self, call: Call, http_status: int, sse: bool) -> None:
        super().__init__(call, http_status)
        self.events = SseEvents() if sse else None
        self.body = JsonBody()
        self.reader: Any = None
        """The generator the agent reads the body through, once it has started."""

    def closed(self) -> bool:
        """The response is being closed. True when the HTTP library closes it itself as the last
        bytes come in (from inside the read: the read then says how the call ended). Otherwise
        the agent closed it: the call ends now, cancelled unless its usage was seen, and the
        caller must close `reader` too (a read left half-way would end only when collected)."""
        reader = self.reader
        running = reader is not None and bool(
            getattr(reader, "gi_running", False) or getattr(reader, "ag_running", False)
        )
        if not running:
            self.end(Status.CANCELLED)
        return running

    def feed(self, chunk: bytes) -> None:
        try:
            if self.events is None:
                self.body.feed(chunk)
                return
            for doc in self.events.feed(chunk):
                self.see(doc)
        except Exception:
            log.debug("tokenwatch: unreadable response body", exc_info=True)

    def end(self, status: Status) -> None:
        if self.events is not None:
            return super().end(status)
        doc = self.body.document() if status is Status.OK else None
        usage = counted(field(doc, "usage"))
        self.call.answer = conversation.answer_of(self.call.wire, doc)
        self.call.finish(
            usage,
            field(doc, "model"),
            self.http_status,
            status=status if usage is None else Status.OK,
        )


def _is_streamed_response(result: Any) -> bool:
    return type(result).__name__ in _STREAMED and hasattr(result, "http_response")


def _follow_body(response: Any, call: Call) -> None:
    """Read along as the agent reads the body: its HTTP response's decoded bytes are teed."""
    http = response.http_response
    sse = str(http.headers.get("content-type", "")).startswith("text/event-stream")
    watch = BodyWatch(call, int(getattr(response, "status_code", 200)), sse)
    if type(response).__name__ == "AsyncAPIResponse":
        _tee_async(http, watch)
    else:
        _tee_sync(http, watch)


def _tee_sync(http: Any, watch: BodyWatch) -> None:
    original_iter, original_close = http.iter_bytes, http.close

    def read(*args: Any, **kwargs: Any) -> Iterator[bytes]:
        with watch.following():
            for chunk in original_iter(*args, **kwargs):
                watch.feed(chunk)
                yield chunk

    def iter_bytes(*args: Any, **kwargs: Any) -> Iterator[bytes]:
        watch.reader = read(*args, **kwargs)
        return cast(Iterator[bytes], watch.reader)

    def close() -> None:
        if not watch.closed() and watch.reader is not None:
            watch.reader.close()
        original_close()

    http.iter_bytes, http.close = iter_bytes, close


def _tee_async(http: Any, watch: BodyWatch) -> None:
    original_iter, original_close = http.aiter_bytes, http.aclose

    async def read(*args: Any, **kwargs: Any) -> AsyncIterator[bytes]:
        with watch.following():
            async for chunk in original_iter(*args, **kwargs):
                watch.feed(chunk)
                yield chunk

    def aiter_bytes(*args: Any, **kwargs: Any) -> AsyncIterator[bytes]:
        watch.reader = read(*args, **kwargs)
        return cast(AsyncIterator[bytes], watch.reader)

    async def aclose() -> None:
        if not watch.closed() and watch.reader is not None:
            await watch.reader.aclose()
        await original_close()

    http.aiter_bytes, http.aclose = aiter_bytes, aclose


def _is_raw_response(result: Any) -> bool:
    return type(result).__name__ == "LegacyAPIResponse" and hasattr(result, "parse")


def _is_stream(result: Any, name: str) -> bool:
    return any(c.__name__ == name for c in type(result).__mro__) and hasattr(result, "_iterator")


def _watch_sync(stream: Any, watch: StreamWatch) -> None:
    inner: Iterator[Any] = stream._iterator

    def watched() -> Iterator[Any]:
        with watch.following():
            for item in inner:
                watch.see(item)
                yield item

    original_close = stream.close

    def close() -> None:
        watch.end(Status.CANCELLED)
        original_close()

    stream._iterator = watched()
    stream.close = close


def _watch_async(stream: Any, watch: StreamWatch) -> None:
    inner: AsyncIterator[Any] = stream._iterator

    async def watched() -> AsyncIterator[Any]:
        with watch.following():
            async for item in inner:
                watch.see(item)
                yield item

    original_close = stream.close

    async def close() -> None:
        watch.end(Status.CANCELLED)
        await original_close()

    stream._iterator = watched()
    stream.close = close
