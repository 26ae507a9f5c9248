"""Loaded at startup by Python children of `tokenwatch run`: instruments openai when it is imported.

Standard library only at startup; runs any other sitecustomize.py the child would have loaded,
and never lets a failure of its own reach the child.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

_HERE = os.path.dirname(os.path.abspath(__file__))


def _chain_previous() -> None:
    """Run the sitecustomize.py this one shadows (e.g. the distribution's), if any."""
    rest = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)


def _instrument() -> None:
    try:
        import tokenwatch.client as client
    except ImportError:
        extra = os.environ.get("TOKENWATCH_CLIENT_PATH", "")
        if not extra:
            return
        sys.path.append(extra)
        import tokenwatch.client as client
    client.instrument()


class _InstrumentingLoader(importlib.abc.Loader):
    """Loads openai as usual, then instruments it."""

    def __init__(self, inner: importlib.abc.Loader) -> None:
        self._inner = inner

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._inner.exec_module(module)
        try:
            _instrument()
        except Exception:  # the agent runs uninstrumented rather than not at all
            pass


class _OpenAIHook(importlib.abc.MetaPathFinder):
    """Waits for the first `import openai` (so children that never use it pay nothing)."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != "openai":
            return None
        _remove_hook()
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _InstrumentingLoader(spec.loader)
        return spec


def _remove_hook() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _OpenAIHook)]


def _install() -> None:
    if os.environ.get("TOKENWATCH_AUTOINSTRUMENT", "1") == "0":
        return
    if not os.environ.get("TOKENWATCH_SOCKET"):
        return
    if "openai" in sys.modules:
        _instrument()
        return
    sys.meta_path.insert(0, _OpenAIHook())


def _safely(step: Any) -> None:
    try:
        step()
    except Exception:  # never break the child's startup
        pass


_safely(_chain_previous)
_safely(_install)
