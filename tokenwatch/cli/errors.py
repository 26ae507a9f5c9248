"""The one exception a command raises to end with a one-line message and a non-zero exit."""

from __future__ import annotations


class CliError(Exception):
    """Printed as `tokenwatch: MESSAGE` on stderr; the process exits with `exit_code`."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code
