"""The HTML report's Ablation section: a stored ablate run as a before/after table with per-class bars."""
from __future__ import annotations

from tests.app.ablation_helpers import ablated_project, stored_ablations
from tests.app.export.conftest import export


def test_html_report_has_an_ablation_section(tmp_path):
    proj = ablated_project(tmp_path)
    (run, r), = stored_ablations(proj)
    out = tmp_path / "report.html"
    export(proj, "html", out, compare="off")
    page = out.read_text(encoding="utf-8")
    assert '<section id="ablation"><h2>Ablation</h2>' in page and 'href="#ablation"' in page
    section = page[page.index('<section id="ablation">'):]
    section = section[:section.index("</section>")]
    assert f"run {run.id}" in section and "block4" in section
    assert f"<td>overall</td><td>12</td><td>{r.accuracy_before:.1%}</td><td>{r.accuracy_after:.1%}</td>" in section
    for c in r.per_class:
        assert f"<td>{c.name}</td><td>{c.n}</td><td>{c.accuracy_before:.1%}</td>" in section
        assert f"{c.name} after: {c.accuracy_after:.1%}" in section  # its bar
    assert f"{r.changed} of 12 predictions changed" in section and "Random-unit controls: 3 × 3" in section
