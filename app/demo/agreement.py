"""How far the demo's language-based labels agree with Network Dissection, each beside what the same comparison gives
a trivial labeler, and beside what the method itself could reach on this data.

- CLIP-Dissect: of the units Network Dissection calls detectors (IoU >= 0.04) of a colour or a shape, the share whose
  CLIP-Dissect top label is that concept (`clip_dissect_agreement`). Beside it:
  * the most frequent CLIP-Dissect top label given to every unit;
  * the method's ceiling on this data: soft-WPMI with the parameters the demo ran, but with the dataset's TRUE
    image-level concept labels in place of the dual encoder (p(t | x) = softmax(a * s), s = 1 for the concepts the
    image contains, 0 for the others: a perfect encoder). A gap between the two is the encoder's; what the ceiling
    misses is the method's (whole-image statistics, the layer prior at lambda = 1) or Network Dissection's. The
    ceiling without the prior (lambda = 0) is reported too: on the demo most of the ceiling's misses are the prior's
    (block4 has some twenty circle detectors; at lambda = 1 only the strongest keeps "circle").
  * the same with a perfect encoder that also sees how much of the image a concept covers, as CLIP's similarity
    grows with a concept's size: s = the concept's share of the image's pixels / AREA_FULL, at most 1 (datasets with
    masks only). On the demo this is the higher of the two ceilings (a quarter of the image scored best of the caps
    tried: 2%, 5%, 10%, 25%, 50%, 100%).
- MILAN: of the units Network Dissection calls detectors of any concept in MILAN's layers, the share whose MILAN
  description names that concept (its name, plural or a synonym the demo's captions use, `shapes.concept_words`);
  beside it, the most frequent MILAN description given to every unit.
"""
from __future__ import annotations

import re
from typing import Any

DETECTOR_CATEGORIES = ("color", "object")  # "detectors of a colour or shape"
AREA_FULL = 0.25  # a concept covering this share of an image is as present as a concept can be (see the docstring)


def _top_labels(project: Any, layer_id: int) -> dict[tuple[str, int], dict[str, Any]]:
    return {(lab["method"], lab["unit"]): lab for lab in project.labels(layer_id=layer_id, max_rank=1)}


def _detectors(top: dict[tuple[str, int], dict[str, Any]], categories: tuple[str, ...] | None) -> dict[int, str]:
    return {u: lab["label"] for (m, u), lab in top.items()
            if m == "netdissect" and lab["extra"].get("interpretable")
            and (categories is None or lab["category"] in categories)}


def _most_frequent(tops: Any, method: str) -> str | None:
    """The label `method` gives most often as a unit's top label over the layers' `_top_labels` (`tops`)."""
    counts: dict[str, int] = {}
    for top in tops:
        for (m, _u), lab in top.items():
            if m == method:
                counts[lab["label"]] = counts.get(lab["label"], 0) + 1
    return max(counts, key=counts.get) if counts else None


def clip_dissect_agreement(project: Any, model_id: int, layers: list[str],
                           categories: tuple[str, ...] = DETECTOR_CATEGORIES) -> dict[str, Any]:
    """Of the units Network Dissection calls detectors (IoU >= 0.04) of a concept in `categories` (colours and
    shapes), the fraction whose CLIP-Dissect top label names the same concept."""
    agree = total = 0
    per_layer = {}
    for name in layers:
        top = _top_labels(project, project.layer(model_id, name)["id"])
        a = t = 0
        for unit, concept in _detectors(top, categories).items():
            clip = top.get(("clip_dissect", unit))
            if clip is None:
                continue
            t += 1
            a += clip["label"] == concept
        per_layer[name] = {"detectors": t, "agree": a}
        agree, total = agree + a, total + t
    return {"detectors": total, "agree": agree, "fraction": agree / total if total else None, "layers": per_layer}


def names_concept(text: str, concept: str) -> bool:
    """Whether a description uses a word naming `concept` (see the module docstring)."""
    from app.demo.shapes import concept_words

    return bool(set(re.findall(r"[a-z]+", text.lower())) & concept_words(concept))


def clip_dissect_baselines(project: Any, model_id: int, layers: list[str], params: dict[str, Any] | None = None,
                           categories: tuple[str, ...] = DETECTOR_CATEGORIES) -> dict[str, Any]:
    """The most-frequent-label baseline and the true-label ceiling of `clip_dissect_agreement`."""
    import numpy as np
    import torch

    from app.engine.results import LayerResults
    from labelers.base import get
    from labelers.clip_dissect import soft_wpmi_terms

    p = get("clip_dissect").resolve_params(dict(params or {}))
    tops, per_layer = {}, {}
    for name in layers:
        row = project.layer(model_id, name)
        tops[name] = (row, _top_labels(project, row["id"]))
    frequent = _most_frequent((top for _, top in tops.values()), "clip_dissect")
    agree_ceiling = agree_ceiling0 = agree_frequent = total = 0
    agree_area: int | None = 0
    presence_cache: dict[int, Any] = {}
    area_cache: dict[int, Any] = {}
    for name, (row, top) in tops.items():
        det = _detectors(top, categories)
        if not det:
            per_layer[name] = {"detectors": 0, "ceiling": 0, "ceiling_lambda_0": 0, "ceiling_area": 0,
                               "most_frequent": 0}
            continue
        res = LayerResults.load(project, row["id"])
        ds_id = int(res.stats["dataset_id"])
        if ds_id not in presence_cache:
            concepts = project.concepts(ds_id)
            names = [c["name"] for c in concepts]
            words = list(dict.fromkeys(names))  # vocabulary=dataset: one text per distinct name
            pres = np.asarray(project.presence_matrix(ds_id), dtype=bool)
            by_word = np.zeros((pres.shape[0], len(words)), bool)
            for c, n in enumerate(names):
                by_word[:, words.index(n)] |= pres[:, c]
            presence_cache[ds_id] = (words, by_word)
        words, by_word = presence_cache[ds_id]
        if ds_id not in area_cache:
            area_cache[ds_id] = _concept_areas(project, ds_id, words)
        areas = area_cache[ds_id]
        valid = np.asarray(res.valid, dtype=bool)
        acts = torch.from_numpy(np.array(res.pooled_mean if p["pooling"] == "mean" else res.pooled_max,
                                         dtype=np.float32))
        if acts.shape[0] != int(valid.sum()):
            acts = acts[torch.from_numpy(valid)]

        def picks(similarity: Any) -> tuple[list[int], list[int]]:
            """Each unit's top concept with the layer prior and without it (lambda 0: how much of the gap is the
            prior's; with lambda = 1 the prior is about the best unit's own log p(t | u), so the others lose it)."""
            p_t_x = torch.softmax(p["a"] * torch.from_numpy(similarity[valid].astype(np.float32)), dim=1)
            log_p_t_u, log_p_t = soft_wpmi_terms(acts, p_t_x, p["top_k_images"], p["p_start"], p["p_end"])
            return (log_p_t_u - p["lambda"] * log_p_t[None, :]).argmax(1).tolist(), log_p_t_u.argmax(1).tolist()

        def hits(best: list[int]) -> int:
            return sum(words[best[u]] == concept for u, concept in det.items())

        best, best0 = picks(by_word)
        c, c0 = hits(best), hits(best0)
        ca = hits(picks(np.minimum(areas / AREA_FULL, 1.0))[0]) if areas is not None else None
        f = sum(frequent == concept for concept in det.values())
        per_layer[name] = {"detectors": len(det), "ceiling": c, "ceiling_lambda_0": c0, "ceiling_area": ca,
                           "most_frequent": f}
        agree_ceiling, agree_frequent, total = agree_ceiling + c, agree_frequent + f, total + len(det)
        agree_ceiling0 += c0
        agree_area = None if ca is None or agree_area is None else agree_area + ca
    return {"detectors": total, "ceiling": agree_ceiling, "ceiling_lambda_0": agree_ceiling0,
            "ceiling_area": agree_area, "most_frequent_label": frequent, "most_frequent": agree_frequent,
            "lambda": p["lambda"], "layers": per_layer}


def _concept_areas(project: Any, dataset_id: int, words: list[str]) -> Any:
    """[N, W] float: each concept name's share of each image's pixels, from the dataset's masks (None without)."""
    import numpy as np

    from app.engine.extract import open_project_dataset

    reader = open_project_dataset(project.dataset(dataset_id))
    if not reader.has_masks:
        return None
    names = [c["name"] for c in project.concepts(dataset_id)]
    column = np.array([words.index(n) for n in names])
    out = np.zeros((len(reader.images), len(words)), np.float32)
    for i in range(len(reader.images)):
        # masks at a fixed small size: a share of the pixels needs no more
        cidx, masks = reader.masks(i, (64, 64))
        if len(cidx):
            np.maximum.at(out[i], column[cidx], masks.reshape(len(masks), -1).mean(1))
    return out


def milan_agreement(project: Any, model_id: int, layers: list[str]) -> dict[str, Any]:
    """MILAN's agreement with Network Dissection's detectors, and the most-frequent-description baseline."""
    tops = {name: _top_labels(project, project.layer(model_id, name)["id"]) for name in layers}
    frequent = _most_frequent(tops.values(), "milan")
    agree = base = total = described = 0
    per_layer: dict[str, Any] = {}
    per_concept: dict[str, dict[str, int]] = {}  # the detectors of each concept: a few concepts can be most of them
    for name, top in tops.items():
        det = _detectors(top, None)
        a = b = t = 0
        for u, concept in det.items():
            lab = top.get(("milan", u))
            if lab is None:
                continue
            t += 1
            hit = names_concept(lab["label"], concept)
            a += hit
            b += names_concept(frequent, concept)
            pc = per_concept.setdefault(concept, {"detectors": 0, "agree": 0})
            pc["detectors"] += 1
            pc["agree"] += hit
        described += sum(1 for (m, _u) in top if m == "milan")
        per_layer[name] = {"detectors": t, "agree": a, "most_frequent": b}
        agree, base, total = agree + a, base + b, total + t
    return {"detectors": total, "agree": agree, "most_frequent": base, "most_frequent_description": frequent,
            "units_described": described, "fraction": agree / total if total else None,
            "baseline_fraction": base / total if total else None, "layers": per_layer,
            "concepts": dict(sorted(per_concept.items(), key=lambda kv: -kv[1]["detectors"]))}
