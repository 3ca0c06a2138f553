"""TExplain's words for the selected class or unit: a horizontal bar chart (pyqtgraph) of the words the frozen
language model says most often (or with the highest lift), and, for classes, the spurious-cue table."""
from __future__ import annotations

from typing import Any

from PySide6.QtCore import Qt
from PySide6.QtWidgets import (
    QComboBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QSplitter,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from app.ui.theme import style_plot

OWN = "#59a14f"  # the class's own name
CUE = "#e15759"  # a flagged spurious-cue candidate
OTHER = "#4e79a7"
SHOWN = 15


class TExplainView(QWidget):
    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        import pyqtgraph as pg

        self.data: dict[str, Any] | None = None
        self.unit: int | None = None
        self.title = QLabel("TExplain has not labelled this layer")
        self.title.setStyleSheet("font-size: 15px; font-weight: 600;")
        self.note = QLabel("Train a translator (neuron-studio texplain train PROJECT --lm DIR), then label the "
                           "classifier layer (per class) or any layer (per unit) with the texplain method.")
        self.note.setWordWrap(True)
        self.note.setStyleSheet("color: gray;")
        self.rank_by = QComboBox()
        self.rank_by.addItem("most frequent", "frequency")
        self.rank_by.addItem("highest lift", "lift")
        self.rank_by.currentIndexChanged.connect(self._redraw)
        row = QHBoxLayout()
        row.addWidget(self.title, 1)
        row.addWidget(QLabel("words:"))
        row.addWidget(self.rank_by)
        self.plot = pg.PlotWidget()
        self.plot.setMenuEnabled(False)
        self.plot.setMouseEnabled(x=False, y=False)
        self.plot.hideButtons()
        self.plot.setLabel("bottom", "share of sentences that say the word")
        self.plot.getAxis("bottom").enableAutoSIPrefix(False)
        self.plot.invertY(True)
        self.bars: Any = None
        self.table = QTableWidget(0, 6)
        self.table.setHorizontalHeaderLabels(["possible cue", "frequency", "lift", "right when said",
                                              "right when not said", "flagged"])
        self.table.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        self.table.verticalHeader().setVisible(False)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        self.table.horizontalHeader().setStretchLastSection(True)
        split = QSplitter(Qt.Orientation.Vertical)
        split.addWidget(self.plot)
        split.addWidget(self.table)
        split.setSizes([420, 160])
        lay = QVBoxLayout(self)
        lay.addLayout(row)
        lay.addWidget(self.note)
        lay.addWidget(split, 1)

    def set_dark(self, dark: bool) -> None:
        style_plot(self.plot, dark)

    def set_data(self, data: dict[str, Any] | None) -> None:
        """`data` from app.export.texplain.layer_words (loaded off the UI thread)."""
        self.data = data
        self.show_unit(self.unit)

    def show_unit(self, unit: int | None) -> None:
        self.unit = unit
        self._redraw()

    def words(self) -> list[dict[str, Any]]:
        if self.data is None or self.unit is None:
            return []
        rows = list(self.data["units"].get(int(self.unit), []))
        if self.rank_by.currentData() == "lift":
            rows = [r for r in rows if r.get("lift_rank")]
            rows.sort(key=lambda r: r["lift_rank"])
        else:
            rows.sort(key=lambda r: -r.get("frequency", 0.0))
        return rows[:SHOWN]

    def _redraw(self) -> None:
        import pyqtgraph as pg

        if self.bars is not None:
            self.plot.removeItem(self.bars)
            self.bars = None
        self.table.setRowCount(0)
        rows = self.words()
        if self.data is None:
            self.title.setText("TExplain has not labelled this layer")
            self.note.setVisible(True)
            return
        self.note.setVisible(False)
        classes = self.data["mode"] == "classes"
        name = rows[0].get("class", "") if rows else ""
        what = f"class {self.unit}{' ' + name if name else ''}" if classes else f"unit {self.unit}"
        images = rows[0].get("images") if rows else None
        self.title.setText(f"TExplain words of {what}" + (f" ({images} images)" if images else "")
                           if self.unit is not None else "Select a unit")
        if not rows:
            return
        colours = [OWN if r.get("own_word") else CUE if r.get("spurious") else OTHER for r in rows]
        self.bars = pg.BarGraphItem(x0=[0] * len(rows), y=list(range(len(rows))), height=0.7,
                                    width=[float(r.get("frequency", 0.0)) for r in rows],
                                    brushes=[pg.mkBrush(c) for c in colours], pens=[pg.mkPen(None)] * len(rows))
        self.plot.addItem(self.bars)
        self.plot.getAxis("left").setTicks(
            [[(i, f"{r['word']}  ×{r.get('lift', 0):.1f}") for i, r in enumerate(rows)]])
        self.plot.setYRange(-0.6, len(rows) - 0.4, padding=0)
        self.plot.setXRange(0, max(0.05, max(float(r.get("frequency", 0.0)) for r in rows)) * 1.05, padding=0)
        if classes:
            report = {c["class"]: c for c in self.data["summary"].get("spurious", [])}
            cues = report.get(int(self.unit), {}).get("words", [])
            self.table.setRowCount(len(cues))
            for i, w in enumerate(cues):
                vals = [w["word"], f"{w['frequency']:.2f}", f"{w['lift']:.2f}", _pct(w.get("accuracy_said")),
                        _pct(w.get("accuracy_not_said")), "yes" if w.get("flagged") else ""]
                for j, v in enumerate(vals):
                    self.table.setItem(i, j, QTableWidgetItem(v))


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{v:.0%}"
