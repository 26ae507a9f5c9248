"""How many output tokens a call will likely produce: what a budget reserves for it before it goes."""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from typing import Final

RECENT_CALLS: Final = 20
"""Outputs remembered per agent and model."""
HEADROOM: Final = 1.5
"""The reservation is this many times the largest recent output, so a call a little longer than
the others still fits inside its reservation."""
MAX_KEYS: Final = 4096
"""(agent, model) pairs remembered; the least recently used go first."""


class OutputEstimate:
    """Reserve what a call is likely to produce, not its `max_tokens`.

    Coding agents ask for far more output than they use (Claude Code asks 32k and writes about
    800), so reserving `max_tokens` refuses calls while most of a budget is unspent. This
    reserves HEADROOM x the largest of the agent's last RECENT_CALLS outputs on the model, never
    more than `max_tokens`, and `max_tokens` until the agent has made a call on that model. A
    call that writes more than its reservation is still counted in full when it settles: what a
    hard budget can overshoot by is that excess, for the calls in flight (docs/budgets.md).
    """

    def __init__(self, recent: int = RECENT_CALLS, headroom: float = HEADROOM) -> None:
        self._recent_n = recent
        self._headroom = headroom
        self._outputs: OrderedDict[tuple[str, str], deque[int]] = OrderedDict()

    def expected(self, agent: str, model: str, max_output_tokens: int) -> int:
        """Output tokens to reserve for the agent's next call on `model`."""
        seen = self._outputs.get((agent, model))
        if not seen:
            return max_output_tokens
        likely = math.ceil(max(seen) * self._headroom)
        return likely if max_output_tokens <= 0 else min(max_output_tokens, likely)

    def observe(self, agent: str, model: str, output_tokens: int) -> None:
        """Remember a settled call's output."""
        key = (agent, model)
        seen = self._outputs.get(key)
        if seen is None:
            seen = self._outputs[key] = deque(maxlen=self._recent_n)
            if len(self._outputs) > MAX_KEYS:
                self._outputs.popitem(last=False)
        else:
            self._outputs.move_to_end(key)
        seen.append(max(0, output_tokens))
