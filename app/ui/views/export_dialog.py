"""File > Export: every format the CLI's `export` knows, with its options as a form, run as a job (the same
`ExportJob` the CLI runs, so what the window writes is what `neuron-studio export` writes)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from PySide6.QtCore import Qt
from PySide6.QtWidgets import (
    QDialog, QDialogButtonBox, QFormLayout, QLabel, QListWidget, QListWidgetItem, QSplitter, QStackedWidget,
    QVBoxLayout, QWidget,
)

from app.ui.views.params import ParamForm, PathField


class FormatPage(QWidget):
    def __init__(self, exp: Any, folder: Path, parent: QWidget | None = None):
        super().__init__(parent)
        self.exp = exp
        title = QLabel(f"<b>{exp.title}</b> <span style='color:gray'>({exp.name}, writes a "
                       f"{'folder' if exp.target == 'folder' else exp.suffix or 'file'})</span>")
        about = QLabel(exp.description)
        about.setWordWrap(True)
        about.setStyleSheet("color: gray;")
        self.form = ParamForm(exp.params)
        default = folder / (f"{exp.name}{exp.suffix}" if exp.target == "file" else exp.name)
        self.output = PathField(exp.target == "folder", f"Export {exp.title} to", f"*{exp.suffix}" if exp.suffix
                                else "")
        self.output.setText(str(default))
        out = QFormLayout()
        out.addRow("Write to", self.output)
        lay = QVBoxLayout(self)
        lay.addWidget(title)
        lay.addWidget(about)
        lay.addLayout(out)
        if exp.params:
            lay.addWidget(QLabel("Options"))
            lay.addWidget(self.form)
        lay.addStretch(1)


class ExportDialog(QDialog):
    """Choose a format, its options and where to write; `request()` gives (format, path, options)."""

    def __init__(self, folder: Path, parent: QWidget | None = None):
        super().__init__(parent)
        from app.export.base import list_formats

        self.setWindowTitle("Export")
        self.resize(820, 520)
        self.formats = list_formats()
        self.list = QListWidget()
        self.pages = QStackedWidget()
        self.page_of: dict[str, FormatPage] = {}
        for exp in self.formats:
            item = QListWidgetItem(exp.title)
            item.setData(Qt.ItemDataRole.UserRole, exp.name)
            item.setToolTip(exp.description)
            self.list.addItem(item)
            page = FormatPage(exp, folder)
            self.pages.addWidget(page)
            self.page_of[exp.name] = page
        self.list.currentRowChanged.connect(self.pages.setCurrentIndex)
        self.list.currentRowChanged.connect(lambda _r: self.error.clear())
        split = QSplitter()
        split.addWidget(self.list)
        split.addWidget(self.pages)
        split.setStretchFactor(1, 1)
        split.setSizes([240, 560])
        self.error = QLabel()
        self.error.setStyleSheet("color: #d64545;")
        self.error.setWordWrap(True)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel)
        buttons.button(QDialogButtonBox.StandardButton.Ok).setText("Export")
        buttons.accepted.connect(self._accept)
        buttons.rejected.connect(self.reject)
        lay = QVBoxLayout(self)
        lay.addWidget(QLabel("The same formats and options as `neuron-studio export`; the export runs as a job "
                             "(progress, cancel and resume in the Runs panel)."))
        lay.addWidget(split, 1)
        lay.addWidget(self.error)
        lay.addWidget(buttons)
        self.list.setCurrentRow(0)

    def choose(self, name: str) -> FormatPage:
        row = next(i for i, e in enumerate(self.formats) if e.name == name)
        self.list.setCurrentRow(row)
        return self.page_of[name]

    def request(self) -> tuple[str, str, dict[str, Any]]:
        """(format, output path, options), checked like the job checks them; raises NeuronStudioError."""
        from app.errors import JobError
        from app.export.base import resolve_options

        page = self.pages.currentWidget()
        assert isinstance(page, FormatPage)
        path = page.output.text()
        if not path:
            raise JobError("choose where to write the export", fix="fill in 'Write to' or press Browse")
        return page.exp.name, path, resolve_options(page.exp, page.form.values())

    def _accept(self) -> None:
        from app.errors import NeuronStudioError

        try:
            self.request()
        except NeuronStudioError as exc:
            self.error.setText(str(exc))
            return
        self.accept()
