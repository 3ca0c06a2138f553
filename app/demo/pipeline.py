"""The built-in demo, end to end and offline, as an explicit list of named steps: generate the shapes dataset, put
the demo CNN's weights in place (the trained weights shipped with the app, or trained here), create the project,
extract its layers, then run every labeler on every layer.

Each step is one `DemoStep` with its own name, progress stage ("step k of n: ...") and clock, and is skipped when
its result is already there, so an interrupted demo continues where it stopped; the summary says how long each
step took. `demo_steps` is the whole list: a new step (training a language model, a new kind of labeling) is one
entry there. The window runs the setup steps as one job, then every other step as a job of its own, so results
appear in the window as each one finishes (`DemoJob(only=...)`).
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import labelers.base as lb
from app.demo.agreement import clip_dissect_agreement, clip_dissect_baselines, milan_agreement
from app.demo.shapes import DEFAULT_IMAGES  # re-exported: the window and tests read it here
from app.jobs import JobProgress

log = logging.getLogger(__name__)

PROJECT_NAME = "demo.nstudio"
DATASET_DIR = "shapes"
DATASET_NAME = "shapes"  # the training set's name in the project
WEIGHTS_NAME = "shapes_cnn.safetensors"
LANGUAGE_KINDS = ("clip", "captioner", "lm")
# The in-app dual encoder knows the project's own words only: CLIP-Dissect names units from the dataset's concepts.
DEMO_PARAMS: dict[str, dict[str, Any]] = {"clip_dissect": {"vocabulary": "dataset"}}
# MILAN runs a beam search per unit: the demo describes the layers whose units detect shapes, not the colour blobs
MILAN_LAYERS = ("block3", "block4", "fc")
# TExplain in the demo: the translator maps the classifier's input (block4's pooled features) to the demo's own LM,
# and the words are counted per class on the classifier layer. Per-unit words on the other layers would sample
# sentences for every unit's top images; the demo leaves them to the user.
TEXPLAIN_LAYERS = ("fc",)
# The translator is small and short-trained for the demo's six classes: a 4-vector deep prefix and 300 steps of 64
# captions; its card gives the held-out caption loss beside the LM without a prefix.
DEMO_TRANSLATOR: dict[str, Any] = {"steps": 300, "prefix_length": 4, "batch_size": 64}
# Per class 96 images x 4 sentences (users get 100 x 50): a class's word frequencies vary between images far more
# than between one image's sentences, so many images with few sentences each rank the words best for the cost. With
# 24 images x 12 sentences chance background shares in the small sample got flagged as cues (the demo has none);
# with 96 images none is. The summary reads whether the class's own shape word is among its 10 most frequent words.
DEMO_PARAMS["texplain"] = {"sentences": 4, "images_per_class": 96, "batch_images": 64}
# inputs only the language step provides (and the TExplain translator step, which runs just before TExplain)
LANGUAGE_INPUTS = {lb.Input.CLIP_MODEL, lb.Input.CAPTIONER, lb.Input.CAUSAL_LM, lb.Input.SENTENCE_ENCODER,
                   lb.Input.TRANSLATOR}

# Methods the demo runs on one torch thread. Compositional explanations do many small tensor operations whose
# second thread only waits: on 2 cores at load 4.5, compexp on block2 took 45 s of wall time and 42 s of CPU with
# 2 threads, 11 s and 4 s with one (the same labels).
ONE_THREAD_METHODS = ("compexp",)
# The audit (MILAN §7): two labelled test sets the CNN was not trained on, and the layer whose glyph units the demo
# finds by their labels and switches off. block4 is what the classifier reads: the cue shows there as whole units.
TEST_SETS = ("shapes-clean", "shapes-shifted")
AUDIT_LAYER = "block4"
AUDIT_QUERY = "glyph"
# The labels the audit reads: the methods that score units against the dataset's glyph masks. Measured on the demo:
# with every method's labels `find glyph` lists 33 of block4's 64 units, because CLIP-Dissect's in-app encoder never
# read the word glyph in a caption and invert scores image-level presence (the glyph rides on 90% of circles), and
# switching off half the layer wrecks the clean accuracy (-26 points); with these two it lists the 16 mask-matched
# units.
AUDIT_METHODS = "netdissect,compexp"
# Test images per set: a tenth of the training set's size (300 for the demo). Each set runs 12 forward passes (with
# and without the units, 10 random-unit controls): about 12 CPU-seconds per set for 300 images, and the glyph's
# effect on the shifted set is some 20 points, far above a point of 3 images.
TEST_SHARE = 10

# ShapesCNN's four blocks and its classifier: the layers the demo extracts and labels. Their inner conv/bn/relu are
# left out, and so is the global pooling, which only repeats block4's per-image means. Known before the project
# exists, so that every step can be listed (and counted) up front.
DEMO_LAYERS: tuple[str, ...] = ("block1", "block2", "block3", "block4", "fc")


@dataclass
class StepTime:
    name: str
    seconds: float
    outcome: str  # "done", "already done", "skipped: why", "failed: why"


@dataclass
class DemoSummary:
    project: str
    training: dict[str, Any]
    layers: list[dict[str, Any]] = field(default_factory=list)
    skipped_methods: dict[str, str] = field(default_factory=dict)
    steps: list[StepTime] = field(default_factory=list)
    seconds: float = 0.0
    language: dict[str, Any] = field(default_factory=dict)  # per trained kind: name, seconds, held-out figures
    texplain: dict[str, Any] = field(default_factory=dict)  # see texplain_own_words
    clip_agreement: dict[str, Any] = field(default_factory=dict)  # see agreement.clip_dissect_agreement
    clip_baselines: dict[str, Any] = field(default_factory=dict)  # see agreement.clip_dissect_baselines
    milan_agreement: dict[str, Any] = field(default_factory=dict)  # see agreement.milan_agreement
    audit: dict[str, Any] = field(default_factory=dict)  # see _audit_step: the glyph units and their ablation


@dataclass
class DemoContext:
    """What the steps share: the demo's folders and settings, and the summary they fill in."""

    out_dir: Path
    n_images: int
    epochs: int | None
    device: str
    seed: int
    train: bool  # train the CNN here even when the shipped weights fit
    summary: DemoSummary
    params: dict[str, dict[str, Any]] = field(default_factory=dict)  # method -> parameters other than its defaults
    # overrides of app.language.train.TrainOptions for the demo's language models (tests make them tiny)
    language_options: dict[str, Any] = field(default_factory=dict)
    # overrides of DEMO_TRANSLATOR (app.language.translator.TranslatorOptions)
    translator_options: dict[str, Any] = field(default_factory=dict)

    @property
    def data_dir(self) -> Path:
        return self.out_dir / DATASET_DIR

    @property
    def weights(self) -> Path:
        return self.out_dir / WEIGHTS_NAME

    @property
    def project_dir(self) -> Path:
        return self.out_dir / PROJECT_NAME


@dataclass
class DemoStep:
    """One named step. `run` does it and returns what the summary says about it ("done", "already done", or
    "skipped: why"); it raises on failure. `setup` steps are what the window needs before it can show the project;
    `kind`/`layer`/`method` tell the window what a step's job changes (a label step refreshes that layer's table)."""

    name: str
    run: Callable[[DemoContext, JobProgress], str]
    setup: bool = False
    kind: str = "demo"
    layer: str | None = None
    method: str | None = None


# ---- the steps ------------------------------------------------------------------------------------------------
def _dataset_step(ctx: DemoContext, progress: JobProgress) -> str:
    from app.demo.glyph import CUE_CLASS, CUE_SHARE, generate_demo_dataset

    marker = ctx.data_dir / ".complete"
    recipe = {"images": ctx.n_images, "seed": ctx.seed, "glyph": {"class": CUE_CLASS, "share": CUE_SHARE}}
    if marker.exists() and json.loads(marker.read_text()) == recipe:
        return "already done"
    if ctx.data_dir.exists():
        shutil.rmtree(ctx.data_dir)
    generate_demo_dataset(ctx.data_dir, n_images=ctx.n_images, seed=ctx.seed, progress=progress)
    marker.write_text(json.dumps(recipe))
    return "done"


def _weights_step(ctx: DemoContext, progress: JobProgress) -> str:
    from app.demo.shipped import matching_shipped_weights

    metrics_file = ctx.out_dir / "training.json"
    if ctx.weights.exists():
        ctx.summary.training = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
        return "already done"
    shipped = None if ctx.train else matching_shipped_weights(ctx.data_dir, ctx.n_images, ctx.seed, ctx.epochs)
    if shipped is not None:
        weights, metrics = shipped
        tmp = ctx.weights.with_name(ctx.weights.name + ".tmp")
        shutil.copyfile(weights, tmp)
        tmp.replace(ctx.weights)
        metrics = dict(metrics, source="shipped with the app (trained by the same code on this dataset)")
        outcome = "done (the shipped trained weights: this dataset is the one they were trained on)"
    else:
        from app.demo.train import train_demo_model

        kwargs: dict[str, Any] = {"seed": ctx.seed, "progress": progress}
        if ctx.epochs is not None:
            kwargs["epochs"] = ctx.epochs
        metrics = dict(train_demo_model(ctx.data_dir, ctx.weights, **kwargs), source="trained here")
        outcome = "done (trained here)"
    metrics_file.write_text(json.dumps(metrics, indent=1, default=float))
    ctx.summary.training = metrics
    return outcome


def _project_step(ctx: DemoContext, progress: JobProgress) -> str:
    from app.errors import JobError
    from app.project.store import Project
    from app.workspace import add_dataset, add_model

    added = []
    with Project.open_or_create(ctx.project_dir) as project:
        if not project.models():
            add_model(project, "builtin:shapes_cnn", ctx.weights, name="shapes_cnn")
            added.append("model")
        if not project.datasets():
            add_dataset(project, ctx.data_dir, name=DATASET_NAME)
            added.append("dataset")
        model = project.model()
        with_units = {r["name"] for r in project.layers(model["id"], extractable_only=True)}
    missing = [name for name in DEMO_LAYERS if name not in with_units]
    if missing:
        raise JobError(f"the demo model has no layer with units named {', '.join(missing)}",
                       fix="rebuild the demo (neuron-studio demo --rebuild)")
    return f"done (added the {' and the '.join(added)})" if added else "already done"


def _extract_step(ctx: DemoContext, progress: JobProgress) -> str:
    from app.engine.extract import ExtractJob

    rep = ExtractJob(ctx.project_dir, extract_options(ctx.device), dataset=DATASET_NAME).execute(progress)
    return f"done ({rep.images} images)"


def _language_step(ctx: DemoContext, progress: JobProgress) -> str:
    from app.project.store import Project

    with Project.open(ctx.project_dir) as project:
        had = all(project.language_model(kind=kind) is not None for kind in LANGUAGE_KINDS)
    ctx.summary.language = train_language_models(ctx.project_dir, ctx.device, progress, ctx.language_options)
    if had:
        return "already done"
    return "done (" + ", ".join(f"{k} {v['seconds']:.0f} s" if isinstance(v.get("seconds"), (int, float)) else k
                               for k, v in ctx.summary.language.items()) + ")"


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
            opts = {"dataset": DATASET_NAME, **(options or {})}  # the test sets are no text to learn from
            TrainJob(project_dir, TrainOptions(kind=kind, device=device, **opts)).execute(progress)
            with Project.open(project_dir) as project:
                have = project.language_model(kind=kind)
        card = have["card"]
        out[kind] = {"name": have["name"], "seconds": card.get("seconds"), "heldout": card.get("heldout", {}),
                     "baselines": card.get("baselines", {})}
    return out


def _translator_step(ctx: DemoContext, progress: JobProgress) -> str:
    from app.language.translator import (
        TranslatorJob,
        TranslatorOptions,
        translator_cards,
    )
    from app.project.store import Project

    with Project.open(ctx.project_dir) as project:
        if project.language_model(kind="lm") is None:
            why = "no causal language model in the project (the language step trains one)"
            ctx.summary.skipped_methods["TExplain translator"] = why
            return f"skipped: {why}"
        had = {c["name"] for c in translator_cards(project)}
    job = TranslatorJob(ctx.project_dir, TranslatorOptions(device=ctx.device, dataset=DATASET_NAME,
                                                           **{**DEMO_TRANSLATOR, **ctx.translator_options}))
    rep = job.execute(progress)
    return (("already done" if rep.name in had else "done") + f" (held-out caption loss {rep.heldout_loss:.3f} per token, "
            f"{rep.baseline_loss:.3f} for the LM without a prefix; trained in {rep.seconds:.0f} s)")


def texplain_own_words(project: Any, model_id: int, layer: str = "fc", top: int = 10) -> dict[str, Any]:
    """Of the classes TExplain describes on the classifier layer, those whose `top` most frequent words include
    the class's own name, and the words its spurious-cue report flags (per class)."""
    from app.export.texplain import layer_words

    row = project.layer(model_id, layer)
    words = layer_words(project, row["id"])
    if words is None or words["mode"] != "classes":
        return {}
    summary = words["summary"]
    names = {c["class"]: c["name"] for c in summary.get("spurious", [])}
    own, classes = [], []
    for unit, rows in sorted(words["units"].items()):
        rows = sorted(rows, key=lambda r: r["rank"])[:top]
        classes.append(names.get(unit, str(unit)))
        if any(r.get("own_word") for r in rows):
            own.append(names.get(unit, str(unit)))
    flagged = {c["name"]: [w["word"] for w in c.get("words", []) if w.get("flagged")]
               for c in summary.get("spurious", [])}
    return {"layer": layer, "top": top, "classes": classes, "own_word": own,
            "fraction": len(own) / len(classes) if classes else None,
            "flagged": {k: v for k, v in flagged.items() if v}, "run_id": words["run_id"],
            "images_per_class": summary.get("images_per_class"),
            "sentences_per_image": summary.get("sentences_per_image")}


def extract_options(device: str) -> Any:
    from app.engine.extract import ExtractOptions

    # No decoding processes: the demo's images are 64-pixel PNGs, decoded faster than worker processes start.
    # One torch thread: the demo CNN's operations are small, so a second thread saves little on an idle machine,
    # while on a busy one threads that wait for each other cost many times over (measured on 2 cores at load 11-14:
    # the demo's extraction took 376 s of wall time and 126 s of CPU with 2 threads, 52 s and 17 s with one).
    return ExtractOptions(layers=list(DEMO_LAYERS), device=device, num_workers=0, threads=1)


def _label_step(method: str, layer: str) -> Callable[[DemoContext, JobProgress], str]:
    def run(ctx: DemoContext, progress: JobProgress) -> str:
        import labelers.base as lb
        from app.engine.labeling import LabelJob
        from app.project.store import Project

        params = ctx.params.get(method, DEMO_PARAMS.get(method, {}))
        with Project.open(ctx.project_dir) as project:
            row = project.layer(project.model()["id"], layer)
            layer_id = row["id"]
            why_not = lb.available()[method].applies_to(tuple(row["grid"]) if row["grid"] else None)
            if why_not:
                ctx.summary.skipped_methods[f"{method} on {layer}"] = why_not
                return f"skipped: {why_not}"
            if any(r.method == method and r.layer_id == layer_id and r.status == "done"
                   and all(r.params.get(k) == v for k, v in params.items()) for r in project.runs("label")):
                return "already done"
        from app.engine.device import cpu_threads

        try:
            with cpu_threads(1 if method in ONE_THREAD_METHODS else None):
                rep = LabelJob(ctx.project_dir, method, layer, params, device=ctx.device).execute(progress)
        except lb.MissingInputError as exc:
            ctx.summary.skipped_methods[method] = str(exc)
            return f"skipped: {exc}"
        return f"done ({rep.labels} labels)"

    return run


def _test_sets_step(ctx: DemoContext, progress: JobProgress) -> str:
    """Writes shapes-clean and shapes-shifted (ImageFolder, from images the CNN was not trained on: another seed)
    and adds them to the project."""
    from app.demo.glyph import CUE_CLASS, SHIFT_SHARE, write_test_sets
    from app.demo.shapes import generate_shapes_dataset
    from app.project.store import Project
    from app.workspace import add_dataset

    n = max(1, ctx.n_images // TEST_SHARE)
    recipe = {"images": n, "seed": ctx.seed + 1, "class": CUE_CLASS, "share": SHIFT_SHARE}
    marker = ctx.out_dir / ".test-sets-complete"
    clean, shifted = (ctx.out_dir / name for name in TEST_SETS)
    with Project.open(ctx.project_dir) as project:
        have = {d["name"] for d in project.datasets()}
    if not (marker.exists() and json.loads(marker.read_text()) == recipe):
        if have & set(TEST_SETS):
            from app.errors import JobError

            raise JobError("the demo project holds test sets that differ from the ones this demo would write",
                           fix="rebuild the demo (neuron-studio demo --rebuild)")
        marker.unlink(missing_ok=True)
        source = ctx.out_dir / ".test-source"
        if source.exists():
            shutil.rmtree(source)
        progress.begin_stage("drawing the test images")
        generate_shapes_dataset(source, n_images=n, seed=ctx.seed + 1)
        counts = write_test_sets(source, clean, shifted, CUE_CLASS, seed=ctx.seed + 1)
        shutil.rmtree(source)
        marker.write_text(json.dumps(recipe))
        log.info("demo test sets: %s", counts)
    added = []
    with Project.open(ctx.project_dir) as project:
        for name, folder in zip(TEST_SETS, (clean, shifted)):
            if name not in have:
                add_dataset(project, folder, name=name)
                added.append(name)
    return f"done ({n} images each, added {' and '.join(added)})" if added else "already done"


def audit_options(dataset: str, exact_only: bool = False, device: str = "auto") -> Any:
    """`neuron-studio ablate DEMO --layer block4 --query glyph --methods netdissect,compexp --dataset DATASET` with
    its other defaults."""
    from app.audit import AblateOptions

    return AblateOptions(layer=AUDIT_LAYER, dataset=dataset, query=AUDIT_QUERY, device=device, exact_only=exact_only,
                         methods=AUDIT_METHODS)


def _audit_step(ctx: DemoContext, progress: JobProgress) -> str:
    """`find glyph` on the audit layer, then `ablate --query glyph` on both test sets with the CLI's defaults
    (zero, 10 random-unit controls, seed 0): the figures the summary prints are what those commands print."""
    from app.audit import AblateJob, find_units, load_encoder
    from app.engine.device import pick_device
    from app.engine.extract import load_project_model
    from app.project.store import Project

    exact_only = bool(ctx.params.get("audit", {}).get("exact_only"))  # tests skip loading the sentence encoder
    encoder, why = (None, "words and formula atoms only") if exact_only else load_encoder(None)
    with Project.open(ctx.project_dir) as project:
        model_row = project.model()
        layer_id = int(project.layer(int(model_row["id"]), AUDIT_LAYER)["id"])
        matches = find_units(project, AUDIT_QUERY, layer_id=layer_id, encoder=encoder,
                             methods=AUDIT_METHODS.split(","))
        # a finished ablation of the same query with the same settings (a resumed demo, or the same CLI command)
        same = {k: v for k, v in asdict(audit_options("", exact_only)).items()
                if k not in ("dataset", "units", "device", "workers", "batch_size")}
        done = {}
        for r in project.runs("ablate"):
            if r.status == "done" and r.layer_id == layer_id and r.report and all(
                    r.params.get(k) == v for k, v in same.items()):
                done[r.report["dataset"]] = r.report
    audit: dict[str, Any] = {"layer": AUDIT_LAYER, "query": AUDIT_QUERY, "units": sorted(m.unit for m in matches),
                             "methods": sorted({r.who for m in matches for r in m.reasons}), "note": why}
    ctx.summary.audit = audit
    if not matches:
        audit["skipped"] = f"no unit of {AUDIT_LAYER} is labelled {AUDIT_QUERY!r}"
        return f"skipped: {audit['skipped']}"
    model = None
    ran = []
    for name in TEST_SETS:
        if name in done and done[name]["units"] == audit["units"]:
            audit[name] = done[name]
            continue
        if model is None:
            model = load_project_model(model_row, pick_device(ctx.device))
        options = audit_options(name, exact_only, ctx.device)
        audit[name] = AblateJob(ctx.project_dir, options, model=model, encoder=encoder).execute(progress).to_json()
        ran.append(name)
    return f"done ({len(matches)} units, ablated on {' and '.join(ran)})" if ran else "already done"


def demo_steps() -> list[DemoStep]:
    """Every step of the demo, in order. Labelers run quick ones first (those reading only the extracted arrays),
    so every layer has labels early; each method runs on every layer before the next method starts."""
    from app.workspace import methods_quick_first

    steps = [
        DemoStep("shapes dataset", _dataset_step, setup=True),
        DemoStep("demo CNN weights", _weights_step, setup=True),
        DemoStep("project with the model and dataset", _project_step, setup=True),
        DemoStep(f"extract {', '.join(DEMO_LAYERS)}", _extract_step, kind="extract"),
    ]
    methods = lb.available()
    # Methods that need a language model run after the demo has trained them, so the others' labels show first.
    later = {n for n, c in methods.items() if set(c.inputs) & LANGUAGE_INPUTS}
    for batch in ([m for m in methods_quick_first() if m not in later], [m for m in methods_quick_first() if m in later]):
        if batch and batch[0] in later:
            steps.append(DemoStep("language models (dual encoder, captioner, LM)", _language_step,
                                  kind="train_language"))
        for method in batch:
            if method == "texplain":
                steps.append(DemoStep("TExplain translator", _translator_step, kind="texplain-train"))
            for layer in DEMO_LAYERS:
                if method == "milan" and layer not in MILAN_LAYERS:
                    continue
                if method == "texplain" and layer not in TEXPLAIN_LAYERS:
                    continue
                steps.append(DemoStep(f"{method} on {layer}", _label_step(method, layer), kind="label",
                                      layer=layer, method=method))
    steps.append(DemoStep("labelled test sets (shapes-clean, shapes-shifted)", _test_sets_step))
    steps.append(DemoStep(f"audit: find {AUDIT_QUERY} on {AUDIT_LAYER}, ablate on both test sets", _audit_step,
                          kind="ablate"))
    return steps


# ---- the job ----------------------------------------------------------------------------------------------------
class DemoJob:
    """Runs the demo's steps in this process, each as step k of n of its progress. `only` restricts it to the
    named steps (the window queues each step as a job of its own); `setup_only` to the setup steps."""

    kind = "demo"

    def __init__(self, out_dir: Path, n_images: int = DEFAULT_IMAGES, epochs: int | None = None,
                 device: str = "auto", rebuild: bool = False, seed: int = 0, *, train: bool = False,
                 only: list[str] | None = None, setup_only: bool = False,
                 params: dict[str, dict[str, Any]] | None = None, language_options: dict[str, Any] | None = None,
                 translator_options: dict[str, Any] | None = None):
        self.out_dir = Path(out_dir)
        self.n_images = n_images
        self.epochs = epochs
        self.device = device
        self.rebuild = rebuild
        self.seed = seed
        self.train = train
        self.only = list(only) if only is not None else None
        self.setup_only = setup_only
        self.params = dict(params or {})  # method -> parameters (tests run a lighter demo)
        self.language_options = dict(language_options or {})
        self.translator_options = dict(translator_options or {})
        self.title = ("Prepare the demo: dataset, model, project" if setup_only
                      else only[0] if only and len(only) == 1 else "Build the demo project")
        self.run_id: int | None = None

    def selected_steps(self) -> list[DemoStep]:
        steps = demo_steps()
        if self.setup_only:
            return [s for s in steps if s.setup]
        if self.only is not None:
            unknown = set(self.only) - {s.name for s in steps}
            if unknown:
                from app.errors import JobError

                raise JobError(f"the demo has no step named {', '.join(sorted(unknown))}",
                               fix=f"the steps are: {', '.join(s.name for s in steps)}")
            return [s for s in steps if s.name in self.only]
        return steps

    def execute(self, progress: JobProgress) -> DemoSummary:
        t_start = time.monotonic()
        out = self.out_dir
        if self.rebuild and out.exists():
            for name in (PROJECT_NAME, DATASET_DIR, WEIGHTS_NAME, "training.json", *TEST_SETS, ".test-sets-complete"):
                target = out / name
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
        out.mkdir(parents=True, exist_ok=True)
        summary = DemoSummary(project=str(out / PROJECT_NAME), training={})
        metrics_file = out / "training.json"
        if metrics_file.exists():
            summary.training = json.loads(metrics_file.read_text())
        ctx = DemoContext(out, self.n_images, self.epochs, self.device, self.seed, self.train, summary, self.params,
                          self.language_options, self.translator_options)
        steps = self.selected_steps()
        for k, step in enumerate(steps, 1):
            progress.begin_step(k, len(steps), step.name)
            t0 = time.monotonic()
            try:
                outcome = step.run(ctx, progress)
            except BaseException as exc:
                log.info("demo step %r ended after %.1f s: %s", step.name, time.monotonic() - t0, exc)
                raise
            summary.steps.append(StepTime(step.name, time.monotonic() - t0, outcome))
            log.info("demo step %d/%d %r: %s in %.1f s", k, len(steps), step.name, outcome, time.monotonic() - t0)
        if ctx.project_dir.exists() and self.only is None and not self.setup_only:
            from app.project.store import Project

            with Project.open(ctx.project_dir) as project:
                summary.layers = layer_summaries(project, project.model()["id"], list(DEMO_LAYERS))
                summary.clip_agreement = clip_dissect_agreement(project, project.model()["id"], list(DEMO_LAYERS))
                cd_params = self.params.get("clip_dissect", DEMO_PARAMS["clip_dissect"])
                summary.clip_baselines = clip_dissect_baselines(project, project.model()["id"], list(DEMO_LAYERS),
                                                                cd_params)
                summary.milan_agreement = milan_agreement(project, project.model()["id"], list(MILAN_LAYERS))
                summary.texplain = texplain_own_words(project, project.model()["id"], TEXPLAIN_LAYERS[0])
        summary.seconds = time.monotonic() - t_start
        return summary


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


def audit_lines(audit: dict[str, Any]) -> list[str]:
    """The audit's figures: the glyph units found, and accuracy before/after ablating them on each test set, with
    the random-unit controls' range (the coordinator's and the issue's bar: shifted up >= 2 points, clean down
    <= 1 point, no control up >= 2 points on shifted)."""
    if not audit:
        return []
    head = f"audit: `find {audit['query']}` on {audit['layer']}: {len(audit['units'])} unit(s)"
    if audit.get("skipped"):
        return [f"{head}; skipped: {audit['skipped']}"]
    lines = [f"{head} ({', '.join(map(str, audit['units']))}; labelled by {', '.join(audit['methods'])})"]
    for name in TEST_SETS:
        r = audit.get(name)
        if not r:
            continue
        lo, hi = r["difference_ci"]
        control = r["control"]
        lines.append(f"  {name}: accuracy {r['accuracy_before']:.4f} -> {r['accuracy_after']:.4f} "
                     f"({100 * r['difference']:+.1f} points, 95% CI {100 * lo:+.1f} .. {100 * hi:+.1f}; "
                     f"{r['images']} images); {len(control)} random-unit controls "
                     + (f"{min(control):.4f} .. {max(control):.4f}" if control else "none"))
    shifted, clean = audit.get("shapes-shifted"), audit.get("shapes-clean")
    if shifted and clean:
        gain = shifted["difference"]
        control_gain = max(shifted["control"], default=shifted["accuracy_before"]) - shifted["accuracy_before"]
        met = gain >= 0.02 and clean["difference"] >= -0.01 and control_gain < 0.02
        lines.append(f"  bar (shifted >= +2 points, clean >= -1 point, no control >= +2 points on shifted): "
                     f"{'met' if met else 'NOT met'} (best control {100 * control_gain:+.1f} points)")
    return lines


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
        cb = summary.clip_baselines
        if cb.get("detectors"):
            lines.append(f"  baselines: its most frequent label ({cb['most_frequent_label']}) for every unit "
                         f"{cb['most_frequent']} of {cb['detectors']}; the same soft-WPMI (lambda {cb['lambda']:g}) "
                         f"with the dataset's true image labels in place of the dual encoder {cb['ceiling']} of "
                         f"{cb['detectors']} (the method's ceiling on this data; {cb['ceiling_lambda_0']} without "
                         f"the layer prior, lambda 0)"
                         + (f"; {cb['ceiling_area']} of {cb['detectors']} with true labels weighted by each "
                            f"concept's share of the image" if cb.get("ceiling_area") is not None else ""))
    mg = summary.milan_agreement
    if mg.get("detectors"):
        lines.append(f"MILAN's description names Network Dissection's concept for {mg['agree']} of "
                     f"{mg['detectors']} detector units of {', '.join(mg['layers'])} ({mg['fraction']:.0%}); "
                     f"the most frequent description ({mg['most_frequent_description']!r}) for every unit: "
                     f"{mg['most_frequent']} ({mg['baseline_fraction']:.0%})")
        if mg.get("concepts"):
            lines.append("  by concept: " + ", ".join(f"{c} {v['agree']}/{v['detectors']}"
                                                      for c, v in mg["concepts"].items()))
    tx = summary.texplain
    if tx.get("classes"):
        lines.append(f"TExplain ({tx['layer']}, {tx['images_per_class']} images x {tx['sentences_per_image']} sentences "
                     f"per class): the class's own shape word is among its top {tx['top']} words for "
                     f"{len(tx['own_word'])} of {len(tx['classes'])} classes ({tx['fraction']:.0%})"
                     + (f"; missing for {', '.join(c for c in tx['classes'] if c not in tx['own_word'])}"
                        if len(tx["own_word"]) < len(tx["classes"]) else ""))
        cues = "; ".join(f"{c}: {', '.join(w)}" for c, w in tx["flagged"].items())
        lines.append(f"TExplain spurious-cue report flags: {cues or 'no word'}")
    lines += audit_lines(summary.audit)
    for method, why in summary.skipped_methods.items():
        lines.append(f"skipped {method}: {why}")
    if summary.steps:
        lines.append(f"time per step ({len(summary.steps)} steps, {summary.seconds:.1f} s in all):")
        for s in summary.steps:
            outcome = s.outcome if not s.outcome.startswith("skipped") else "skipped (see above)"
            lines.append(f"  {s.seconds:7.1f} s  {s.name}: {outcome}")
    return "\n".join(lines)
