"""Duty cycles: a throttle of last resort that lets an agent's tree run a fraction of each period."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import anyio

from tokenwatch.process.processes import ProcessGone, ProcessHandle, Sleep, stopped_quietly


@dataclass(slots=True)
class DutyCycleStatistics:
    cycles: int
    run_fraction: float
    period: float


class DutyCycle:
    """Throttle of last resort: let the tree run `run_fraction` of every `period`, stopped otherwise.

    Cancel `run()` before pausing the agent by other means: the cycle resumes it each period.
    """

    def __init__(
        self,
        handle: ProcessHandle,
        run_fraction: float,
        period: float = 1.0,
        sleep: Sleep = anyio.sleep,
    ) -> None:
        self._handle = handle
        self._sleep = sleep
        self._cycles = 0
        self._user_stopped = False
        self._users_job: set[int] = set()
        """Processes a Ctrl-Z was handed on to, held for their user until they run again."""
        self.continue_at_end = True
        """Leave the tree continued when cancelled; False when it is being paused or killed."""
        self.run_fraction = run_fraction
        self.period = period
        self.set_fraction(run_fraction)
        if period <= 0:
            raise ValueError(f"a duty-cycle period must be positive: {period}")

    def set_fraction(self, run_fraction: float) -> None:
        """Change the share of time the tree runs; takes effect at the next phase."""
        if not 0 < run_fraction <= 1:
            raise ValueError(f"a run fraction must be above 0 and at most 1: {run_fraction}")
        self.run_fraction = run_fraction

    def statistics(self) -> DutyCycleStatistics:
        return DutyCycleStatistics(self._cycles, self.run_fraction, self.period)

    async def run(self) -> None:
        """Cycle until cancelled or the tree is gone; leaves the tree continued, unless its user
        stopped it (Ctrl-Z): a job stopped by its user is theirs to continue, so while the root
        is stopped by someone else the cycle leaves it alone, and takes up again once it runs."""
        try:
            while True:
                self._continue()
                await self._sleep(self.run_fraction * self.period)
                while self._held_by_user():  # stopped meanwhile, and not by us
                    self._user_stopped = True
                    await self._sleep(self.period)
                self._user_stopped = False
                self._users_job.clear()
                if self.run_fraction < 1:
                    self._handle.pause()
                    await self._sleep((1 - self.run_fraction) * self.period)
                self._cycles += 1
        except ProcessGone:
            return
        finally:
            if self.continue_at_end and not self._user_stopped:
                try:
                    self._continue()
                except ProcessGone:
                    pass

    def continue_now(self) -> None:
        """Continue the tree at once, as the cycle's end would (unless its user stopped it), for
        a caller that is about to act on it and must not have the end come after."""
        self.continue_at_end = False
        if not self._user_stopped:
            with contextlib.suppress(ProcessGone):
                self._continue()

    def _continue(self) -> None:
        """SIGCONT after our stop; a Ctrl-Z that came meanwhile is handed on (the job is then
        its user's: the cycle holds off)."""
        _, handed_on = self._handle.continue_tree()
        if handed_on:
            self._users_job.update(handed_on)
            self._user_stopped = True

    def _held_by_user(self) -> bool:
        """The root, or a job its user stopped (the Ctrl-Z handed on), is stopped: not by us."""
        if self._handle.stopped():
            return True
        return any(stopped_quietly(pid) for pid in self._users_job)
