"""The jobs panel: every run with its progress bar, ETA, cancel button, and its error or report when done; below,
the runs that stopped before finishing (cancelled, failed, interrupted), each with a Resume button."""
from __future__ import annotations

import dataclasses
import logging
from typing import Any

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QFrame,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QSizePolicy,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from app.jobs import format_seconds
from app.ui.theme import STATE_COLORS, icon
from app.ui.workers import JobHandle, JobManager, JobState

log = logging.getLogger(__name__)


def describe_result(result: Any, problems: bool = False) -> str:
    """One line about a finished run, from its report; with `problems`, then one line per problem of the run."""
    if result is None:
        return "done"
    name = type(result).__name__
    if name == "ExtractReport":
        from app.engine.summary import report_problems, report_summary

        lines = report_problems(result) if problems else []
        return "\n".join([report_summary(result), *lines])
    if name == "LabelReport":
        return f"{result.labels} labels for {result.units} units in {format_seconds(result.seconds)}"
    if name == "DemoSummary":
        return "; ".join(f"{s.name}: {s.outcome} in {format_seconds(s.seconds)}" for s in result.steps) or "done"
    if dataclasses.is_dataclass(result):
        fields = [f"{f.name}: {getattr(result, f.name)}" for f in dataclasses.fields(result)
                  if isinstance(getattr(result, f.name), (int, float, str))]
        return ", ".join(fields[:5]) or "done"
    text = str(result)
    return text if len(text) < 200 else text[:197] + "..."


class JobRow(QFrame):
    """One run. Reads its JobHandle whenever the handle changes."""

    def __init__(self, handle: JobHandle, manager: JobManager, parent: QWidget | None = None):
        super().__init__(parent)
        self.handle = handle
        self.manager = manager
        self.setFrameShape(QFrame.Shape.StyledPanel)
        self.state_icon = QLabel()
        self._shown_state = ""
        self.title = QLabel(handle.title)
        self.title.setStyleSheet("font-weight: 600;")
        self.title.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.status = QLabel()
        # The stage line: "step 5 of 29: compexp on block3", with the stage's own clock; the bar and its ETA below
        # are the stage's, so neither lies about a job whose stages differ in length.
        self.stage = QLabel()
        self.stage.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.stage.setVisible(False)
        self.bar = QProgressBar()
        self.bar.setRange(0, 1000)
        self.bar.setTextVisible(True)
        self.bar.setMinimumWidth(160)
        self.eta = QLabel()
        self.eta.setMinimumWidth(90)
        self.cancel_button = QToolButton()
        self.cancel_button.setIcon(icon("cancel"))
        self.cancel_button.setToolTip("Cancel this run (it can be resumed later)")
        self.cancel_button.setFixedSize(26, 26)  # never painted at zero size before the row is laid out
        self.cancel_button.clicked.connect(lambda: self.manager.cancel(self.handle))
        self.detail = QLabel()
        self.detail.setWordWrap(True)
        self.detail.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.detail.setVisible(False)

        top = QHBoxLayout()
        top.addWidget(self.state_icon)
        top.addWidget(self.title, 1)
        top.addWidget(self.status)
        mid = QHBoxLayout()
        mid.addWidget(self.bar, 1)
        mid.addWidget(self.eta)
        mid.addWidget(self.cancel_button)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(8, 6, 8, 6)
        lay.setSpacing(3)
        lay.addLayout(top)
        lay.addWidget(self.stage)
        lay.addLayout(mid)
        lay.addWidget(self.detail)
        handle.changed.connect(self.refresh)
        self.refresh()

    def refresh(self) -> None:
        h = self.handle
        state = h.state.value
        if state != self._shown_state:  # drawing the icon costs more than the rest of a refresh
            self._shown_state = state
            self.state_icon.setPixmap(icon(state, STATE_COLORS.get(state)).pixmap(16, 16))
        message = h.info.message if h.info and h.info.message else ""
        if h.state is JobState.RUNNING and h.progress.cancelled:
            text = "cancelling..."
        elif h.state is JobState.RUNNING:
            text = message or "starting: loading the model and data"
        else:
            text = state
        heading = h.info.heading if h.info else ""
        if text == heading or (h.info is not None and text == h.info.stage):
            text = "running"  # the stage line below already says it
        self.status.setText(text)
        self.status.setStyleSheet(f"color: {STATE_COLORS.get(state, '')};")
        if h.state is JobState.RUNNING and heading:
            self.stage.setText(f"{heading}  ({format_seconds(h.info.stage_elapsed)} in this stage)")
            self.stage.setVisible(True)
        else:
            self.stage.setVisible(False)
        if h.state is JobState.QUEUED:
            self.bar.setValue(0)
            self.bar.setFormat("queued")
        elif h.info is None and h.state is JobState.RUNNING:
            self.bar.setRange(0, 0)  # busy until the first report
        else:
            self.bar.setRange(0, 1000)
            self.bar.setValue(int(round(1000 * (1.0 if h.state is JobState.DONE else h.fraction))))
            if h.info is not None and h.info.total:
                self.bar.setFormat(f"{h.info.done} / {h.info.total}  (%p%)")
            else:
                self.bar.setFormat("%p%")
        if h.state is JobState.RUNNING:
            self.eta.setText(h.eta_text or "estimating...")
        elif h.state.finished and h.started_at is not None:
            self.eta.setText(format_seconds(h.elapsed))
        else:
            self.eta.setText("")
        self.cancel_button.setVisible(not h.state.finished)
        self.cancel_button.setEnabled(not h.progress.cancelled)
        if h.state is JobState.FAILED:
            self.detail.setText(h.error or "failed")
            self.detail.setStyleSheet(f"color: {STATE_COLORS['failed']};")
            self.detail.setVisible(True)
        elif h.state is JobState.DONE:
            self.detail.setText(describe_result(h.result, problems=True))
            self.detail.setStyleSheet("")
            self.detail.setVisible(True)
        elif h.state is JobState.CANCELLED:
            self.detail.setText("cancelled; resume it from the list of stopped runs")
            self.detail.setStyleSheet("")
            self.detail.setVisible(True)
        else:
            self.detail.setVisible(False)


class ResumableRow(QFrame):
    def __init__(self, run: Any, on_resume: Any, parent: QWidget | None = None, layer: str = ""):
        super().__init__(parent)
        self.run = run
        self.setFrameShape(QFrame.Shape.StyledPanel)
        what = f"{run.kind} run {run.id}"
        if run.method:
            what += f" ({run.method})"
        if layer:
            what += f" on {layer}"
        progress = f"{run.done} / {run.total}" if run.total else ""
        self.label = QLabel(f"<b>{what}</b> &nbsp; <span style='color:{STATE_COLORS.get(run.status, '')}'>"
                            f"{run.status}</span> &nbsp; {progress}")
        self.label.setToolTip(run.error or run.message or "")
        self.resume_button = QPushButton(icon("resume"), "Resume")
        self.resume_button.clicked.connect(lambda: on_resume(run))
        lay = QHBoxLayout(self)
        lay.setContentsMargins(8, 4, 8, 4)
        lay.addWidget(self.label, 1)
        lay.addWidget(self.resume_button)


class JobsPanel(QWidget):
    """All runs of this session, newest last, and the stopped runs of the project."""

    resume_requested = Signal(object)  # RunInfo

    def __init__(self, manager: JobManager, parent: QWidget | None = None):
        super().__init__(parent)
        self.manager = manager
        self.rows: dict[int, JobRow] = {}
        self.resumable_rows: list[ResumableRow] = []
        self.summary = QLabel("No runs yet")
        self.clear_button = QPushButton(icon("clear"), "Clear finished")
        self.clear_button.clicked.connect(self.clear_finished)
        head = QHBoxLayout()
        head.addWidget(self.summary, 1)
        head.addWidget(self.clear_button)

        self._list = QWidget()
        self._list_layout = QVBoxLayout(self._list)
        self._list_layout.setContentsMargins(0, 0, 0, 0)
        self._list_layout.setSpacing(4)
        self._resumable_title = QLabel("Stopped runs (resume continues from the last checkpoint)")
        self._resumable_title.setStyleSheet("font-weight: 600; margin-top: 6px;")
        self._resumable_title.setVisible(False)
        self._resumable_box = QVBoxLayout()
        self._resumable_box.setSpacing(4)
        self._list_layout.addLayout(self._resumable_box)
        self._list_layout.insertWidget(0, self._resumable_title)
        self._list_layout.addStretch(1)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(QFrame.Shape.NoFrame)
        scroll.setWidget(self._list)
        scroll.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(6, 6, 6, 6)
        lay.addLayout(head)
        lay.addWidget(scroll, 1)
        manager.job_added.connect(self._add)
        manager.job_changed.connect(lambda _h: self._update_summary())
        for h in manager.handles:
            self._add(h)

    def _add(self, handle: JobHandle) -> None:
        row = JobRow(handle, self.manager, self._list)
        self.rows[handle.id] = row
        # Runs go above the stopped-runs section, in submission order.
        self._list_layout.insertWidget(len(self.rows) - 1, row)
        self._update_summary()

    def _update_summary(self) -> None:
        hs = self.manager.handles
        counts = {s: sum(1 for h in hs if h.state is s) for s in JobState}
        parts = [f"{counts[s]} {s.value}" for s in JobState if counts[s]]
        self.summary.setText(", ".join(parts) if parts else "No runs yet")

    def clear_finished(self) -> None:
        for h in self.manager.remove_finished():
            row = self.rows.pop(h.id, None)
            if row is not None:
                row.setParent(None)
                row.deleteLater()
        self._update_summary()

    def set_resumable(self, runs: list[Any], layer_names: dict[int, str] | None = None) -> None:
        for row in self.resumable_rows:
            row.setParent(None)
            row.deleteLater()
        self.resumable_rows = []
        for run in runs:
            row = ResumableRow(run, self.resume_requested.emit, self._list,
                               (layer_names or {}).get(run.layer_id, "") if run.layer_id else "")
            self._resumable_box.addWidget(row)
            self.resumable_rows.append(row)
        self._resumable_title.setVisible(bool(runs))
        # keep the section below the runs
        idx = self._list_layout.indexOf(self._resumable_title)
        if idx != len(self.rows):
            self._list_layout.removeWidget(self._resumable_title)
            self._list_layout.insertWidget(len(self.rows), self._resumable_title)
