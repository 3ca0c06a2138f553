"""The bridge between jobs (plain objects with `title` and `execute(progress)`, see app/jobs.py) and Qt.

- `JobThread` runs one job for the window: in a child process (app/ui/jobproc.py) whose messages it relays, or,
  for a job that cannot be pickled, in the thread itself. Each progress report becomes a Qt signal, queued to the
  window's thread. Errors become readable messages (tracebacks go to the log).
- `JobManager` queues runs, starts them `parallel` at a time, keeps a reference to every thread until it has
  finished (the classic crash is "QThread: Destroyed while thread is still running"), cancels through
  `JobProgress.cancel()`, and on shutdown cancels, waits and disconnects.
- `call_in_pool` runs a short function (a query, a thumbnail) on a QThreadPool and hands its result back to the
  window's thread.
"""
from __future__ import annotations

import enum
import itertools
import logging
import time
from collections.abc import Callable
from typing import Any

import shiboken6
from PySide6.QtCore import QObject, QRunnable, QThread, QThreadPool, Signal, Slot

from app.jobs import JobProgress, ProgressInfo, format_seconds
from app.ui.jobproc import picklable, readable_error
from labelers.base import Cancelled
from labelers.errors import UserError

log = logging.getLogger(__name__)


class JobState(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobState.DONE, JobState.FAILED, JobState.CANCELLED)


class JobThread(QThread):
    """Runs one job off the window's thread; exactly one of succeeded/failed/cancelled is emitted.

    With `in_process` (the default for picklable jobs), the job runs in a child process (app/ui/jobproc.py) and
    this thread only relays its messages, so nothing the job does can hold the window's GIL; otherwise the job
    runs in this thread. Either way, cancelling is `progress.cancel()`.
    """

    progressed = Signal(object)  # ProgressInfo
    succeeded = Signal(object)
    failed = Signal(str)
    cancelled = Signal()

    def __init__(self, job: Any, progress: JobProgress | None = None, parent: QObject | None = None,
                 in_process: bool = True):
        super().__init__(parent)
        self.job = job
        self.progress = progress or JobProgress()
        self.in_process = in_process and picklable(job)
        if in_process and not self.in_process:
            log.info("job %s cannot be sent to a process; it runs in a thread", getattr(job, "title", job))
        self.progress.listeners.append(self._forward)
        self.process: Any = None
        self.terminate_after: float | None = None  # seconds to wait after cancelling before killing the child
        self.setObjectName(f"job: {getattr(job, 'title', type(job).__name__)}")

    def _forward(self, info: ProgressInfo) -> None:
        # Called in the job's thread; the signal is queued to the receivers' thread.
        if shiboken6.isValid(self):
            self.progressed.emit(info)

    def run(self) -> None:  # noqa: D401 - QThread entry point
        if self.in_process:
            self._run_in_process()
        else:
            self._run_here()

    def _run_here(self) -> None:
        from app.jobs import run_job

        try:
            result = run_job(self.job, self.progress)
        except Cancelled:
            log.info("job %s cancelled", self.job.title)
            self.cancelled.emit()
        except UserError as exc:
            log.info("job %s failed: %s", self.job.title, exc, exc_info=True)
            self.failed.emit(readable_error(exc))
        except BaseException as exc:  # the thread must report, whatever went wrong
            log.exception("job %s failed unexpectedly", self.job.title)
            self.failed.emit(readable_error(exc))
        else:
            self.succeeded.emit(result)

    def _run_in_process(self) -> None:
        from app.ui.jobproc import child_main, job_context

        # Two one-way pipes, no multiprocessing.Queue: a Queue's pipe stays open in this process too, so a child
        # that dies mid-message leaves a reader blocked forever; with the child holding the only write end, its
        # end (or death) is an EOF here, and this process closing its end of `stop` is an EOF there.
        ctx = job_context()
        messages, child_out = ctx.Pipe(duplex=False)
        child_stop, stop = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=child_main, args=(self.job, child_out, child_stop), name=f"run: {self.job.title}")
        try:
            proc.start()
        except Exception as exc:
            log.exception("could not start a process for %s", self.job.title)
            self.failed.emit(f"the run could not start its process: {exc}")
            return
        finally:
            child_out.close()
            child_stop.close()
        self.process = proc
        log.info("run %s: process %s started", self.job.title, proc.pid)
        run_id = lambda: getattr(self.job, "run_id", None)  # noqa: E731
        final: tuple[Any, ...] | None = None
        cancel_at: float | None = None
        while final is None:
            if self.progress.cancelled and cancel_at is None:
                cancel_at = time.monotonic()
                log.info("run %s: cancelling", self.job.title)
                try:
                    stop.send("stop")
                except OSError:  # the child is already gone; the EOF below says how it ended
                    pass
            if (cancel_at is not None and self.terminate_after is not None
                    and time.monotonic() - cancel_at > self.terminate_after and proc.is_alive()):
                log.warning("run %s did not stop within %.0f s of cancelling: ending its process",
                            self.job.title, self.terminate_after)
                proc.terminate()
                final = ("cancelled", None, run_id())
                break
            try:
                if not messages.poll(0.1):
                    continue
                msg = messages.recv()
            except (EOFError, OSError):
                proc.join(5)
                final = ("failed", f"the run's process ended unexpectedly (exit code {proc.exitcode}); "
                                   "details in the log", run_id())
                break
            if msg[2] is not None:
                self.job.run_id = msg[2]  # the run row the child works on (resume, jobs panel)
            if msg[0] == "progress":
                self._forward(msg[1])
            else:
                final = msg
        proc.join(timeout=30)
        if proc.is_alive():
            proc.terminate()
            proc.join(5)
        messages.close()
        stop.close()
        log.info("run %s: process %s ended (%s, exit code %s)", self.job.title, proc.pid, final[0], proc.exitcode)
        kind, value = final[0], final[1]
        if kind == "done":
            self.succeeded.emit(value)
        elif kind == "cancelled":
            self.cancelled.emit()
        else:
            self.failed.emit(value)


class JobHandle(QObject):
    """One run as the window sees it: its state, last progress, result or error."""

    changed = Signal()

    _ids = itertools.count(1)

    def __init__(self, job: Any, parent: QObject | None = None):
        super().__init__(parent)
        self.id = next(self._ids)
        self.job = job
        self.title: str = getattr(job, "title", type(job).__name__)
        self.state = JobState.QUEUED
        self.progress = JobProgress()
        self.info: ProgressInfo | None = None
        self.result: Any = None
        self.error: str | None = None
        self.queued_at = time.monotonic()
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.thread: JobThread | None = None
        self.on_done: Callable[[JobHandle], None] | None = None

    @property
    def fraction(self) -> float:
        return self.info.fraction if self.info else 0.0

    @property
    def eta_text(self) -> str:
        if self.state is not JobState.RUNNING or self.info is None or self.info.eta is None:
            return ""
        return f"{format_seconds(self.info.eta)} left"

    @property
    def elapsed(self) -> float:
        if self.started_at is None:
            return 0.0
        return (self.finished_at or time.monotonic()) - self.started_at

    @property
    def run_id(self) -> int | None:
        return getattr(self.job, "run_id", None)

    def __repr__(self) -> str:
        return f"<JobHandle {self.id} {self.title!r} {self.state.value}>"


class JobManager(QObject):
    """Queued runs, `parallel` at a time, each in a JobThread."""

    job_added = Signal(object)  # JobHandle
    job_changed = Signal(object)
    job_finished = Signal(object)

    def __init__(self, parallel: int = 1, parent: QObject | None = None, in_process: bool = True):
        super().__init__(parent)
        self.parallel = max(1, parallel)
        self.in_process = in_process
        self.handles: list[JobHandle] = []
        self._threads: dict[int, JobThread] = {}  # every started thread, until it has finished
        self._tasks: set[JobThread] = set()  # short background tasks outside the queue (validation)
        self._shutting_down = False

    # ---- queue ---------------------------------------------------------------------------------------------
    def submit(self, job: Any, on_done: Callable[[JobHandle], None] | None = None) -> JobHandle:
        if self._shutting_down:
            raise RuntimeError("the job manager is shutting down")
        handle = JobHandle(job, self)
        handle.on_done = on_done
        self.handles.append(handle)
        self.job_added.emit(handle)
        self._pump()
        return handle

    def active(self) -> list[JobHandle]:
        return [h for h in self.handles if not h.state.finished]

    def running(self) -> list[JobHandle]:
        return [h for h in self.handles if h.state is JobState.RUNNING]

    def cancel(self, handle: JobHandle) -> None:
        if handle.state is JobState.QUEUED:
            self._finish(handle, JobState.CANCELLED)
            self._pump()
        elif handle.state is JobState.RUNNING:
            # The thread notices at the job's next progress report and then reports 'cancelled'.
            handle.progress.cancel()
            handle.changed.emit()
            self.job_changed.emit(handle)

    def cancel_all(self) -> None:
        for h in list(self.handles):
            if h.state is JobState.QUEUED:
                self._finish(h, JobState.CANCELLED)
        for h in self.running():
            h.progress.cancel()

    def remove_finished(self) -> list[JobHandle]:
        gone = [h for h in self.handles if h.state.finished]
        self.handles = [h for h in self.handles if not h.state.finished]
        return gone

    def _pump(self) -> None:
        if self._shutting_down:
            return
        while len(self.running()) < self.parallel:
            nxt = next((h for h in self.handles if h.state is JobState.QUEUED), None)
            if nxt is None:
                return
            self._start(nxt)

    def _start(self, handle: JobHandle) -> None:
        thread = JobThread(handle.job, handle.progress, in_process=self.in_process)
        handle.thread = thread
        handle.state = JobState.RUNNING
        handle.started_at = time.monotonic()
        thread.progressed.connect(lambda info, h=handle: self._on_progress(h, info))
        thread.succeeded.connect(lambda result, h=handle: self._on_result(h, JobState.DONE, result=result))
        thread.failed.connect(lambda msg, h=handle: self._on_result(h, JobState.FAILED, error=msg))
        thread.cancelled.connect(lambda h=handle: self._on_result(h, JobState.CANCELLED))
        thread.finished.connect(lambda h=handle, t=thread: self._on_thread_finished(h, t))
        self._threads[handle.id] = thread
        handle.changed.emit()
        self.job_changed.emit(handle)
        thread.start()

    def _on_progress(self, handle: JobHandle, info: ProgressInfo) -> None:
        if handle.state is not JobState.RUNNING:
            return
        handle.info = info
        handle.changed.emit()
        self.job_changed.emit(handle)

    def _on_result(self, handle: JobHandle, state: JobState, *, result: Any = None, error: str | None = None) -> None:
        handle.result = result
        handle.error = error
        if handle.info is not None and state is JobState.DONE and handle.info.total:
            handle.info = ProgressInfo(handle.info.total, handle.info.total, handle.info.message,
                                       handle.info.elapsed, 0.0)
        self._finish(handle, state)

    def _finish(self, handle: JobHandle, state: JobState) -> None:
        handle.state = state
        handle.finished_at = time.monotonic()
        handle.changed.emit()
        self.job_changed.emit(handle)
        self.job_finished.emit(handle)
        if handle.on_done is not None:
            try:
                handle.on_done(handle)
            except Exception:  # a view's callback must not stop the queue
                log.exception("callback after job %s failed", handle.title)

    def _on_thread_finished(self, handle: JobHandle, thread: JobThread) -> None:
        self._threads.pop(handle.id, None)
        handle.thread = None
        # `finished` is emitted just before the thread ends: wait for it, then let the last reference go. (No
        # parent and no deleteLater: a QThread deleted with its parent while a deferred delete is pending crashes.)
        thread.wait()
        if not handle.state.finished:  # the thread ended without reporting (it should not happen)
            handle.error = "the run stopped without reporting a result"
            self._finish(handle, JobState.FAILED)
        self._pump()

    # ---- short background tasks ----------------------------------------------------------------------------
    def run_task(self, job: Any, on_success: Callable[[Any], None], on_error: Callable[[str], None]) -> JobThread:
        """Run a short job (validating a model or a dataset) at once, outside the queue, in its own thread."""
        thread = JobThread(job, in_process=self.in_process)
        self._tasks.add(thread)
        thread.succeeded.connect(on_success)
        thread.failed.connect(on_error)
        thread.cancelled.connect(lambda: on_error("cancelled"))

        def done(t: JobThread = thread) -> None:
            t.wait()
            self._tasks.discard(t)

        thread.finished.connect(done)
        thread.start()
        return thread

    # ---- closing -------------------------------------------------------------------------------------------
    def wait_all(self, timeout_s: float | None = None) -> bool:
        """Wait for every thread to end, letting queued signals through. True when all ended in time."""
        from PySide6.QtCore import QCoreApplication

        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while self._threads or self._tasks:
            for t in list(self._threads.values()) + list(self._tasks):
                t.wait(50)
            QCoreApplication.processEvents()
            if deadline is not None and time.monotonic() > deadline:
                return False
        return True

    def shutdown(self, timeout_s: float | None = 120.0) -> bool:
        """Cancel everything, wait for the threads and disconnect them. Cancelled runs stay resumable. A run in a
        process that does not reach its next progress report within `timeout_s` is ended; its run row is then
        found dead and marked interrupted when the project is next opened, and resumes like a cancelled one."""
        self.cancel_all()
        for t in list(self._tasks):
            t.progress.cancel()
        for t in list(self._threads.values()) + list(self._tasks):
            t.terminate_after = timeout_s
        self._shutting_down = True
        # threads end at most a few seconds after their process was ended at `timeout_s`
        ok = self.wait_all(None if timeout_s is None else timeout_s + 30)
        for t in list(self._threads.values()) + list(self._tasks):
            for sig in (t.progressed, t.succeeded, t.failed, t.cancelled):
                try:
                    sig.disconnect()
                except (RuntimeError, TypeError):
                    pass
        if not ok:
            log.warning("%d run(s) did not stop within %s s", len(self._threads), timeout_s)
        return ok


class CallJob:
    """A job around a plain function, for short background tasks (checking a model or a dataset). With a
    module-level function and picklable arguments it runs in a process like any run, else in a thread."""

    def __init__(self, title: str, fn: Callable[..., Any], *args: Any, **kwargs: Any):
        self.title = title
        self.fn = fn
        self.args = args
        self.kwargs = kwargs

    def execute(self, progress: JobProgress) -> Any:
        return self.fn(*self.args, **self.kwargs)


# ---- thread pool calls ---------------------------------------------------------------------------------------
class _Relay(QObject):
    done = Signal(object)


_pending: set[_Relay] = set()


class _Call(QRunnable):
    def __init__(self, fn: Callable[[], Any], relay: _Relay):
        super().__init__()
        self.fn = fn
        self.relay = relay

    def run(self) -> None:
        try:
            out = (True, self.fn())
        except BaseException as exc:
            if not isinstance(exc, UserError):
                log.exception("background call failed")
            out = (False, exc)
        try:
            self.relay.done.emit(out)
        except RuntimeError:  # the window went away meanwhile
            pass


_pool: QThreadPool | None = None


def pool() -> QThreadPool:
    """The window's pool for queries and thumbnails (not the global one, so closing can wait for exactly it)."""
    global _pool
    if _pool is None:
        _pool = QThreadPool()
        # Decoding and drawing thumbnails are mostly in PIL/numpy (they release the GIL); a few threads suffice.
        _pool.setMaxThreadCount(max(2, min(4, QThread.idealThreadCount())))
    return _pool


def call_in_pool(fn: Callable[[], Any], on_result: Callable[[Any], None],
                 on_error: Callable[[BaseException], None] | None = None, owner: QObject | None = None) -> None:
    """Run `fn` on the pool; `on_result(value)` or `on_error(exc)` run later in this (the window's) thread, and
    not at all if `owner` was deleted meanwhile."""
    relay = _Relay()
    _pending.add(relay)

    @Slot(object)
    def deliver(out: tuple[bool, Any]) -> None:
        _pending.discard(relay)
        relay.deleteLater()
        if owner is not None and not shiboken6.isValid(owner):
            return
        ok, value = out
        if ok:
            on_result(value)
        elif on_error is not None:
            on_error(value)

    relay.done.connect(deliver)
    pool().start(_Call(fn, relay))


def wait_pool(timeout_ms: int = 10000) -> bool:
    if _pool is None:
        return True
    _pool.clear()
    return _pool.waitForDone(timeout_ms)
