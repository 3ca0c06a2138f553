"""Audit and edit a model with its unit labels (MILAN §6-7): find the units whose labels, human names or
descriptions say something, switch them off, and measure what changes on a labelled dataset against switching off
as many random units of the same layer."""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from app.errors import DatasetError, JobError
from app.project.store import Project
from labelers.compare import formula_atoms, normalise
from labelers.resample import bootstrap

log = logging.getLogger(__name__)

# Cosine between the query's and a text's all-MiniLM-L6-v2 sentence embeddings at which the text counts as saying
# the same thing. Measured on the demo's one-word labels: synonyms score 0.41-0.56 (disc/circle 0.42, round
# shape/circle 0.56, symbol/glyph 0.46) but so do different concepts (circle/square 0.49, circle/ring 0.53), and
# unrelated words 0.33-0.37; no cut separates them, so meaning only adds close paraphrases (>= 0.6) and words and
# formula atoms do the rest. Lower it (find --threshold) only with a list you check by eye.
SEMANTIC_THRESHOLD = 0.6


# ==== find ========================================================================================================
@dataclass
class MatchReason:
    source: str  # "label" (an automatic method's), "name" or "description" (a person's)
    who: str  # the method or the annotator
    text: str
    how: str  # "words", "formula atom", "meaning"
    score: float  # 1 for a word or atom match, the cosine for meaning


@dataclass
class UnitMatch:
    model: str
    layer: str
    layer_id: int
    unit: int
    unit_id: int
    score: float
    reasons: list[MatchReason] = field(default_factory=list)


# One word rule for every search of units (`find`, the ablation's --query and the units browser's search box): a
# label asserts the words of its text, except that a formula's atoms under an odd number of NOTs are negated words.
# A query's words must all be asserted; a query word written `NOT word` or `-word` must be negated. So "star" does
# not find "NOT star", and "NOT star" finds only it. Words are normalised as the comparison of labels normalises
# them (case, plurals).
@functools.lru_cache(maxsize=65536)
def text_terms(text: str) -> tuple[frozenset[str], frozenset[str]]:
    """(asserted words, negated words) of one label, name or description. Cached: the same label text recurs over
    many units and methods."""
    if not text.strip():
        return frozenset(), frozenset()
    atoms = formula_atoms(text)
    if atoms is None:
        return frozenset(normalise(text).split()), frozenset()
    pos: set[str] = set()
    neg: set[str] = set()
    for atom, positive in atoms:
        (pos if positive else neg).update(normalise(atom).split())
    return frozenset(pos), frozenset(neg)


def unit_terms(texts: list[str]) -> tuple[frozenset[str], frozenset[str]]:
    """The union of `text_terms` over all of a unit's texts."""
    pos: set[str] = set()
    neg: set[str] = set()
    for text in texts:
        p, n = text_terms(text)
        pos |= p
        neg |= n
    return frozenset(pos), frozenset(neg)


def query_terms(query: str) -> tuple[frozenset[str], frozenset[str]]:
    """(wanted words, wanted negated words) of a query: `NOT x` or `-x` asks for a negated atom."""
    want: set[str] = set()
    avoid: set[str] = set()
    negate = False
    for raw in query.split():
        if raw.upper() == "NOT":
            negate = True
            continue
        neg = negate or raw.startswith("-")
        (avoid if neg else want).update(normalise(raw.lstrip("-")).split())
        negate = False
    return frozenset(want), frozenset(avoid)


def terms_match(query: tuple[frozenset[str], frozenset[str]], terms: tuple[frozenset[str], frozenset[str]]) -> bool:
    """Whether texts with `terms` (from text_terms / unit_terms) answer `query` (from query_terms)."""
    want, avoid = query
    return bool(want or avoid) and want <= terms[0] and avoid <= terms[1]


def _text_match(query: tuple[frozenset[str], frozenset[str]], text: str) -> tuple[str | None, str]:
    """("words" | "formula atom" | None, the text to compare for meaning). Only a formula's positive atoms go on to
    the sentence encoder: "NOT glyph" says the unit does not fire on the glyph, so it must not answer a query for
    glyphs by meaning either."""
    atoms = formula_atoms(text)
    if terms_match(query, text_terms(text)):
        return ("words" if atoms is None else "formula atom"), text
    if atoms is None:
        return None, text
    return None, " and ".join(a for a, pos in atoms if pos)


def _texts(project: Project, layer_id: int | None, max_rank: int | None,
           methods: list[str] | None = None) -> list[dict[str, Any]]:
    rows = []
    for r in project.labels(layer_id=layer_id, max_rank=max_rank):
        if r["label"] and (not methods or r["method"] in methods):
            rows.append({"source": "label", "who": r["method"], "text": r["label"], "model": r["model"],
                         "layer": r["layer"], "layer_id": r["layer_id"], "unit": r["unit"], "unit_id": r["unit_id"]})
    for a in project.annotations(layer_id):
        if a["text"] and a["text"].strip():
            rows.append({"source": a["kind"], "who": a["annotator"], "text": a["text"], "model": a["model"],
                         "layer": a["layer"], "layer_id": a["layer_id"], "unit": a["unit"], "unit_id": a["unit_id"]})
    return rows


def find_units(project: Project, query: str, *, layer_id: int | None = None, encoder: Any = None,
               threshold: float = SEMANTIC_THRESHOLD, max_rank: int | None = 1,
               methods: list[str] | None = None) -> list[UnitMatch]:
    """Units whose labels (every method's newest run), human names or descriptions match `query`: by its words,
    by a positive formula atom, or, with a sentence `encoder` (an object with `sentences(texts) -> [N, D]` unit
    vectors), by meaning; `NOT word` asks for units whose formulas negate the word. Best first, each with every
    reason it matched. `max_rank` 1: each method's best label per unit only; its runners-up are what the unit is
    not mainly about, and matching them lists most units."""
    query_words = query_terms(query)
    if not (query_words[0] or query_words[1]):
        raise JobError(f"the query {query!r} has no words to look for", fix="give a word, e.g. glyph")
    rows = _texts(project, layer_id, max_rank, methods)  # `methods`: only these methods' labels (names still count)
    hits: dict[int, UnitMatch] = {}

    def add(r: dict[str, Any], how: str, score: float) -> None:
        m = hits.setdefault(r["unit_id"], UnitMatch(r["model"], r["layer"], int(r["layer_id"]), int(r["unit"]),
                                                    int(r["unit_id"]), 0.0))
        m.reasons.append(MatchReason(r["source"], r["who"], r["text"], how, round(float(score), 4)))
        m.score = max(m.score, float(score))

    for_meaning: list[tuple[dict[str, Any], str]] = []
    for r in rows:
        how, meaning_text = _text_match(query_words, r["text"])
        if how is not None:
            add(r, how, 1.0)
        elif meaning_text:
            for_meaning.append((r, meaning_text))
    if encoder is not None and for_meaning:
        unique = sorted({t for _r, t in for_meaning})
        vecs = np.asarray(encoder.sentences([query, *unique]), dtype=np.float32)
        cos = dict(zip(unique, (vecs[1:] @ vecs[0]).tolist()))
        for r, t in for_meaning:
            if cos[t] >= threshold:
                add(r, "meaning", cos[t])
    return sorted(hits.values(), key=lambda m: (-m.score, -len(m.reasons), m.layer_id, m.unit))


def load_encoder(path: str | None = None, device: str = "cpu") -> tuple[Any, str]:
    """The sentence encoder for meaning, or (None, why not) when none is installed or given."""
    from labelers.errors import UserError

    try:
        from labelers.sentence import SentenceEncoder

        return SentenceEncoder.load(path, device), ""
    except UserError as exc:
        return None, f"words and formula atoms only ({exc})"


# ==== ablate ======================================================================================================
@dataclass
class AblateOptions:
    layer: str
    dataset: str | int
    units: list[int] | None = None
    query: str | None = None
    mode: str = "zero"  # zero | mean | constant
    constant: float = 0.0
    model: str | int | None = None
    # 10 random-unit controls: enough to see whether the edit's drop is outside what as many random units do, at
    # one forward pass per control.
    controls: int = 10
    n_boot: int = 1000
    seed: int = 0
    batch_size: int = 64
    device: str = "auto"
    workers: int | None = 0
    max_images: int | None = None
    encoder: str | None = None
    exact_only: bool = False
    split: str | None = None  # only the images with a folder of this name on their path (val/, test/ ...)
    target: str | None = None  # labels.csv: the 0/1 column(s) holding the class (comma-separated)
    methods: str | None = None  # --query reads only these methods' labels (comma-separated); None: every method


@dataclass
class ClassRow:
    name: str
    n: int
    accuracy_before: float
    accuracy_after: float


@dataclass
class AblateResult:
    model: str
    layer: str
    dataset: str
    mode: str
    units: list[int]
    query: str | None
    images: int
    accuracy_before: float
    accuracy_after: float
    difference: float  # after - before
    difference_ci: tuple[float, float]  # 95% paired bootstrap over images
    changed: int  # images whose prediction changed
    per_class: list[ClassRow]
    control: list[float]  # accuracy with as many random units of the layer ablated, one per control
    control_units: list[list[int]]
    control_as_large: float  # share of controls whose accuracy change is at least as far from 0 as the edit's
    run_id: int | None = None
    unread: int = 0
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "AblateResult":
        """The result stored in an "ablate" run's report (fields it lacks, from an older version, keep their
        defaults; fields this version does not know are ignored)."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["per_class"] = [ClassRow(**{k: v for k, v in c.items() if k in {f.name for f in fields(ClassRow)}})
                               for c in data.get("per_class", [])]
        values["difference_ci"] = tuple(data.get("difference_ci") or (float("nan"), float("nan")))
        for name in ("control", "control_units", "notes", "units"):
            values.setdefault(name, [])
        values.setdefault("control_as_large", float("nan"))
        return cls(**values)

    def control_caveat(self) -> str:
        """What makes the controls weaker than they look: fewer other units in the layer than were ablated (each
        control then ablates fewer units, and when it takes all of the others every control is the same)."""
        sizes = {len(u) for u in self.control_units}
        if not sizes:
            return ""
        if min(sizes) >= len(self.units):
            edit = set(self.units)
            if any(edit & set(u) for u in self.control_units):
                return (f"Note: the edit takes more than half of the layer's units, so each control is "
                        f"{len(self.units)} random units of the whole layer and shares units with the edit.")
            return ""
        k = min(sizes)
        same = len({tuple(u) for u in self.control_units}) == 1
        return (f"Caution: the layer has only {k} units besides these {len(self.units)}, so each control ablates "
                f"{k} units" + (", all of the others: every control is the same set and they show nothing of "
                                "chance's spread." if same else "."))


def paired_bootstrap(before: np.ndarray, after: np.ndarray, n_boot: int, seed: int) -> tuple[float, float]:
    """95% percentile interval of mean(after) - mean(before), resampling images (pairs kept together)."""
    if before.size == 0:
        return (float("nan"), float("nan"))
    diff = after.astype(np.float64) - before.astype(np.float64)
    iv = bootstrap(diff, n_boot, np.random.default_rng(seed))
    return (iv.low, iv.high)


def ablation_stats(labels: np.ndarray, pred_before: np.ndarray, pred_after: np.ndarray, classes: list[str],
                   n_boot: int, seed: int) -> dict[str, Any]:
    ok_b = pred_before == labels
    ok_a = pred_after == labels
    per_class = [ClassRow(name, int((labels == c).sum()),
                          float(ok_b[labels == c].mean()) if (labels == c).any() else float("nan"),
                          float(ok_a[labels == c].mean()) if (labels == c).any() else float("nan"))
                 for c, name in enumerate(classes)]
    return {"accuracy_before": float(ok_b.mean()), "accuracy_after": float(ok_a.mean()),
            "difference": float(ok_a.mean() - ok_b.mean()),
            "difference_ci": paired_bootstrap(ok_b, ok_a, n_boot, seed),
            "changed": int((pred_before != pred_after).sum()), "per_class": per_class}


def output_targets(classes: list[str], labels: np.ndarray, class_names: list[str] | None, dataset: str
                   ) -> tuple[np.ndarray, str]:
    """The model output index of each image's class: by name when the model has class names (an ImageFolder's
    classes are sorted by name, a model's are in its training order), else the dataset's order."""
    if not class_names:
        return labels, "the model has no class names: its outputs are taken in the dataset's class order"
    index = {n: i for i, n in enumerate(class_names)}
    missing = [c for c in classes if c not in index]
    if missing:
        raise DatasetError(f"dataset {dataset} has classes the model does not predict: {', '.join(missing[:5])}",
                           fix=f"name the class folders as the model's classes ({', '.join(class_names[:6])} ...)")
    return np.array([index[c] for c in classes], dtype=np.int64)[labels], "classes matched to outputs by name"


@dataclass
class Targets:
    classes: list[str]  # the dataset's class names, in its label order
    labels: np.ndarray  # [images] int64 class of each image of the dataset; -1: not scored
    how: str  # where the classes came from, for the notes
    output_index: bool = False  # a binary target: its 0/1 is the model's output index, not a class name to match


def split_images(keys: list[str], split: str, dataset: str) -> np.ndarray:
    """[images] bool: the images with a folder named `split` on their path (the usual layouts keep splits in
    folders: images/val/..., class/test/...). No such image is an error naming the folders there are."""
    parts = [k.split("/")[:-1] for k in keys]
    keep = np.array([split in ps for ps in parts], dtype=bool)
    if not keep.any():
        folders = sorted({f for ps in parts for f in ps})
        raise DatasetError(f"no image of dataset {dataset} lies in a folder named {split!r}",
                           fix=(f"name one of its folders ({', '.join(folders[:12])}"
                                f"{' ...' if len(folders) > 12 else ''})" if folders
                                else "its images lie in no subfolder: leave out --split"))
    return keep


def dataset_targets(reader: Any, dataset: str, target: str | None, class_names: list[str] | None) -> Targets:
    """Each image's class: an ImageFolder's class folders (or a COCO image's "class"), or a labels.csv's 0/1
    columns: one column is a binary target (its value is the output index), several are one-hot classes (images
    with no or several 1s among them are not scored). Without --target, a labels.csv's classes are the columns
    named after the model's classes."""
    if reader.format == "labels-csv":
        columns = [c.name for c in reader.concepts]
        if target:
            wanted = [t.strip() for t in target.split(",") if t.strip()]
            unknown = [t for t in wanted if t not in columns]
            if unknown or not wanted:
                raise DatasetError(f"dataset {dataset} has no labels.csv column {', '.join(unknown) or repr(target)}",
                                   file=getattr(reader, "csv_file", None),
                                   fix=f"name one or more of its columns: {', '.join(columns[:12])}")
        else:
            wanted = [c for c in columns if class_names and c in class_names]
            if not wanted:
                raise DatasetError(
                    f"dataset {dataset} is a labels.csv: which column holds the class to score?",
                    file=getattr(reader, "csv_file", None),
                    fix=(f"name the target column(s) with --target (columns: {', '.join(columns[:12])}); without "
                         "it the columns named after the model's classes are used, and none is"))
        presence = reader.presence()[:, [columns.index(w) for w in wanted]]
        if len(wanted) == 1:
            return Targets([f"not {wanted[0]}", wanted[0]], presence[:, 0].astype(np.int64),
                           f"labels.csv column {wanted[0]!r} is a binary target: 1 is output 1, 0 is output 0",
                           output_index=True)
        single = presence.sum(1) == 1
        if not single.any():
            raise DatasetError(f"no image of dataset {dataset} has exactly one 1 among the columns "
                               f"{', '.join(wanted)}", file=getattr(reader, "csv_file", None),
                               fix="--target names the columns of mutually exclusive classes")
        labels = np.where(single, presence.argmax(1), -1).astype(np.int64)
        how = f"classes from the labels.csv columns {', '.join(wanted)}"
        if (~single).any():
            how += f"; {int((~single).sum())} image(s) with no or several 1s among them are not scored"
        return Targets(wanted, labels, how)
    if target:
        raise DatasetError(f"--target names labels.csv columns, and dataset {dataset} is {reader.format}",
                           fix="leave out --target: the dataset's classes are its class folders")
    found = reader.class_labels()
    if found is None:
        raise DatasetError(f"dataset {dataset} has no class labels to score predictions against",
                           file=getattr(reader, "source", None),
                           fix="add the test images as ImageFolder class folders, or a labels.csv with --target")
    classes, labels = found
    return Targets(list(classes), np.asarray(labels, dtype=np.int64), f"classes of the {reader.format} dataset")


def resolve_units(project: Project, layer_row: dict[str, Any], options: AblateOptions,
                  encoder: Any = None) -> tuple[list[int], list[str]]:
    """`encoder`: an already loaded sentence encoder for --query (else it is loaded unless exact_only)."""
    notes: list[str] = []
    if (options.units is None) == (options.query is None):
        raise JobError("say which units to ablate: --units or --query, not both", fix="e.g. --units 3,17,40")
    if options.units is not None:
        units = sorted({int(u) for u in options.units})
    else:
        if options.exact_only:
            encoder, why = None, "words and formula atoms only"
        elif encoder is not None:
            why = ""
        else:
            encoder, why = load_encoder(options.encoder)
        if why:
            notes.append(why)
        methods = [m.strip() for m in options.methods.split(",") if m.strip()] if options.methods else None
        matches = find_units(project, options.query or "", layer_id=int(layer_row["id"]), encoder=encoder,
                             methods=methods)
        units = sorted(m.unit for m in matches)
        if not units:
            raise JobError(f"no unit of layer {layer_row['name']} has a label, name or description matching "
                           f"{options.query!r}", fix="try `neuron-studio find` with another query, or --units")
    bad = [u for u in units if not 0 <= u < int(layer_row["units"])]
    if bad:
        raise JobError(f"unit(s) {bad} out of range: layer {layer_row['name']} has {layer_row['units']} units",
                       fix=f"choose units between 0 and {int(layer_row['units']) - 1}")
    return units, notes


class AblateJob:
    """Runs the model with and without the units (and with random-unit controls) over a labelled dataset, in one
    pass over the images, and stores the result as an "ablate" run of the project."""

    def __init__(self, project_path: str | Path, options: AblateOptions, model: Any = None, encoder: Any = None):
        """`model`: an already loaded model of the project (the window's, or a test's); else it is loaded.
        `encoder`: an already loaded sentence encoder for a query (the demo's audit runs two ablations with one)."""
        self.project_path = Path(project_path)
        self.options = options
        self.model = model
        self.encoder = encoder
        self.title = f"ablate {options.layer}"

    def execute(self, progress: Any) -> AblateResult:
        o = self.options
        with Project.open(self.project_path) as project:
            model_row = project.model(o.model)
            layer_row = project.layer(int(model_row["id"]), o.layer)
            ds_row = project.dataset(o.dataset)
            units, notes = resolve_units(project, layer_row, o, self.encoder)
            params = {k: v for k, v in asdict(o).items() if k not in ("device", "workers", "batch_size")}
            params["units"] = units
            key = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:16]
            run_id = project.create_run(kind="ablate", key=key, params=params, model_id=int(model_row["id"]),
                                        dataset_id=int(ds_row["id"]), layer_id=int(layer_row["id"]),
                                        status="running")
            t0 = time.monotonic()
            with project.finishing(run_id, t0, cancelled="cancelled"):
                result = self._evaluate(project, model_row, layer_row, ds_row, units, progress)
            result.run_id = run_id
            result.notes = notes + result.notes
            project.finish_run(run_id, "done", report=result.to_json(), seconds=time.monotonic() - t0,
                               message=f"accuracy {result.accuracy_before:.3f} -> {result.accuracy_after:.3f}")
            return result

    def _evaluate(self, project: Project, model_row: dict[str, Any], layer_row: dict[str, Any],
                  ds_row: dict[str, Any], units: list[int], progress: Any) -> AblateResult:
        import torch

        from app.engine.device import pick_device
        from app.engine.extract import (
            layer_info,
            load_project_model,
            make_loader,
            open_project_dataset,
        )
        from app.sources import instrument

        o = self.options
        reader = open_project_dataset(ds_row)
        targets = dataset_targets(reader, ds_row["name"], o.target, model_row.get("class_names"))
        classes, labels = targets.classes, targets.labels
        scored = labels >= 0
        if o.split:
            scored &= split_images([r.key for r in reader.images], o.split, ds_row["name"])
        if targets.output_index:
            how = "the binary target's 0/1 is the output index (not matched by class name)"
        else:
            labels, how = output_targets(classes, np.where(scored, labels, 0), model_row.get("class_names"),
                                         ds_row["name"])
        device = pick_device(o.device)
        model = self.model if self.model is not None else load_project_model(model_row, device)
        info = layer_info(layer_row)
        axis = instrument.unit_axis(info.kind, info.channels_last)
        pooled_mean = None
        if o.mode == "mean":
            from app.engine.results import LayerResults

            pooled_mean = LayerResults.load(project, int(layer_row["id"])).pooled_mean
        values = lambda us: instrument.ablation_values(o.mode, us, pooled_mean=pooled_mean,
                                                       constant=o.constant)
        rng = np.random.default_rng(o.seed)
        # Controls are as many units as the edit, drawn from the layer's other units; when the edit takes more than
        # half the layer there are too few others (every control would be the same set of all of them), so they
        # are drawn from the whole layer and may share units with the edit: random subsets of the same size still.
        others = np.setdiff1d(np.arange(int(layer_row["units"])), units)
        pool = others if others.size >= len(units) else np.arange(int(layer_row["units"]))
        k = min(len(units), pool.size)
        controls = [sorted(rng.choice(pool, size=k, replace=False).tolist()) for _ in range(o.controls)] \
            if k and others.size else []
        conditions = [units, *controls]

        indices = np.flatnonzero(scored).tolist()[: o.max_images or None]
        if not indices:
            raise DatasetError(f"dataset {ds_row['name']} has no image to score", fix="check --split and --target")
        loader = make_loader(reader, model.preprocess, indices, o.batch_size, o.workers, device)
        position = np.full(len(reader.images), -1, dtype=np.int64)  # dataset index -> column of preds
        position[indices] = np.arange(len(indices))
        preds = np.full((2 + len(controls), len(indices)), -1, dtype=np.int64)
        ok = np.zeros(len(indices), dtype=bool)
        done = 0
        progress.update(0, len(indices), "running the model with and without the units")
        for batch in loader:
            x = batch["x"].to(device)
            pos = position[batch["index"].numpy()]
            ok[pos] = batch["ok"].numpy()
            with torch.inference_mode():
                logits = model.forward(x)
                if logits.ndim != 2:
                    raise JobError(f"ablation needs a classifier (output [batch, classes]); the model gives "
                                   f"{list(logits.shape)}", fix="choose a classification model")
                if logits.shape[1] < len(classes):
                    raise JobError(f"the model has {logits.shape[1]} outputs but dataset {ds_row['name']} has "
                                   f"{len(classes)} classes", fix="use a dataset with the model's classes")
                preds[0, pos] = logits.argmax(1).cpu().numpy()
                for j, us in enumerate(conditions):
                    with instrument.ablate(model.module, info.name, us, axis=axis, values=values(us)):
                        preds[1 + j, pos] = model.forward(x).argmax(1).cpu().numpy()
            done += len(pos)
            progress.update(done, len(indices), "running the model with and without the units")
        y = np.asarray(labels)[indices][ok]
        p = preds[:, ok]
        names = list(classes) if targets.output_index else list(model_row.get("class_names") or classes)
        stats = ablation_stats(y, p[0], p[1], names, o.n_boot, o.seed)
        stats["per_class"] = [c for c in stats["per_class"] if c.n > 0]
        control = [float((p[2 + j] == y).mean()) for j in range(len(controls))]
        edit = stats["accuracy_after"] - stats["accuracy_before"]
        as_large = float(np.mean([abs(c - stats["accuracy_before"]) >= abs(edit) for c in control])) if control \
            else float("nan")
        notes = [targets.how, how] + ([f"split {o.split}: {len(indices)} images"] if o.split else [])
        return AblateResult(model=model_row["name"], layer=info.name, dataset=ds_row["name"], mode=o.mode,
                            units=units, query=o.query, images=int(ok.sum()), control=control,
                            control_units=controls, control_as_large=as_large, unread=int((~ok).sum()), notes=notes,
                            **stats)


def result_lines(r: AblateResult) -> list[str]:
    lo, hi = r.difference_ci
    lines = [f"{r.model} {r.layer}: {len(r.units)} unit(s) {r.mode}-ablated on {r.dataset} ({r.images} images)",
             f"  units: {', '.join(map(str, r.units))}",
             (f"  accuracy {r.accuracy_before:.4f} -> {r.accuracy_after:.4f} (difference {r.difference:+.4f}, "
              f"95% CI {lo:+.4f} .. {hi:+.4f}); {r.changed} prediction(s) changed")]
    if r.control:
        lines.append(f"  random-unit controls ({len(r.control)} x {len(r.units)} units): accuracy "
                     f"{min(r.control):.4f} .. {max(r.control):.4f} (mean {np.mean(r.control):.4f}); "
                     f"{r.control_as_large:.0%} change accuracy as much as the edit")
    lines.append("  per class (before -> after):")
    for c in r.per_class:
        lines.append(f"    {c.name:<20} n={c.n:<6} {c.accuracy_before:.4f} -> {c.accuracy_after:.4f}")
    lines += [f"  note: {n}" for n in r.notes]
    if r.run_id is not None:
        lines.append(f"  stored as run {r.run_id}")
    return lines
