"""What agents import: report usage and task boundaries to the supervisor (stdlib + openai only).

import tokenwatch
tokenwatch.instrument()              # every openai SDK call is now reported
with tokenwatch.task("t-42"):        # ...and attributed to a task
    client.chat.completions.create(...)
tokenwatch.usage().cost_usd          # this process's totals so far
"""

from __future__ import annotations

from tokenwatch.client.gate import BudgetExceeded
from tokenwatch.client.instrument import instrument, instrumented, uninstrument
from tokenwatch.client.reporter import Identity, Reporter, ReporterStatistics
from tokenwatch.client.session import install as install_reporter
from tokenwatch.client.tracking import Usage, current_task, report, reset_usage, task, usage

__all__ = [
    "BudgetExceeded",
    "Identity",
    "Reporter",
    "ReporterStatistics",
    "Usage",
    "current_task",
    "install_reporter",
    "instrument",
    "instrumented",
    "report",
    "reset_usage",
    "task",
    "uninstrument",
    "usage",
]
