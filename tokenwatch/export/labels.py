"""Bounded label values: the first N distinct values of a label are kept, the rest fold into `other`."""

from __future__ import annotations

OTHER = "other"


class LabelFolder:
    """Keeps a time-series count bounded when tasks or users are unbounded (one per request, say)."""

    def __init__(self, max_values: int) -> None:
        self.max_values = max(1, max_values)
        self._seen: set[str] = set()
        self.folded = 0
        """How many values were folded into `other` (each time one was)."""

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        if len(self._seen) < self.max_values:
            self._seen.add(value)
            return value
        self.folded += 1
        return OTHER
