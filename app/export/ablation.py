"""The HTML report's Ablation section: every finished "ablate" run (`neuron-studio ablate`, or the window's
Ablation tab) as a before/after table, overall and per class, with the paired bootstrap interval of the change,
the predictions that changed, the random-unit controls, and the per-class accuracies as paired bars (inline SVG)."""
from __future__ import annotations

import html
import math

import numpy as np

from app.audit import AblateResult
from app.project.store import Project

_e = html.escape
BEFORE = "#9a9a9a"
AFTER = "#3b6fb6"


def _acc(x: float) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{x:.1%}"


def _pts(x: float) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{100 * x:+.1f}&nbsp;pts"


def svg_paired_bars(names: list[str], before: list[float], after: list[float], *, height: int = 170,
                    title: str = "") -> str:
    """Vertical bars, two per class (before grey, after blue), on a 0–1 scale."""
    if not names:
        return ""
    slot, bar, left, top, bottom = 44, 16, 34, 22, 34
    width = left + slot * len(names) + 10
    plot_h = height - top - bottom
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="{_e(title)}">']
    if title:
        parts.append(f'<text x="0" y="14" class="ct">{_e(title)}</text>')
    for tick in (0.0, 0.5, 1.0):
        y = top + plot_h * (1 - tick)
        parts.append(f'<line x1="{left}" x2="{width - 6}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e3e6ea"/>'
                     f'<text x="{left - 4}" y="{y + 4:.1f}" text-anchor="end" class="cv">{tick:.0%}</text>')
    for i, (name, b, a) in enumerate(zip(names, before, after)):
        x = left + i * slot + (slot - 2 * bar) / 2
        for k, (v, colour, what) in enumerate(((b, BEFORE, "before"), (a, AFTER, "after"))):
            v = 0.0 if v is None or not math.isfinite(v) else max(0.0, min(1.0, v))
            h = plot_h * v
            parts.append(f'<rect x="{x + k * bar:.1f}" y="{top + plot_h - h:.1f}" width="{bar - 1}" height="{h:.1f}" '
                         f'fill="{colour}"><title>{_e(name)} {what}: {v:.1%}</title></rect>')
        short = name if len(name) <= 7 else name[:6] + "…"
        parts.append(f'<text x="{left + i * slot + slot / 2:.1f}" y="{height - bottom + 14}" text-anchor="middle" '
                     f'class="cl"><title>{_e(name)}</title>{_e(short)}</text>')
    parts.append(f'<text x="{left}" y="{height - 4}" class="cv">■ before (grey) · ■ after (blue)</text></svg>')
    return "".join(parts)


def result_html(r: AblateResult, run_id: int | None = None) -> str:
    lo, hi = r.difference_ci
    how = f"found by the query <i>{_e(r.query)}</i>" if r.query else "chosen by number"
    units = ", ".join(map(str, r.units[:60])) + (" …" if len(r.units) > 60 else "")
    rows = [("overall", r.images, r.accuracy_before, r.accuracy_after)]
    rows += [(c.name, c.n, c.accuracy_before, c.accuracy_after) for c in r.per_class]
    cells = []
    for i, (name, n, b, a) in enumerate(rows):
        change = _pts(a - b) + (f" [{_pts(lo)}, {_pts(hi)}]" if i == 0 else "")
        style = ' style="font-weight:bold"' if i == 0 else ""
        cells.append(f"<tr{style}><td>{_e(name)}</td><td>{n}</td><td>{_acc(b)}</td><td>{_acc(a)}</td>"
                     f"<td>{change}</td></tr>")
    lines = [f"{r.changed} of {r.images} predictions changed. The interval is a 95% paired bootstrap over images "
             "(each image's before and after kept together)."]
    if r.control:
        c = np.asarray(r.control, dtype=np.float64)
        lines.append(f"Random-unit controls: {len(c)} × {len(r.units)} random units of {_e(r.layer)} ablated the "
                     f"same way give accuracy {_acc(c.min())} … {_acc(c.max())} (mean {_acc(c.mean())}); "
                     f"{r.control_as_large:.0%} of them change accuracy as much as this edit.")
    caveat = r.control_caveat()
    if caveat:
        lines.append(_e(caveat))
    lines += [f"Note: {_e(n)}" for n in r.notes]
    head = (f"<h3>{_e(r.layer)} <small>{_e(r.model)} · {len(r.units)} unit(s) {how} · {_e(r.mode)}-ablated · "
            f"{_e(r.dataset)} ({r.images} images){f' · run {run_id}' if run_id is not None else ''}</small></h3>")
    table = ('<table class="compare"><tr><th>class</th><th>images</th><th>before</th><th>after</th>'
             f'<th>change</th></tr>{"".join(cells)}</table>')
    chart = svg_paired_bars([c.name for c in r.per_class], [c.accuracy_before for c in r.per_class],
                            [c.accuracy_after for c in r.per_class], title="accuracy per class")
    return (f'{head}<p class="note">units: {_e(units)}</p><div class="charts"><div class="chartbox">{table}'
            f'</div><div class="chartbox">{chart}</div></div>'
            + "".join(f'<p class="note">{line}</p>' for line in lines))


def report_section(project: Project, layer_ids: set[int] | None = None) -> str:
    """Empty when the project has no finished ablation (of the report's layers)."""
    runs = [r for r in project.runs("ablate") if r.status == "done" and r.report
            and (layer_ids is None or r.layer_id in layer_ids)]
    if not runs:
        return ""
    parts = ['<section id="ablation"><h2>Ablation</h2><p class="note">Units switched off and the classifier '
             "measured with and without them, beside as many random units of the same layer (the controls): a "
             "change is specific to the units when the controls do not make it.</p>"]
    for run in sorted(runs, key=lambda r: r.id):
        parts.append(result_html(AblateResult.from_json(run.report), run.id))
    parts.append("</section>")
    return "".join(parts)
