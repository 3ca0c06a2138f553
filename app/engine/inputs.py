"""One provider per labeler input: whether the project can give it for an extracted layer (`available`) and the value
itself (`build`). The CLI (`label`), the window (which methods a layer can run, and why not) and the demo all ask
here, so the three cannot disagree.

Adding an input is one class with `input`, `available` and `build`, and one line in `PROVIDERS`.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import labelers.base as lb

log = logging.getLogger(__name__)


@dataclass
class Availability:
    ok: bool
    why: str = ""  # when not ok: what is missing and where it comes from
    detail: str = ""  # when not ok: the particular reason, if any (a folder gone, ...), without the source

    def __bool__(self) -> bool:
        return self.ok


@dataclass
class InputOptions:
    """Choices the caller makes about inputs (the CLI's flags, the window's form)."""

    clip_model: Path | None = None  # a brought CLIP folder, used instead of the project's own (--clip DIR)
    captioner: Path | None = None  # likewise a captioner folder for MILAN
    causal_lm: Path | None = None  # likewise a causal LM folder (MILAN's prior, TExplain's frozen LM)
    batch_size: int = 32
    num_workers: int | None = None


@dataclass
class BuildContext:
    """What `build` gets: the layer's rows, its extraction, the images it read, and a cache shared by providers."""

    project: Any
    layer: dict[str, Any]
    model: dict[str, Any]
    dataset: dict[str, Any]
    results: Any  # app.engine.results.LayerResults
    rows: Any  # np.ndarray of the dataset indices extraction read, in the labeler's image order
    device: Any
    options: InputOptions
    inputs: lb.LabelerInputs
    cache: dict[str, Any] = field(default_factory=dict)

    def reader(self) -> Any:
        if "reader" not in self.cache:
            from app.engine.extract import open_project_dataset

            self.cache["reader"] = open_project_dataset(self.dataset)
        return self.cache["reader"]

    def image_model(self) -> Any:
        if "model" not in self.cache:
            from app.engine.extract import load_project_model

            self.cache["model"] = load_project_model(self.model, self.device)
        return self.cache["model"]


def _missing(need: lb.Input, detail: str = "") -> Availability:
    return Availability(False, f"Needs {need.value.replace('_', ' ')}{' (' + detail + ')' if detail else ''}, "
                               f"which comes from {lb.INPUT_SOURCES[need]}.", detail)


def _facts(project: Any, layer: dict[str, Any]) -> dict[str, Any]:
    """The layer's extraction facts, read once per layer and project (cached on the row dict)."""
    cached = layer.get("_input_facts")
    if cached is not None:
        return cached
    stats = project.layer_stats(layer["id"])
    ds = project.dataset(stats["dataset_id"]) if stats else None
    facts = {"stats": stats, "dataset": ds, "concepts": 0, "captions": 0}
    if ds is not None:
        facts["concepts"], facts["captions"] = project.text_counts(ds["id"])
    layer["_input_facts"] = facts
    return facts


class Provider:
    input: ClassVar[lb.Input]

    def available(self, project: Any, layer: dict[str, Any], options: InputOptions | None = None) -> Availability:
        raise NotImplementedError

    def build(self, ctx: BuildContext) -> None:
        """Set the input's field(s) on `ctx.inputs`."""
        raise NotImplementedError


class PooledProvider(Provider):
    input = lb.Input.POOLED

    def available(self, project, layer, options=None):
        return Availability(True) if _facts(project, layer)["stats"] else _missing(self.input)

    def build(self, ctx):
        import numpy as np
        import torch

        ctx.inputs.pooled_max = torch.from_numpy(np.asarray(ctx.results.pooled_max)[ctx.rows]).to(ctx.device)
        ctx.inputs.pooled_mean = torch.from_numpy(np.asarray(ctx.results.pooled_mean)[ctx.rows]).to(ctx.device)


class PresenceProvider(Provider):
    input = lb.Input.CONCEPT_PRESENCE

    def available(self, project, layer, options=None):
        return Availability(True) if _facts(project, layer)["concepts"] else _missing(self.input)

    def build(self, ctx):
        import torch

        concept_rows = ctx.project.concepts(ctx.dataset["id"])
        if concept_rows:
            ctx.inputs.concepts = [lb.Concept(c["name"], c["category"]) for c in concept_rows]
            presence = ctx.project.presence_matrix(ctx.dataset["id"])[ctx.rows]
            ctx.inputs.concept_presence = torch.from_numpy(presence).to(ctx.device)


class MaskCountsProvider(Provider):
    input = lb.Input.MASK_COUNTS

    def available(self, project, layer, options=None):
        f = _facts(project, layer)
        ok = bool(f["stats"] and f["stats"]["has_mask_counts"]) and f["concepts"] > 0
        return Availability(True) if ok else _missing(self.input)

    def build(self, ctx):
        if not ctx.results.has_mask_counts:
            return
        mc = ctx.results.mask_counts(ctx.dataset["categories"])
        ctx.inputs.mask_counts = dataclasses.replace(
            mc, **{f: getattr(mc, f).to(ctx.device)
                   for f in ("intersection", "unit_area", "concept_area", "concept_category")})


class MaskBatchesProvider(Provider):
    input = lb.Input.MASK_BATCHES

    def available(self, project, layer, options=None):
        f = _facts(project, layer)
        ok = bool(f["dataset"] and f["dataset"]["has_masks"] and f["stats"] and f["stats"]["has_mask_counts"])
        return Availability(True) if ok else _missing(self.input)

    def build(self, ctx):
        reader = ctx.reader()
        if reader.has_masks and ctx.results.has_mask_counts:
            ctx.inputs.mask_batches = _mask_iter(ctx, reader, ctx.image_model())


class CaptionsProvider(Provider):
    input = lb.Input.CAPTIONS

    def available(self, project, layer, options=None):
        return Availability(True) if _facts(project, layer)["captions"] else _missing(self.input)

    def build(self, ctx):
        caps = ctx.project.captions(ctx.dataset["id"])
        ctx.inputs.captions = [caps[i] for i in ctx.rows]


class ImagesProvider(Provider):
    input = lb.Input.IMAGES

    def available(self, project, layer, options=None):
        ds = _facts(project, layer)["dataset"]
        if ds is None:
            return _missing(self.input)
        if not Path(ds["root"]).exists():
            return _missing(self.input, f"the folder {ds['root']} is gone")
        return Availability(True)

    def build(self, ctx):
        ctx.inputs.images = _image_iter(ctx.reader(), ctx.rows)


class ExemplarsProvider(Provider):
    """Each unit's top images as the model saw them, with its thresholded regions (app/engine/exemplars.py)."""

    input = lb.Input.EXEMPLARS

    def available(self, project, layer, options=None):
        return Availability(True) if _facts(project, layer)["stats"] else _missing(self.input)

    def build(self, ctx):
        from app.engine.exemplars import ProjectExemplars

        ctx.inputs.exemplars = ProjectExemplars(ctx.results, ctx.reader(), ctx.model["preprocess"], ctx.rows)


class TranslatorProvider(Provider):
    """TExplain's translator trained for this model and dataset, with its frozen LM and the images' features
    (app/language/translator.py)."""

    input = lb.Input.TRANSLATOR

    def available(self, project, layer, options=None):
        from app.language.translator import pick_translator

        ds = _facts(project, layer)["dataset"]
        if ds is None:
            return _missing(self.input)
        model = project.model(layer["model_id"])
        return Availability(True) if pick_translator(project, model, ds, layer["name"]) else _missing(self.input)

    def build(self, ctx):
        from app.language.translator import translator_inputs

        ctx.inputs.translator = translator_inputs(ctx.project, ctx.model, ctx.dataset, ctx.layer["name"], ctx.rows,
                                                  ctx.device)


class ImageModelProvider(Provider):
    input = lb.Input.MODEL

    def available(self, project, layer, options=None):
        layer_row = project.layer_by_id(layer["id"])
        row = project.model(layer_row["model_id"]) if layer_row else None
        if row is None:
            return _missing(self.input)
        if row["weights_path"] and not Path(row["weights_path"]).exists():
            return _missing(self.input, f"its weights file {row['weights_path']} is gone")
        return Availability(True)

    def build(self, ctx):
        ctx.inputs.model = ctx.image_model()


class LanguageModelProvider(Provider):
    """The newest language model of one kind in the project (trained in the app or brought), loaded on the
    labeling device."""

    kind: ClassVar[str]
    field_name: ClassVar[str]

    def folder(self, project: Any, options: InputOptions | None) -> Path | None:
        given = getattr(options, self.field_name, None) if options is not None else None
        if given:  # a folder the caller named wins over the project's own
            return Path(given).expanduser()
        row = project.language_model(kind=self.kind)
        return Path(row["abs_path"]) if row else None

    def available(self, project, layer, options=None):
        folder = self.folder(project, options)
        if folder is None:
            return _missing(self.input)
        if not folder.is_dir():
            return _missing(self.input, f"its folder {folder} is gone")
        return Availability(True)

    def build(self, ctx):
        from labelers.textmodels import load

        folder = self.folder(ctx.project, ctx.options)
        if folder is None:
            return
        key = f"{self.kind}:{folder}"
        if key not in ctx.cache:
            ctx.cache[key] = load(folder, self.kind, ctx.device)
        setattr(ctx.inputs, self.field_name, ctx.cache[key])


class ClipProvider(LanguageModelProvider):
    """CLIP-Dissect's dual encoder: a folder given by the caller (--clip DIR), else the project's own. The labeler
    gets the folder's path (it loads the model itself)."""

    input = lb.Input.CLIP_MODEL
    kind = "clip"
    field_name = "clip_model"

    def build(self, ctx):
        ctx.inputs.clip_model = self.folder(ctx.project, ctx.options)


class CaptionerProvider(LanguageModelProvider):
    input = lb.Input.CAPTIONER
    kind = "captioner"
    field_name = "captioner"


class CausalLMProvider(LanguageModelProvider):
    input = lb.Input.CAUSAL_LM
    kind = "lm"
    field_name = "causal_lm"


class SentenceEncoderProvider(LanguageModelProvider):
    """The project's sentence encoder, else the all-MiniLM-L6-v2 folder of the optional package, when installed."""

    input = lb.Input.SENTENCE_ENCODER
    kind = "sentence"
    field_name = "sentence_encoder"

    def folder(self, project, options):
        own = super().folder(project, options)
        if own is not None:
            return own
        from labelers.textmodels import default_sentence_encoder_path

        try:
            return default_sentence_encoder_path()
        except lb.LabelerError:  # the optional package is not installed: the input is missing, with its source
            return None


PROVIDERS: dict[lb.Input, Provider] = {p.input: p for p in (
    PooledProvider(), PresenceProvider(), MaskCountsProvider(), MaskBatchesProvider(), CaptionsProvider(),
    ImagesProvider(), ExemplarsProvider(), ImageModelProvider(), ClipProvider(), CaptionerProvider(),
    CausalLMProvider(), SentenceEncoderProvider(), TranslatorProvider(),
)}
# Built for every method because it is cheap and some methods read it without requiring it (e.g. CLIP-Dissect's
# vocabulary=dataset reads the concept names). The pooled arrays ([N, U] each) are read only for methods that ask.
ALWAYS = (lb.Input.CONCEPT_PRESENCE,)


def availability(project: Any, layer: dict[str, Any], need: lb.Input,
                 options: InputOptions | None = None) -> Availability:
    provider = PROVIDERS.get(need)
    if provider is None:
        return _missing(need, "this version of Neuron Studio cannot provide it yet")
    return provider.available(project, layer, options)


def missing_inputs(project: Any, layer: dict[str, Any], needed: tuple[lb.Input, ...],
                   options: InputOptions | None = None) -> dict[lb.Input, str]:
    """The inputs of `needed` this project cannot give for `layer`, each with its reason."""
    out = {}
    for need in needed:
        a = availability(project, layer, need, options)
        if not a:
            out[need] = a.why
    return out


def unavailable_methods(project: Any, model_id: int, options: InputOptions | None = None) -> dict[str, dict[str, str]]:
    """Per extracted layer of the model, the methods whose inputs the project lacks, with the first reason."""
    out: dict[str, dict[str, str]] = {}
    methods = lb.available()
    for layer in project.extracted_layers(model_id):
        reasons = {}
        for name, cls in methods.items():
            missing = missing_inputs(project, layer, cls.inputs, options)
            if missing:
                reasons[name] = next(iter(missing.values()))
        out[layer["name"]] = reasons
    return out


def build_inputs(project: Any, method: str, needed: tuple[lb.Input, ...], layer: dict[str, Any],
                 model: dict[str, Any], dataset: dict[str, Any], results: Any, device: Any,
                 options: InputOptions | None = None) -> lb.LabelerInputs:
    """The `LabelerInputs` of one method on one layer. An input the project cannot give raises MissingInputError
    with the provider's reason, before anything heavy is loaded."""
    import numpy as np

    options = options or InputOptions()
    for need in needed:
        a = availability(project, layer, need, options)
        if not a:
            raise lb.MissingInputError(method, need, a.detail)  # its message names the source itself
    rows = np.nonzero(results.valid)[0]
    inputs = lb.LabelerInputs(layer=layer["name"], num_units=layer["units"], device=device)
    ctx = BuildContext(project=project, layer=layer, model=model, dataset=dataset, results=results, rows=rows,
                       device=device, options=options, inputs=inputs)
    for need in dict.fromkeys((*ALWAYS, *needed)):
        PROVIDERS[need].build(ctx)
    return inputs


# ---- iterators over the extraction's images ----------------------------------------------------------------------
def _image_iter(reader: Any, rows: Any):
    import torch

    from app.sources.datasets import load_rgb

    def images(batch_size: int) -> Iterator[tuple[torch.Tensor, list[Any]]]:
        for s in range(0, len(rows), batch_size):
            chunk = rows[s:s + batch_size]
            # Positions are in the labeler's index space (valid images only), not the dataset's.
            yield torch.arange(s, s + len(chunk)), [load_rgb(reader.images[int(i)].path) for i in chunk]

    return images


def mask_batches(layer: dict[str, Any], model_row: dict[str, Any], dataset: dict[str, Any], results: Any, rows: Any,
                 reader: Any, model: Any, device: Any, options: InputOptions | None = None):
    """The MASK_BATCHES iterator of a layer outside a project (a Ray worker has the rows, not the database)."""
    ctx = BuildContext(project=None, layer=layer, model=model_row, dataset=dataset, results=results, rows=rows,
                       device=device, options=options or InputOptions(), inputs=None)  # type: ignore[arg-type]
    return _mask_iter(ctx, reader, model)


def _mask_iter(ctx: BuildContext, reader: Any, model: Any):
    import numpy as np
    import torch

    from app.engine.extract import MapRunner, layer_info, make_loader
    from app.errors import JobError
    from labelers.netdissect import threshold_and_upsample

    info = layer_info(ctx.layer)
    size = int(ctx.results.stats["mask_size"][0])
    thresholds = torch.from_numpy(np.asarray(ctx.results.threshold())).to(ctx.device)
    n_concepts = len(reader.concepts)
    # Dense [B, C, H, W] concept masks: keep the batch small when the vocabulary is large.
    batch = max(1, min(ctx.options.batch_size, int(2**28 // max(1, n_concepts * size * size))))
    device, rows, workers = ctx.device, ctx.rows, ctx.options.num_workers

    def batches() -> Iterator[lb.MaskBatch]:
        runner = MapRunner(model, {info.name: info}, device, batch_size=batch)
        for b in make_loader(reader, model.preprocess, rows.tolist(), batch, workers, device, size):
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
