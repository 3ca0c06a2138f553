"""Forms built from declarations: a labeler's `params: tuple[Param, ...]` becomes a form with the right widget
per type (check box, choice, spin box, text), its range, its paper default and its help as tooltip; and the two
dialogs that start runs (extraction options, labeling methods)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from PySide6.QtCore import Qt
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QSpinBox,
    QSplitter,
    QStackedWidget,
    QVBoxLayout,
    QWidget,
)

import labelers.base as lb

INT_LIMIT = 2**31 - 1


def _decimals(value: float) -> int:
    text = f"{value:.8f}".rstrip("0")
    return min(8, max(2, len(text.split(".")[1]) if "." in text else 2))


class ParamForm(QWidget):
    """One widget per `Param`; `values()` gives a dict ready for `Labeler.resolve_params`."""

    def __init__(self, params: tuple[lb.Param, ...], parent: QWidget | None = None):
        super().__init__(parent)
        self.params = params
        self.widgets: dict[str, QWidget] = {}
        form = QFormLayout(self)
        form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
        for p in params:
            w = self._widget(p)
            w.setToolTip(f"{p.help}\nDefault: {p.default!r}")
            w.setObjectName(f"param_{p.name}")
            label = QLabel(p.name.replace("_", " "))
            label.setToolTip(p.help)
            form.addRow(label, w)
            self.widgets[p.name] = w
        if not params:
            form.addRow(QLabel("This method has no parameters."))
        self.reset()

    def _widget(self, p: lb.Param) -> QWidget:
        if p.choices is not None:
            w = QComboBox()
            for c in p.choices:
                w.addItem(str(c), c)
            return w
        if p.type is bool:
            return QCheckBox()
        if p.type in (int, float) and p.default is None:  # "not set" is a value of its own: a spin box has none
            w = QLineEdit()
            w.setPlaceholderText("empty: the default (see the tooltip)")
            return w
        if p.type is int:
            w = QSpinBox()
            w.setRange(int(p.minimum) if p.minimum is not None else -INT_LIMIT,
                       int(p.maximum) if p.maximum is not None else INT_LIMIT)
            return w
        if p.type is float:
            w = QDoubleSpinBox()
            # two more digits than the default shows, so smaller values (alpha = 0.001) can be typed
            w.setDecimals(min(8, max(4, _decimals(float(p.default)) + 2)) if isinstance(p.default, (int, float))
                          else 6)
            w.setRange(float(p.minimum) if p.minimum is not None else -1e12,
                       float(p.maximum) if p.maximum is not None else 1e12)
            w.setSingleStep(10 ** -min(w.decimals(), 3) if p.maximum is not None and p.maximum <= 1 else 0.1)
            return w
        return QLineEdit()

    def set_values(self, values: dict[str, Any]) -> None:
        for p in self.params:
            if p.name not in values:
                continue
            v = values[p.name]
            w = self.widgets[p.name]
            if isinstance(w, QComboBox):
                i = w.findData(v)
                w.setCurrentIndex(max(0, i))
            elif isinstance(w, QCheckBox):
                w.setChecked(bool(v))
            elif isinstance(w, QSpinBox):
                w.setValue(int(v))
            elif isinstance(w, QDoubleSpinBox):
                w.setValue(float(v))
            elif isinstance(w, QLineEdit):
                w.setText("" if v is None else str(v))

    def reset(self) -> None:
        self.set_values({p.name: p.default for p in self.params})

    def values(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for p in self.params:
            w = self.widgets[p.name]
            if isinstance(w, QComboBox):
                out[p.name] = w.currentData()
            elif isinstance(w, QCheckBox):
                out[p.name] = w.isChecked()
            elif isinstance(w, QSpinBox):
                out[p.name] = w.value()
            elif isinstance(w, QDoubleSpinBox):
                out[p.name] = w.value()
            elif not w.text().strip() and p.default is None:
                out[p.name] = None
            else:
                out[p.name] = p.coerce(w.text()) if p.type is not str else w.text()
        return out


class PathField(QWidget):
    """A line edit with a Browse button for a file or a folder."""

    def __init__(self, folder: bool, caption: str, filter: str = "", parent: QWidget | None = None):
        super().__init__(parent)
        self.folder = folder
        self.caption = caption
        self.filter = filter
        self.edit = QLineEdit()
        self.button = QPushButton("Browse...")
        self.button.clicked.connect(self.browse)
        lay = QHBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.edit, 1)
        lay.addWidget(self.button)

    def browse(self) -> None:
        start = self.edit.text() or str(Path.home())
        if self.folder:
            path = QFileDialog.getExistingDirectory(self, self.caption, start)
        else:
            path, _ = QFileDialog.getOpenFileName(self, self.caption, start, self.filter)
        if path:
            self.edit.setText(path)

    def text(self) -> str:
        return self.edit.text().strip()

    def setText(self, text: str) -> None:  # noqa: N802 - Qt naming
        self.edit.setText(text)


class ExtractDialog(QDialog):
    """Options of an extraction of the ticked layers."""

    def __init__(self, layers: list[str], datasets: list[dict[str, Any]], prefs: Any, parent: QWidget | None = None):
        super().__init__(parent)
        self.setWindowTitle("Extract layers")
        self.layers = layers
        form = QFormLayout()
        shown = ", ".join(layers[:8]) + (f" and {len(layers) - 8} more" if len(layers) > 8 else "")
        layer_label = QLabel(shown)
        layer_label.setWordWrap(True)
        form.addRow("Layers", layer_label)
        self.dataset = QComboBox()
        for d in datasets:
            self.dataset.addItem(f"{d['name']} ({d['num_images']} images, {d['format']})", d["id"])
        form.addRow("Dataset", self.dataset)
        self.batch_size = QSpinBox()
        self.batch_size.setRange(1, 4096)
        self.batch_size.setValue(prefs.batch_size)
        form.addRow("Batch size", self.batch_size)
        self.device = QComboBox()
        self.device.setEditable(True)
        self.device.addItems(["auto", "cpu", "cuda", "mps"])
        self.device.setCurrentText(prefs.device)
        self.device.setToolTip("auto: CUDA, then Apple MPS, then the CPU")
        form.addRow("Device", self.device)
        self.workers = QSpinBox()
        self.workers.setRange(-1, 64)
        self.workers.setSpecialValueText("auto")
        self.workers.setValue(-1 if prefs.num_workers is None else prefs.num_workers)
        self.workers.setToolTip("Processes decoding images (auto: one fewer than the CPU cores, at most 8)")
        form.addRow("Decoding workers", self.workers)
        self.topk = QSpinBox()
        self.topk.setRange(1, 1000)
        self.topk.setValue(15)
        self.topk.setToolTip("Top exemplar images kept per unit with their maps (MILAN: 15)")
        form.addRow("Exemplars per unit", self.topk)
        self.mask_stats = QCheckBox("count overlaps with concept masks (Network Dissection)")
        self.mask_stats.setChecked(True)
        form.addRow("Masks", self.mask_stats)
        self.max_images = QSpinBox()
        self.max_images.setRange(0, 2**31 - 1)
        self.max_images.setSpecialValueText("all")
        form.addRow("Images", self.max_images)
        self.run_on = QComboBox()
        self.run_on.setEditable(True)
        self.run_on.addItems(["this machine", "Ray: auto", "Ray: local"])
        import importlib.util

        ray_note = "" if importlib.util.find_spec("ray") else (
            " Ray is not installed here: pip install 'neuron-studio[ray]'.")
        self.run_on.setToolTip("Ray: shards on a Ray cluster's workers, results identical to this machine's. auto: "
                               "the cluster this machine belongs to, else a local Ray; or type 'Ray: ADDRESS'. "
                               "Workers need the same package, model file and dataset paths." + ray_note)
        form.addRow("Run on", self.run_on)
        self.shards = QSpinBox()
        self.shards.setRange(0, 100_000)
        self.shards.setSpecialValueText("auto")
        self.shards.setToolTip("With Ray: shards of whole batches (auto: 4 per GPU, or per CPU without GPUs)")
        form.addRow("Ray shards", self.shards)
        self.then_label = QCheckBox("then label these layers with every method the dataset has inputs for")
        self.then_label.setChecked(True)
        form.addRow("", self.then_label)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel)
        buttons.button(QDialogButtonBox.StandardButton.Ok).setText("Queue extraction")
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        lay = QVBoxLayout(self)
        lay.addLayout(form)
        lay.addWidget(buttons)

    def options(self) -> Any:
        from app.engine.extract import ExtractOptions

        return ExtractOptions(
            layers=list(self.layers), batch_size=self.batch_size.value(), device=self.device.currentText().strip()
            or "auto", num_workers=None if self.workers.value() < 0 else self.workers.value(),
            topk=self.topk.value(), mask_stats=self.mask_stats.isChecked(),
            max_images=self.max_images.value() or None,
        )

    def dataset_id(self) -> int | None:
        return self.dataset.currentData()

    def ray_address(self) -> str | None:
        """None to run on this machine, else the Ray address ('auto', 'local' or a cluster's)."""
        text = self.run_on.currentText().strip()
        if not text.lower().startswith("ray"):
            return None
        return text[3:].lstrip(":").strip() or "auto"

    def shard_count(self) -> int | None:
        return self.shards.value() or None


class MethodPage(QWidget):
    def __init__(self, cls: type[lb.Labeler], unavailable: str | None, parent: QWidget | None = None):
        super().__init__(parent)
        self.cls = cls
        lay = QVBoxLayout(self)
        title = QLabel(f"<b>{cls.title}</b> <span style='color:gray'>({cls.name})</span>")
        paper = QLabel(cls.paper)
        paper.setWordWrap(True)
        paper.setStyleSheet("color: gray;")
        needs = QLabel("Needs: " + ", ".join(i.value.replace("_", " ") for i in cls.inputs))
        needs.setWordWrap(True)
        lay.addWidget(title)
        lay.addWidget(paper)
        lay.addWidget(needs)
        self.warning = QLabel(unavailable or "")
        self.warning.setWordWrap(True)
        self.warning.setStyleSheet("color: #d64545;")
        self.warning.setVisible(bool(unavailable))
        lay.addWidget(self.warning)
        self.form = ParamForm(cls.params)
        lay.addWidget(self.form)
        self.clip: PathField | None = None
        if lb.Input.CLIP_MODEL in cls.inputs:
            self.clip = PathField(True, "Local CLIP model folder (transformers format)")
            self.clip.edit.setPlaceholderText("empty: the project's own dual encoder (Language models panel)")
            row = QFormLayout()
            row.addRow("CLIP model folder", self.clip)
            lay.addLayout(row)
        reset = QPushButton("Paper defaults")
        reset.clicked.connect(self.form.reset)
        lay.addWidget(reset, 0, Qt.AlignmentFlag.AlignLeft)
        lay.addStretch(1)


class LabelDialog(QDialog):
    """Choose a layer and methods; each method's parameters in a form built from its declaration."""

    def __init__(self, methods: dict[str, type[lb.Labeler]], layers: list[str], current: str | None,
                 unavailable: dict[str, dict[str, str]], parent: QWidget | None = None):
        """`unavailable[layer][method]` says why a method cannot run on a layer (missing inputs)."""
        super().__init__(parent)
        self.setWindowTitle("Label units")
        self.resize(760, 520)
        self.methods = methods
        self.unavailable = unavailable
        self.layer = QComboBox()
        self.layer.addItems(layers)
        if current in layers:
            self.layer.setCurrentText(current)
        self.layer.currentTextChanged.connect(self._refresh_availability)
        self.method_list = QListWidget()
        self.pages = QStackedWidget()
        self.page_of: dict[str, MethodPage] = {}
        for name, cls in methods.items():
            item = QListWidgetItem(f"{cls.title}")
            item.setData(Qt.ItemDataRole.UserRole, name)
            item.setFlags(item.flags() | Qt.ItemFlag.ItemIsUserCheckable)
            self.method_list.addItem(item)
            page = MethodPage(cls, None)
            self.pages.addWidget(page)
            self.page_of[name] = page
        self.method_list.currentRowChanged.connect(self.pages.setCurrentIndex)
        # A message about the last Queue no longer applies once the choice changes.
        self.method_list.itemChanged.connect(lambda _i: self.error.clear())
        for name, page in self.page_of.items():
            if page.clip is not None:
                page.clip.edit.textChanged.connect(lambda text, n=name: self._clip_chosen(n, text))
        split = QSplitter()
        split.addWidget(self.method_list)
        split.addWidget(self.pages)
        split.setStretchFactor(1, 1)
        split.setSizes([220, 520])
        self.error = QLabel()
        self.error.setStyleSheet("color: #d64545;")
        self.error.setWordWrap(True)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel)
        buttons.button(QDialogButtonBox.StandardButton.Ok).setText("Queue labeling")
        buttons.accepted.connect(self._accept)
        buttons.rejected.connect(self.reject)
        top = QFormLayout()
        top.addRow("Layer", self.layer)
        lay = QVBoxLayout(self)
        lay.addLayout(top)
        lay.addWidget(QLabel("Tick the methods to run; select one to see its parameters."))
        lay.addWidget(split, 1)
        lay.addWidget(self.error)
        lay.addWidget(buttons)
        self._refresh_availability()
        self.method_list.setCurrentRow(0)

    def _refresh_availability(self) -> None:
        """Ticks what can run as it stands. A method whose inputs the layer lacks cannot be ticked; a CLIP method
        on a project without a dual encoder of its own becomes runnable (and ticked) once a folder is chosen."""
        self.error.clear()
        self.method_list.blockSignals(True)
        for i in range(self.method_list.count()):
            self._apply_availability(self.method_list.item(i))
        self.method_list.blockSignals(False)

    def _apply_availability(self, item: Any) -> None:
        name = item.data(Qt.ItemDataRole.UserRole)
        page = self.page_of[name]
        reason = self.unavailable.get(self.layer.currentText(), {}).get(name)
        if reason and page.clip is not None and page.clip.text().strip():
            reason = None  # no dual encoder in the project, but a folder is chosen in the form
        if reason:
            item.setFlags(item.flags() & ~Qt.ItemFlag.ItemIsUserCheckable)
            item.setForeground(Qt.GlobalColor.gray)
            if page.clip is not None:
                reason += " Or choose a CLIP model folder below and it is ticked."
        else:
            item.setFlags(item.flags() | Qt.ItemFlag.ItemIsUserCheckable)
            item.setData(Qt.ItemDataRole.ForegroundRole, None)
        item.setCheckState(Qt.CheckState.Unchecked if reason else Qt.CheckState.Checked)
        item.setToolTip(reason or self.methods[name].paper)
        page.warning.setText(reason or "")
        page.warning.setVisible(bool(reason))

    def _clip_chosen(self, name: str, text: str) -> None:
        item = next(self.method_list.item(i) for i in range(self.method_list.count())
                    if self.method_list.item(i).data(Qt.ItemDataRole.UserRole) == name)
        self.error.clear()
        self._apply_availability(item)

    def set_checked(self, names: list[str]) -> None:
        for i in range(self.method_list.count()):
            item = self.method_list.item(i)
            on = item.data(Qt.ItemDataRole.UserRole) in names
            item.setCheckState(Qt.CheckState.Checked if on else Qt.CheckState.Unchecked)

    def requests(self) -> list[dict[str, Any]]:
        """[{layer, method, params, clip_model}] for the ticked methods; raises LabelerError on a bad value."""
        out = []
        for i in range(self.method_list.count()):
            item = self.method_list.item(i)
            if item.checkState() != Qt.CheckState.Checked:
                continue
            name = item.data(Qt.ItemDataRole.UserRole)
            page = self.page_of[name]
            params = self.methods[name].resolve_params(page.form.values())
            clip = page.clip.text() if page.clip is not None else ""
            out.append({"layer": self.layer.currentText(), "method": name, "params": params,
                        "clip_model": clip or None})
        return out

    def _accept(self) -> None:
        try:
            reqs = self.requests()
        except lb.LabelerError as exc:
            self.error.setText(str(exc))
            return
        if not reqs:
            self.error.setText("Tick at least one method.")
            return
        self.accept()
