"""TExplain's words: the `texplain-words` CSV and the HTML report's section.

texplain-words: one row per word of a class or unit (newest finished TExplain run per layer):
    model, layer, mode, unit, class, rank, word, frequency, count, lift, frequency_rank, lift_rank, images,
    own_word, spurious, accuracy_said, accuracy_not_said, run_id
mode is 'class' when the layer is the classifier (unit = class index) and 'unit' otherwise. frequency is the
fraction of the group's sampled sentences that say the word, lift its frequency relative to all images; the last
four columns are filled for classes only (the spurious-cue report).
"""
from __future__ import annotations

import csv
import html
from typing import Any

from app.export.base import ExportContext, exporter, split_names
from app.export.common import LAYERS, MODEL
from app.project.store import Project

COLUMNS = ("model", "layer", "mode", "unit", "class", "rank", "word", "frequency", "count", "lift", "frequency_rank",
           "lift_rank", "images", "own_word", "spurious", "accuracy_said", "accuracy_not_said", "run_id")
_e = html.escape


def run_modes(project: Project, run_ids: set[int]) -> dict[int, dict[str, Any]]:
    """Per TExplain run, the labeler's summary (mode, spurious-cue report) stored with the run."""
    out = {}
    for rid in run_ids:
        report = project.run(rid).report or {}
        out[rid] = report.get("summary") or {}
    return out


def word_rows(project: Project, model: str | None = None, layers: list[str] | None = None) -> list[dict[str, Any]]:
    labels = [r for r in project.labels(method="texplain")
              if (not model or r["model"] == model) and (not layers or r["layer"] in layers)]
    summaries = run_modes(project, {r["run_id"] for r in labels})
    rows = []
    for r in labels:
        x = r["extra"]
        mode = "class" if summaries.get(r["run_id"], {}).get("mode") == "classes" else "unit"
        rows.append({
            "model": r["model"], "layer": r["layer"], "mode": mode, "unit": r["unit"], "class": x.get("class", ""),
            "rank": r["rank"], "word": r["label"], "frequency": x.get("frequency"), "count": x.get("count"),
            "lift": x.get("lift"), "frequency_rank": x.get("frequency_rank"), "lift_rank": x.get("lift_rank"),
            "images": x.get("images"), "own_word": x.get("own_word", ""), "spurious": x.get("spurious", ""),
            "accuracy_said": x.get("accuracy_said"), "accuracy_not_said": x.get("accuracy_not_said"),
            "run_id": r["run_id"],
        })
    return rows


@exporter("texplain-words", title="TExplain words (CSV)", target="file", suffix=".csv", params=(MODEL, LAYERS))
def write_words(ctx: ExportContext) -> dict[str, Any]:
    """TExplain's words per class and per unit with frequency, count, lift and the spurious-cue columns."""
    rows = word_rows(ctx.project, ctx.options.get("model") or None, split_names(ctx.options.get("layers")))
    ctx.update(0, max(1, len(rows)), "texplain words")
    with open(ctx.path, "w", encoding="utf-8", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS, lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: "" if v is None else v for k, v in r.items()})
    ctx.update(max(1, len(rows)), max(1, len(rows)), "texplain words")
    return {"rows": len(rows)}


def report_section(project: Project, layer_ids: set[int], bars: Any) -> str:
    """The HTML report's TExplain section: per class its most frequent words (bars, lift beside) and the
    spurious-cue table; empty when no TExplain run labelled a classifier layer. `bars` is the report's svg_hbars."""
    labels = [r for r in project.labels(method="texplain") if r["layer_id"] in layer_ids]
    summaries = run_modes(project, {r["run_id"] for r in labels})
    parts = []
    for rid, summary in sorted(summaries.items()):
        if summary.get("mode") != "classes":
            continue
        layer = next(r["layer"] for r in labels if r["run_id"] == rid)
        parts.append(f"<h3>{_e(layer)} <small>run {rid} · translator {_e(str(summary.get('translator', '')))} · "
                     f"{summary.get('sentences_per_image')} sentences per image</small></h3><div class=\"units\">")
        by_class: dict[int, list[dict[str, Any]]] = {}
        for r in labels:
            if r["run_id"] == rid:
                by_class.setdefault(r["unit"], []).append(r)
        cues = {c["class"]: c for c in summary.get("spurious", [])}
        for c, rows in sorted(by_class.items()):
            rows.sort(key=lambda r: r["rank"])
            info = cues.get(c, {})
            chart = bars([(r["label"], float(r["extra"].get("frequency", 0.0)),
                           f"×{r['extra'].get('lift', 0):.1f}") for r in rows[:10]], maximum=1.0,
                         title=f"{info.get('name', c)}: share of sentences (lift)")
            flagged = [w for w in info.get("words", []) if w.get("flagged")]
            table = ""
            if flagged:
                cells = "".join(
                    f"<tr><td>{_e(w['word'])}</td><td>{w['frequency']:.2f}</td><td>{w['lift']:.2f}</td>"
                    f"<td>{_pct(w.get('accuracy_said'))} ({w.get('images_said', '–')})</td>"
                    f"<td>{_pct(w.get('accuracy_not_said'))} ({w.get('images_not_said', '–')})</td></tr>"
                    for w in flagged)
                table = ("<table class=\"facts\"><tr><th>possible cue</th><th>freq.</th><th>lift</th>"
                         "<th>right when said</th><th>right when not said</th></tr>" + cells + "</table>")
            acc = info.get("accuracy")
            of = info.get("images_in_class")
            sampled = f" of {of}" if of is not None and of != info.get("images") else ""
            parts.append(f"<div class=\"card\"><h4>{_e(str(info.get('name', c)))} <small>{info.get('images', 0)}"
                         f"{sampled} images{'' if acc is None else f', accuracy {acc:.0%}'}</small></h4>{chart}"
                         f"{table or '<p class=note>no spurious-cue candidate</p>'}</div>")
        parts.append("</div>")
    if not parts:
        return ""
    lift = max((s.get("min_lift", 1.5) for s in summaries.values() if s.get("mode") == "classes"), default=1.5)
    return ("<section id=\"texplain\"><h2>TExplain: what the classifier's features say</h2><p class=\"note\">Words "
            "a frozen language model says from each class's feature vectors (sampled sentences, stop words removed)."
            f" Possible cues: frequent words other than the class's name, said at least {lift:g} times more often "
            "for the class than overall; compare how often the classifier is right when the word is said or not.</p>"
            + "".join(parts) + "</section>")


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{v:.0%}"


def layer_words(project: Project, layer_id: int) -> dict[str, Any] | None:
    """The newest TExplain run of a layer for the window: {"mode", "run_id", "summary", "units": {unit: rows}},
    or None when TExplain has not labelled the layer."""
    labels = project.labels(layer_id=layer_id, method="texplain")
    if not labels:
        return None
    rid = max(r["run_id"] for r in labels)
    summary = run_modes(project, {rid})[rid]
    units: dict[int, list[dict[str, Any]]] = {}
    for r in labels:
        if r["run_id"] == rid:
            units.setdefault(r["unit"], []).append({"word": r["label"], "rank": r["rank"], **r["extra"]})
    return {"mode": summary.get("mode", "units"), "run_id": rid, "summary": summary, "units": units}
