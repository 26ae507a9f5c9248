"""This process's one link to the supervisor: created on first use, flushed at exit, reset after fork."""

from __future__ import annotations

import atexit
import dataclasses
import os
import sys
import threading

from tokenwatch import environ
from tokenwatch.client.reporter import Identity, Reporter, socket_path_from_env

FLUSH_TIMEOUT_S = 1.0
"""At exit, wait at most this long for unacknowledged reports (never when no supervisor answers)."""

_lock = threading.Lock()
_reporter: Reporter | None = None
_identity: Identity | None = None


def identity() -> Identity:
    """Who this process reports as (from TOKENWATCH_AGENT etc.), read once."""
    global _identity
    if _identity is None:
        _identity = Identity.from_env()
    return _identity


_inherited_socket: str | None = None
"""After a fork: the parent's socket path (it may have been installed, not read from the env)."""


def reporter() -> Reporter:
    """The process's reporter, started on first use from the TOKENWATCH_* environment."""
    global _reporter
    with _lock:
        if _reporter is None:
            _reporter = Reporter(_inherited_socket or socket_path_from_env(), identity())
            _reporter.start()
            _flush_in_multiprocessing_children()
        return _reporter


def _flush_in_multiprocessing_children() -> None:
    # multiprocessing children end with os._exit, which skips atexit; its own exit hook runs these.
    mp = sys.modules.get("multiprocessing")
    if mp is not None and mp.parent_process() is not None:
        mp.util.Finalize(None, _flush_at_exit, exitpriority=10)


def current_reporter() -> Reporter | None:
    """The reporter if one was started, without starting one."""
    return _reporter


def install(new: Reporter | None) -> Reporter | None:
    """Replace the process's reporter (tests, or a custom socket); returns the previous one.

    The identity follows the new reporter's, so events and `hello` agree.
    """
    global _reporter, _identity
    with _lock:
        old, _reporter = _reporter, new
        _identity = new.identity if new is not None else None
    if new is not None:
        new.start()
    return old


def _flush_at_exit() -> None:
    rep = _reporter
    if rep is None:
        return
    try:
        timeout = float(os.environ.get(environ.FLUSH_TIMEOUT, FLUSH_TIMEOUT_S))
    except ValueError:
        timeout = FLUSH_TIMEOUT_S
    rep.close(flush_timeout=timeout)


def _after_fork_in_child() -> None:
    # The reporter thread does not survive fork; the child starts its own on first use, to the
    # same socket, under the same name with its own pid.
    global _reporter, _lock, _identity, _inherited_socket
    if _reporter is not None:
        _inherited_socket = _reporter.socket_path
    if _identity is not None:
        _identity = dataclasses.replace(_identity, pid=os.getpid())
    _reporter = None
    _lock = threading.Lock()


atexit.register(_flush_at_exit)
os.register_at_fork(after_in_child=_after_fork_in_child)
