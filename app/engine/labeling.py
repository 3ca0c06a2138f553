"""The labeling job: the thin adapter between the project and `labelers/`. It gathers the inputs a method asks for
from an extraction of one layer (only images that were read), runs the method, and stores its labels as a run."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

import labelers.base as lb
from app.engine.claims import claim_or_wait
from app.engine.device import pick_device
from app.engine.results import LayerResults
from app.jobs import JobProgress
from app.project.store import Project

log = logging.getLogger(__name__)

LANGUAGE_INPUTS = {lb.Input.CLIP_MODEL, lb.Input.CAPTIONER, lb.Input.CAUSAL_LM, lb.Input.SENTENCE_ENCODER}


@dataclasses.dataclass
class LabelReport:
    method: str
    layer: str
    units: int
    labels: int
    seconds: float
    summary: dict[str, Any]


@dataclasses.dataclass
class LabelSources:
    """The project rows a labeling job read its inputs from (plain data: what a worker needs to read them again)."""

    model_row: dict[str, Any]
    ds_row: dict[str, Any]
    layer_row: dict[str, Any]
    results: LayerResults


class LabelJob:
    kind = "label"

    def __init__(self, project_path: str | Path, method: str, layer: str, params: dict[str, Any] | None = None, *,
                 model: str | int | None = None, clip_model: str | Path | None = None, device: str = "auto",
                 batch_size: int = 32, num_workers: int | None = None, extraction_run: int | None = None,
                 captioner: str | Path | None = None, causal_lm: str | Path | None = None):
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
        # local transformers folders for the language methods (until the project registers its own models)
        self.captioner = Path(captioner) if captioner else None
        self.causal_lm = Path(causal_lm) if causal_lm else None
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
             "clip": str(self.clip_model) if self.clip_model else None,
             "captioner": str(self.captioner) if self.captioner else None,
             "causal_lm": str(self.causal_lm) if self.causal_lm else None,
             # a retrained or newly brought language model is a new run, not the resumption of an old one
             "language": [m["id"] for m in project.language_models()]
             if set(labeler.inputs) & LANGUAGE_INPUTS else None}, sort_keys=True, default=str,
        ).encode()).hexdigest()
        # Inputs first: a method this project cannot feed leaves no failed run behind, only its message.
        inputs = self._inputs(project, labeler, results, layer_row, model_row, ds_row, device)
        inputs.require(self.method, *labeler.inputs)
        # Claimed atomically before computing: the same command started twice computes each job once.
        run_id, finished = claim_or_wait(
            project, progress,
            kind=self.kind, key=key, params=params | ({"clip_model": str(self.clip_model)} if self.clip_model else {})
            | ({"captioner": str(self.captioner)} if self.captioner else {})
            | ({"causal_lm": str(self.causal_lm)} if self.causal_lm else {}),
            model_id=model_row["id"], dataset_id=ds_row["id"], layer_id=layer_row["id"],
            source_run_id=results.run_id, method=self.method,
        )
        self.run_id = run_id
        if finished is not None and finished.report:
            return LabelReport(**{f.name: finished.report[f.name] for f in dataclasses.fields(LabelReport)})
        t0 = time.monotonic()
        with project.finishing(run_id, t0):
            out = self._run_labeler(labeler, inputs, params, progress,
                                    LabelSources(model_row, ds_row, layer_row, results))
            n = project.replace_labels(run_id, layer_row["id"], self.method, out.labels)
        seconds = time.monotonic() - t0
        report = LabelReport(self.method, self.layer, layer_row["units"], n, seconds, out.summary)
        project.finish_run(run_id, "done", report=dataclasses.asdict(report), seconds=seconds,
                           message=f"{n} labels for {layer_row['units']} units")
        return report

    def _run_labeler(self, labeler: lb.Labeler, inputs: lb.LabelerInputs, params: dict[str, Any],
                     progress: JobProgress, sources: LabelSources) -> lb.LabelingResult:
        """In this process; `distributed.RayLabelJob` splits the units over Ray workers instead."""
        return labeler(inputs, params, progress)

    # ---- inputs --------------------------------------------------------------------------------------------
    def _inputs(self, project: Project, labeler: lb.Labeler, results: LayerResults, layer_row: dict[str, Any],
                model_row: dict[str, Any], ds_row: dict[str, Any], device: torch.device) -> lb.LabelerInputs:
        from app.engine.inputs import InputOptions, build_inputs

        options = InputOptions(clip_model=self.clip_model, captioner=self.captioner, causal_lm=self.causal_lm,
                               batch_size=self.batch_size, num_workers=self.num_workers)
        return build_inputs(project, self.method, tuple(labeler.inputs), dict(layer_row), model_row, ds_row, results,
                            device, options)
