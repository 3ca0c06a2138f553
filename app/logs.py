"""Logging set-up, one home for the CLI and the window's run processes: everything goes to one log file in the
user's log folder (tracebacks included); what the user sees is the short message of the error."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def log_file() -> Path:
    from platformdirs import user_log_dir

    d = Path(user_log_dir("neuron-studio", appauthor=False))
    d.mkdir(parents=True, exist_ok=True)
    return d / "neuron-studio.log"


def setup_logging(verbose: bool) -> None:
    """The CLI's and the window's process: the log file gets INFO (DEBUG with `verbose`), the console warnings."""
    handlers: list[logging.Handler] = []
    try:
        handlers.append(logging.FileHandler(log_file(), encoding="utf-8"))
    except OSError:
        pass
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.DEBUG if verbose else logging.WARNING)
    console.addFilter(_console_filter(verbose))
    handlers.append(console)
    logging.captureWarnings(True)  # PIL's and torch's warnings go to the log like everything else
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=handlers, format=FORMAT, force=True)


def _console_filter(verbose: bool):
    """Tracebacks (records marked console=False) stay in the log file; so do library warnings unless -v."""
    def keep(record: logging.LogRecord) -> bool:
        if not getattr(record, "console", True):
            return False
        return verbose or record.name != "py.warnings"

    return keep


def setup_child_logging() -> None:
    """A run's child process: the same file, each line tagged with the run's process id."""
    handlers: list[logging.Handler] = []
    try:
        handlers.append(logging.FileHandler(log_file(), encoding="utf-8"))
    except OSError:
        handlers.append(logging.StreamHandler(sys.stderr))
    logging.basicConfig(level=logging.INFO, handlers=handlers, force=True,
                        format=f"%(asctime)s %(levelname)s run[{os.getpid()}] %(name)s: %(message)s")
    logging.captureWarnings(True)  # PIL's and torch's warnings into the log, not onto the window's terminal
