"""The unit view: the unit's top exemplars with its activation map laid over them (heat map, thresholded region,
or a chosen concept's dataset mask, with an opacity slider), the histogram of its pooled activations with its
threshold, and every method's ranked labels side by side.

Exemplar thumbnails are decoded and drawn on the pool (numpy + PIL), cached in an LRU cache, and painted by a
delegate that blends the overlay at the slider's opacity, so moving the slider only repaints.
"""
from __future__ import annotations

import html
import logging
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PySide6.QtCore import QAbstractListModel, QEvent, QModelIndex, QRect, QSize, Qt, Signal
from PySide6.QtGui import QColor, QImage, QPainter, QPalette
from PySide6.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QCompleter,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QListView,
    QSlider,
    QSplitter,
    QStyle,
    QStyledItemDelegate,
    QStyleOptionViewItem,
    QTableWidget,
    QTableWidgetItem,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from app import imaging as maps
from app.ui import imaging
from app.ui.data import Exemplar, Histogram, LayerView
from app.ui.theme import icon, style_plot
from app.ui.views.units import format_p, format_score
from app.ui.workers import call_in_pool

log = logging.getLogger(__name__)

OVERLAYS = (("outline", "Region outline"), ("heat", "Heat map"), ("region", "Thresholded region"), ("concept", "Concept mask"))
CACHE_ITEMS = 400


def to_qimage(arr: np.ndarray) -> QImage:
    arr = np.ascontiguousarray(arr)
    h, w = arr.shape[:2]
    fmt = QImage.Format.Format_RGBA8888 if arr.shape[2] == 4 else QImage.Format.Format_RGB888
    return QImage(arr.data, w, h, arr.strides[0], fmt).copy()  # copy: the QImage must own its pixels


def colormap_lut(name: str = "turbo") -> np.ndarray:
    # turbo reads as "cold to hot" over any picture; inferno's yellow top vanished over bright, green images
    import pyqtgraph as pg

    cmap = pg.colormap.get(name)
    return np.asarray(cmap.getLookupTable(0.0, 1.0, 256, alpha=False), dtype=np.uint8)


@dataclass
class Thumb:
    exemplar: Exemplar
    base: QImage | None = None
    overlays: dict[str, QImage | None] = field(default_factory=dict)
    error: str = ""


class _LRU:
    def __init__(self, size: int):
        self.size = size
        self.data: OrderedDict[Any, Any] = OrderedDict()

    def get(self, key: Any) -> Any:
        if key in self.data:
            self.data.move_to_end(key)
            return self.data[key]
        return None

    def put(self, key: Any, value: Any) -> None:
        self.data[key] = value
        self.data.move_to_end(key)
        while len(self.data) > self.size:
            self.data.popitem(last=False)


class ExemplarModel(QAbstractListModel):
    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.thumbs: list[Thumb] = []

    def set_exemplars(self, exemplars: list[Exemplar]) -> None:
        self.beginResetModel()
        self.thumbs = [Thumb(e) for e in exemplars]
        self.endResetModel()

    def rowCount(self, parent: QModelIndex = QModelIndex()) -> int:  # noqa: N802
        return 0 if parent.isValid() else len(self.thumbs)

    def data(self, index: QModelIndex, role: int = Qt.ItemDataRole.DisplayRole):
        if not index.isValid():
            return None
        t = self.thumbs[index.row()]
        if role == Qt.ItemDataRole.DisplayRole:
            return f"#{t.exemplar.rank}  {format_score(t.exemplar.score)}"
        if role == Qt.ItemDataRole.ToolTipRole:
            e = t.exemplar
            tip = f"{e.key}\nimage {e.image}, rank {e.rank}\nmax activation {e.score:.4g}"
            return tip + (f"\n{t.error}" if t.error else "")
        if role == Qt.ItemDataRole.UserRole:
            return t
        return None

    def thumb_changed(self, row: int) -> None:
        idx = self.index(row)
        self.dataChanged.emit(idx, idx)


class ExemplarDelegate(QStyledItemDelegate):
    """Paints the exemplar, then the current overlay at the current opacity, then a caption."""

    def __init__(self, owner: "UnitView"):
        super().__init__(owner)
        self.owner = owner

    def sizeHint(self, option: QStyleOptionViewItem, index: QModelIndex) -> QSize:  # noqa: N802
        s = self.owner.thumb_size
        return QSize(s + 8, s + 8 + option.fontMetrics.height() + 2)

    def paint(self, painter: QPainter, option: QStyleOptionViewItem, index: QModelIndex) -> None:
        t: Thumb = index.data(Qt.ItemDataRole.UserRole)
        if t is None:
            return
        s = self.owner.thumb_size
        r = option.rect
        box = QRect(r.x() + 4, r.y() + 4, s, s)
        painter.save()
        painter.setRenderHint(QPainter.RenderHint.SmoothPixmapTransform, True)
        pal = option.palette
        if option.state & QStyle.StateFlag.State_Selected:
            painter.fillRect(r, pal.color(QPalette.ColorRole.Highlight))
        painter.fillRect(box, pal.color(QPalette.ColorRole.Mid))
        if t.base is not None:
            painter.drawImage(box, t.base)
            overlay = t.overlays.get(self.owner.overlay_mode)
            if overlay is not None and self.owner.opacity > 0:
                painter.setOpacity(self.owner.opacity)
                painter.drawImage(box, overlay)
                painter.setOpacity(1.0)
        else:
            painter.setPen(pal.color(QPalette.ColorRole.PlaceholderText))
            painter.drawText(box, Qt.AlignmentFlag.AlignCenter | Qt.TextFlag.TextWordWrap,
                             t.error or "loading...")
        painter.setPen(pal.color(QPalette.ColorRole.HighlightedText if option.state & QStyle.StateFlag.State_Selected
                                 else QPalette.ColorRole.Text))
        text_rect = QRect(r.x() + 4, box.bottom() + 2, s, option.fontMetrics.height())
        painter.drawText(text_rect, Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignVCenter,
                         f"#{t.exemplar.rank}  act {format_score(t.exemplar.score)}")
        painter.restore()


def score_parts(extra: dict[str, Any]) -> str:
    """A description scored by wpmi (MILAN) shows what its score is made of: how well it fits the exemplars and
    how common it is anyway, so a reader sees why a candidate won."""
    if "log_p_d_given_e" not in extra or "log_p_d" not in extra:
        return ""
    return f"\nlog p(d|E) {extra['log_p_d_given_e']:.2f}, log p(d) {extra['log_p_d']:.2f}"


def render_exemplar(view: LayerView, ex: Exemplar, size: int, vmin: float, vmax: float, threshold: float,
                    lut: np.ndarray) -> dict[str, np.ndarray]:
    """Pool thread: the image as the model saw it, shrunk to `size`, and the unit's overlays at that size."""
    img = view.source.load(ex.image, ex.key)
    base = np.asarray(imaging.model_view(img, view.preprocess, max_side=size))
    side = base.shape[0]
    up = imaging.upsample(ex.map, side)
    if not maps.has_extent(ex.map):  # 1x1: a frame and a bar, never a tint over the whole picture
        feature = maps.feature_rgba(side, float(np.asarray(ex.map).ravel()[0]), threshold, vmin, vmax)
        return {"base": base, "heat": feature, "region": feature, "outline": feature}
    return {"base": base, "heat": imaging.heat_rgba(up, vmin, vmax, lut),
            "region": imaging.region_rgba(up, threshold) if math.isfinite(threshold) else None,
            "outline": maps.contour_rgba(up, threshold) if math.isfinite(threshold) else None}


def render_concept(view: LayerView, ex: Exemplar, concept: int, side: int) -> np.ndarray:
    """Pool thread: the concept's dataset mask on the exemplar, through the same resize and crop as the image."""
    img = view.source.load(ex.image, ex.key)
    w, h = img.size
    mask = view.source.concept_mask(ex.image, concept, (h, w))
    if mask is None:
        return np.zeros((side, side, 4), dtype=np.uint8)  # the concept is not in this image: nothing to draw
    return imaging.mask_rgba(imaging.model_view_mask(mask, view.preprocess, side))


class UnitView(QWidget):
    """Shows one unit of one extracted layer."""

    step_requested = Signal(int)  # -1 previous, +1 next
    overlay_changed = Signal(str, float)  # mode, opacity (for the preferences)

    def __init__(self, thumb_size: int = 150, overlay_mode: str = "outline", opacity: float = 0.6,
                 parent: QWidget | None = None):
        super().__init__(parent)
        self.thumb_size = thumb_size  # shown size: grows so the columns fill the grid's width
        self.base_thumb_size = thumb_size  # the preferred size, which sets how many columns fit
        self.overlay_mode = overlay_mode
        self.opacity = opacity
        self.view: LayerView | None = None
        self.unit: int | None = None
        self.labels: dict[str, list[dict[str, Any]]] = {}
        self.histogram: Histogram | None = None
        self._token = 0
        self._cache = _LRU(CACHE_ITEMS)
        self._lut = colormap_lut()
        self._dark = False

        self.title = QLabel("No unit selected")
        self.title.setStyleSheet("font-size: 15px; font-weight: 600;")
        self.title.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.prev_button = QToolButton()
        self.prev_button.setIcon(icon("previous"))
        self.prev_button.setToolTip("Previous unit (P or Alt+Left)")
        self.prev_button.clicked.connect(lambda: self.step_requested.emit(-1))
        self.next_button = QToolButton()
        self.next_button.setIcon(icon("next"))
        self.next_button.setToolTip("Next unit (N or Alt+Right)")
        self.next_button.clicked.connect(lambda: self.step_requested.emit(1))

        self.mode = QComboBox()
        for key, text in OVERLAYS:
            self.mode.addItem(text, key)
        self.mode.setCurrentIndex(max(0, self.mode.findData(overlay_mode)))
        self.mode.currentIndexChanged.connect(self._on_mode)
        self.concept = QComboBox()
        self.concept.setEditable(True)
        self.concept.setInsertPolicy(QComboBox.InsertPolicy.NoInsert)
        self.concept.setMinimumWidth(150)
        self.concept.completer().setFilterMode(Qt.MatchFlag.MatchContains)
        self.concept.completer().setCompletionMode(QCompleter.CompletionMode.PopupCompletion)
        self.concept.activated.connect(lambda _i: self._on_concept())
        self.concept.setToolTip("Concept whose dataset mask is drawn in 'Concept mask' mode")
        self.opacity_slider = QSlider(Qt.Orientation.Horizontal)
        self.opacity_slider.setRange(0, 100)
        self.opacity_slider.setValue(int(round(opacity * 100)))
        self.opacity_slider.setMaximumWidth(160)
        self.opacity_slider.valueChanged.connect(self._on_opacity)
        self.opacity_label = QLabel(f"{self.opacity_slider.value()}%")
        self.opacity_label.setMinimumWidth(36)

        self.model = ExemplarModel(self)
        self.grid = QListView()
        self.grid.setModel(self.model)
        self.grid.setViewMode(QListView.ViewMode.IconMode)
        self.grid.setResizeMode(QListView.ResizeMode.Adjust)
        self.grid.setMovement(QListView.Movement.Static)
        self.grid.setUniformItemSizes(True)
        self.grid.setWrapping(True)
        self.grid.setSpacing(4)
        self.grid.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.grid.setItemDelegate(ExemplarDelegate(self))
        self.grid.viewport().installEventFilter(self)

        import pyqtgraph as pg

        pg.setConfigOptions(imageAxisOrder="row-major")
        self.plot = pg.PlotWidget()
        self.plot.setMinimumHeight(150)
        self.plot.setMenuEnabled(False)
        self.plot.setMouseEnabled(x=False, y=False)
        self.plot.hideButtons()
        self.plot.setLabel("bottom", "spatial max per image  (<span style='color:#f0b400'>▲</span> exemplars)")
        self.plot.setLabel("left", "images")
        self.bars = pg.PlotDataItem(stepMode="center", fillLevel=0, brush=(80, 130, 220, 160), pen=(80, 130, 220))
        self.plot.addItem(self.bars)
        # the threshold's value goes in the title: a label on the line is clipped when the line is near an edge
        self.threshold_line = pg.InfiniteLine(angle=90, movable=False, pen=pg.mkPen("#e0552d", width=2))
        self.plot.addItem(self.threshold_line)
        self.exemplar_ticks = pg.ScatterPlotItem(symbol="t1", size=9, brush="#f0b400", pen=None)
        self.plot.addItem(self.exemplar_ticks)

        self.labels_table = QTableWidget()
        self.labels_table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.labels_table.setWordWrap(False)  # one line per label; the whole text is in the cell's tooltip
        self.labels_table.setTextElideMode(Qt.TextElideMode.ElideRight)
        self.labels_table.verticalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        self.labels_table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Stretch)

        controls = QHBoxLayout()
        controls.addWidget(self.prev_button)
        controls.addWidget(self.next_button)
        controls.addWidget(self.title, 1)
        controls.addWidget(QLabel("Overlay"))
        controls.addWidget(self.mode)
        controls.addWidget(self.concept)
        controls.addWidget(QLabel("Opacity"))
        controls.addWidget(self.opacity_slider)
        controls.addWidget(self.opacity_label)

        top = QWidget()
        tl = QVBoxLayout(top)
        tl.setContentsMargins(0, 0, 0, 0)
        tl.addLayout(controls)
        self.subtitle = QLabel("")
        self.subtitle.setStyleSheet("color: gray;")
        tl.addWidget(self.subtitle)
        # What people wrote about the unit on the naming board: every annotator's name and descriptions.
        self.notes = QLabel("")
        self.notes.setObjectName("unitNotes")
        self.notes.setWordWrap(True)
        self.notes.setTextFormat(Qt.TextFormat.RichText)
        self.notes.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.notes.setVisible(False)
        tl.addWidget(self.notes)
        tl.addWidget(self.grid, 1)
        bottom = QSplitter(Qt.Orientation.Horizontal)
        bottom.addWidget(self.plot)
        bottom.addWidget(self.labels_table)
        bottom.setSizes([380, 520])
        self.splitter = QSplitter(Qt.Orientation.Vertical)
        self.splitter.addWidget(top)
        self.splitter.addWidget(bottom)
        self.splitter.setStretchFactor(0, 3)
        self.splitter.setStretchFactor(1, 2)
        self.splitter.setSizes([560, 300])
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.splitter)
        self._update_mode_widgets()

    # ---- appearance ----------------------------------------------------------------------------------------
    def set_dark(self, dark: bool) -> None:
        self._dark = dark
        style_plot(self.plot, dark)
        self.prev_button.setIcon(icon("previous"))
        self.next_button.setIcon(icon("next"))
        self.grid.viewport().update()

    # ---- content -------------------------------------------------------------------------------------------
    def set_layer(self, view: LayerView | None) -> None:
        self._token += 1  # pictures and a histogram still on their way belong to the previous layer
        self.histogram = None
        self.view = view
        self.unit = None
        self.concept.clear()
        if view is not None:
            for c in view.concepts:
                label = f"{c['name']}  [{c['category']}]" if c["category"] else c["name"]
                self.concept.addItem(label, int(c["idx"]))
        self._update_mode_widgets()
        if view is None:
            self.clear()

    def clear(self) -> None:
        self._token += 1
        self.unit = None
        self.title.setText("No unit selected")
        self.subtitle.setText("")
        self.notes.setText("")
        self.notes.setVisible(False)
        self.model.set_exemplars([])
        self.bars.setData([], [])
        self.exemplar_ticks.setData([], [])
        self.labels_table.clear()
        self.labels_table.setRowCount(0)
        self.labels_table.setColumnCount(0)

    def eventFilter(self, obj: Any, event: Any) -> bool:
        if obj is self.grid.viewport() and event.type() == QEvent.Type.Resize:
            self.fit_columns()
        return super().eventFilter(obj, event)

    def fit_columns(self) -> None:
        """As many columns as the preferred size allows, each widened so the row fills the grid (no empty third
        on the right)."""
        spacing = self.grid.spacing()
        width = self.grid.viewport().width() - spacing
        cell = self.base_thumb_size + 8 + 2 * spacing
        cols = max(1, width // cell)
        size = max(self.base_thumb_size, width // cols - 8 - 2 * spacing)
        if size != self.thumb_size:
            self.thumb_size = size
            self.grid.doItemsLayout()
            self.grid.viewport().update()

    def set_notes(self, rows: list[dict[str, Any]]) -> None:
        """Names and descriptions by annotator (rows of `app.ui.data.unit_notes`), or nothing when there are none."""
        by: dict[str, list[str]] = {}
        for r in rows:
            text = html.escape(r["text"])
            by.setdefault(r["annotator"], []).append(f"<b>{text}</b>" if r["kind"] == "name" else f"“{text}”")
        self.notes.setText("<br>".join(f"<span style='color:gray'>{html.escape(a)}:</span> {' · '.join(v)}"
                                       for a, v in by.items()))
        self.notes.setVisible(bool(by))

    def show_unit(self, unit: int, labels: dict[str, list[dict[str, Any]]], name: str = "") -> None:
        view = self.view
        if view is None:
            return
        self._token += 1
        token = self._token
        self.histogram = None  # until this unit's arrives
        self.unit = unit
        self.labels = labels
        layer = view.layer["name"]
        self.title.setText(f"Unit {unit}" + (f" — {name}" if name else ""))
        self.subtitle.setText(
            f"{layer} ({view.layer['type']}), {view.units} units; exemplars from {view.dataset['name']}, "
            f"extraction run {view.run_id}; threshold = top {100 * (1 - view.threshold_quantile):.2g}% of map values")
        exemplars = view.exemplars(unit)
        if exemplars and not maps.has_extent(exemplars[0].map):
            self.subtitle.setText(self.subtitle.text() + ". This layer's maps are 1×1, without spatial extent: a "
                                  "frame marks an activation above the threshold, the bar shows its strength")
        self.model.set_exemplars(exemplars)
        self._fill_labels(labels)
        self._pick_concept(labels)
        # colour scale shared by all exemplars of the unit, so their heat maps compare
        maxima = [float(e.map.max()) for e in exemplars]
        minima = [float(e.map.min()) for e in exemplars]
        vmax = max(maxima) if maxima else 1.0
        # what a unit responds to is its positive activation; a unit that never fires above 0 shows its range
        vmin = 0.0 if vmax > 0 or not minima else min(minima)
        thr = float(view.thresholds[unit])
        size = self._render_size()
        for row, ex in enumerate(exemplars):
            key = (view.run_id, view.layer["id"], unit, ex.rank, size)
            hit = self._cache.get(key)
            if hit is not None:
                self._set_render(row, token, hit, key, cache=False)
                continue
            call_in_pool(
                # a unit left before its turn came (keys held down) costs no decoding
                lambda ex=ex: None if token != self._token else render_exemplar(view, ex, size, vmin, vmax, thr,
                                                                                  self._lut),
                lambda out, row=row, key=key: self._set_render(row, token, out, key),
                lambda exc, row=row: self._set_error(row, token, exc),
                owner=self,
            )
        call_in_pool(lambda: None if token != self._token else view.histogram(unit),
                     lambda h: h is not None and self._set_histogram(token, h, exemplars),
                     lambda exc: log.warning("histogram of unit %s failed: %s", unit, exc), owner=self)
        if self.overlay_mode == "concept":
            self._load_concept_masks()

    def _render_size(self) -> int:
        # draw at twice the display size (at most the crop), so the delegate's scaling stays sharp
        base = self.base_thumb_size
        return int(min(self.view.preprocess.get("crop") or 224, 2 * base)) if self.view else base

    def _set_render(self, row: int, token: int, out: dict[str, Any] | None, key: Any, cache: bool = True) -> None:
        if out is None:
            return
        if cache:
            self._cache.put(key, out)
        if token != self._token or row >= len(self.model.thumbs):
            return
        t = self.model.thumbs[row]
        t.base = to_qimage(out["base"])
        t.overlays["heat"] = to_qimage(out["heat"])
        t.overlays["region"] = to_qimage(out["region"]) if out.get("region") is not None else None
        t.overlays["outline"] = to_qimage(out["outline"]) if out.get("outline") is not None else None
        self.model.thumb_changed(row)

    def _set_error(self, row: int, token: int, exc: BaseException) -> None:
        if token != self._token or row >= len(self.model.thumbs):
            return
        self.model.thumbs[row].error = f"cannot show the image: {exc}"
        self.model.thumb_changed(row)

    def _set_histogram(self, token: int, h: Histogram, exemplars: list[Exemplar]) -> None:
        if token != self._token:
            return
        self.histogram = h
        if h.counts.size:
            self.bars.setData(h.edges, h.counts.astype(float))
        else:
            self.bars.setData([], [])
        thr = ""
        if math.isfinite(h.threshold):
            self.threshold_line.setValue(h.threshold)
            self.threshold_line.setVisible(True)
            thr = f", <span style='color:#e0552d'>threshold {h.threshold:.3g}</span>"
        else:
            self.threshold_line.setVisible(False)
        xs = [e.score for e in exemplars]
        self.exemplar_ticks.setData(xs, [0.0] * len(xs))
        counted = f"{h.images} images" if h.images == h.total_images else \
            f"a regular sample of {h.images} of {h.total_images} images"
        self.plot.setTitle(f"{counted}{thr}", size="9pt")
        self.plot.enableAutoRange()

    def _fill_labels(self, labels: dict[str, list[dict[str, Any]]]) -> None:
        methods = list(labels)
        depth = max((len(v) for v in labels.values()), default=0)
        self.labels_table.clear()
        self.labels_table.setColumnCount(len(methods))
        self.labels_table.setRowCount(depth)
        self.labels_table.setHorizontalHeaderLabels(methods)
        self.labels_table.setVerticalHeaderLabels([str(i + 1) for i in range(depth)])
        for c, m in enumerate(methods):
            for r, lab in enumerate(labels[m]):
                text = f"{lab['text']}  ·  {format_score(lab['score'])}"
                if lab["p_value"] is not None:
                    text += f"  p {format_p(lab['p_value'])}"
                text += score_parts(lab["extra"])
                item = QTableWidgetItem(text)
                tip = [lab["text"]]
                if lab["category"]:
                    tip.append(f"category: {lab['category']}")
                tip.append(f"score: {lab['score']:.6g}")
                if lab["p_value"] is not None:
                    tip.append(f"p-value: {format_p(lab['p_value'])}")
                for k, v in sorted(lab["extra"].items()):
                    tip.append(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}")
                item.setToolTip("\n".join(tip))
                if lab["extra"].get("interpretable") or lab["extra"].get("significant"):
                    item.setForeground(QColor("#2e9d57"))
                self.labels_table.setItem(r, c, item)
        if not methods:
            self.labels_table.setColumnCount(1)
            self.labels_table.setHorizontalHeaderLabels(["labels"])
            self.labels_table.setRowCount(1)
            self.labels_table.setItem(0, 0, QTableWidgetItem("No labeling run on this layer yet (Label...)."))

    # ---- overlays ------------------------------------------------------------------------------------------
    def _pick_concept(self, labels: dict[str, list[dict[str, Any]]]) -> None:
        """Default the concept to the unit's best concept label (Network Dissection's, when there is one)."""
        if self.view is None or not self.view.concepts:
            return
        names = {c["name"]: int(c["idx"]) for c in self.view.concepts}
        order = sorted(labels, key=lambda m: m != "netdissect")
        for m in order:
            for lab in labels[m][:1]:
                if lab["text"] in names:
                    i = self.concept.findData(names[lab["text"]])
                    if i >= 0:
                        self.concept.setCurrentIndex(i)
                    return

    def _update_mode_widgets(self) -> None:
        masks = self.view is not None and self.view.has_masks and bool(self.view.concepts)
        item = self.mode.model().item(2)
        if item is not None:
            item.setEnabled(masks)
            item.setToolTip("" if masks else "the dataset has no concept masks, or the layer was extracted without "
                                             "mask statistics")
        if self.overlay_mode == "concept" and not masks:
            self.mode.setCurrentIndex(0)
        self.concept.setVisible(self.overlay_mode == "concept")

    def _on_mode(self, _i: int) -> None:
        self.overlay_mode = self.mode.currentData()
        self.concept.setVisible(self.overlay_mode == "concept")
        if self.overlay_mode == "concept":
            self._load_concept_masks()
        self.grid.viewport().update()
        self.overlay_changed.emit(self.overlay_mode, self.opacity)

    def set_overlay_mode(self, mode: str) -> None:
        i = self.mode.findData(mode)
        if i >= 0:
            self.mode.setCurrentIndex(i)

    def _on_concept(self) -> None:
        if self.overlay_mode == "concept":
            self._load_concept_masks()

    def _on_opacity(self, value: int) -> None:
        self.opacity = value / 100.0
        self.opacity_label.setText(f"{value}%")
        self.grid.viewport().update()
        self.overlay_changed.emit(self.overlay_mode, self.opacity)

    def _load_concept_masks(self) -> None:
        view = self.view
        concept = self.concept.currentData()
        if view is None or concept is None or self.unit is None:
            return
        token = self._token
        side = self._render_size()
        for row, t in enumerate(self.model.thumbs):
            t.overlays["concept"] = None
            ex = t.exemplar
            call_in_pool(
                lambda ex=ex: render_concept(view, ex, int(concept), side),
                lambda out, row=row, c=concept: self._set_concept(row, token, c, out),
                lambda exc: log.warning("concept mask failed: %s", exc),
                owner=self,
            )

    def _set_concept(self, row: int, token: int, concept: int, out: np.ndarray | None) -> None:
        if token != self._token or row >= len(self.model.thumbs) or self.concept.currentData() != concept:
            return
        self.model.thumbs[row].overlays["concept"] = to_qimage(out) if out is not None else None
        self.model.thumb_changed(row)
