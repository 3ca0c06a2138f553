"""What to tell a user about an exception that is not one of the project's own errors (a permission refused, a
full disk, a damaged safetensors file, a crashed image-decoding process, a bug): one message with the path, the
problem and what to do. The traceback is for the log file, not for the user."""
from __future__ import annotations

import errno
import re
import signal
from pathlib import Path

from app.errors import NeuronStudioError, disk_full

_PATH_NAMES = ("path", "filename", "file", "fname", "target", "tmp", "folder", "root")
_WORKER = re.compile(r"DataLoader worker \(pid(?:\(s\))? ([\d, ]+)\) (?:is killed by signal: ([^.\n]+)|exited unexpectedly"
                     r"(?: with exit code (-?\d+))?)")


def _path_in_traceback(exc: BaseException) -> str | None:
    """The innermost file path the failing code was working on (a local named path, filename, ...)."""
    found = None
    tb = exc.__traceback__
    while tb is not None:
        local = tb.tb_frame.f_locals
        for name in _PATH_NAMES:
            value = local.get(name)
            if isinstance(value, (str, Path)) and str(value).startswith(("/", "~", ".")) and len(str(value)) < 1000:
                found = str(value)
                break
        tb = tb.tb_next
    return found


def as_user_error(exc: BaseException) -> NeuronStudioError | None:
    """The project's own error for an exception a user can act on, or None for what only a bug report can fix."""
    if isinstance(exc, OSError) and exc.errno is not None:
        where = exc.filename or _path_in_traceback(exc)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return disk_full(where or Path.cwd())
        if exc.errno in (errno.EACCES, errno.EPERM):
            return NeuronStudioError("permission denied", file=where,
                                     fix="give your user access to it, or choose a place you can write to")
        if exc.errno == errno.EROFS:
            return NeuronStudioError("the file system is read-only", file=where,
                                     fix="choose a place on a writable disk")
        if exc.errno == errno.ENOENT:
            return NeuronStudioError("the file or folder is missing", file=where,
                                     fix="check the path, or put the file back")
    if type(exc).__name__ == "SafetensorError":
        return NeuronStudioError(f"a safetensors file cannot be read, it is truncated or damaged ({exc})",
                                 file=_path_in_traceback(exc),
                                 fix="replace the file (for a model, save its weights again; for a run's "
                                     "checkpoint in the project, delete it and run the job again)")
    if isinstance(exc, RuntimeError):
        m = _WORKER.search(str(exc))
        if m:
            how = m.group(2) or (f"exit code {m.group(3)}" if m.group(3) else "it exited unexpectedly")
            if m.group(3) and m.group(3).lstrip("-").isdigit() and int(m.group(3)) < 0:
                try:
                    how = signal.Signals(-int(m.group(3))).name
                except ValueError:
                    pass
            return NeuronStudioError(
                f"an image decoding process (pid {m.group(1).strip()}) stopped: {how}; usually the machine ran out "
                "of memory, or an image crashed its decoder",
                fix="run the same command again (it resumes); if it stops again, use --workers 0 (the message then "
                    "names the image) or a smaller --batch-size")
    if isinstance(exc, MemoryError):
        return NeuronStudioError("the machine ran out of memory",
                                 fix="close other programs, or use a smaller --batch-size or fewer layers at once, "
                                     "then run the same command again (it resumes)")
    return None


def explain(exc: BaseException, log_file: str | Path | None) -> str:
    """One line for the user: the project's own message where the cause is known, else the error and where the
    details are."""
    details = f" (details in {log_file})" if log_file else ""
    user = as_user_error(exc)
    if user is not None:
        return f"{user}{details}"
    return (f"unexpected {type(exc).__name__}: {exc}. This is a bug in Neuron Studio: please report it with the "
            f"log file{details}")
