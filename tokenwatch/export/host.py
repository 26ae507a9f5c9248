"""The host name every exported series carries, so a team's board can split spend by machine."""

from __future__ import annotations

import socket


def host_name() -> str:
    """This machine's name: the one place exporters take `host` from.

    A [fleet] host setting (issue #20) is meant to replace this default: the exporters take an
    explicit `host=` and fall back to this function only when none is given.
    """
    return socket.gethostname() or "localhost"
