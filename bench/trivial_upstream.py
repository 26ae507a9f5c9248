"""A trivial, cheap OpenAI-shaped upstream for benchmarks: raw asyncio protocol, fixed answers.

It answers every POST with a fixed chat completion (JSON), or, when the body asks for a stream,
with 50 SSE chunks plus a usage chunk and `[DONE]`, each chunk its own write as a real server
sends them. It parses only what it must (the head's end, Content-Length, the stream flag), so a
request costs it a few microseconds and the benchmark's figure is the proxy's, not the upstream's.

    python bench/trivial_upstream.py      # prints its port, serves until killed
"""

from __future__ import annotations

import asyncio
import json

CHUNKS = 50
USAGE = {"prompt_tokens": 14, "completion_tokens": 50, "total_tokens": 64}


def _completion() -> bytes:
    message = {"role": "assistant", "content": "hello " * 50}
    choice = {"index": 0, "message": message, "finish_reason": "stop"}
    doc = {"id": "c1", "object": "chat.completion", "model": "gpt-4o-mini", "choices": [choice]}
    return json.dumps({**doc, "usage": USAGE}).encode()


def _event(doc: object) -> bytes:
    return b"data: " + json.dumps(doc).encode() + b"\n\n"


def _chunked(data: bytes) -> bytes:
    """One HTTP/1.1 chunk (Transfer-Encoding: chunked)."""
    return b"%x\r\n%s\r\n" % (len(data), data)


def _stream_events() -> list[bytes]:
    delta = {"index": 0, "delta": {"content": "hello "}, "finish_reason": None}
    doc = {"id": "c1", "object": "chat.completion.chunk", "choices": [delta], "usage": None}
    events = [_event({**doc, "n": i}) for i in range(CHUNKS)]
    events.append(_event({"choices": [], "usage": USAGE}))
    events.append(b"data: [DONE]\n\n")
    return events


COMPLETION = _completion()
JSON_ANSWER = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
    % len(COMPLETION)
) + COMPLETION
STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)
STREAM_FRAMES = [_chunked(e) for e in _stream_events()] + [b"0\r\n\r\n"]


class UpstreamProtocol(asyncio.Protocol):
    """HTTP/1.1 keep-alive, one request at a time per connection (what clients and pools send)."""

    def __init__(self) -> None:
        self._buffer = b""
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while (request := self._take_request()) is not None:
            self._answer(request)

    def _take_request(self) -> bytes | None:
        """The next whole request's body, removed from the buffer; None until it is all here."""
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            return None
        head = self._buffer[:end].lower()
        at = head.find(b"\r\ncontent-length:")
        length = 0
        if at >= 0:
            line_end = head.find(b"\r\n", at + 2)
            length = int(head[at + 17 : line_end if line_end >= 0 else len(head)])
        if len(self._buffer) < end + 4 + length:
            return None
        body = self._buffer[end + 4 : end + 4 + length]
        self._buffer = self._buffer[end + 4 + length :]
        return body

    def _answer(self, body: bytes) -> None:
        assert self._transport is not None
        if b'"stream":true' not in body and b'"stream": true' not in body:
            self._transport.write(JSON_ANSWER)
            return
        self._transport.write(STREAM_HEAD)
        for frame in STREAM_FRAMES:
            if self._transport.is_closing():
                return  # the client hung up (wrk does, at the end of a run)
            self._transport.write(frame)


async def serve(host: str = "127.0.0.1", port: int = 0) -> asyncio.Server:
    """Start listening; the caller reads the port from `server.sockets`."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(UpstreamProtocol, host, port)


async def _main() -> None:
    server = await serve()
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(_main())
