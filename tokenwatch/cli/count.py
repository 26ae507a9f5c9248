"""`tokenwatch count`: count the tokens of a file, stdin, or a JSON chat request, offline."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from tokenwatch.cli.errors import CliError

MAX_INPUT_BYTES = 256 * 1024 * 1024


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "count",
        help="count the tokens of a file or stdin (text, or a JSON chat request)",
        description=(
            'Count tokens offline with tiktoken. A JSON chat request ({"messages": [...]}, '
            'Anthropic\'s {"system": ..., "messages": [...]}, a Responses {"input": ...}) '
            "or a bare list of messages is counted as a prompt, with the per-message overhead "
            "and the tools, tool choice and response format it carries, as a budget reserves "
            "it; "
            "anything else as plain text. Counts for models without a public tokenizer "
            "(Claude, Gemini, open models) are marked estimated."
        ),
    )
    p.add_argument(
        "file",
        nargs="?",
        default="-",
        metavar="FILE",
        help="file to count; '-' or nothing reads stdin",
    )
    p.add_argument(
        "--model",
        "-m",
        default="",
        help="model whose tokenizer to use (default: the request's model, else cl100k_base)",
    )
    p.add_argument(
        "--text",
        action="store_true",
        help="count the input as plain text even if it is a JSON chat request",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    text = _read(args.file)
    request = None if args.text else _as_request(text)
    model = args.model or (str(request.get("model", "")) if request else "")
    count, kind = _count(text, request, model)
    if args.json:
        print(
            json.dumps(
                {
                    "tokens": count.tokens,
                    "estimated": count.estimated,
                    "encoding": count.encoding,
                    "model": model,
                    "kind": kind,
                }
            )
        )
        return 0
    how = "estimated" if count.estimated else "exact"
    shown = f" for {model}" if model else ""
    print(f"{count.tokens} tokens ({kind}, {count.encoding}, {how}{shown})")
    return 0


def _read(name: str) -> str:
    try:
        if name == "-":
            raw = sys.stdin.buffer.read(MAX_INPUT_BYTES + 1)
        else:
            path = Path(name)
            if path.is_dir():
                raise CliError(f"{name} is a directory, not a file")
            with path.open("rb") as f:
                raw = f.read(MAX_INPUT_BYTES + 1)
    except FileNotFoundError:
        raise CliError(f"no such file: {name}") from None
    except PermissionError:
        raise CliError(f"cannot read {name}: permission denied") from None
    except OSError as exc:
        raise CliError(f"cannot read {name}: {exc.strerror or exc}") from None
    if len(raw) > MAX_INPUT_BYTES:
        raise CliError(f"{name} is larger than {MAX_INPUT_BYTES // (1024 * 1024)} MiB")
    return raw.decode("utf-8", errors="replace")


def _as_request(text: str) -> dict[str, Any] | None:
    """The input as a chat-like request, if it is one (a bare message list becomes messages)."""
    stripped = text.lstrip()
    if not stripped.startswith(("{", "[")):
        return None
    try:
        value = json.loads(stripped)
    except ValueError:
        return None
    if (
        isinstance(value, list)
        and value
        and all(isinstance(m, dict) and "role" in m for m in value)
    ):
        return {"messages": value}
    if isinstance(value, dict) and "messages" in value and not isinstance(value["messages"], list):
        raise CliError("not a valid chat request: `messages` must be a list of message objects")
    if isinstance(value, dict) and ("messages" in value or "input" in value):
        return value
    return None


def _count(text: str, request: dict[str, Any] | None, model: str) -> tuple[Any, str]:
    from tokenwatch.core import request_tokens, tokens

    if request is None:
        return tokens.count_text(text, model), "text"
    if "messages" not in request:
        endpoint, kind = request_tokens.RESPONSES, "responses input"
    elif "system" in request or model.startswith("claude"):
        endpoint, kind = request_tokens.MESSAGES, "messages"
    else:
        endpoint, kind = request_tokens.CHAT, "messages"
    try:
        return request_tokens.count_request(endpoint, request, model), kind
    except TypeError as exc:
        raise CliError(f"not a valid chat request: {exc}") from None
