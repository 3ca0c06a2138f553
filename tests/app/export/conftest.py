from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from app.export.base import ExportJob
from labelers.base import Cancelled, NullProgress
from tests.app.export.helpers import build_project


@pytest.fixture
def study(tmp_path: Path) -> dict[str, Any]:
    """A project with extraction, labels, annotations and naming groups."""
    return build_project(tmp_path)


@pytest.fixture
def fresh(tmp_path: Path, study: dict[str, Any]):
    """A factory of fresh projects with the same model, dataset (same image files) and extraction, no content."""
    made = []

    def make(name: str = "fresh.nstudio") -> dict[str, Any]:
        info = build_project(tmp_path, name, content=False, images=study["images"])
        made.append(info)
        return info

    return make


def export(project: Path, fmt: str, out: Path, progress: Any = None, **options: Any) -> Any:
    return ExportJob(project, fmt, out, options).execute(progress or NullProgress())


class CountingProgress:
    """Counts update calls; with `cancel_at`, raises Cancelled on that call (1-based), like a user pressing Stop."""

    def __init__(self, cancel_at: int | None = None):
        self.calls = 0
        self.cancel_at = cancel_at

    def update(self, done: int, total: int, message: str = "") -> None:
        self.calls += 1
        if self.cancel_at is not None and self.calls >= self.cancel_at:
            raise Cancelled()
