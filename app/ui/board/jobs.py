"""Background work of the naming window (building a pool, region features, clustering suggestions): a job runs
in a QThread with a `JobProgress`; its result, error message or cancellation comes back as a signal, queued to
the window's thread. The window keeps every thread until it has finished and waits for them when it closes."""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import shiboken6
from PySide6.QtCore import QObject, QThread, Signal

from app.jobs import JobProgress, ProgressInfo
from labelers.base import Cancelled
from labelers.errors import UserError

log = logging.getLogger(__name__)


class CallJob:
    """A plain function as a job."""

    def __init__(self, title: str, fn: Callable[[], Any]):
        self.title = title
        self.fn = fn

    def execute(self, progress: JobProgress) -> Any:
        return self.fn()


class JobThread(QThread):
    progressed = Signal(object)  # ProgressInfo
    succeeded = Signal(object)
    failed = Signal(str)
    cancelled = Signal()

    def __init__(self, job: Any, parent: QObject | None = None):
        super().__init__(parent)
        self.job = job
        self.progress = JobProgress()
        self.progress.listeners.append(self._forward)

    def _forward(self, info: ProgressInfo) -> None:
        if shiboken6.isValid(self):
            self.progressed.emit(info)

    def run(self) -> None:
        try:
            result = self.job.execute(self.progress)
        except Cancelled:
            self.cancelled.emit()
        except UserError as exc:
            log.info("%s failed: %s", self.job.title, exc)
            self.failed.emit(str(exc))
        except BaseException as exc:  # the thread must report whatever went wrong; the traceback goes to the log
            log.exception("%s failed unexpectedly", self.job.title)
            self.failed.emit(f"unexpected {type(exc).__name__}: {exc}")
        else:
            self.succeeded.emit(result)
