"""One process per job: a job takes its run atomically before computing (`Project.claim_run`); a second process
asking for the same job waits for the first and takes its result, instead of computing it again."""
from __future__ import annotations

import logging
import time
from typing import Any

from app.jobs import JobProgress
from app.project.store import Project, RunInfo, pid_alive

log = logging.getLogger(__name__)

POLL_SECONDS = 0.25


def claim_or_wait(project: Project, progress: JobProgress | Any, **run: Any) -> tuple[int, RunInfo | None]:
    """(run id, None): this process owns the run and computes it. (run id, finished run): another process
    computed it while this one waited. A run that the other process left unfinished (failed, cancelled, killed)
    is taken over and computed here."""
    while True:
        run_id, other = project.claim_run(**run)
        if other is None:
            return run_id, None
        log.info("run %d (%s) is being computed by process %d: waiting for it", run_id, run["kind"], other)
        waited = time.monotonic()
        while True:
            if hasattr(progress, "check"):
                progress.check()
            if hasattr(progress, "update"):
                progress.update(0, 0, f"waiting for process {other}, which computes the same job "
                                      f"({time.monotonic() - waited:.0f} s)")
            info = project.run(run_id)
            if info.status == "done":
                return run_id, info
            if info.status not in ("running", "queued") or not pid_alive(other):
                break  # it stopped without finishing: claim again (this process may take it over)
            time.sleep(POLL_SECONDS)
