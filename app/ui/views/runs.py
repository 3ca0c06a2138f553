"""The project's whole run history as one filterable list: every extraction, labeling, export and naming run with
its kind, method, layer, status and duration (the session's live jobs stay in the jobs panel beside it)."""
from __future__ import annotations

import datetime as _dt
from collections.abc import Sequence
from typing import Any

from PySide6.QtCore import Qt
from PySide6.QtGui import QColor
from PySide6.QtWidgets import (
    QAbstractItemView, QComboBox, QHBoxLayout, QHeaderView, QLabel, QTableWidget, QTableWidgetItem, QVBoxLayout,
    QWidget,
)

from app.ui.theme import STATE_COLORS

# What a person means by each filter, in the store's run states.
FILTERS = (
    ("all runs", None),
    ("running", ("queued", "running")),
    ("finished", ("done",)),
    ("failed", ("failed",)),
    ("stopped", ("cancelled", "interrupted")),
)
COLUMNS = ("run", "kind", "method", "layer", "status", "started", "duration", "progress", "message")


def format_duration(seconds: float | None) -> str:
    if seconds is None or seconds <= 0:
        return ""
    s = int(round(seconds))
    if s < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def run_duration(run: Any, now: _dt.datetime | None = None) -> float | None:
    """Seconds the run has worked: its recorded total, or for one still running, the time since it started."""
    if run.seconds:
        return float(run.seconds)
    if run.status == "running" and run.started_at:
        try:
            started = _dt.datetime.fromisoformat(run.started_at)
        except ValueError:
            return None
        now = now or _dt.datetime.now(started.tzinfo)
        return (now - started).total_seconds()
    return None


class RunHistory(QWidget):
    """All runs of the project, newest first, filtered by state."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.runs: list[Any] = []
        self.layer_names: dict[int, str] = {}
        self.filter = QComboBox()
        for text, _states in FILTERS:
            self.filter.addItem(text)
        self.filter.currentIndexChanged.connect(lambda _i: self._fill())
        self.count = QLabel()
        self.count.setStyleSheet("color: gray;")
        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(list(COLUMNS))
        self.table.verticalHeader().setVisible(False)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setWordWrap(False)
        self.table.setAlternatingRowColors(True)
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        header.setStretchLastSection(True)
        head = QHBoxLayout()
        head.addWidget(QLabel("Show"))
        head.addWidget(self.filter)
        head.addWidget(self.count, 1)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(6, 6, 6, 6)
        lay.addLayout(head)
        lay.addWidget(self.table, 1)

    def set_runs(self, runs: Sequence[Any], layer_names: dict[int, str]) -> None:
        self.runs = sorted(runs, key=lambda r: -r.id)
        self.layer_names = dict(layer_names)
        self._fill()

    def set_filter(self, name: str) -> None:
        self.filter.setCurrentIndex(next(i for i, (t, _s) in enumerate(FILTERS) if t == name))

    def shown(self) -> list[Any]:
        states = FILTERS[self.filter.currentIndex()][1]
        return [r for r in self.runs if states is None or r.status in states]

    def _fill(self) -> None:
        runs = self.shown()
        self.table.setRowCount(len(runs))
        for row, r in enumerate(runs):
            values = [str(r.id), r.kind, r.method or "", self.layer_names.get(r.layer_id, "") if r.layer_id else "",
                      r.status, (r.started_at or r.created_at or "")[:16].replace("T", " "),
                      format_duration(run_duration(r)), f"{r.done} / {r.total}" if r.total else "",
                      (r.error or r.message or "").splitlines()[0] if (r.error or r.message) else ""]
            for col, v in enumerate(values):
                item = QTableWidgetItem(v)
                if col == 4 and STATE_COLORS.get(r.status):
                    item.setForeground(QColor(STATE_COLORS[r.status]))
                if col in (0, 6, 7):
                    item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
                if col == 8 and (r.error or r.message):
                    item.setToolTip(r.error or r.message)
                self.table.setItem(row, col, item)
        total = len(self.runs)
        self.count.setText(f"{len(runs)} of {total} runs" if total else "This project has no runs yet.")
