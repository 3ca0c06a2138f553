"""Errors a user can cause. Each carries the file, the problem and the fix; the CLI and the window show the
message, never a traceback (that goes to the log)."""
from __future__ import annotations

from pathlib import Path

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
