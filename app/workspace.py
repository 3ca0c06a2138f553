"""High-level operations shared by the CLI and the window: create projects, add models and datasets (validated
before anything is written), and list what can be extracted and labeled."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.errors import ProjectError
from app.project.store import Project

log = logging.getLogger(__name__)


@dataclass
class AddedModel:
    model_id: int
    name: str
    layers: int
    extractable: int


def add_model(project: Project, spec: str, weights: str | Path | None = None, *, name: str | None = None,
              trust_code: bool = False, preprocess_overrides: dict[str, Any] | None = None) -> AddedModel:
    """Load the model on the CPU and dry-run it; only a model that loads and runs is written to the project."""
    from app.sources.models import discover_layers, load_model

    model = load_model(spec, weights, trust_code=trust_code, preprocess_overrides=preprocess_overrides, device="cpu")
    layers = discover_layers(model)
    if name is None:
        base = Path(weights).stem if weights else spec.split(":", 1)[-1].rstrip("/").split("/")[-1]
        name = base or spec
        taken = {r["name"] for r in project.models()}
        i = 2
        while name in taken:
            name = f"{base}-{i}"
            i += 1
    model_id = project.add_model(
        name=name, spec=spec, kind=model.kind, weights_path=str(Path(weights).resolve()) if weights else None,
        fingerprint=model.fingerprint, preprocess=model.preprocess.to_dict(), class_names=model.class_names,
        layers=layers, trust_code=trust_code,
    )
    return AddedModel(model_id, name, len(layers), sum(1 for layer in layers if layer.units > 0))


def dataset_fingerprint(reader: Any) -> str:
    """Content key of a dataset as read (see `app.sources.datasets.content_fingerprint`)."""
    from app.sources.datasets import content_fingerprint

    return content_fingerprint(reader)


@dataclass
class AddedDataset:
    dataset_id: int
    name: str
    images: int
    concepts: int
    has_masks: bool
    captions: int
    report: dict[str, Any]


def add_dataset(project: Project, path: str | Path, *, name: str | None = None, format: str | None = None) -> AddedDataset:
    from app.sources.datasets import open_dataset

    reader = open_dataset(path, format)
    if not reader.images:
        raise ProjectError("the dataset has no images", file=path, fix="point at a folder that holds images")
    if name is None:
        base = Path(path).resolve().name or "dataset"
        name = base
        taken = {r["name"] for r in project.datasets()}
        i = 2
        while name in taken:
            name = f"{base}-{i}"
            i += 1
    ds_id = project.add_dataset(name=name, reader=reader, fingerprint=dataset_fingerprint(reader))
    caps = reader.captions()
    return AddedDataset(ds_id, name, len(reader.images), len(reader.concepts), bool(reader.has_masks),
                        sum(len(c) for c in caps) if caps else 0, reader.report())


def resolve_layers(project: Project, model_id: int, names: list[str] | str) -> list[str]:
    """'all' means every layer with units; otherwise names are checked against the model."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    if names == ["all"]:
        # every named layer; the unnamed row is the whole model's output, which its last layer already gives
        return [r["name"] for r in project.layers(model_id, extractable_only=True) if r["name"]]
    return [project.layer(model_id, n)["name"] for n in names]


def methods_quick_first() -> list[str]:
    """Every labeling method, those that read only the extracted arrays first (seconds) and those that go over the
    images again (masks pixel by pixel, images through a model: minutes) last, so that labels show up early."""
    import labelers.base as lb

    heavy = {lb.Input.MASK_BATCHES, lb.Input.IMAGES}
    return [name for name, cls in sorted(lb.available().items(), key=lambda kv: (bool(heavy & set(kv[1].inputs)),
                                                                                   kv[0]))]
