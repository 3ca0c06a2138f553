"""The built-in demo, end to end and offline: generate the shapes dataset, train the small CNN, create a project,
extract its layers and run every labeler whose inputs the demo has. Each step is skipped when its result is
already there, so an interrupted demo continues where it stopped."""
from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import labelers.base as lb
from app.jobs import JobProgress

log = logging.getLogger(__name__)

PROJECT_NAME = "demo.nstudio"
DATASET_DIR = "shapes"
WEIGHTS_NAME = "shapes_cnn.safetensors"
LANGUAGE_KINDS = ("clip", "captioner", "lm")
# The in-app dual encoder knows the project's own words only: CLIP-Dissect names units from the dataset's concepts.
DEMO_PARAMS: dict[str, dict[str, Any]] = {"clip_dissect": {"vocabulary": "dataset"}}
# MILAN runs a beam search per unit: the demo describes the layers whose units detect shapes, not the colour blobs
MILAN_LAYERS = ("block3", "block4", "fc")


@dataclass
class DemoSummary:
    project: str
    training: dict[str, Any]
    layers: list[dict[str, Any]] = field(default_factory=list)
    skipped_methods: dict[str, str] = field(default_factory=dict)
    language: dict[str, Any] = field(default_factory=dict)  # per trained kind: name, seconds, held-out figures
    clip_agreement: dict[str, Any] = field(default_factory=dict)  # see clip_dissect_agreement


def demo_layers(project: Any, model_id: int) -> list[str]:
    """The blocks and the classifier: the top-level modules with units (their inner conv/bn/relu are left out, and
    the global pooling, which only repeats the last block's per-image means)."""
    rows = project.layers(model_id, extractable_only=True)
    return [r["name"] for r in rows if "." not in r["name"] and r["name"] and "Pool" not in r["type"]]


class DemoJob:
    title = "Build the demo project"

    def __init__(self, out_dir: Path, n_images: int = 3000, epochs: int | None = None, device: str = "auto",
                 rebuild: bool = False, seed: int = 0, language_options: dict[str, Any] | None = None):
        self.out_dir = Path(out_dir)
        self.n_images = n_images
        self.epochs = epochs
        self.device = device
        self.rebuild = rebuild
        self.seed = seed
        # overrides of app.language.train.TrainOptions for the demo's language models (tests make them tiny)
        self.language_options = dict(language_options or {})

    def execute(self, progress: JobProgress) -> DemoSummary:
        from app.demo.shapes import generate_shapes_dataset
        from app.demo.train import train_demo_model
        from app.engine.extract import ExtractJob, ExtractOptions
        from app.engine.labeling import LabelJob
        from app.project.store import Project
        from app.workspace import add_dataset, add_model

        out = self.out_dir
        if self.rebuild and out.exists():
            for name in (PROJECT_NAME, DATASET_DIR, WEIGHTS_NAME, "training.json"):
                target = out / name
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
        out.mkdir(parents=True, exist_ok=True)
        data_dir = out / DATASET_DIR
        done_marker = data_dir / ".complete"
        if not done_marker.exists():
            progress.begin_stage("generating the shapes dataset")
            if data_dir.exists():
                shutil.rmtree(data_dir)
            generate_shapes_dataset(data_dir, n_images=self.n_images, seed=self.seed, progress=progress)
            done_marker.write_text(json.dumps({"images": self.n_images, "seed": self.seed}))
        weights = out / WEIGHTS_NAME
        metrics_file = out / "training.json"
        if not weights.exists():
            progress.begin_stage("training the demo CNN")
            kwargs: dict[str, Any] = {"seed": self.seed, "progress": progress}
            if self.epochs is not None:
                kwargs["epochs"] = self.epochs
            metrics = train_demo_model(data_dir, weights, **kwargs)
            metrics_file.write_text(json.dumps(metrics, indent=1, default=float))
        metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}

        project_dir = out / PROJECT_NAME
        with Project.open_or_create(project_dir) as project:
            if not project.models():
                add_model(project, "builtin:shapes_cnn", weights, name="shapes_cnn")
            if not project.datasets():
                add_dataset(project, data_dir, name="shapes")
            model = project.model()
            layers = demo_layers(project, model["id"])
        summary = DemoSummary(project=str(project_dir), training=metrics)
        ExtractJob(project_dir, ExtractOptions(layers=layers, device=self.device)).execute(progress)
        summary.language = train_language_models(project_dir, self.device, progress, self.language_options)
        methods = lb.available()
        grids = layer_grids(project_dir, layers)
        for layer in layers:
            for name in methods:
                if name == "milan" and layer not in MILAN_LAYERS:
                    continue
                why_not = methods[name].applies_to(grids.get(layer))
                if why_not:
                    summary.skipped_methods[f"{name} on {layer}"] = why_not
                    continue
                job = LabelJob(project_dir, name, layer, DEMO_PARAMS.get(name), device=self.device)
                try:
                    job.execute(progress)
                except lb.MissingInputError as exc:
                    summary.skipped_methods[name] = str(exc)
        with Project.open(project_dir) as project:
            summary.layers = layer_summaries(project, model["id"], layers)
            summary.clip_agreement = clip_dissect_agreement(project, model["id"], layers)
        return summary


def layer_grids(project_dir: Path, layers: list[str]) -> dict[str, tuple[int, int] | None]:
    """Each layer's map grid (h, w), None for vector layers: methods say through `applies_to` where they mean little."""
    from app.project.store import Project

    with Project.open(project_dir) as project:
        model = project.model()
        rows = {name: project.layer(model["id"], name) for name in layers}
    return {name: (tuple(r["grid"]) if r["grid"] else None) for name, r in rows.items()}  # type: ignore[misc]


def train_language_models(project_dir: Path, device: str, progress: JobProgress,
                          options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train the dual encoder, the set captioner and the LM on the demo's own text unless the project has them
    (a resumed demo keeps what it trained); returns each model's time and held-out figures from its card."""
    from app.language.train import TrainJob, TrainOptions
    from app.project.store import Project

    out: dict[str, Any] = {}
    for kind in LANGUAGE_KINDS:
        with Project.open(project_dir) as project:
            have = project.language_model(kind=kind)
        if have is None:
            TrainJob(project_dir, TrainOptions(kind=kind, device=device, **(options or {}))).execute(progress)
            with Project.open(project_dir) as project:
                have = project.language_model(kind=kind)
        card = have["card"]
        out[kind] = {"name": have["name"], "seconds": card.get("seconds"), "heldout": card.get("heldout", {}),
                     "baselines": card.get("baselines", {})}
    return out


def clip_dissect_agreement(project: Any, model_id: int, layers: list[str],
                           categories: tuple[str, ...] = ("color", "object")) -> dict[str, Any]:
    """Of the units Network Dissection calls detectors (IoU >= 0.04) of a concept in `categories` (colours and
    shapes), the fraction whose CLIP-Dissect top label names the same concept."""
    agree = total = 0
    per_layer = {}
    for name in layers:
        row = project.layer(model_id, name)
        top = {(lab["method"], lab["unit"]): lab for lab in project.labels(layer_id=row["id"], max_rank=1)}
        a = t = 0
        for (method, unit), lab in top.items():
            if method != "netdissect" or not lab["extra"].get("interpretable") or lab["category"] not in categories:
                continue
            clip = top.get(("clip_dissect", unit))
            if clip is None:
                continue
            t += 1
            a += clip["label"] == lab["label"]
        per_layer[name] = {"detectors": t, "agree": a}
        agree, total = agree + a, total + t
    return {"detectors": total, "agree": agree, "fraction": agree / total if total else None, "layers": per_layer}


def layer_summaries(project: Any, model_id: int, layers: list[str]) -> list[dict[str, Any]]:
    out = []
    for name in layers:
        row = project.layer(model_id, name)
        per_method: dict[str, Any] = {}
        for lab in project.labels(layer_id=row["id"], max_rank=1):
            m = per_method.setdefault(lab["method"], {"units": 0, "interpretable": 0, "significant": 0, "top": {}})
            m["units"] += 1
            m["interpretable"] += bool(lab["extra"].get("interpretable"))
            m["significant"] += bool(lab["extra"].get("significant"))
            m["top"][lab["label"]] = m["top"].get(lab["label"], 0) + 1
        out.append({"layer": name, "units": row["units"], "methods": per_method})
    return out


def format_summary(summary: DemoSummary) -> str:
    lines = [f"demo project: {summary.project}"]
    t = summary.training
    if t:
        acc = t.get("heldout_accuracy", t.get("val_accuracy", t.get("test_accuracy")))
        lines.append(f"model: shapes_cnn, held-out accuracy {acc:.3f}" if isinstance(acc, float) else "model: shapes_cnn")
    for layer in summary.layers:
        lines.append(f"layer {layer['layer']} ({layer['units']} units)")
        for method, m in sorted(layer["methods"].items()):
            top = ", ".join(f"{k} ({v})" for k, v in sorted(m["top"].items(), key=lambda kv: -kv[1])[:4])
            extra = ""
            if method == "netdissect":
                extra = f", {m['interpretable']} interpretable (IoU >= 0.04)"
            elif method == "invert":
                extra = f", {m['significant']} significant"
            lines.append(f"  {method:<13} {m['units']:>4} units labeled{extra}; most common: {top}")
    for kind, m in summary.language.items():
        figures = ", ".join(f"{k.replace('_', ' ')} {v:.3g} (baseline {m['baselines'][k]:.3g})"
                            for k, v in m["heldout"].items() if k in m["baselines"] and isinstance(v, float))
        lines.append(f"language model {m['name']} ({kind}): trained in {m['seconds']} s; held-out {figures}")
    ag = summary.clip_agreement
    if ag.get("detectors"):
        lines.append(f"CLIP-Dissect names the same concept as Network Dissection for {ag['agree']} of "
                     f"{ag['detectors']} colour/shape detector units ({ag['fraction']:.0%})")
    for method, why in summary.skipped_methods.items():
        lines.append(f"skipped {method}: {why}")
    return "\n".join(lines)
