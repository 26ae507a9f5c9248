"""The TOKENWATCH_* environment variables: what an agent's processes are told (set by the engine
and `tokenwatch run`, read by the SDK client), and the knobs a user sets. One home for the names."""

from __future__ import annotations

from typing import Final

SOCKET: Final = "TOKENWATCH_SOCKET"
"""The supervisor's Unix socket, for the SDK client and the CLI."""
AGENT: Final = "TOKENWATCH_AGENT"
"""The name the agent's usage is recorded under."""
RUN_ID: Final = "TOKENWATCH_RUN_ID"
"""Which run of that agent (a run's budget and summary are per run)."""
TASK: Final = "TOKENWATCH_TASK"
"""The task the agent's calls count toward."""
USER: Final = "TOKENWATCH_USER"
"""The user the agent's calls count toward (default: $USER)."""
SESSION: Final = "TOKENWATCH_SESSION"
"""A session label for the agent's calls."""
PROXY_URL: Final = "TOKENWATCH_PROXY_URL"
"""The supervisor's local proxy, for SDK instrumentation that routes through it."""
ENDPOINT: Final = "TOKENWATCH_ENDPOINT"
"""The proxy's stable endpoint (`http://127.0.0.1:PORT`, no route token), when it listens."""
ENDPOINT_PORT: Final = "TOKENWATCH_ENDPOINT_PORT"
"""Overrides `[proxy] endpoint_port` for the supervisor started with it (0 or off: off)."""
FLUSH_TIMEOUT: Final = "TOKENWATCH_FLUSH_TIMEOUT"
"""Seconds an exiting agent waits for its usage to be acknowledged."""
DEBUG: Final = "TOKENWATCH_DEBUG"
"""Set, an internal error prints its traceback."""
