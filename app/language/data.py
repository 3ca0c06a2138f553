"""What the language models learn from, gathered from one dataset of the project (and its annotated units).

- images: the dataset's images as the models see them (shorter side resized to S, centre-cropped to S x S).
- captions: (image, caption) pairs of the dataset.
- concept words: which concepts each whole image contains (image-level labels), so the dual encoder learns that a
  whole image is near the name of every concept in it (what CLIP-Dissect asks of it).
- regions: (image, mask, phrase) for every annotated concept mask of an image, and for adjective + noun pairs whose
  masks coincide in an image (a "red" mask and a "circle" mask on the same object give "red circle"); a region
  image is the image with everything outside the mask replaced by grey (`labelers.textmodels.mask_pixels`, the same
  masking the captioner sees at use time).
- descriptions: unit descriptions annotators wrote or imported (MILANNOTATIONS), each with its unit's exemplars (the
  top images of the unit, masked where the unit's map exceeds its 0.99 quantile, as MILAN masks them).

Held-out split: by image (10%, fixed by a hash of the image index) for captions and regions, and by unit for
descriptions, so a held-out figure never scores something the model was trained on.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from app.errors import JobError

log = logging.getLogger(__name__)

# Categories whose concepts read as adjectives and as nouns in phrases ("red circle", "striped squares").
ADJECTIVE_CATEGORIES = ("color", "colour", "texture", "material")
NOUN_CATEGORIES = ("object", "part")
MIN_REGION_PIXELS = 12  # smaller masks (at S x S) carry too little to learn a word from
HELDOUT_FRACTION = 0.1


def plural(word: str) -> str:
    """English plural of the last word of a phrase (enough for concept names: circle -> circles, cross -> crosses)."""
    head, _, last = word.rpartition(" ")
    if not last:
        return word
    if last.endswith(("s", "x", "z", "ch", "sh")):
        last = last + "es"
    elif last.endswith("y") and len(last) > 1 and last[-2] not in "aeiou":
        last = last[:-1] + "ies"
    else:
        last = last + "s"
    return f"{head} {last}" if head else last


def heldout_key(key: str | int) -> bool:
    """Whether an image or unit is held out: a fixed 10% by hash, the same on every run and machine."""
    h = hashlib.sha256(str(key).encode()).digest()
    return int.from_bytes(h[:4], "little") / 2**32 < HELDOUT_FRACTION


def description_split(project: Any) -> tuple[list[str], list[str]]:
    """Units ("model/layer/unit") with a human description (the naming board's, imported MILANNOTATIONS), split
    as the captioner's training splits them: (trained on, held out). Only units extracted on the dataset trained
    on have exemplars, so a training run may use fewer; its model card lists the units it did use."""
    units = dict.fromkeys(f"{a['model']}/{a['layer']}/{int(a['unit'])}" for a in project.annotations()
                          if a["kind"] == "description" and a["text"].strip())
    seen = [u for u in units if not heldout_key(u)]
    return seen, [u for u in units if heldout_key(u)]


@dataclass
class Description:
    text: str
    unit: str  # "model/layer/unit", for the model card
    exemplar_rows: Any  # torch int64 [k]: rows of Corpus.images
    exemplar_masks: Any  # torch bool [k, S, S]
    heldout: bool


@dataclass
class Corpus:
    image_size: int
    dataset: str
    images: Any  # torch uint8 [N, 3, S, S]
    heldout: Any  # torch bool [N]
    captions: list[tuple[int, str]] = field(default_factory=list)
    # regions: image row, phrase index, mask
    region_image: Any = None  # torch int64 [R]
    region_phrase: Any = None  # torch int64 [R]
    region_masks: Any = None  # torch bool [R, S, S]
    phrases: list[str] = field(default_factory=list)  # singular phrase of each phrase index ("red circle")
    descriptions: list[Description] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    concept_names: list[str] = field(default_factory=list)  # distinct concept names (several concepts may share one)
    presence: Any = None  # torch bool [N, len(concept_names)]: the image contains a concept of that name
    # the category of each concept name ("color", "object", ...; the first concept's where names repeat)
    concept_categories: list[str] = field(default_factory=list)

    def caption_split(self, heldout: bool) -> list[tuple[int, str]]:
        return [(i, t) for i, t in self.captions if bool(self.heldout[i]) == heldout]

    def region_split(self, heldout: bool) -> Any:
        """Indices of the regions of training (or held-out) images."""
        import torch

        if self.region_image is None or len(self.region_image) == 0:
            return torch.zeros(0, dtype=torch.int64)
        return torch.nonzero(self.heldout[self.region_image] == heldout).flatten()

    def texts(self, heldout: bool) -> list[str]:
        """All text of one split: captions, phrases of regions (singular and plural), descriptions."""
        out = [t for _, t in self.caption_split(heldout)]
        if self.region_image is not None and len(self.region_image):
            used = self.region_phrase[self.region_split(heldout)].unique().tolist()
            out += [self.phrases[j] for j in used] + [plural(self.phrases[j]) for j in used]
        out += [d.text for d in self.descriptions if d.heldout == heldout]
        if self.presence is not None:
            rows = self.heldout == heldout
            out += [n for n, present in zip(self.concept_names, self.presence[rows].any(0).tolist()) if present]
        return out

    def summary(self) -> dict[str, Any]:
        n_regions = 0 if self.region_image is None else int(len(self.region_image))
        return {
            "dataset": self.dataset,
            "image_size": self.image_size,
            "images": int(len(self.images)),
            "heldout_images": int(self.heldout.sum()),
            "captions": len(self.captions),
            "regions": n_regions,
            "phrases": len(self.phrases),
            "concept_words": len(self.concept_names),
            "descriptions": len(self.descriptions),
            "heldout_descriptions": sum(d.heldout for d in self.descriptions),
            "notes": list(self.notes),
        }


def _view(img: Any, size: int) -> Any:
    """PIL image -> the S x S centre crop of the image resized so its shorter side is S (what the models see)."""
    from PIL import Image

    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size)), (nh, nw, top, left)


def gather(project: Any, dataset: int | str | None, image_size: int = 64, max_images: int = 20000,
           max_regions: int = 60000, progress: Any = None, seed: int = 0) -> Corpus:
    """Read the training material of one dataset of `project` (see the module docstring)."""
    import torch

    from app.engine.extract import open_project_dataset
    from app.sources.datasets import load_rgb

    ds_row = project.dataset(dataset)
    reader = open_project_dataset(ds_row)
    n_all = len(reader.images)
    rng = np.random.default_rng(seed)
    rows = np.arange(n_all) if n_all <= max_images else np.sort(rng.choice(n_all, max_images, replace=False))
    captions_all = project.captions(ds_row["id"])
    concept_rows = project.concepts(ds_row["id"])
    names = [c["name"] for c in concept_rows]
    cats = [(c["category"] or "").lower() for c in concept_rows]
    adjectives = {i for i, c in enumerate(cats) if c in ADJECTIVE_CATEGORIES}
    nouns = {i for i, c in enumerate(cats) if c in NOUN_CATEGORIES}
    has_masks = bool(reader.has_masks) and bool(concept_rows)

    images = torch.zeros((len(rows), 3, image_size, image_size), dtype=torch.uint8)
    ok = np.ones(len(rows), bool)
    phrase_index: dict[str, int] = {}
    r_img: list[int] = []
    r_phr: list[int] = []
    r_mask: list[np.ndarray] = []
    captions: list[tuple[int, str]] = []
    unreadable = 0
    row_of: dict[int, int] = {}
    for j, i in enumerate(rows.tolist()):
        if progress is not None and j % 50 == 0:
            progress.update(j, len(rows), "reading images and masks")
        try:
            img = load_rgb(reader.images[i].path)
        except Exception as exc:  # a file gone or damaged since the dataset was added: skip it, say so
            unreadable += 1
            ok[j] = False
            log.info("language data: skipping %s (%s)", reader.images[i].path, exc)
            continue
        view, (nh, nw, top, left) = _view(img, image_size)
        images[j] = torch.from_numpy(np.asarray(view, dtype=np.uint8).copy()).permute(2, 0, 1)
        row_of[i] = j
        captions += [(j, c) for c in captions_all[i] if c.strip()] if i < len(captions_all) else []
        if not has_masks or len(r_img) >= max_regions:
            continue
        cidx, masks = reader.masks(i, (nh, nw))
        masks = masks[:, top:top + image_size, left:left + image_size]
        area = masks.reshape(len(masks), -1).sum(1)
        keep = [(int(c), m) for c, m, a in zip(cidx.tolist(), masks, area.tolist()) if a >= MIN_REGION_PIXELS]
        for c, m in keep:
            r_img.append(j)
            r_phr.append(phrase_index.setdefault(names[c], len(phrase_index)))
            r_mask.append(m)
        # adjective + noun on the same object: the pair's overlap, when it covers most of the smaller mask
        for a, ma in keep:
            if a not in adjectives:
                continue
            for b, mb in keep:
                if b not in nouns:
                    continue
                both = ma & mb
                nb = int(both.sum())
                if nb >= MIN_REGION_PIXELS and nb >= 0.5 * min(int(ma.sum()), int(mb.sum())):
                    r_img.append(j)
                    r_phr.append(phrase_index.setdefault(f"{names[a]} {names[b]}", len(phrase_index)))
                    r_mask.append(both)
    if progress is not None:
        progress.update(len(rows), len(rows), "reading images and masks")
    if not ok.any():
        raise JobError("none of the dataset's images can be read", file=ds_row["root"],
                       fix="restore the image files, or add the dataset again")
    heldout = torch.tensor([heldout_key(int(i)) for i in rows], dtype=torch.bool)
    heldout[~torch.from_numpy(ok)] = False
    corpus = Corpus(image_size=image_size, dataset=ds_row["name"], images=images, heldout=heldout,
                    captions=captions, phrases=list(phrase_index))
    if concept_rows:
        # concepts of the same name (e.g. in two categories) are one word to the text side
        word_of = {n: i for i, n in enumerate(dict.fromkeys(names))}
        presence = np.asarray(project.presence_matrix(ds_row["id"]))[rows]
        by_word = np.zeros((len(rows), len(word_of)), bool)
        for c, n in enumerate(names):
            by_word[:, word_of[n]] |= presence[:, c]
        by_word[~ok] = False
        corpus.concept_names = list(word_of)
        corpus.concept_categories = [cats[names.index(n)] for n in word_of]
        corpus.presence = torch.from_numpy(by_word)
    if r_img:
        corpus.region_image = torch.tensor(r_img, dtype=torch.int64)
        corpus.region_phrase = torch.tensor(r_phr, dtype=torch.int64)
        corpus.region_masks = torch.from_numpy(np.stack(r_mask))
    if unreadable:
        corpus.notes.append(f"{unreadable} unreadable images skipped")
    if len(rows) < n_all:
        corpus.notes.append(f"{len(rows)} of {n_all} images used (a random sample, seed {seed})")
    corpus.descriptions = _descriptions(project, ds_row, row_of, image_size, corpus.notes)
    return corpus


def _descriptions(project: Any, ds_row: dict[str, Any], row_of: dict[int, int], size: int,
                  notes: list[str]) -> list[Description]:
    """Unit descriptions with their exemplar sets, for units extracted on this dataset."""
    import torch

    from app.engine.results import LayerResults

    rows = [a for a in project.annotations() if a["kind"] == "description" and a["text"].strip()]
    if not rows:
        return []
    out: list[Description] = []
    cache: dict[tuple[str, str], Any] = {}
    skipped = 0
    for a in rows:
        key = (a["model"], a["layer"])
        if key not in cache:
            try:
                model = project.model(a["model"])
                layer = project.layer(model["id"], a["layer"])
                res = LayerResults.load(project, layer["id"])
                cache[key] = res if int(res.stats["dataset_id"]) == int(ds_row["id"]) else None
            except Exception as exc:  # a layer never extracted, or extracted on another dataset: no exemplars
                log.info("language data: no exemplars for %s/%s (%s)", *key, exc)
                cache[key] = None
        res = cache[key]
        if res is None:
            skipped += 1
            continue
        u = int(a["unit"])
        index = np.asarray(res.topk_index[u])
        maps = torch.from_numpy(np.asarray(res.topk_maps[u], dtype=np.float32))  # [k, h, w]
        q = 0.99 if 0.99 in res.quantiles else None
        thr = float(res.threshold(q)[u])
        keep = [k for k, i in enumerate(index.tolist()) if int(i) in row_of]
        if not keep:
            skipped += 1
            continue
        up = torch.nn.functional.interpolate(maps[keep][:, None], size=(size, size), mode="bilinear",
                                             align_corners=False)[:, 0]
        unit_key = f"{a['model']}/{a['layer']}/{u}"
        out.append(Description(
            text=a["text"].strip(), unit=unit_key,
            exemplar_rows=torch.tensor([row_of[int(index[k])] for k in keep], dtype=torch.int64),
            exemplar_masks=up > thr, heldout=heldout_key(unit_key)))
    if skipped:
        notes.append(f"{skipped} unit descriptions without exemplars on this dataset were not used")
    return out
