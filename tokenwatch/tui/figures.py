"""Small text figures the dashboard draws: gauges, sparklines, state labels, ages, money and tokens."""

from __future__ import annotations

import time
from collections.abc import Sequence

from rich.cells import cell_len
from rich.text import Text

from tokenwatch.core.models import AgentState, Severity
from tokenwatch.core.quantities import PARTIAL_MARK, format_tokens, format_usd

__all__ = ["PARTIAL_MARK", "format_tokens", "format_usd"]

_BLOCKS = "▁▂▃▄▅▆▇█"

STATE_STYLES: dict[str, str] = {
    AgentState.RUNNING.value: "green",
    AgentState.PAUSED.value: "bold yellow",
    AgentState.THROTTLED.value: "magenta",
    AgentState.STOPPED.value: "dim",
    AgentState.EXITED.value: "dim",
    AgentState.DETACHED.value: "cyan",
}

SEVERITY_STYLES: dict[str, str] = {
    Severity.INFO.value: "cyan",
    Severity.WARNING.value: "yellow",
    Severity.CRITICAL.value: "bold red",
}


def sparkline(values: Sequence[float], width: int = 8) -> str:
    """The last `width` values as block characters scaled to their own maximum."""
    recent = list(values)[-width:]
    if not recent:
        return ""
    top = max(recent)
    if top <= 0:
        return _BLOCKS[0] * len(recent)
    scale = len(_BLOCKS) - 1
    return "".join(_BLOCKS[min(scale, round(v / top * scale))] for v in recent)


def gauge_style(fraction: float) -> str:
    if fraction >= 1.0:
        return "bold red"
    if fraction >= 0.8:
        return "yellow"
    return "green"


def gauge(fraction: float | None, width: int = 8, partial: bool = False) -> Text:
    """A bar and a percentage (`█████░░░ 62%`); empty text when there is no budget; marked
    `█████░░░* 62%` when `partial` (some of what it measures is priced by estimate), in the
    same width."""
    if fraction is None:
        return Text("-", style="dim")
    filled = max(0, min(width, round(fraction * width)))
    text = Text("█" * filled, style=gauge_style(fraction))
    text.append("░" * (width - filled), style="dim")
    if partial:
        text.append(PARTIAL_MARK, style="bold yellow")
    text.append(f"{'' if partial else ' '}{fraction * 100:3.0f}%")
    return text


def state_label(state: str, exit_code: int | None = None, throttle: str = "") -> Text:
    label = state
    if state == AgentState.EXITED.value and exit_code is not None:
        label = f"exited {exit_code}"
    elif state == AgentState.THROTTLED.value and throttle:
        label = f"throttled {throttle}"
    return Text(label, style=STATE_STYLES.get(state, ""))


def fit_middle(text: str, width: int) -> str:
    """`literatu…er-alpha`: a name cut in the middle, so names sharing a prefix stay apart."""
    if cell_len(text) <= width:
        return text
    if width <= 1:
        return "…"[:width]
    head, tail = (width - 1) // 2, width - 1 - (width - 1) // 2
    while cell_len(text[:head]) > (width - 1) // 2:
        head -= 1
    while tail and cell_len(text[-tail:]) > width - 1 - cell_len(text[:head]):
        tail -= 1
    return text[:head] + "…" + (text[-tail:] if tail else "")


def fit_end(cell: str | Text, width: int) -> str | Text:
    """A cell cut to `width` with `…` at the end (never cut silently)."""
    if isinstance(cell, Text):
        if cell.cell_len <= width:
            return cell
        cut = cell.copy()
        cut.truncate(width, overflow="ellipsis")
        return cut
    if cell_len(cell) <= width:
        return cell
    while cell and cell_len(cell) > width - 1:
        cell = cell[:-1]
    return cell + "…"


def age(seconds: float) -> str:
    """`12s`, `5m`, `3h`, `2d`: how long ago, in the fewest characters."""
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size:.0f}{unit}"
    return f"{seconds:.0f}s"


def clock_time(ts: float, now: float) -> str:
    """`14:32` within a day of `now`, `Dec 07 14:32` further away (local time)."""
    fmt = "%H:%M" if abs(ts - now) < 86400 else "%b %d %H:%M"
    return time.strftime(fmt, time.localtime(ts))


def rate(value: float, unit: str) -> str:
    """A per-minute or per-hour figure: tokens compact, dollars with cents."""
    if unit == "usd":
        return format_usd(value)
    return format_tokens(value)
