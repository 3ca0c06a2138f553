"""Adding a model or a dataset: dialogs whose input is checked in a background thread by the same functions the
CLI uses (`app.workspace.add_model` / `add_dataset`, which load and dry-run before writing anything). A problem is
shown in the dialog as the error's message; the dialog stays open to fix it."""
from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PySide6.QtCore import Qt
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from app.errors import NeuronStudioError
from app.ui.workers import CallJob, call_in_pool

log = logging.getLogger(__name__)

# (key, shown text, what the path field holds, whether a weights file applies)
MODEL_KINDS = (
    ("torchvision", "torchvision architecture + weights file", "architecture", True),
    ("torchscript", "TorchScript file", "file", False),
    ("export", "torch.export program (.pt2)", "file", False),
    ("hf", "transformers model folder", "folder", False),
    ("builtin", "built-in architecture + weights file", "architecture", True),
    ("python", "Python file with a factory function (runs its code)", "python", True),
)
MODEL_FILE_FILTER = "Model files (*.pt *.pth *.pt2 *.ts *.torchscript *.safetensors *.bin);;All files (*)"
WEIGHTS_FILTER = "Weights (*.safetensors *.pth *.pt *.bin);;All files (*)"
DATASET_FORMATS = (("", "detect"), ("folder", "folder of images"), ("imagefolder", "ImageFolder (class folders)"),
                   ("coco", "COCO JSON"), ("broden", "Broden (index.csv)"), ("labels-csv", "labels.csv"))
Submit = Callable[[Any, Callable[[Any], None], Callable[[str], None]], Any]


def guess_model_kind(path: Path) -> str:
    """What a dropped or chosen model path most likely is."""
    if path.is_dir():
        return "hf"
    suffix = path.suffix.lower()
    if suffix == ".py":
        return "python"
    if suffix in (".ts", ".torchscript"):
        return "torchscript"
    if suffix == ".pt2":
        return "export"
    if suffix in (".pt", ".pth", ".zip"):
        import zipfile

        # A TorchScript archive is a zip holding the serialized code; a state dict saved by torch.save has none.
        try:
            with zipfile.ZipFile(path) as zf:
                if any(n.split("/", 1)[-1].startswith("code/") for n in zf.namelist()):
                    return "torchscript"
        except (OSError, zipfile.BadZipFile):
            pass
    return "torchvision"


def _triple(text: str, what: str) -> tuple[float, float, float] | None:
    text = text.strip()
    if not text:
        return None
    try:
        nums = tuple(float(x) for x in text.replace(" ", "").split(","))
    except ValueError:
        nums = ()
    if len(nums) != 3:
        raise NeuronStudioError(f"{what} {text!r} is not three comma-separated numbers",
                                fix="write e.g. 0.485,0.456,0.406")
    return nums  # type: ignore[return-value]


def check_and_add_model(project_path: Path, spec: str, weights: str | None, **kwargs: Any) -> Any:
    """In a run's process: load and dry-run the model, and add it only if that works (app.workspace)."""
    from app.project.store import Project
    from app.workspace import add_model

    with Project.open(project_path) as project:
        return add_model(project, spec, weights, **kwargs)


def check_and_add_dataset(project_path: Path, path: str, **kwargs: Any) -> Any:
    """In a run's process: read the dataset's annotations (a large COCO file takes a while) and add it."""
    from app.project.store import Project
    from app.workspace import add_dataset

    with Project.open(project_path) as project:
        return add_dataset(project, path, **kwargs)


class _BusyDialog(QDialog):
    """Common parts: an error line, a busy bar and OK/Cancel; the check runs through `submit`."""

    def __init__(self, submit: Submit, parent: QWidget | None = None):
        super().__init__(parent)
        self.submit = submit
        self.result_value: Any = None
        self.error = QLabel()
        self.error.setWordWrap(True)
        self.error.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.error.setStyleSheet("color: #d64545;")
        self.error.setVisible(False)
        self.busy = QProgressBar()
        self.busy.setRange(0, 0)
        self.busy.setVisible(False)
        self.buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel)
        self.buttons.accepted.connect(self._start)
        self.buttons.rejected.connect(self.reject)
        self.checking = False

    def _finish_layout(self, lay: QVBoxLayout) -> None:
        lay.addWidget(self.error)
        lay.addWidget(self.busy)
        lay.addWidget(self.buttons)

    def _job(self) -> Any:
        raise NotImplementedError

    def _start(self) -> None:
        if self.checking:
            return
        try:
            job = self._job()
        except NeuronStudioError as exc:
            self.show_error(str(exc))
            return
        self.checking = True
        self.error.setVisible(False)
        self.busy.setVisible(True)
        self.buttons.button(QDialogButtonBox.StandardButton.Ok).setEnabled(False)
        self.submit(job, self._ok, self._failed)

    def _ok(self, value: Any) -> None:
        self.checking = False
        self.result_value = value
        self.busy.setVisible(False)
        self.accept()

    def _failed(self, message: str) -> None:
        self.checking = False
        self.busy.setVisible(False)
        self.buttons.button(QDialogButtonBox.StandardButton.Ok).setEnabled(True)
        self.show_error(message)

    def show_error(self, message: str) -> None:
        self.error.setText(message)
        self.error.setVisible(True)

    def reject(self) -> None:
        if self.checking:  # the check cannot be interrupted half-way; it writes nothing until it succeeds
            self.show_error("Still checking; this closes when the check ends.")
            return
        super().reject()


class AddModelDialog(_BusyDialog):
    def __init__(self, project_path: Path, submit: Submit, parent: QWidget | None = None, path: str = "",
                 kind: str | None = None):
        super().__init__(submit, parent)
        self.project_path = Path(project_path)
        self.setWindowTitle("Add a model")
        self.setMinimumWidth(560)
        self.kind = QComboBox()
        for key, text, _what, _w in MODEL_KINDS:
            self.kind.addItem(text, key)
        self.target = QComboBox()
        self.target.setEditable(True)
        self.target.setInsertPolicy(QComboBox.InsertPolicy.NoInsert)
        self.browse = QPushButton("Browse...")
        self.browse.clicked.connect(self._browse_target)
        row = QHBoxLayout()
        row.addWidget(self.target, 1)
        row.addWidget(self.browse)
        self.factory = QLineEdit()
        self.factory.setPlaceholderText("function returning the nn.Module, e.g. build_model")
        self.weights = QLineEdit()
        self.weights.setPlaceholderText(".safetensors or state dict .pth (loaded with weights_only=True)")
        wbrowse = QPushButton("Browse...")
        wbrowse.clicked.connect(self._browse_weights)
        wrow = QHBoxLayout()
        wrow.addWidget(self.weights, 1)
        wrow.addWidget(wbrowse)
        self.name = QLineEdit()
        self.name.setPlaceholderText("default: from the file name")
        self.trust = QCheckBox("I trust this file: run its code")
        self.form = QFormLayout()
        self.form.addRow("Kind", self.kind)
        self.target_label = QLabel("Architecture")
        self.form.addRow(self.target_label, row)
        self.factory_label = QLabel("Factory")
        self.form.addRow(self.factory_label, self.factory)
        self.weights_label = QLabel("Weights file")
        self.form.addRow(self.weights_label, wrow)
        self.form.addRow("Name", self.name)
        self.form.addRow("", self.trust)
        pre = QGroupBox("Preprocessing overrides (leave empty to use the model's own)")
        pre.setCheckable(True)
        pre.setChecked(False)
        pf = QFormLayout(pre)
        self.resize_ = QSpinBox()
        self.resize_.setRange(0, 4096)
        self.resize_.setSpecialValueText("model's")
        self.crop = QSpinBox()
        self.crop.setRange(0, 4096)
        self.crop.setSpecialValueText("model's")
        self.mean = QLineEdit()
        self.mean.setPlaceholderText("e.g. 0.485,0.456,0.406")
        self.std = QLineEdit()
        self.std.setPlaceholderText("e.g. 0.229,0.224,0.225")
        pf.addRow("Resize shorter side", self.resize_)
        pf.addRow("Centre crop", self.crop)
        pf.addRow("Mean", self.mean)
        pf.addRow("Std", self.std)
        self.pre_box = pre
        lay = QVBoxLayout(self)
        lay.addLayout(self.form)
        lay.addWidget(pre)
        self._finish_layout(lay)
        self.buttons.button(QDialogButtonBox.StandardButton.Ok).setText("Add model")
        self.kind.currentIndexChanged.connect(self._on_kind)
        if kind:
            self.kind.setCurrentIndex(max(0, self.kind.findData(kind)))
        self._on_kind()
        if path:
            if self.kind_key() in ("torchvision", "builtin"):
                self.weights.setText(path)
            else:
                self.target.setCurrentText(path)
        self._load_architectures()

    def kind_key(self) -> str:
        return self.kind.currentData()

    def _on_kind(self, *_: Any) -> None:
        key = self.kind_key()
        what = next(w for k, _t, w, _x in MODEL_KINDS if k == key)
        weights = next(x for k, _t, _w, x in MODEL_KINDS if k == key)
        self.target_label.setText({"architecture": "Architecture", "file": "TorchScript file", "folder": "Folder",
                                   "python": "Python file"}[what])
        self.browse.setVisible(what != "architecture")
        self.factory.setVisible(key == "python")
        self.factory_label.setVisible(key == "python")
        self.weights.setEnabled(weights)
        self.weights_label.setEnabled(weights)
        self.trust.setVisible(key == "python")
        self._fill_targets()

    def _fill_targets(self) -> None:
        key = self.kind_key()
        current = self.target.currentText()
        self.target.clear()
        if key == "torchvision":
            self.target.addItems(getattr(self, "_torchvision_names", []))
        elif key == "builtin":
            self.target.addItems(getattr(self, "_builtin_names", []))
        self.target.setCurrentText(current if key not in ("torchvision", "builtin") or current else "")

    def _load_architectures(self) -> None:
        def names() -> tuple[list[str], list[str]]:
            tv: list[str] = []
            bi: list[str] = []
            try:
                import torchvision.models

                tv = sorted(torchvision.models.list_models(module=torchvision.models))
            except Exception as exc:  # only a convenience list: the field stays editable
                log.info("torchvision model list unavailable: %s", exc)
            try:
                from app.sources import models as src

                reg = getattr(src, "BUILTINS", None) or getattr(src, "BUILTIN_MODELS", None) or {}
                bi = sorted(reg)
            except Exception as exc:
                log.info("built-in model list unavailable: %s", exc)
            return tv, bi or ["shapes_cnn"]

        def got(value: tuple[list[str], list[str]]) -> None:
            self._torchvision_names, self._builtin_names = value
            if not self.target.currentText():
                self._fill_targets()

        call_in_pool(names, got, owner=self)

    def _browse_target(self) -> None:
        key = self.kind_key()
        if key == "hf":
            path = QFileDialog.getExistingDirectory(self, "transformers model folder")
        elif key == "python":
            path, _ = QFileDialog.getOpenFileName(self, "Python file", "", "Python (*.py)")
        else:
            path, _ = QFileDialog.getOpenFileName(self, "TorchScript file", "", MODEL_FILE_FILTER)
        if path:
            self.target.setCurrentText(path)

    def _browse_weights(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Weights file", "", WEIGHTS_FILTER)
        if path:
            self.weights.setText(path)

    def spec(self) -> tuple[str, str | None]:
        key = self.kind_key()
        target = self.target.currentText().strip()
        if not target:
            raise NeuronStudioError("choose what to load", fix="fill in the architecture, file or folder")
        weights = self.weights.text().strip() or None if self.weights.isEnabled() else None
        if key == "python":
            factory = self.factory.text().strip()
            if not factory:
                raise NeuronStudioError("a Python model needs the name of its factory function",
                                        fix="write the function that returns the model")
            if not self.trust.isChecked():
                raise NeuronStudioError("loading a Python file runs its code",
                                        fix="tick 'I trust this file' if you wrote it or know it")
            return f"python:{target}:{factory}", weights
        return f"{key}:{target}", weights

    def overrides(self) -> dict[str, Any] | None:
        if not self.pre_box.isChecked():
            return None
        out: dict[str, Any] = {}
        if self.resize_.value():
            out["resize"] = self.resize_.value()
        if self.crop.value():
            out["crop"] = self.crop.value()
        for name, edit in (("mean", self.mean), ("std", self.std)):
            v = _triple(edit.text(), name)
            if v is not None:
                out[name] = v
        return out or None

    def _free_name(self, base: str | None) -> str | None:
        """The file's stem, made unique among the project's models (the workspace would use the whole spec)."""
        if not base:
            return None
        from app.project.store import Project

        with Project.open(self.project_path, readonly=True) as project:
            taken = {r["name"] for r in project.models()}
        name, i = base, 2
        while name in taken:
            name, i = f"{base}-{i}", i + 1
        return name

    def _job(self) -> Any:
        spec, weights = self.spec()
        overrides = self.overrides()
        name = self.name.text().strip() or None
        if name is None and self.kind_key() in ("python", "torchscript", "export", "hf"):
            name = self._free_name(Path(self.target.currentText().strip()).stem or None)
        trust = self.kind_key() == "python" and self.trust.isChecked()
        return CallJob(f"Check model {spec}", check_and_add_model, self.project_path, spec, weights, name=name,
                       trust_code=trust, preprocess_overrides=overrides)


class AddDatasetDialog(_BusyDialog):
    def __init__(self, project_path: Path, submit: Submit, parent: QWidget | None = None, path: str = ""):
        super().__init__(submit, parent)
        self.project_path = Path(project_path)
        self.setWindowTitle("Add a dataset")
        self.setMinimumWidth(560)
        self.path = QLineEdit(path)
        self.path.setPlaceholderText("image folder, or its annotation file (COCO JSON, index.csv, labels.csv)")
        folder = QPushButton("Folder...")
        folder.clicked.connect(self._browse_folder)
        file = QPushButton("File...")
        file.clicked.connect(self._browse_file)
        row = QHBoxLayout()
        row.addWidget(self.path, 1)
        row.addWidget(folder)
        row.addWidget(file)
        self.format = QComboBox()
        for key, text in DATASET_FORMATS:
            self.format.addItem(text, key)
        self.name = QLineEdit()
        self.name.setPlaceholderText("default: the folder name")
        form = QFormLayout()
        form.addRow("Dataset", row)
        form.addRow("Format", self.format)
        form.addRow("Name", self.name)
        lay = QVBoxLayout(self)
        lay.addLayout(form)
        hint = QLabel("Reading a large annotation file can take a while; nothing is written until it has been read.")
        hint.setWordWrap(True)
        hint.setStyleSheet("color: gray;")
        lay.addWidget(hint)
        self._finish_layout(lay)
        self.buttons.button(QDialogButtonBox.StandardButton.Ok).setText("Add dataset")

    def _browse_folder(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Dataset folder", self.path.text())
        if path:
            self.path.setText(path)

    def _browse_file(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Annotation file", self.path.text(),
                                              "Annotations (*.json *.csv);;All files (*)")
        if path:
            self.path.setText(path)

    def _job(self) -> Any:
        path = self.path.text().strip()
        if not path:
            raise NeuronStudioError("choose a dataset folder or annotation file")
        if not Path(path).exists():
            raise NeuronStudioError("this path does not exist", file=path, fix="choose an existing folder or file")
        fmt = self.format.currentData() or None
        name = self.name.text().strip() or None
        return CallJob(f"Check dataset {path}", check_and_add_dataset, self.project_path, path, name=name, format=fmt)
