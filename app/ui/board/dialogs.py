"""The dialog that describes a new pool of activation maps."""
from __future__ import annotations

import re
from typing import Any

from PySide6.QtWidgets import (
    QCheckBox, QComboBox, QDialog, QDialogButtonBox, QFormLayout, QLabel, QLineEdit, QSpinBox, QVBoxLayout,
    QWidget,
)

from app import naming
from app.project.store import Project


def parse_ranges(text: str) -> list[int] | None:
    """'all' or '' -> None; '0-15, 32' -> [0..15, 32]."""
    text = text.strip().lower()
    if text in ("", "all"):
        return None
    out: list[int] = []
    for part in re.split(r"[,\s]+", text):
        if not part:
            continue
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise ValueError(f"{part!r} is not a number or a range like 4-9")
        a, b = int(m.group(1)), int(m.group(2) or m.group(1))
        if b < a:
            raise ValueError(f"the range {part!r} runs backwards")
        out.extend(range(a, b + 1))
    return sorted(set(out))


class NewPoolDialog(QDialog):
    def __init__(self, project: Project, parent: QWidget | None = None):
        super().__init__(parent)
        self.setWindowTitle("New pool of activation maps")
        self.project = project
        self.layer = QComboBox()
        for row in project.extracted_layers():
            model = project.model(row["model_id"])["name"]
            self.layer.addItem(f"{model} · {row['name']} ({row['units']} units)", (row["id"], row["units"]))
        self.kind = QComboBox()
        self.kind.addItem("Unit-centric: the top exemplars of chosen units", "unit")
        self.kind.addItem("Decision-centric: the maps behind each chosen image's prediction", "decision")
        self.units = QLineEdit("all")
        self.units.setPlaceholderText("all, or e.g. 0-15, 32")
        self.per_unit = QSpinBox()
        self.per_unit.setRange(1, 100)
        self.per_unit.setValue(5)
        self.images = QSpinBox()
        self.images.setRange(1, 100000)
        self.images.setValue(20)
        self.image_list = QLineEdit()
        self.image_list.setPlaceholderText("optional: dataset indices, e.g. 0-9, 40 (else drawn at random)")
        self.per_image = QSpinBox()
        self.per_image.setRange(1, 64)
        self.per_image.setValue(5)
        self.name = QLineEdit()
        self.name.setPlaceholderText("optional")
        self.features = QCheckBox("Compute region features for suggested groups (runs the model)")
        self.features.setChecked(True)
        self.shuffle = QCheckBox("Show maps in random order")
        self.shuffle.setChecked(True)
        self.error = QLabel()
        self.error.setStyleSheet("color: #d9534f")
        self.form = QFormLayout()
        self.form.addRow("Layer", self.layer)
        self.form.addRow("Kind", self.kind)
        self.form.addRow("Units", self.units)
        self.form.addRow("Exemplars per unit", self.per_unit)
        self.form.addRow("Images", self.images)
        self.form.addRow("Image indices", self.image_list)
        self.form.addRow("Maps per image", self.per_image)
        self.form.addRow("Name", self.name)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel)
        buttons.accepted.connect(self._accept)
        buttons.rejected.connect(self.reject)
        lay = QVBoxLayout(self)
        lay.addLayout(self.form)
        lay.addWidget(self.features)
        lay.addWidget(self.shuffle)
        lay.addWidget(self.error)
        lay.addWidget(buttons)
        self.kind.currentIndexChanged.connect(self._kind_changed)
        self._kind_changed()
        self._spec: naming.PoolSpec | None = None

    def _kind_changed(self) -> None:
        unit = self.kind.currentData() == "unit"
        for w, show in ((self.units, unit), (self.per_unit, unit), (self.images, not unit),
                        (self.image_list, not unit), (self.per_image, not unit)):
            self.form.setRowVisible(w, show)

    def spec(self) -> naming.PoolSpec:
        if self.layer.currentData() is None:
            raise ValueError("no layer has been extracted yet; extract one first")
        layer_id, units = self.layer.currentData()
        kind = self.kind.currentData()
        spec = naming.PoolSpec(kind=kind, layer=int(layer_id), name=self.name.text().strip() or None,
                               features=self.features.isChecked(), shuffle=self.shuffle.isChecked())
        if kind == "unit":
            spec.units = parse_ranges(self.units.text())
            if spec.units and max(spec.units) >= units:
                raise ValueError(f"the layer has units 0..{units - 1}")
            spec.per_unit = self.per_unit.value()
        else:
            spec.images = parse_ranges(self.image_list.text())
            spec.num_images = self.images.value()
            spec.per_image = self.per_image.value()
        return spec

    def _accept(self) -> None:
        try:
            self._spec = self.spec()
        except ValueError as exc:
            self.error.setText(str(exc))
            return
        self.accept()

    @property
    def result_spec(self) -> Any:
        return self._spec
