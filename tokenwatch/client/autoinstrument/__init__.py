"""Automatic instrumentation of Python children: `child_env()` puts this folder's sitecustomize.py
first on their PYTHONPATH; it instruments the openai SDK the moment the child imports it."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

HOOK_DIR = Path(__file__).resolve().parent
"""Holds the sitecustomize.py that children load at startup."""
PACKAGE_PARENT = HOOK_DIR.parents[2]
"""The folder that contains the `tokenwatch` package."""
CLIENT_PATH_ENV = "TOKENWATCH_CLIENT_PATH"
DISABLE_ENV = "TOKENWATCH_AUTOINSTRUMENT"
"""Set to 0 in a child's environment to turn automatic instrumentation off."""


def child_env(env: Mapping[str, str]) -> dict[str, str]:
    """`env` for a child process, with the auto-instrumentation hook first on PYTHONPATH.

    The folder that holds tokenwatch is not put on PYTHONPATH (it could shadow the child's own
    packages, or be another Python's site-packages): the hook appends it to the end of sys.path
    only if the child cannot import tokenwatch itself. Calling this twice changes nothing more.
    """
    out = dict(env)
    hook = str(HOOK_DIR)
    rest = [p for p in out.get("PYTHONPATH", "").split(os.pathsep) if p and p != hook]
    out["PYTHONPATH"] = os.pathsep.join([hook, *rest])
    out[CLIENT_PATH_ENV] = str(PACKAGE_PARENT)
    return out
