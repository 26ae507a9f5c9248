"""Connecting to the team's PostgreSQL with libpq's own settings (PGPASSWORD, ~/.pgpass,
PGSERVICE); every error worded without the password, whatever the server or libpq said."""

from __future__ import annotations

import math
import os
import re
from typing import TYPE_CHECKING, Final

import anyio

from tokenwatch.config import FleetSettings

if TYPE_CHECKING:
    import psycopg

LIBPQ_MIN_TIMEOUT: Final = 2
"""libpq's connect_timeout is whole seconds, and it treats 1 as 2."""
_SECRETS: Final = (
    re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE),
    re.compile(r"(://[^:/@\s]*:)([^@\s]*)(@)"),
)


class FleetUnreachable(Exception):
    """The team's database cannot be reached or refused us; the message holds no password."""


def scrub(text: str, env: dict[str, str] | None = None) -> str:
    """`text` with any password in it replaced by `***`: a `password=` setting, the one in a
    URL, and the value of PGPASSWORD wherever it shows."""
    text = _SECRETS[0].sub(r"\1***", text)
    text = _SECRETS[1].sub(r"\1***\3", text)
    secret = (os.environ if env is None else env).get("PGPASSWORD", "")
    if secret:
        text = text.replace(secret, "***")
    return text


def where(settings: FleetSettings) -> str:
    """The server as the user gave it (a URL has no password: config refuses one)."""
    return settings.url or "the server PGHOST/PGSERVICE name"


async def connect(settings: FleetSettings) -> psycopg.AsyncConnection[tuple[object, ...]]:
    """An autocommit connection to the team's database; raises FleetUnreachable."""
    import psycopg

    timeout = max(LIBPQ_MIN_TIMEOUT, math.ceil(settings.connect_timeout))
    try:
        with anyio.fail_after(settings.connect_timeout + 1):
            return await psycopg.AsyncConnection.connect(
                settings.url,
                autocommit=True,
                connect_timeout=timeout,
                application_name=f"tokenwatch {settings.host}"[:63],
            )
    except TimeoutError:
        raise FleetUnreachable(
            f"cannot reach the fleet database {where(settings)}: no answer in "
            f"{settings.connect_timeout:g} s"
        ) from None
    except (psycopg.Error, OSError) as exc:
        raise FleetUnreachable(
            f"cannot reach the fleet database {where(settings)}: {describe(exc)}"
        ) from None


def describe(exc: BaseException) -> str:
    """One line about a database error, without a password in it."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = "; ".join(lines) or type(exc).__name__
    return scrub(text)
