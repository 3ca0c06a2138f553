"""Errors a user can cause. Each carries the file, the problem and the fix; the CLI and the window show the
message, never a traceback (that goes to the log)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from labelers.errors import UserError


class NeuronStudioError(UserError):
    def __init__(self, problem: str, *, file: str | Path | None = None, fix: str | None = None):
        self.problem = problem
        self.file = str(file) if file is not None else None
        self.fix = fix
        super().__init__(self.message())

    def message(self) -> str:
        parts = []
        if self.file:
            parts.append(f"{self.file}: ")
        parts.append(self.problem.rstrip("."))
        parts.append(".")
        if self.fix:
            parts.append(f" {self.fix.rstrip('.')}.")
        return "".join(parts)


class ModelLoadError(NeuronStudioError):
    """A model spec, weights file or architecture that cannot be used."""


class DatasetError(NeuronStudioError):
    """A dataset folder or annotation file that cannot be read."""


class ProjectError(NeuronStudioError):
    """A project folder that is missing, locked, corrupt or from a newer version."""


class JobError(NeuronStudioError):
    """A job that cannot start or continue (e.g. its inputs changed since it began)."""


class DiskFullError(NeuronStudioError):
    """The disk (or quota) ran out of space while writing; nothing half-written is left behind."""

    needed: int | None = None  # bytes the write needed, where known


def format_bytes(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def disk_full(path: str | Path, needed: int | None = None) -> DiskFullError:
    """The message for ENOSPC (or EDQUOT) while writing `path`: where, how much, what to do."""
    import shutil

    free = None
    for folder in [Path(path), *Path(path).parents]:
        try:
            free = shutil.disk_usage(folder).free
            break
        except OSError:
            continue
    need = f"; {format_bytes(needed)} are needed" if needed else ""
    have = f" and {format_bytes(free)} are free" if free is not None else ""
    err = DiskFullError(f"the disk is full{need}{have}", file=path,
                        fix="free space on that disk (or choose a place with more room), then run the same command "
                            "again: it continues where it stopped")
    err.needed = needed
    return err


def json_problem(exc: Any, line: bool = True) -> str:
    """What a json.JSONDecodeError says, in words: "unterminated string starting at line 3, column 5" (its own
    message may end in "at", which must not be followed by another "at")."""
    msg = str(getattr(exc, "msg", exc)).strip()
    msg = msg[:1].lower() + msg[1:]
    if not line:
        return msg[:-3] + " at column " + str(exc.colno) if msg.endswith(" at") else f"{msg} (column {exc.colno})"
    where = f"line {exc.lineno}, column {exc.colno}"
    return f"{msg} {where}" if msg.endswith(" at") else f"{msg} at {where}"
