"""The QThread bridge: runs in child processes (threads for jobs that cannot be pickled), progress with ETA,
results, readable errors, cancelling running and queued runs, and a shutdown that leaves nothing running."""
from __future__ import annotations

import os
import threading
import time

import pytest

from app.errors import DatasetError
from app.ui.workers import CallJob, JobManager, JobState, call_in_pool

pytestmark = pytest.mark.qt


class CountJob:
    def __init__(self, steps: int, delay: float = 0.002, fail: BaseException | None = None):
        self.title = f"count to {steps}"
        self.steps = steps
        self.delay = delay
        self.fail = fail
        self.thread_name = ""

    def execute(self, progress):
        for i in range(1, self.steps + 1):
            time.sleep(self.delay)
            progress.update(i, self.steps, "counting")
            if self.fail is not None and i == self.steps // 2:
                raise self.fail
        return {"value": self.steps * 2, "pid": os.getpid(), "thread": threading.current_thread().name}


class DyingJob:
    title = "dies"

    def execute(self, progress):
        progress.update(1, 2, "about to die")
        os._exit(3)


class DeafJob:
    """Never reports progress, so it never notices a cancel."""

    title = "deaf"

    def execute(self, progress):
        time.sleep(600)


def test_progress_eta_and_result(qtbot):
    m = JobManager()
    etas = []
    m.job_changed.connect(lambda h: etas.append(h.eta_text) if h.state is JobState.RUNNING else None)
    h = m.submit(CountJob(150))
    qtbot.waitUntil(lambda: h.state.finished, timeout=30000)
    assert h.state is JobState.DONE and h.result["value"] == 300 and h.error is None
    assert h.result["pid"] != os.getpid()  # it ran in a child process
    assert h.info.done == h.info.total == 150 and h.fraction == 1.0
    assert any(e.endswith("left") for e in etas)  # an ETA was shown while it ran
    qtbot.waitUntil(lambda: m._threads == {})


def test_jobs_that_cannot_be_pickled_run_in_a_thread(qtbot):
    m = JobManager(in_process=True)
    job = CountJob(20)
    job.unpicklable = lambda: None
    h = m.submit(job)
    qtbot.waitUntil(lambda: h.state.finished, timeout=30000)
    assert h.state is JobState.DONE
    assert h.result["pid"] == os.getpid() and h.result["thread"] != threading.current_thread().name


def test_a_process_that_dies_is_reported(qtbot):
    m = JobManager()
    h = m.submit(DyingJob())
    qtbot.waitUntil(lambda: h.state.finished, timeout=30000)
    assert h.state is JobState.FAILED and "ended unexpectedly (exit code 3)" in h.error


def test_shutdown_ends_a_run_that_does_not_notice_the_cancel(qtbot):
    m = JobManager()
    h = m.submit(DeafJob())
    qtbot.waitUntil(lambda: h.thread is not None and h.thread.process is not None, timeout=30000)
    proc = h.thread.process
    t0 = time.monotonic()
    assert m.shutdown(timeout_s=1.0)
    assert time.monotonic() - t0 < 20
    assert h.state is JobState.CANCELLED and not proc.is_alive()


def test_queue_runs_one_at_a_time_and_cancels_queued_and_running(qtbot):
    m = JobManager(parallel=1)
    first = m.submit(CountJob(100000, delay=0.001))
    second = m.submit(CountJob(10))
    assert first.state is JobState.RUNNING and second.state is JobState.QUEUED
    m.cancel(second)
    assert second.state is JobState.CANCELLED and second.started_at is None
    qtbot.waitUntil(lambda: first.info is not None, timeout=10000)
    m.cancel(first)
    qtbot.waitUntil(lambda: first.state.finished, timeout=10000)
    assert first.state is JobState.CANCELLED
    assert first.info.done < first.info.total
    qtbot.waitUntil(lambda: m._threads == {})
    third = m.submit(CountJob(5))
    qtbot.waitUntil(lambda: third.state.finished, timeout=10000)
    assert third.state is JobState.DONE


def test_errors_are_messages_not_tracebacks(qtbot):
    m = JobManager(parallel=2)
    a = m.submit(CountJob(20, fail=DatasetError("the image is corrupt", file="/d/x.png", fix="replace it")))
    b = m.submit(CountJob(20, fail=ValueError("bad value")))
    qtbot.waitUntil(lambda: a.state.finished and b.state.finished, timeout=10000)
    assert a.state is JobState.FAILED and a.error == "/d/x.png: the image is corrupt. replace it."
    assert b.state is JobState.FAILED and b.error.startswith("unexpected ValueError: bad value")
    assert "Traceback" not in b.error


def test_shutdown_cancels_waits_and_refuses_new_runs(qtbot):
    m = JobManager()
    h = m.submit(CountJob(10**6, delay=0.001))
    q = m.submit(CountJob(3))
    qtbot.waitUntil(lambda: h.info is not None, timeout=10000)
    thread = h.thread
    assert m.shutdown(timeout_s=30)
    assert h.state is JobState.CANCELLED and q.state is JobState.CANCELLED
    assert not thread.isRunning()
    with pytest.raises(RuntimeError):
        m.submit(CountJob(1))


def test_tasks_run_outside_the_queue(qtbot):
    m = JobManager(parallel=1)
    m.submit(CountJob(10**6, delay=0.001))
    got = []
    m.run_task(CallJob("quick", lambda: 42), got.append, got.append)
    qtbot.waitUntil(lambda: got == [42], timeout=10000)
    m.shutdown(30)


def test_call_in_pool_returns_to_the_window_thread(qtbot):
    from PySide6.QtWidgets import QWidget

    main = threading.current_thread().name
    seen = []
    call_in_pool(lambda: threading.current_thread().name, lambda v: seen.append((v, threading.current_thread().name)))
    qtbot.waitUntil(lambda: len(seen) == 1)
    assert seen[0][0] != main and seen[0][1] == main
    errors = []
    call_in_pool(lambda: 1 / 0, seen.append, errors.append)
    qtbot.waitUntil(lambda: len(errors) == 1)
    assert isinstance(errors[0], ZeroDivisionError)
    owner = QWidget()
    late = []
    call_in_pool(lambda: time.sleep(0.2) or 1, late.append, owner=owner)
    owner.deleteLater()
    qtbot.wait(600)
    assert late == []  # the owner went away: its callback is not called


def test_a_run_cancels_itself_when_the_window_side_goes_away(monkeypatch):
    """The child's end of the stop pipe reads EOF when the window's process closes its end or dies: the run is
    cancelled at its next progress report, and says so on its way out."""
    import multiprocessing as mp

    from app.ui import jobproc

    monkeypatch.setattr(jobproc, "setup_child_logging", lambda: None)  # a child's logging, not this process's
    child_main = jobproc.child_main
    messages, child_out = mp.Pipe(duplex=False)
    child_stop, stop = mp.Pipe(duplex=False)
    job = CountJob(100_000, delay=0.001)
    child = threading.Thread(target=child_main, args=(job, child_out, child_stop))
    child.start()
    assert messages.poll(30) and messages.recv()[0] == "progress"
    stop.close()
    seen = []
    while True:
        msg = messages.recv()
        seen.append(msg[0])
        if msg[0] != "progress":
            break
    child.join(30)
    assert seen[-1] == "cancelled" and not child.is_alive()
    with pytest.raises(EOFError):
        messages.recv()  # the child closed its end: nothing can block on a half-sent message
