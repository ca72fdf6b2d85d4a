"""The time box: each selected phase's reserve, each phase's deadline, and the hard limit that interrupts
a phase running past it."""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterable, Mapping

from benchmarks.gpu_check.sizes import PHASES, Sizes

STARTUP_S = 10.0  # Python and torch start-up, counted in the budget


class PhaseTimeout(BaseException):
    """A phase ran past its hard limit (BaseException: per-setting handlers let it through)."""


def phase_reserves(sizes: Sizes, selected: Iterable[str], budget_s: float) -> dict[str, float]:
    """Seconds reserved for each selected phase: ``sizes.reserves`` times ``budget_s`` over the sum of them,
    the margin and :data:`STARTUP_S` (which is 420 s for the paper's default phases)."""
    selected = set(selected)
    reserves = {phase: seconds for phase, seconds in sizes.reserves if phase in selected}
    scale = budget_s / (sum(reserves.values()) + sizes.margin_s + STARTUP_S)
    return {phase: seconds * scale for phase, seconds in reserves.items()}


def phase_deadline(end: float, margin_s: float, reserves: Mapping[str, float], phase: str) -> float:
    """End of ``phase``: the session's ``end`` less the margin and the time reserved for the later phases."""
    later = [p for p in PHASES[PHASES.index(phase) + 1:] if p in reserves]
    return end - margin_s - sum(reserves[p] for p in later)


@contextlib.contextmanager
def hard_limit(seconds: float | None):
    """Raise :class:`PhaseTimeout` in the main thread after ``seconds`` (SIGALRM; a no-op where unavailable)."""
    if seconds is None or not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def alarm(signum, frame):
        raise PhaseTimeout(f"ran past its hard limit ({seconds:.0f} s)")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1.0))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
