"""`tokenwatch fake-llm`: run the offline OpenAI/Anthropic-compatible test server."""

from __future__ import annotations

import argparse
from typing import Any

from tokenwatch.cli.errors import CliError


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "fake-llm",
        help="run an offline OpenAI/Anthropic-compatible LLM server (for tests and demos)",
        description=(
            "Serve the OpenAI (/v1/chat/completions, /v1/responses, /v1/completions, "
            "/v1/embeddings, /v1/models) and Anthropic (/v1/messages, "
            "/v1/messages/count_tokens) and Gemini (/v1beta/models/MODEL:generateContent, "
            ":streamGenerateContent, :countTokens) APIs offline, with deterministic replies and "
            "usage counted with tiktoken. Prints 'fake-llm listening on URL' when ready; point "
            "OPENAI_BASE_URL at URL/v1, ANTHROPIC_BASE_URL and GOOGLE_GEMINI_BASE_URL at URL. "
            "Any non-empty API key "
            "is accepted. Per-request faults: header 'x-fake-llm-fault: 429|500|cut[:N]|slow[:MS]'. "
            "GET /_fake/calls lists what was billed."
        ),
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8765, help="port; 0 picks a free one (default 8765)")
    p.add_argument(
        "--latency-ms",
        type=float,
        default=0.0,
        metavar="MS",
        help="wait before every response (default 0)",
    )
    p.add_argument(
        "--chunk-ms",
        type=float,
        default=0.0,
        metavar="MS",
        help="wait between stream chunks (default 0)",
    )
    p.add_argument(
        "--fail-every",
        type=int,
        default=0,
        metavar="N",
        help="answer every Nth request with an error (default 0: never)",
    )
    p.add_argument(
        "--fail-status",
        type=int,
        default=500,
        metavar="CODE",
        help="HTTP status of --fail-every errors (default 500)",
    )
    p.add_argument(
        "--cut-every",
        type=int,
        default=0,
        metavar="N",
        help="cut every Nth stream before its end (default 0: never)",
    )
    p.add_argument(
        "--cut-after",
        type=int,
        default=2,
        metavar="CHUNKS",
        help="chunks sent before a --cut-every cut (default 2)",
    )
    p.add_argument(
        "--retry-after",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="retry-after sent with 429 errors (default 1)",
    )
    p.add_argument(
        "--reply-to-last",
        action="store_true",
        help="choose replies by the last message only: the same question gets the same answer "
        "however long the conversation (a model in a rut)",
    )
    p.add_argument("--quiet", action="store_true", help="do not log requests on stderr")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    for name in ("latency_ms", "chunk_ms", "fail_every", "cut_every", "cut_after", "retry_after"):
        if getattr(args, name) < 0:
            raise CliError(f"--{name.replace('_', '-')} must not be negative", 2)
    if not 400 <= args.fail_status <= 599:
        raise CliError("--fail-status must be an HTTP error status (400-599)", 2)
    if not 0 <= args.port <= 65535:
        raise CliError("--port must be between 0 and 65535", 2)
    return _serve(args)


def _serve(args: argparse.Namespace) -> int:
    import logging
    import signal
    import sys

    import anyio

    from tokenwatch.demo.fake_llm import FakeLLM

    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(message)s",
    )
    fake = FakeLLM(
        latency_ms=args.latency_ms,
        chunk_ms=args.chunk_ms,
        fail_every=args.fail_every,
        fail_status=args.fail_status,
        cut_every=args.cut_every,
        cut_after=args.cut_after,
        retry_after_s=args.retry_after,
        reply_to_last=args.reply_to_last,
    )

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            try:
                url = await tg.start(fake.serve, args.host, args.port, name="fake-llm")
            except OSError as exc:
                raise CliError(
                    f"cannot listen on {args.host}:{args.port}: {exc.strerror}"
                ) from None
            print(f"fake-llm listening on {url}", flush=True)
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    tg.cancel_scope.cancel()
                    break

    try:
        anyio.run(main)
    except BaseExceptionGroup as group:
        cli_errors = group.subgroup(CliError)
        if cli_errors is not None:
            raise cli_errors.exceptions[0] from None
        raise
    return 0
