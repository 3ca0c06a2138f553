"""Jobs: plain objects doing long work with progress, ETA and cancellation, run the same way by the CLI (with a
progress bar), by the window (in a QThread) and by tests (no Qt at all).

A job's `execute(project, progress)` does the work; `run_job` wraps it in a run row of the project, so that its
state (running, done, failed, cancelled, interrupted) and its error are recorded whatever happens.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from labelers.base import Cancelled

log = logging.getLogger(__name__)

__all__ = ["Cancelled", "JobProgress", "ProgressInfo", "Job", "run_job"]


@dataclass
class ProgressInfo:
    done: int
    total: int
    message: str
    elapsed: float
    eta: float | None  # seconds left in the current stage, None while unknown
    stage: str = ""  # what is being done, e.g. "compexp on block3" (the step's name in a multi-step job)
    step: int = 0  # 1-based step of a multi-step job; 0 for a job of one step
    steps: int = 0
    stage_elapsed: float = 0.0  # seconds since the current stage began (each stage has its own clock)
    stage_id: int = 0  # changes whenever a new stage begins, so a display can start a new bar

    @property
    def fraction(self) -> float:
        return min(1.0, self.done / self.total) if self.total else 0.0

    @property
    def heading(self) -> str:
        """"step 3 of 24: compexp on block3" for a multi-step job, else the stage's name."""
        if not self.steps:
            return self.stage
        head = f"step {self.step} of {self.steps}"
        return f"{head}: {self.stage}" if self.stage else head


@dataclass
class JobProgress:
    """Thread-safe progress and cancellation; implements `labelers.base.Progress`.

    `cancel()` may be called from any thread; the job notices at its next `update` or `check`.
    Listeners are called from the job's thread (the window forwards them through a Qt signal).
    """

    listeners: list[Callable[[ProgressInfo], None]] = field(default_factory=list)
    min_interval: float = 0.1
    _cancel: threading.Event = field(default_factory=threading.Event)
    _start: float = field(default_factory=time.monotonic)
    _last_emit: float = 0.0
    _stage_start: float = field(default_factory=time.monotonic)
    _stage_done0: int = 0
    _stage_total: int = -1
    _rate_start: float = field(default_factory=time.monotonic)
    _stage_id: int = 0
    _last: ProgressInfo | None = None
    stage: str = ""
    step: int = 0
    steps: int = 0
    step_name: str = ""

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def check(self) -> None:
        if self._cancel.is_set():
            raise Cancelled()

    def begin_step(self, step: int, steps: int, name: str) -> None:
        """Start step `step` (1-based) of `steps` of a multi-step job; its stages are shown under its name. Reports
        at once, so a display names the step before its first progress report (loading a model can take a while)."""
        self.step, self.steps, self.step_name = step, steps, name
        self.stage = name
        self._new_stage(0, -1)
        self.update(0, 0, "starting")

    def begin_stage(self, name: str, done: int = 0) -> None:
        """ETA is measured from the start of the current stage (e.g. a resumed extraction's first new batch)."""
        self.stage = f"{self.step_name}: {name}" if self.step_name and name != self.step_name else name
        self._new_stage(done, -1)

    def _new_stage(self, done: int, total: int) -> None:
        self._stage_start = time.monotonic()
        self._stage_done0 = done
        self._stage_total = total
        self._stage_id += 1

    def update(self, done: int, total: int, message: str = "") -> None:
        self.check()
        t = time.monotonic()
        if total != self._stage_total or (self._last is not None and done < self._last.done):
            # The stage's first report, a new total (a labeler's next pass over other work) or a count going back:
            # the rate is measured from this report on, so neither the start-up (loading a model) nor an earlier
            # phase's speed goes into the ETA. The stage's clock keeps running from its start.
            self._rate_start, self._stage_done0 = t, done
            self._stage_total = total
        eta = None
        rate_done = done - self._stage_done0
        if total and rate_done > 0:
            eta = (t - self._rate_start) / rate_done * max(0, total - done)
        info = ProgressInfo(done, total, message or self.stage, t - self._start, eta, stage=self.stage,
                            step=self.step, steps=self.steps, stage_elapsed=t - self._stage_start,
                            stage_id=self._stage_id)
        self._last = info
        if done >= total or t - self._last_emit >= self.min_interval:
            self._last_emit = t
            for fn in list(self.listeners):
                fn(info)

    @property
    def last(self) -> ProgressInfo | None:
        return self._last


class Job(Protocol):
    """What every job provides. `title` is shown in progress bars and the jobs panel."""

    title: str

    def execute(self, progress: JobProgress) -> Any: ...


def run_job(job: Job, progress: JobProgress | None = None) -> Any:
    """Run a job in this thread. Cancellation raises `Cancelled` out of here after the job recorded it."""
    progress = progress or JobProgress()
    log.info("job %s started", job.title)
    t0 = time.monotonic()
    try:
        return job.execute(progress)
    finally:
        log.info("job %s ended after %.1f s", job.title, time.monotonic() - t0)


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "--:--"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"
