"""The child side of a run: a job executed in its own process, reporting to the window through a pipe.

Why a process and not only a thread: a thread shares the GIL with the window, and some of a run's work holds it
for long stretches (json.load of a COCO annotation file holds it for the whole parse: about 45 ms per MB here,
15-20 s for COCO 2017 train), which froze the event loop for as long. In a process, nothing a run does can pause
the window. This module imports no Qt, so that the child starts light.

Messages, child to window: ("progress", ProgressInfo, run_id), then exactly one of ("done", result, run_id),
("failed", message, run_id), ("cancelled", None, run_id).
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import pickle
import threading
from typing import Any

from app.logs import log_file, setup_child_logging
from labelers.base import Cancelled
from labelers.errors import UserError

log = logging.getLogger(__name__)

# What a child needs, imported once by the fork server so that each run starts in a fraction of a second.
PRELOAD = [
    "app.ui.jobproc", "torch", "torchvision.transforms.v2", "PIL.Image", "pycocotools.mask", "app.workspace",
    "app.engine.extract", "app.engine.labeling", "app.sources.datasets", "app.sources.models",
    "app.sources.preprocess", "labelers.netdissect", "labelers.compexp", "labelers.invert", "labelers.textsum",
]

_context: Any = None


def job_context() -> Any:
    """The multiprocessing context for runs: a fork server where there is one (a fresh, small process forks
    each child; the window's own process, with Qt and its threads, is never forked), spawn elsewhere."""
    global _context
    if _context is None:
        if "forkserver" in mp.get_all_start_methods():
            _context = mp.get_context("forkserver")
            _context.set_forkserver_preload(PRELOAD)
        else:
            _context = mp.get_context("spawn")
    return _context


def warm_up() -> None:
    """Start the fork server (and its imports) ahead of the first run."""
    ctx = job_context()
    if ctx.get_start_method() == "forkserver":
        from multiprocessing import forkserver

        forkserver.ensure_running()


def readable_error(exc: BaseException) -> str:
    """What the window shows for an exception: the message of errors a user can cause, a short line otherwise."""
    if isinstance(exc, UserError):
        return str(exc)
    from app.failures import as_user_error

    known = as_user_error(exc)  # a refused permission, a full disk, a crashed decoding process: said plainly
    if known is not None:
        return str(known)
    try:
        where = f" (details in {log_file()})"
    except OSError:
        where = ""
    return f"unexpected {type(exc).__name__}: {exc}{where}"


def picklable(value: Any) -> bool:
    try:
        pickle.dumps(value)
    except Exception:
        return False
    return True


def child_main(job: Any, out: Any, stop: Any) -> None:
    """Entry point of a run's process: `out` carries its messages to the window, `stop` a request to cancel (or
    an EOF when the window's side closed it or died)."""
    from app.jobs import JobProgress

    # No lower CPU priority (nice) here: measured, it doubled runs' time on a shared machine and gained the window
    # little once the run was out of its process.
    setup_child_logging()
    progress = JobProgress()
    run_id = lambda: getattr(job, "run_id", None)  # noqa: E731
    sending = threading.Lock()  # progress may be reported from several of the job's threads

    def send(message: tuple[Any, ...]) -> None:
        with sending:
            out.send(message)

    progress.listeners.append(lambda info: send(("progress", info, run_id())))

    def watch() -> None:
        try:
            stop.poll(None)
        except (EOFError, OSError):
            pass
        if not progress.cancelled:
            log.info("run %s: cancel requested (or the window is gone)", job.title)
        progress.cancel()

    threading.Thread(target=watch, name="cancel-watch", daemon=True).start()
    log.info("run %s started in process %d", job.title, os.getpid())
    try:
        result = job.execute(progress)
    except Cancelled:
        final: tuple[Any, ...] = ("cancelled", None, run_id())
    except UserError as exc:
        log.info("run %s failed: %s", job.title, exc, exc_info=True)
        final = ("failed", readable_error(exc), run_id())
    except BaseException as exc:  # the window must hear of it, whatever went wrong
        log.exception("run %s failed unexpectedly", job.title)
        final = ("failed", readable_error(exc), run_id())
    else:
        if not picklable(result):
            log.warning("the result of %s cannot be sent to the window; sending its text", job.title)
            result = repr(result)
        final = ("done", result, run_id())
    try:
        send(final)
    except OSError:
        log.warning("run %s ended (%s) but the window is gone", job.title, final[0])
    finally:
        out.close()
