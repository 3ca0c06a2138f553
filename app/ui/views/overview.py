"""The layer overview: how many units each method finds interpretable, split by the concept category of their
best label, as a stacked bar chart (pyqtgraph), with the numbers in a table beside it."""
from __future__ import annotations

import html
import zlib

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QHeaderView, QLabel, QSplitter, QTableWidget, QTableWidgetItem, QVBoxLayout, QWidget

from app.ui.data import NO_CATEGORY, LayerOverviewData
from app.ui.theme import style_plot

PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7", "#9c755f",
           "#bab0ac")
MAX_CATEGORIES = 9  # the rest are summed as "other"
NO_CATEGORY_COLOUR = "#9a9a9a"
# One colour per category, the same on every layer and in every project: the Broden and COCO categories have
# their own; any other name gets a colour from its text (crc32), never from its position in this layer's list.
CATEGORY_COLOURS = {
    "object": "#4e79a7", "scene": "#59a14f", "part": "#f28e2b", "material": "#9c755f", "texture": "#b07aa1",
    "color": "#e15759", "colour": "#e15759", "shape": "#76b7b2", "word": "#edc948", "other": "#bab0ac",
}


def colour_of(category: str) -> str:
    if category == NO_CATEGORY:
        return NO_CATEGORY_COLOUR
    fixed = CATEGORY_COLOURS.get(category.lower())
    return fixed if fixed is not None else PALETTE[zlib.crc32(category.encode()) % len(PALETTE)]


class LayerOverview(QWidget):
    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        import pyqtgraph as pg

        self.data: LayerOverviewData | None = None
        self.title = QLabel("No layer selected")
        self.title.setStyleSheet("font-size: 15px; font-weight: 600;")
        self.note = QLabel("")
        self.note.setWordWrap(True)
        self.note.setStyleSheet("color: gray;")
        self.plot = pg.PlotWidget()
        self.plot.setMenuEnabled(False)
        self.plot.setMouseEnabled(x=False, y=False)
        self.plot.hideButtons()
        self.plot.setLabel("left", "interpretable units")
        # The legend sits above the plot, not inside it, so it never covers a bar.
        self.legend = QLabel("")
        self.legend.setWordWrap(True)
        self.legend.setTextFormat(Qt.TextFormat.RichText)
        self.legend_colours: dict[str, str] = {}
        self.bars: list = []
        self.table = QTableWidget()
        self.table.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        self.table.verticalHeader().setVisible(False)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        self.table.horizontalHeader().setStretchLastSection(True)
        split = QSplitter(Qt.Orientation.Vertical)
        split.addWidget(self.plot)
        split.addWidget(self.table)
        split.setSizes([420, 200])
        lay = QVBoxLayout(self)
        lay.addWidget(self.title)
        lay.addWidget(self.note)
        lay.addWidget(self.legend)
        lay.addWidget(split, 1)

    def set_dark(self, dark: bool) -> None:
        style_plot(self.plot, dark)

    def set_data(self, data: LayerOverviewData | None) -> None:
        import pyqtgraph as pg

        self.data = data
        for b in self.bars:
            self.plot.removeItem(b)
        self.bars = []
        self.legend.clear()
        self.legend_colours = {}
        self.table.clear()
        self.table.setRowCount(0)
        if data is None:
            self.title.setText("No layer selected")
            self.note.setText("")
            return
        self.title.setText(f"Layer {data.layer}: {data.units} units")
        if not data.methods:
            self.note.setText("No labeling run on this layer yet. Use Label... to run the methods.")
            return
        named = [c for c in data.categories if c != NO_CATEGORY]
        cats = named[:MAX_CATEGORIES]
        rest = named[MAX_CATEGORIES:]
        stacks = [(c, [m.by_category.get(c, 0) for m in data.methods]) for c in cats]
        if rest:
            stacks.append(("other", [sum(m.by_category.get(c, 0) for c in rest) for m in data.methods]))
        if NO_CATEGORY in data.categories:  # formulas mixing categories, words: drawn last, in grey
            stacks.append((NO_CATEGORY, [m.by_category.get(NO_CATEGORY, 0) for m in data.methods]))
        xs = list(range(len(data.methods)))
        bottom = [0] * len(xs)
        for cat, heights in stacks:
            colour = colour_of(cat)
            bar = pg.BarGraphItem(x=xs, height=heights, y0=bottom, width=0.6, brush=colour, pen=pg.mkPen(None))
            self.plot.addItem(bar)
            self.legend_colours["no single category (formula or word)" if cat == NO_CATEGORY else cat] = colour
            self.bars.append(bar)
            bottom = [b + h for b, h in zip(bottom, heights)]
        self.legend.setText(" &nbsp; ".join(
            f"<span style='color:{c}; font-size:15px'>■</span> {html.escape(name)}"
            for name, c in self.legend_colours.items()))
        ticks = [(i, m.method + ("*" if not m.criterion else "")) for i, m in enumerate(data.methods)]
        self.plot.getAxis("bottom").setTicks([ticks])
        self.plot.setXRange(-0.6, len(xs) - 0.4, padding=0)
        self.plot.setYRange(0, max(max(bottom, default=1), 1) * 1.1, padding=0)
        starred = [m.method for m in data.methods if not m.criterion]
        note = "Bars: units whose best label passes the method's own test, coloured by the label's concept category."
        if starred:
            note += f" * {', '.join(starred)}: no interpretability test, every labeled unit is counted."
        self.note.setText(note)
        headers = ["Method", "Interpretable", "Labeled", "Share of layer", "Test", "Top categories"]
        self.table.setColumnCount(len(headers))
        self.table.setHorizontalHeaderLabels(headers)
        self.table.setRowCount(len(data.methods))
        for r, m in enumerate(data.methods):
            top = sorted(m.by_category.items(), key=lambda kv: -kv[1])[:4]
            values = [m.method, str(m.interpretable), str(m.labeled),
                      f"{100 * m.interpretable / data.units:.1f}%" if data.units else "", m.criterion_help,
                      ", ".join(f"{k} {v}" for k, v in top)]
            for c, v in enumerate(values):
                item = QTableWidgetItem(v)
                if c in (1, 2, 3):
                    item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
                self.table.setItem(r, c, item)
