"""What the engine refuses, in its own words; the socket maps each kind to a protocol code once."""

from __future__ import annotations


class EngineError(Exception):
    """A request the engine refuses; `message` is what the person who asked reads."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequest(EngineError):
    """The request cannot be done as asked (a bad rate or budget, an agent that has exited)."""


class UnknownAgent(EngineError):
    """No agent, or no configured agent, has that name."""


class NameTaken(EngineError):
    """The process or name is already supervised."""


class NotAllowed(EngineError):
    """tokenwatch may not do this here (another user's process, no way to launch or cycle)."""


class StoreUnavailable(Exception):
    """The ledger file cannot be read or written (damaged, disk full, read-only, locked too long);
    the message names the path and which."""
