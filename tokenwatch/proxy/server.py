"""The proxy: routes each agent's call upstream, relays it unchanged, gates it and records its usage."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.abc

from tokenwatch.config import ProxySettings
from tokenwatch.core import tokens
from tokenwatch.core.admission import Admission, Gate
from tokenwatch.core.models import MAX_CALL_TOKENS, Status, UsageEvent
from tokenwatch.core.nesting import MAX_NESTING
from tokenwatch.core.pricing import PROVIDER
from tokenwatch.core.tokens import TokenCount
from tokenwatch.proxy import anthropic_usage, openai_usage
from tokenwatch.proxy.call import Call, call_event, call_request
from tokenwatch.proxy.endpoint import Callers, StableEndpoint
from tokenwatch.proxy.errors import ErrorReply, error_reply, protocol_error_page, refusal
from tokenwatch.proxy.http import (
    BodyTooLarge,
    ClientGone,
    Headers,
    HttpServer,
    Incoming,
    Limits,
    RequestTooSlow,
    relayable,
)
from tokenwatch.proxy.lever_calls import (
    CALL_ID_HEADER,
    LeverCalls,
    call_id,
    looks_json,
    nested_too_deep,
    read_request,
)
from tokenwatch.proxy.levers import Levers
from tokenwatch.proxy.partial import cut_text
from tokenwatch.proxy.routes import (
    ANTHROPIC,
    OPENAI,
    AgentRoute,
    RouteTable,
    Target,
    check_bind,
    loopback_host,
    provider_of,
    split_path,
    upstream_url,
)
from tokenwatch.proxy.sse import SseSplitter, is_sse, without_null_usage
from tokenwatch.proxy.upstream import (
    UpstreamClient,
    UpstreamCut,
    UpstreamResponse,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from tokenwatch.proxy.usage import (
    CallFacts,
    Reader,
    Usage,
    answer_hash_off_loop,
    cost_from_headers,
    count_prompt,
    fill_event,
    json_object,
)

__all__ = ["AgentRoute", "ProxyServer", "ProxyStatistics", "RouteTable"]

log = logging.getLogger("tokenwatch.proxy")

"""Which attempt of a call this is: the official openai and anthropic SDKs send it, 0 first."""
MAX_HEADER_BYTES = 16_384
"""Longest request line or header field accepted (431 beyond)."""
MAX_CAPTURE_BYTES = 16 * 1024 * 1024
"""A JSON response is kept for reading its usage up to this size; it is relayed whatever its size."""
_UNREAD = frozenset({408, 413})
_UPSTREAM_DROP = frozenset({CALL_ID_HEADER, "accept-encoding"})


@dataclass(frozen=True, slots=True)
class ProxyStatistics:
    """How busy the proxy is, for `tokenwatch status` and the dashboard."""

    in_flight: int
    """Calls being forwarded or relayed right now."""
    held: int
    """Calls waiting for admission (paused or throttled agent)."""
    total: int
    """Requests received since start, refused ones included."""
    errors: int
    """Calls that ended in an upstream error, a cut stream or a timeout."""
    refused: int
    """Calls refused by the gate (budget, deny, store unavailable) or by the proxy's guards."""
    settling: int
    """Recorded calls whose settlement has not returned yet."""
    settle_failures: int
    """Settlements that raised (the engine keeps the record and retries; the proxy only counts)."""


class ProxyServer(LeverCalls):
    """The local reverse proxy. `port = await tg.start(proxy.serve)`; cancel the scope to stop."""

    def __init__(
        self,
        gate: Gate,
        routes: RouteTable,
        settings: ProxySettings,
        *,
        clock: Callable[[], float] = time.time,
        levers: Levers | None = None,
        callers: Callers | None = None,
    ) -> None:
        self._gate = gate
        self._levers = levers or Levers(clock=clock)
        self._routes = routes
        self._settings = settings
        self._clock = clock
        self._limits = Limits(settings.max_body_bytes, MAX_HEADER_BYTES, settings.request_timeout)
        self._http = HttpServer(self._handle, self._limits, protocol_error_page)
        self.endpoint: StableEndpoint | None = None
        """The stable endpoint, with `callers` to attribute its calls and a port configured."""
        if callers is not None and settings.endpoint_port:
            self.endpoint = StableEndpoint(
                self._serve, routes, callers, self._limits, settings.endpoint_port
            )
        self._client: UpstreamClient | None = None
        self._settles: set[asyncio.Task[None]] = set()
        self._host = settings.host
        self.port = 0
        self._in_flight = self._held = self._total = self._errors = self._refused = 0
        self._settling = self._settle_failures = 0
        self._flying: dict[tuple[str, str], int] = {}
        """Calls in flight by (agent, prompt hash): a copy sent alongside is not a next step."""

    async def serve(
        self, *, task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen on loopback until cancelled; reports the port once listening."""
        hosts = check_bind(self._settings.host)
        # load the tokenizer now, in a thread, so the first call does not stall the loop
        await anyio.to_thread.run_sync(tokens.count_text, "warm up")
        timeouts = (self._settings.connect_timeout, self._settings.read_timeout)
        try:
            async with UpstreamClient(*timeouts) as client, anyio.create_task_group() as tg:
                self._client = client
                await tg.start(self._levers.run, name="proxy levers")
                self.port = await tg.start(self._http.serve, hosts, self._settings.port)
                if self.endpoint is not None:
                    await tg.start(self.endpoint.serve, hosts, name="tokenwatch.endpoint")
                task_status.started(self.port)
        finally:
            with anyio.CancelScope(shield=True):
                while self._settles:  # every call taken in is settled before the proxy stops
                    await asyncio.wait(set(self._settles))

    def base_urls(self, token: str) -> dict[str, str]:
        """The environment that points an agent's SDKs at its route."""
        host = "[::1]" if self._host == "::1" else "127.0.0.1"
        root = f"http://{host}:{self.port}/a/{token}"
        return {"OPENAI_BASE_URL": root + "/v1", "ANTHROPIC_BASE_URL": root}

    def endpoint_url(self) -> str:
        """The stable endpoint's URL (no route token), or "" when it is not listening."""
        port = self.endpoint.port if self.endpoint is not None else 0
        return f"http://{'[::1]' if self._host == '::1' else '127.0.0.1'}:{port}" if port else ""

    def statistics(self) -> ProxyStatistics:
        return ProxyStatistics(
            in_flight=self._in_flight,
            held=self._held,
            total=self._total,
            errors=self._errors,
            refused=self._refused,
            settling=self._settling,
            settle_failures=self._settle_failures,
        )

    # -- one request ---------------------------------------------------------------------------

    async def _handle(self, req: Incoming) -> None:
        target = split_path(req.path, req.headers)
        route = self._routes.get(target.token) if target is not None else None
        await self._serve(req, target, route, self.port)

    async def _serve(
        self, req: Incoming, target: Target | None, route: AgentRoute | None, port: int
    ) -> None:
        """A request on `port` (the routed or the stable one) from its guards on."""
        self._total += 1
        provider = target.provider if target is not None else provider_of(req.path, req.headers)
        if not loopback_host(req.headers.get("Host"), port):
            message = "tokenwatch's proxy only answers requests addressed to localhost"
            return await self._guard(req, provider, 403, message, "bad_host")
        if target is not None and not target.token:
            message = "tokenwatch could not tell which of your processes made this call"
            return await self._guard(req, provider, 403, message, "unknown_caller")
        if target is None or route is None:
            message = "unknown tokenwatch route: use the base URL `tokenwatch env` or `run` gave"
            return await self._guard(req, provider, 404, message, "no_route")
        try:
            body = await req.read_body(self._limits)
        except BodyTooLarge:
            limit = self._settings.max_body_bytes
            message = f"request body over tokenwatch's limit of {limit} bytes"
            return await self._guard(req, provider, 413, message, "too_large")
        except RequestTooSlow:
            message = "the request was not received in time"
            return await self._guard(req, provider, 408, message, "too_slow")
        await self._dispatch(req, target, route, body)

    async def _guard(
        self, req: Incoming, provider: str, status: int, message: str, code: str
    ) -> None:
        """Refuse a request the proxy will not forward at all (nothing reaches the upstream)."""
        self._refused += 1
        await self._refuse(req, error_reply(provider, status, message, code=code))

    async def _dispatch(
        self, req: Incoming, target: Target, route: AgentRoute, body: bytes
    ) -> None:
        doc = None
        if req.method == "POST" and looks_json(body):
            if await nested_too_deep(body):
                return await self._too_deep(req, target, route)
            doc = json_object(body)
        facts = read_request(target, doc)
        if req.method != "POST" or not facts.metered:
            return await self._pass_through(req, target, route, body, facts.model)
        plan = None
        if self._levers.rewrites and doc is not None:
            plan = await self._prepare(req, target, route, body, doc, facts)
            body, doc, facts = plan.body, plan.doc, plan.facts
        prompt = await count_prompt(facts, len(body))
        admission = await self._admit(req, target, route, facts, prompt)
        if admission is None:
            return
        call = self._new_call(req, target, route, facts, prompt, admission)
        call.doc, call.plan = doc, plan
        if plan is not None:
            await self._planned(call, plan, prompt)
        if not admission.allowed:
            self._refused += 1
            call.event.status = Status.DENIED.value
            call.event.http_status = admission.status
            self._settle_soon(admission, call.event)
            return await self._refuse(req, refusal(target.provider, admission))
        if req.client_gone:
            # hung up while held: nothing is sent, the reservation is given back by settling
            call.event.status = Status.CANCELLED.value
            self._settle_soon(admission, call.event)
            return None
        self._in_flight += 1
        flying = self._take_off(call.event)
        try:
            if plan is not None and plan.hit is not None:
                await self._replay(req, call, plan)
            else:
                await self._forward(req, call, body, doc)
        except BaseException:
            # stopped from outside (shutdown): recorded as cancelled, estimated like a hang-up
            call.event.status = Status.CANCELLED.value
            raise
        finally:
            self._in_flight -= 1
            self._land(flying)
            call.ended = _now()
            self._settle_soon(admission, call.event, call)

    async def _too_deep(self, req: Incoming, target: Target, route: AgentRoute) -> None:
        # Refused before any reader recurses into it (RecursionError, an unlogged 500 before).
        log.warning(
            "refused a call of agent %s: its body nests deeper than %d levels",
            route.agent,
            MAX_NESTING,
        )
        message = f"request body nested deeper than {MAX_NESTING} levels"
        await self._guard(req, target.provider, 400, message, "too_deep")

    async def _admit(
        self, req: Incoming, target: Target, route: AgentRoute, facts: CallFacts, prompt: TokenCount
    ) -> Admission | None:
        max_output = facts.max_output_tokens or self._settings.default_max_output_tokens
        call = call_request(route, target, facts, (prompt.tokens, max_output), facts.prompt_hash)
        self._held += 1
        try:
            return await self._gate.admit(call)
        except Exception as exc:
            # fail closed: a call nobody could check must not spend
            log.warning("admission failed for agent %s: %s", route.agent, type(exc).__name__)
            message = "tokenwatch could not check this call against its budgets; try again"
            await self._guard(req, target.provider, 503, message, "gate_error")
            return None
        finally:
            self._held -= 1

    def _new_call(
        self,
        req: Incoming,
        target: Target,
        route: AgentRoute,
        facts: CallFacts,
        prompt: TokenCount,
        admission: Admission,
    ) -> Call:
        event = call_event(
            self._clock(), route, target, facts, admission.waited_ms, call_id(req.headers)
        )
        event.prompt_hash, event.prompt_shape = facts.prompt_hash, facts.prompt_shape
        signals = facts.signals
        event.turn_hash, event.turn_shape = signals.turn_hash, signals.turn_shape
        event.tool_hash, event.tool_call = signals.tool_hash, signals.tool_call
        reader: Reader
        if target.provider == ANTHROPIC:
            reader = anthropic_usage.AnthropicReader()
        else:
            reader = openai_usage.OpenAIReader(target.endpoint)
        return Call(target, route, facts, prompt, event, reader)

    # -- forwarding ----------------------------------------------------------------------------

    async def _forward(
        self, req: Incoming, call: Call, body: bytes, doc: dict[str, Any] | None
    ) -> None:
        if call.target.provider == OPENAI and doc is not None:
            asked = openai_usage.ask_for_usage(call.target.endpoint, doc)
            if asked is not None:
                body, call.strip_usage = asked, True
                call.reader = openai_usage.OpenAIReader(call.target.endpoint, strip_usage=True)
        headers = relayable(req.header_items(), _UPSTREAM_DROP)
        # identity, so the usage in a JSON body can be read; the agent's leg is loopback anyway
        headers.append(("Accept-Encoding", "identity"))
        url = upstream_url(self._settings, call.route, call.target, call.facts.model, req.query)
        call.started = _now()
        try:
            await self._exchange(req, call, url, headers, body)
        except ClientGone:
            call.event.status = Status.CANCELLED.value
        except (UpstreamUnreachable, UpstreamTimeout, UpstreamCut) as exc:
            call.event.status = Status.ERROR.value
            status = await self._upstream_failed(req, call.target.provider, exc)
            if call.event.http_status is None:
                # never answered: what the agent got. One that answered and stopped short
                # keeps its status, so the call is estimated like a cut stream (it was billed).
                call.event.http_status = status

    async def _exchange(
        self, req: Incoming, call: Call, url: str, headers: Headers, body: bytes
    ) -> None:
        assert self._client is not None
        async with self._client.open(req.method, url, headers, body) as upstream:
            call.event.http_status = upstream.status
            call.gateway_cost = cost_from_headers(upstream.headers)
            answer = call.answer_headers = relayable(upstream.headers)
            length = upstream.content_length
            sse = is_sse(answer)
            if length is not None and length <= MAX_CAPTURE_BYTES and not sse:
                return await self._relay_whole(req, call, upstream, answer)
            length = None if call.strip_usage else length
            await req.start(upstream.status, answer, length)
            try:
                if sse:
                    await self._relay_stream(req, call, upstream)
                else:
                    await self._relay_body(req, call, upstream)
                await req.finish()
            except ClientGone:
                upstream.close()  # an abandoned generation stops costing
                raise

    async def _relay_whole(
        self, req: Incoming, call: Call, upstream: UpstreamResponse, headers: Headers
    ) -> None:
        """A JSON body of known size: read it, then answer in one write (the agent cannot use
        half a JSON document anyway, and one write costs the proxy far less than many)."""
        try:
            body = await upstream.read(lambda: self._first_byte(call))
        except (UpstreamCut, UpstreamTimeout) as exc:
            call.cut_body = exc.received
            raise
        if call.capture is not None:
            call.capture.append(body)
        try:
            await req.respond(upstream.status, headers, body)
        finally:
            # usage is read after the answer is sent: parsing must not delay the agent
            call.reader.read_json(body)

    async def _relay_body(self, req: Incoming, call: Call, upstream: UpstreamResponse) -> None:
        kept: list[bytes] = []
        size = 0
        try:
            async for chunk in upstream.chunks():
                self._first_byte(call)
                await req.write(chunk)
                size += len(chunk)
                if size <= MAX_CAPTURE_BYTES:
                    kept.append(chunk)
        except (UpstreamCut, UpstreamTimeout):
            call.cut_body = b"".join(kept)
            raise
        if size <= MAX_CAPTURE_BYTES:
            call.reader.read_json(b"".join(kept))
            if call.capture is not None:
                call.capture.extend(kept)

    async def _relay_stream(self, req: Incoming, call: Call, upstream: UpstreamResponse) -> None:
        splitter = SseSplitter()
        read = call.reader.read_event
        async for chunk in upstream.chunks():
            self._first_byte(call)
            if call.strip_usage:
                # whole events only, so the usage chunk the client did not ask for can be left out
                out = b"".join(e.raw for e in splitter.feed(chunk) if read(e))
                if out:
                    out = without_null_usage(out)
                    await req.write(out)
                    if call.capture is not None:
                        call.capture.append(out)
                continue
            await req.write(chunk)  # relay first: parsing must not delay the agent's tokens
            if call.capture is not None:
                call.capture.append(chunk)
            for event in splitter.feed(chunk):
                read(event)
        rest = splitter.rest()
        if rest and call.strip_usage:
            await req.write(rest)

    def _first_byte(self, call: Call) -> None:
        if call.first_byte is None:
            call.first_byte = _now()

    async def _upstream_failed(self, req: Incoming, provider: str, exc: Exception) -> int | None:
        """Tell the agent the upstream failed; returns the status sent (None: the stream was cut)."""
        self._errors += 1
        if req.started_response:
            req.abort()  # the client must see a cut stream, not a clean end
            return None
        status = 504 if isinstance(exc, UpstreamTimeout) else 502
        message = f"tokenwatch could not reach the upstream: {exc}"
        await self._refuse(req, error_reply(provider, status, message, code="upstream"))
        return status

    async def _finish_quietly(self, call: Call) -> None:
        """`_finish_event`, but a failure there must not cost the record: settle what is known."""
        try:
            await self._finish_event(call)
        except Exception as exc:
            call.event.estimated = True
            log.warning("could not read the usage of a call (%s)", type(exc).__name__)

    async def _finish_event(self, call: Call) -> None:
        """Fill in timing and usage: the upstream's figures, else a local count marked estimated."""
        event, end = call.event, call.ended or _now()
        event.latency_ms = (end - call.started) * 1000
        if call.first_byte is not None:
            event.ttft_ms = (call.first_byte - call.started) * 1000
        plan = call.plan
        if plan is not None and plan.hit is not None:
            return self._levers.hit_event(event, plan.hit)
        await self._read_usage(call)
        if plan is not None and plan.lever:
            self._levers.account(event, plan, call.trimmed_tokens)

    async def _read_usage(self, call: Call) -> None:
        event, reader = call.event, call.reader
        failed = event.http_status is None or event.http_status >= 400
        if failed:
            # an upstream error costs nothing unless its body says it was billed
            if event.status == Status.OK.value:
                event.status = Status.ERROR.value
                self._errors += 1
            if reader.usage is not None:
                fill_event(event, reader.usage)
        elif reader.usage is not None and reader.complete:
            fill_event(event, reader.usage)
        else:
            await self._estimate(call, reader.usage)
        if event.price_source != PROVIDER and call.gateway_cost is not None:
            event.cost_usd, event.price_source = call.gateway_cost, PROVIDER
        if not failed:
            event.answer_hash = await answer_hash_off_loop(reader, event.output_tokens)

    async def _estimate(self, call: Call, usage: Usage | None) -> None:
        """No usage, or a cut or abandoned stream: count what was sent and received."""
        known = usage or Usage()
        text = call.reader.output_text() or cut_text(call.cut_body)
        output = await tokens.count_text_async(text, call.facts.model)
        fill_event(call.event, known)
        # Counted here, so within what one call can use whatever the body's size (the ledger
        # refuses more).
        call.event.input_tokens = min(known.input_tokens or call.prompt.tokens, MAX_CALL_TOKENS)
        call.event.output_tokens = min(max(known.output_tokens, output.tokens), MAX_CALL_TOKENS)
        call.event.estimated = True

    # -- pass-through, refusals, settling --------------------------------------------------------

    async def _pass_through(
        self, req: Incoming, target: Target, route: AgentRoute, body: bytes, model: str
    ) -> None:
        assert self._client is not None
        url = upstream_url(self._settings, route, target, model, req.query)
        headers = relayable(req.header_items(), frozenset({CALL_ID_HEADER}))
        self._in_flight += 1
        try:
            async with self._client.open(req.method, url, headers, body) as upstream:
                await req.start(
                    upstream.status, relayable(upstream.headers), upstream.content_length
                )
                async for chunk in upstream.chunks():
                    await req.write(chunk)
                await req.finish()
        except ClientGone:
            pass
        except (UpstreamUnreachable, UpstreamTimeout, UpstreamCut) as exc:
            await self._upstream_failed(req, target.provider, exc)
        finally:
            self._in_flight -= 1

    async def _refuse(self, req: Incoming, reply: ErrorReply) -> None:
        try:
            # a body cut short or too big stays unread: close rather than linger over it
            await req.respond(
                reply.status, reply.headers, reply.body, close=reply.status in _UNREAD
            )
        except ClientGone:
            pass

    def _settle_soon(
        self, admission: Admission, event: UsageEvent, call: Call | None = None
    ) -> None:
        """Finish the event (`call`, when it went upstream) and settle it in a task of its own:
        the agent's connection is not held while the store writes. A bare asyncio task, not the
        task group's: stopping the proxy must not cancel a settlement (`serve` waits for them),
        and a task group's spawn costs several times as much per call."""
        self._settling += 1
        task = asyncio.get_running_loop().create_task(self._settle(admission, event, call))
        self._settles.add(task)
        task.add_done_callback(self._settles.discard)

    async def _settle(self, admission: Admission, event: UsageEvent, call: Call | None) -> None:
        if call is not None:
            await self._finish_quietly(call)
            self._after(call)
        try:
            await self._gate.settle(admission, event)
        except Exception as exc:
            self._settle_failures += 1
            log.warning(
                "could not settle a call of agent %s (%s): the engine keeps and retries it",
                event.agent,
                type(exc).__name__,
            )
        finally:
            self._settling -= 1


def _now() -> float:
    return asyncio.get_running_loop().time()
