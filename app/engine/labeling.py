"""The labeling job: the thin adapter between the project and `labelers/`. It gathers the inputs a method asks for
from an extraction of one layer (only images that were read), runs the method, and stores its labels as a run."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

import labelers.base as lb
from app.engine.device import pick_device
from app.engine.extract import MapRunner, layer_info, load_project_model, make_loader, open_project_dataset
from app.engine.results import LayerResults
from app.errors import JobError
from app.jobs import Cancelled, JobProgress
from app.project.store import Project

log = logging.getLogger(__name__)


@dataclasses.dataclass
class LabelReport:
    method: str
    layer: str
    units: int
    labels: int
    seconds: float
    summary: dict[str, Any]


class LabelJob:
    kind = "label"

    def __init__(self, project_path: str | Path, method: str, layer: str, params: dict[str, Any] | None = None, *,
                 model: str | int | None = None, clip_model: str | Path | None = None, device: str = "auto",
                 batch_size: int = 32, num_workers: int | None = None, extraction_run: int | None = None):
        self.project_path = Path(project_path)
        self.method = method
        self.layer = layer
        self.params = dict(params or {})
        self.model_ref = model
        self.clip_model = Path(clip_model) if clip_model else None
        self.device = device
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.extraction_run = extraction_run
        self.title = f"Label {layer} with {method}"
        self.run_id: int | None = None

    def execute(self, progress: JobProgress) -> LabelReport:
        progress.begin_stage(f"{self.method} on {self.layer}")  # the stage line names method and layer
        project = Project.open(self.project_path)
        try:
            return self._execute(project, progress)
        finally:
            project.close()

    def _execute(self, project: Project, progress: JobProgress) -> LabelReport:
        labeler = lb.get(self.method)
        params = labeler.resolve_params(self.params)
        model_row = project.model(self.model_ref)
        layer_row = project.layer(model_row["id"], self.layer)
        results = LayerResults.load(project, layer_row["id"], self.extraction_run)
        ds_row = project.dataset(results.stats["dataset_id"])
        device = pick_device(self.device)
        key = hashlib.sha256(json.dumps(
            {"source": results.run_id, "layer": layer_row["id"], "method": self.method, "params": params,
             "clip": str(self.clip_model) if self.clip_model else None}, sort_keys=True, default=str,
        ).encode()).hexdigest()
        # Inputs first: a method this project cannot feed leaves no failed run behind, only its message.
        inputs = self._inputs(project, labeler, results, layer_row, model_row, ds_row, device)
        inputs.require(self.method, *labeler.inputs)
        prior = project.resumable_run(self.kind, key)
        run_id = prior.id if prior else project.create_run(
            kind=self.kind, key=key, params=params | ({"clip_model": str(self.clip_model)} if self.clip_model else {}),
            model_id=model_row["id"], dataset_id=ds_row["id"], layer_id=layer_row["id"],
            source_run_id=results.run_id, method=self.method,
        )
        self.run_id = run_id
        project.start_run(run_id)
        t0 = time.monotonic()
        try:
            out = labeler(inputs, params, progress)
            n = project.replace_labels(run_id, layer_row["id"], self.method, out.labels)
        except Cancelled:
            project.finish_run(run_id, "cancelled", seconds=time.monotonic() - t0)
            raise
        except BaseException as exc:
            project.finish_run(run_id, "failed", error=str(exc) or type(exc).__name__, seconds=time.monotonic() - t0)
            raise
        seconds = time.monotonic() - t0
        report = LabelReport(self.method, self.layer, layer_row["units"], n, seconds, out.summary)
        project.finish_run(run_id, "done", report=dataclasses.asdict(report), seconds=seconds,
                           message=f"{n} labels for {layer_row['units']} units")
        return report

    # ---- inputs --------------------------------------------------------------------------------------------
    def _inputs(self, project: Project, labeler: lb.Labeler, results: LayerResults, layer_row: dict[str, Any],
                model_row: dict[str, Any], ds_row: dict[str, Any], device: torch.device) -> lb.LabelerInputs:
        need = set(labeler.inputs)
        valid = results.valid
        rows = np.nonzero(valid)[0]
        inputs = lb.LabelerInputs(layer=layer_row["name"], num_units=layer_row["units"], device=device)
        inputs.pooled_max = torch.from_numpy(np.asarray(results.pooled_max)[rows]).to(device)
        inputs.pooled_mean = torch.from_numpy(np.asarray(results.pooled_mean)[rows]).to(device)
        concept_rows = project.concepts(ds_row["id"])
        if concept_rows:
            inputs.concepts = [lb.Concept(c["name"], c["category"]) for c in concept_rows]
            inputs.concept_presence = torch.from_numpy(project.presence_matrix(ds_row["id"])[rows]).to(device)
        if lb.Input.CAPTIONS in need:
            caps = project.captions(ds_row["id"])
            inputs.captions = [caps[i] for i in rows]
        if lb.Input.MASK_COUNTS in need and results.has_mask_counts:
            inputs.mask_counts = results.mask_counts(ds_row["categories"])
            inputs.mask_counts = dataclasses.replace(
                inputs.mask_counts, **{f: getattr(inputs.mask_counts, f).to(device)
                                       for f in ("intersection", "unit_area", "concept_area", "concept_category")})
        if lb.Input.CLIP_MODEL in need:
            inputs.clip_model = self.clip_model
        if need & {lb.Input.IMAGES, lb.Input.MASK_BATCHES}:
            reader = open_project_dataset(ds_row)
            if lb.Input.IMAGES in need:
                inputs.images = self._image_iter(reader, rows)
            if lb.Input.MASK_BATCHES in need and reader.has_masks and results.has_mask_counts:
                model = load_project_model(model_row, device)
                inputs.mask_batches = self._mask_iter(reader, rows, model, layer_row, results, device)
        return inputs

    def _image_iter(self, reader: Any, rows: np.ndarray):
        from app.sources.datasets import load_rgb

        def images(batch_size: int) -> Iterator[tuple[torch.Tensor, list[Any]]]:
            for s in range(0, len(rows), batch_size):
                chunk = rows[s:s + batch_size]
                # Positions are in the labeler's index space (valid images only), not the dataset's.
                yield torch.arange(s, s + len(chunk)), [load_rgb(reader.images[int(i)].path) for i in chunk]

        return images

    def _mask_iter(self, reader: Any, rows: np.ndarray, model: Any, layer_row: dict[str, Any],
                   results: LayerResults, device: torch.device):
        from labelers.netdissect import threshold_and_upsample

        info = layer_info(layer_row)
        size = int(results.stats["mask_size"][0])
        thresholds = torch.from_numpy(np.asarray(results.threshold())).to(device)
        n_concepts = len(reader.concepts)
        # Dense [B, C, H, W] concept masks: keep the batch small when the vocabulary is large.
        batch = max(1, min(self.batch_size, int(2**28 // max(1, n_concepts * size * size))))

        def batches() -> Iterator[lb.MaskBatch]:
            runner = MapRunner(model, {info.name: info}, device, batch_size=batch)
            for b in make_loader(reader, model.preprocess, rows.tolist(), batch, self.num_workers, device, size):
                ok = b["ok"]
                if not ok.all():
                    raise JobError(f"an image that extraction read is now unreadable: {b['error'][0]}",
                                   fix="restore the file or extract again")
                maps = runner.maps(b["x"])[info.name]
                dense = torch.zeros((len(maps), n_concepts, size, size), dtype=torch.bool)
                for j, (cidx, m) in enumerate(zip(b["concepts"], b["masks"])):
                    if len(cidx):
                        dense[j, cidx] = m
                yield lb.MaskBatch(
                    unit_masks=threshold_and_upsample(maps, thresholds, (size, size)),
                    concept_masks=dense.to(device),
                    category_annotated=b["annotated"].to(device),
                )

        return batches
