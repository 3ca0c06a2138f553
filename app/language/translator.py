"""TExplain translators: training (a resumable job), storage in the project, and the labeler's input.

A translator maps the image model's pooled feature vector at one layer to a prefix of K input embeddings of a
frozen causal language model (`labelers.texplain.PrefixMapper`), trained on the dataset's (image, caption) pairs.
Each one is a folder `translators/NAME/` of the project:

    card.json, README.md     what it was trained on, how long, its loss curve, held-out loss vs the LM alone
    translator.safetensors   the mapper's weights (and the feature normalisation), config in the metadata
    features.npy             [N, D] float32 pooled features of every image (NaN rows: unreadable images)
    logits.npy               [N, C] float32 classifier outputs, when the model's final linear layer was found
    state.safetensors        only while training: the checkpoint a killed or cancelled job resumes from

The job runs the image model once (its step "features"; hooks from app/engine) and keeps the features, so the
labeler never runs the image model again; the folder's card says which model, dataset and language model (with
their fingerprints) it belongs to, and the labeler refuses a translator whose inputs changed.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from app.errors import JobError
from app.jobs import JobProgress
from app.project import arrays
from app.project.store import Project

log = logging.getLogger(__name__)

FOLDER = "translators"
CARD = "card.json"
WEIGHTS = "translator.safetensors"
STATE = "state.safetensors"
KIND = "texplain-train"


@dataclass
class TranslatorOptions:
    lm: str | None = None  # a local causal LM folder; None: the project's own language model when it has one
    layer: str | None = None  # None: the input of the final linear layer (see `default_layer`)
    prefix_length: int = 10  # ClipCap's K for its MLP mapper
    mode: str = "deep"  # "deep": keys and values at every layer; "embeddings": ClipCap's input prefix
    hidden: int | None = None
    steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-2
    max_tokens: int = 32
    heldout_fraction: float = 0.1
    seed: int = 0
    device: str = "auto"
    num_workers: int | None = 0
    checkpoint_seconds: float = 20.0
    model: str | int | None = None
    dataset: str | int | None = None

    def key_fields(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("prefix_length", "mode", "hidden", "steps", "batch_size", "lr", "max_tokens",
                                              "heldout_fraction", "seed")}


@dataclass
class TranslatorReport:
    name: str
    folder: str
    layer: str
    classifier_layer: str | None
    steps: int
    train_pairs: int
    heldout_pairs: int
    heldout_loss: float
    baseline_loss: float
    seconds: float
    loss_curve: list[list[float]] = field(default_factory=list)


def file_fingerprint(path: Path) -> str:
    """sha256 over a language model folder's weight files (names and bytes), so a changed LM is noticed."""
    h = hashlib.sha256()
    files = sorted(list(path.glob("*.safetensors")) + list(path.glob("pytorch_model*.bin")))
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _lm_error(problem: str, file: Any = None) -> JobError:
    return JobError(problem, file=file, fix="give a local causal language model folder (transformers format, e.g. "
                                            "GPT-2) with --lm DIR, or train one in the app: "
                                            "neuron-studio language train PROJECT --kind lm")


def resolve_lm(project: Project, given: str | None) -> Path:
    """The LM folder: the one given, else the project's newest causal LM (trained in the app or brought)."""
    if given:
        return Path(given).expanduser().resolve()
    row = project.language_model(kind="lm")
    if row is not None:
        return Path(row["abs_path"])
    raise _lm_error("no language model was given and the project has none")


def classifier_layer(project: Project, model_row: dict[str, Any], module: Any) -> dict[str, Any] | None:
    """The layers row of the final linear layer: the last Linear whose units are the model's classes (or simply
    the last Linear when the model has no class names)."""
    import torch

    modules = dict(module.named_modules())
    rows = [r for r in project.layers(model_row["id"]) if isinstance(modules.get(r["name"]), torch.nn.Linear)]
    names = model_row.get("class_names")
    if names:
        rows = [r for r in rows if r["units"] == len(names)]
    return rows[-1] if rows else None


def default_layer(project: Project, model_row: dict[str, Any], module: Any, clf: dict[str, Any] | None) -> str:
    """The layer whose spatially averaged output is the input of the final linear layer: a layer before it with
    as many units as the linear layer has inputs, preferring one already extracted, then a top-level module,
    then the deepest (global average pooling of a conv block gives exactly that vector)."""
    if clf is None:
        raise JobError("the model has no final linear layer to take the features from",
                       fix="choose the layer with --layer (see `neuron-studio info PROJECT --layers`)")
    width = dict(module.named_modules())[clf["name"]].in_features
    cands = [r for r in project.layers(model_row["id"], extractable_only=True)
             if r["position"] < clf["position"] and r["units"] == width]
    if not cands:
        raise JobError(f"no layer before {clf['name']} has its {width} inputs as units",
                       fix="choose the layer with --layer (see `neuron-studio info PROJECT --layers`)")
    extracted = {r["id"] for r in project.extracted_layers(model_row["id"])}
    best = max(cands, key=lambda r: (r["id"] in extracted, -r["name"].count("."), r["position"]))
    return best["name"]


# ---- the job ----------------------------------------------------------------------------------------------------

class TranslatorJob:
    """Train a TExplain translator for one layer of the project's model on one of its captioned datasets."""

    kind = KIND

    def __init__(self, project_path: str | Path, options: TranslatorOptions):
        self.project_path = Path(project_path)
        self.options = options
        self.title = f"Train a TExplain translator{' for ' + options.layer if options.layer else ''}"
        self.run_id: int | None = None
        self.folder: Path | None = None

    def execute(self, progress: JobProgress) -> TranslatorReport:
        project = Project.open(self.project_path)
        try:
            return self._execute(project, progress)
        finally:
            project.close()

    def _execute(self, project: Project, progress: JobProgress) -> TranslatorReport:
        from app.engine.device import pick_device
        from app.engine.extract import load_project_model
        from labelers.base import LabelerError
        from labelers.textmodels import load as load_text_model

        opts = self.options
        model_row = project.model(opts.model)
        ds_row = project.dataset(opts.dataset)
        captions = project.captions(ds_row["id"])
        if not any(captions):
            raise JobError(f"the dataset {ds_row['name']} has no captions to train on",
                           fix="add a dataset with captions (COCO captions JSON or captions.jsonl)")
        lm_path = resolve_lm(project, opts.lm)
        device = pick_device(opts.device)
        try:
            lm = load_text_model(lm_path, "lm", device)
        except LabelerError as exc:
            raise JobError(str(exc)) from None
        lm.model.requires_grad_(False)
        model = load_project_model(model_row, device)
        clf = classifier_layer(project, model_row, model.module)
        layer = opts.layer or default_layer(project, model_row, model.module, clf)
        layer_row = project.layer(model_row["id"], layer)
        if layer_row["units"] <= 0:
            raise JobError(f"layer {layer} has no units to take features from", fix="choose another --layer")
        lm_fp = file_fingerprint(lm_path)
        key = hashlib.sha256(json.dumps(
            {"model": model_row["fingerprint"], "dataset": ds_row["fingerprint"], "layer": layer, "lm": lm_fp,
             **opts.key_fields()}, sort_keys=True).encode()).hexdigest()
        name = f"{layer.replace('/', '_')}-{key[:10]}"
        folder = project.path / FOLDER / name
        self.folder = folder
        done = project.finished_run(self.kind, key)
        if done is not None and (folder / CARD).exists():
            self.run_id = done.id
            log.info("translator already trained as run %d", done.id)
            return TranslatorReport(**{k: v for k, v in (done.report or {}).items()
                                       if k in {f.name for f in dataclasses.fields(TranslatorReport)}})
        prior = project.resumable_run(self.kind, key)
        run_id = prior.id if prior else project.create_run(
            kind=self.kind, key=key, params=dataclasses.asdict(opts) | {"layer": layer, "lm": str(lm_path)},
            model_id=model_row["id"], dataset_id=ds_row["id"], layer_id=layer_row["id"], method="texplain")
        self.run_id = run_id
        project.start_run(run_id)
        folder.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        with project.finishing(run_id, t0):
            report = self._train(project, progress, run_id, folder, model, model_row, ds_row, layer_row, clf, lm,
                                 lm_path, lm_fp, captions, device, t0)
        project.finish_run(run_id, "done", report=dataclasses.asdict(report), seconds=report.seconds,
                           message=f"held-out loss {report.heldout_loss:.3f} (LM alone {report.baseline_loss:.3f})")
        return report

    # -- features: one pass of the image model, resumable row by row
    def _features(self, progress: JobProgress, project: Project, run_id: int, folder: Path, model: Any,
                  ds_row: dict[str, Any], layer_row: dict[str, Any], clf: dict[str, Any] | None,
                  device: Any) -> tuple[np.ndarray, np.ndarray | None]:
        from app.engine.extract import (
            MapRunner,
            layer_info,
            make_loader,
            open_project_dataset,
        )

        n = ds_row["num_images"]
        feats = arrays.open_rows(folder / "features.npy", (n, layer_row["units"]), np.float32)
        logits = arrays.open_rows(folder / "logits.npy", (n, clf["units"]), np.float32) if clf else None
        state = folder / "features.json"
        meta = json.loads(state.read_text()) if state.exists() else {"next_index": 0, "problems": {}}
        if meta["next_index"] >= n:
            return feats, logits

        def save() -> None:
            feats.flush()
            if logits is not None:
                logits.flush()
            tmp = state.with_name(state.name + ".tmp")
            tmp.write_text(json.dumps(meta))
            arrays.atomic_replace(tmp, state)

        if meta["next_index"] == 0 and self._copy_extracted(project, ds_row, layer_row, clf, feats, logits):
            progress.begin_stage("features: the extraction's pooled means")
            meta["next_index"], meta["source"] = n, "extraction"
            save()
            return feats, logits
        reader = open_project_dataset(ds_row)
        infos = {layer_row["name"]: layer_info(layer_row)}
        if clf is not None:
            infos[clf["name"]] = layer_info(clf)
        runner = MapRunner(model, infos, device, batch_size=self.options.batch_size)
        progress.begin_stage("features: running the image model", meta["next_index"])
        last = time.monotonic()
        for batch in make_loader(reader, model.preprocess, list(range(meta["next_index"], n)),
                                 self.options.batch_size, self.options.num_workers, device):
            ok = batch["ok"]
            for i, err in zip(batch["index"].tolist(), batch["error"]):
                if err:
                    meta["problems"][str(i)] = err
            if ok.any():
                maps = runner.maps(batch["x"][ok])
                idx = batch["index"][ok].numpy()
                feats[idx] = maps[layer_row["name"]].flatten(2).mean(2).cpu().numpy()
                if logits is not None:
                    logits[idx] = maps[clf["name"]].flatten(2).mean(2).cpu().numpy()
            meta["next_index"] = int(batch["index"][-1]) + 1
            progress.update(meta["next_index"], n, "features: running the image model")
            if time.monotonic() - last >= self.options.checkpoint_seconds:
                save()
                project.update_run(run_id, done=meta["next_index"], total=n, message="features")
                last = time.monotonic()
        save()
        if meta["problems"]:
            project.record_image_problems(run_id, sorted((int(k), v) for k, v in meta["problems"].items()))
        return feats, logits

    @staticmethod
    def _copy_extracted(project: Project, ds_row: dict[str, Any], layer_row: dict[str, Any],
                        clf: dict[str, Any] | None, feats: np.ndarray, logits: np.ndarray | None) -> bool:
        """Fill the features (and logits) from the extraction's per-image pooled means when every layer needed was
        extracted on this dataset: the same numbers (the spatial mean of the layer's map; a linear layer's output
        is its own mean), without running the image model again. Images the extraction could not read stay NaN."""
        from app.engine.results import LayerResults

        needed = [(layer_row, feats)] + ([(clf, logits)] if clf is not None else [])
        found = []
        for row, target in needed:
            try:
                res = LayerResults.load(project, row["id"])
            except JobError:
                return False
            if int(res.stats["dataset_id"]) != int(ds_row["id"]) or res.pooled_mean.shape != target.shape:
                return False
            found.append((res, target))
        for res, target in found:
            values = np.array(res.pooled_mean, dtype=np.float32)
            values[~res.valid] = np.nan
            target[:] = values
        return True

    def _train(self, project: Project, progress: JobProgress, run_id: int, folder: Path, model: Any,
               model_row: dict[str, Any], ds_row: dict[str, Any], layer_row: dict[str, Any],
               clf: dict[str, Any] | None, lm: Any, lm_path: Path, lm_fp: str, captions: list[list[str]],
               device: Any, t0: float) -> TranslatorReport:
        import torch

        from labelers.texplain import (
            PrefixMapper,
            heldout_loss,
            new_optimizer,
            train_steps,
        )

        opts = self.options
        feats, _ = self._features(progress, project, run_id, folder, model, ds_row, layer_row, clf, device)
        features = torch.from_numpy(np.asarray(feats))
        valid = ~torch.isnan(features).any(1)
        pairs = [(i, c) for i in np.flatnonzero(valid.numpy()).tolist() for c in captions[i] if c.strip()]
        if len(pairs) < 2:
            raise JobError("fewer than two captioned images could be read", fix="check the dataset's images")
        # held-out split by image, so no held-out image's other captions were seen in training
        images = sorted({i for i, _ in pairs})
        perm = np.random.default_rng(opts.seed).permutation(len(images))
        n_held = max(1, int(round(len(images) * opts.heldout_fraction))) if len(images) > 1 else 0
        held_images = {images[j] for j in perm[:n_held]}
        train = [p for p in pairs if p[0] not in held_images]
        held = [p for p in pairs if p[0] in held_images]
        if not train:
            raise JobError("no captioned image is left for training after the held-out split",
                           fix="lower the held-out fraction or add images")

        torch.manual_seed(opts.seed)  # the mapper's initial weights: the same seed trains the same translator
        mapper = PrefixMapper.for_lm(layer_row["units"], opts.prefix_length, lm, opts.hidden, opts.mode)
        train_idx = torch.tensor(sorted({i for i, _ in train}))
        mapper.set_normalisation(features[train_idx])
        mapper.to(device)
        optim = new_optimizer(mapper, opts.lr)
        step, curve = 0, []
        state_path = folder / STATE
        if state_path.exists():
            tensors, meta = arrays.load_state(state_path)
            mapper.load_state_dict({k[2:]: v for k, v in tensors.items() if k.startswith("m/")})
            optim.load_state_dict(_optim_from_tensors(tensors, meta["optim"]))
            step, curve = int(meta["step"]), meta["curve"]
            log.info("resuming translator training at step %d", step)
        record_every = max(1, opts.steps // 100)
        last = [time.monotonic()]
        running: list[float] = []

        def checkpoint(at: int) -> None:
            tensors = {"m/" + k: v for k, v in mapper.state_dict().items()}
            optim_meta = _optim_to_tensors(optim.state_dict(), tensors)
            arrays.save_state(state_path, tensors, {"step": at, "curve": curve, "optim": optim_meta})
            project.update_run(run_id, done=at, total=opts.steps, message=f"training, loss {_last(curve)}",
                               seconds=time.monotonic() - t0)
            last[0] = time.monotonic()

        def on_step(at: int, loss: float) -> None:
            running.append(loss)
            if at % record_every == 0 or at == opts.steps:
                curve.append([at, float(np.mean(running))])
                running.clear()
            progress.update(at, opts.steps, f"training the translator, loss {_last(curve)}")
            if time.monotonic() - last[0] >= opts.checkpoint_seconds:
                checkpoint(at)

        progress.begin_stage("training the translator", step)
        step = train_steps(lm, mapper, optim, features, train, start=step, steps=opts.steps,
                           batch_size=opts.batch_size, lr=opts.lr, max_tokens=opts.max_tokens, seed=opts.seed,
                           on_step=on_step)
        checkpoint(step)
        mapper.eval()
        progress.begin_stage("held-out loss")
        progress.update(0, 1, "held-out loss with and without the translator")
        hx = features[torch.tensor([i for i, _ in held])] if held else features[:0]
        hc = [c for _, c in held]
        translated = heldout_loss(lm, mapper, hx, hc, opts.max_tokens) if held else math.nan
        baseline = heldout_loss(lm, None, hx, hc, opts.max_tokens) if held else math.nan
        seconds = time.monotonic() - t0
        report = TranslatorReport(
            name=folder.name, folder=str(folder.relative_to(project.path)), layer=layer_row["name"],
            classifier_layer=clf["name"] if clf else None, steps=step, train_pairs=len(train),
            heldout_pairs=len(held), heldout_loss=translated, baseline_loss=baseline, seconds=seconds,
            loss_curve=curve)
        self._write(folder, mapper, report, model_row, ds_row, lm_path, lm_fp, project, opts, valid)
        state_path.unlink(missing_ok=True)
        progress.update(1, 1, "held-out loss with and without the translator")
        return report

    def _write(self, folder: Path, mapper: Any, report: TranslatorReport, model_row: dict[str, Any],
               ds_row: dict[str, Any], lm_path: Path, lm_fp: str, project: Project, opts: TranslatorOptions,
               valid: Any) -> None:
        from safetensors.torch import save_file

        tmp = folder / (WEIGHTS + ".tmp")
        save_file({k: v.detach().cpu().contiguous() for k, v in mapper.state_dict().items()}, str(tmp),
                  metadata={"config": json.dumps(mapper.config)})
        arrays.atomic_replace(tmp, folder / WEIGHTS)
        try:
            lm_ref = str(lm_path.relative_to(project.path))
        except ValueError:
            lm_ref = str(lm_path)
        card = {
            "kind": "texplain-translator", "name": folder.name, "run_id": self.run_id,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "model": {"name": model_row["name"], "fingerprint": model_row["fingerprint"]},
            "dataset": {"id": ds_row["id"], "name": ds_row["name"], "fingerprint": ds_row["fingerprint"],
                        "images": ds_row["num_images"], "images_read": int(valid.sum())},
            "lm": {"path": lm_ref, "fingerprint": lm_fp},
            "layer": report.layer, "classifier_layer": report.classifier_layer,
            "class_names": model_row.get("class_names"),
            "mapper": mapper.config,
            "training": {k: getattr(opts, k) for k in ("steps", "batch_size", "lr", "max_tokens", "heldout_fraction",
                                                       "seed", "prefix_length", "mode")},
            "train_pairs": report.train_pairs, "heldout_pairs": report.heldout_pairs,
            "heldout_loss": report.heldout_loss, "baseline_loss": report.baseline_loss,
            "loss_curve": report.loss_curve, "seconds": report.seconds,
        }
        tmp = folder / (CARD + ".tmp")
        tmp.write_text(json.dumps(card, indent=1, default=float))
        arrays.atomic_replace(tmp, folder / CARD)
        tmp = folder / "README.md.tmp"
        tmp.write_text(readme(card), encoding="utf-8")
        arrays.atomic_replace(tmp, folder / "README.md")


def _last(curve: list[list[float]]) -> str:
    return f"{curve[-1][1]:.3f}" if curve else "--"


def _optim_to_tensors(sd: dict[str, Any], tensors: dict[str, Any]) -> dict[str, Any]:
    """Optimizer state as safetensors entries (never a pickle) plus the JSON that rebuilds its structure."""
    meta: dict[str, Any] = {"param_groups": sd["param_groups"], "state": {}}
    for pid, st in sd["state"].items():
        meta["state"][str(pid)] = {}
        for k, v in st.items():
            if hasattr(v, "detach"):
                tensors[f"o/{pid}/{k}"] = v.detach().clone().contiguous()
                meta["state"][str(pid)][k] = None
            else:
                meta["state"][str(pid)][k] = v
    return meta


def _optim_from_tensors(tensors: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    state = {int(pid): {k: (tensors[f"o/{pid}/{k}"] if v is None else v) for k, v in st.items()}
             for pid, st in meta["state"].items()}
    return {"param_groups": meta["param_groups"], "state": state}


def readme(card: dict[str, Any]) -> str:
    curve = card.get("loss_curve") or []
    pts = ", ".join(f"{int(s)}: {v:.3f}" for s, v in curve[:: max(1, len(curve) // 10)])
    return "\n".join([
        f"# TExplain translator {card['name']}",
        "",
        (f"Maps the pooled features of layer `{card['layer']}` of model {card['model']['name']} to a prefix of "
         f"{card['mapper']['prefix_length']} "
         + ("input embeddings (ClipCap)" if card["mapper"].get("mode") == "embeddings" else
            "virtual tokens whose keys and values enter every attention layer (a deep prefix)")
         + f" of the frozen language model at `{card['lm']['path']}` (an MLP mapper; the language model was not "
         "changed)."),
        "",
        f"- Data: dataset {card['dataset']['name']} ({card['dataset']['images_read']} images read), "
        f"{card['train_pairs']} training and {card['heldout_pairs']} held-out (image, caption) pairs, split by image.",
        f"- Training: {card['training']['steps']} steps of {card['training']['batch_size']} pairs, AdamW lr "
        f"{card['training']['lr']}, seed {card['training']['seed']}, {card['seconds']:.0f} s.",
        f"- Held-out caption loss per token: {card['heldout_loss']:.4f} with the translator's prefix, "
        f"{card['baseline_loss']:.4f} for the language model without a prefix.",
        f"- Classifier layer (per-class words): {card['classifier_layer'] or 'not found'}.",
        f"- Training loss by step: {pts}",
        "",
    ])


# ---- the store side: finding translators and feeding the labeler ----------------------------------------------

def translator_cards(project: Project) -> list[dict[str, Any]]:
    """Cards of the project's finished translators, newest first."""
    root = project.path / FOLDER
    cards = []
    if root.is_dir():
        for card_file in root.glob(f"*/{CARD}"):
            try:
                card = json.loads(card_file.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                log.warning("%s: unreadable translator card, ignored", card_file)
                continue
            if (card_file.parent / WEIGHTS).exists():
                card["folder"] = str(card_file.parent)
                cards.append(card)
    return sorted(cards, key=lambda c: (c.get("created_at", ""), c.get("run_id") or 0), reverse=True)


def pick_translator(project: Project, model_row: dict[str, Any], ds_row: dict[str, Any],
                    layer: str) -> dict[str, Any] | None:
    """The newest translator of this model and dataset, preferring one trained on `layer` or whose classifier
    layer is `layer` (any other still serves per-unit words through top-activating images)."""
    cards = [c for c in translator_cards(project)
             if c["model"]["fingerprint"] == model_row["fingerprint"]
             and c["dataset"]["fingerprint"] == ds_row["fingerprint"]]
    exact = [c for c in cards if layer in (c["layer"], c.get("classifier_layer"))]
    return (exact or cards or [None])[0]


def lm_folder(project: Project, card: dict[str, Any]) -> Path:
    p = Path(card["lm"]["path"])
    return p if p.is_absolute() else project.path / p


def load_mapper(folder: Path, device: Any) -> Any:
    from safetensors import safe_open
    from safetensors.torch import load_file

    from labelers.texplain import PrefixMapper

    path = folder / WEIGHTS
    with safe_open(str(path), framework="pt") as fh:
        config = json.loads((fh.metadata() or {})["config"])
    mapper = PrefixMapper(**config)
    mapper.load_state_dict(load_file(str(path)))
    return mapper.eval().to(device)


def translator_inputs(project: Project, model_row: dict[str, Any], ds_row: dict[str, Any], layer: str,
                      rows: np.ndarray, device: Any) -> Any:
    """`LabelerInputs.translator` for a labeling job over the dataset images `rows`, or None when the project has
    no translator for this model and dataset."""
    import torch

    from app.engine.extract import open_project_dataset
    from labelers.base import LabelerError
    from labelers.texplain import TranslatorInputs
    from labelers.textmodels import load as load_text_model

    card = pick_translator(project, model_row, ds_row, layer)
    if card is None:
        return None
    folder = Path(card["folder"])
    lm_path = lm_folder(project, card)
    if not lm_path.is_dir() or file_fingerprint(lm_path) != card["lm"]["fingerprint"]:
        raise JobError(f"the language model translator {card['name']} was trained with is missing or changed",
                       file=lm_path, fix="restore that folder, or train the translator again")
    try:
        lm = load_text_model(lm_path, "lm", device)
    except LabelerError as exc:
        raise JobError(str(exc)) from None
    feats = np.asarray(arrays.load_npy(folder / "features.npy"))[rows]
    if np.isnan(feats).any():
        raise JobError(f"the translator {card['name']} has no features for some images the extraction read",
                       fix="train the translator again (the images may have been unreadable then)")
    predictions = labels = None
    names = card.get("class_names")
    if card.get("classifier_layer") and (folder / "logits.npy").exists():
        predictions = torch.from_numpy(np.asarray(arrays.load_npy(folder / "logits.npy"))[rows].argmax(1))
        labels = _class_labels(open_project_dataset(ds_row), names, rows)
    return TranslatorInputs(
        mapper=load_mapper(folder, device), lm=lm, features=torch.from_numpy(np.ascontiguousarray(feats)),
        layer=card["layer"], classifier_layer=card.get("classifier_layer"), class_names=names,
        predictions=predictions, class_labels=labels, name=card["name"])


def _class_labels(reader: Any, model_classes: list[str] | None, rows: np.ndarray) -> Any:
    """The dataset's class of each image in the model's class order (-1 where unknown), or None."""
    import torch

    got = reader.class_labels()
    if got is None:
        return None
    names, labels = got
    if model_classes:
        where = {c.lower(): i for i, c in enumerate(model_classes)}
        remap = np.array([where.get(n.lower(), -1) for n in names] + [-1], dtype=np.int64)
        labels = remap[np.where(labels >= 0, labels, len(names))]
    return torch.from_numpy(np.asarray(labels, dtype=np.int64)[rows])


__all__ = [
    "TranslatorJob",
    "TranslatorOptions",
    "TranslatorReport",
    "pick_translator",
    "readme",
    "translator_cards",
    "translator_inputs",
]
