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


def test_stored_results_read_back_and_degenerate_controls_are_named():
    from app.audit import AblateResult
    from app.export.ablation import result_html

    base = {"model": "m", "layer": "L", "dataset": "d", "mode": "zero", "units": [0, 1, 2], "query": "q",
            "images": 10, "accuracy_before": 0.9, "accuracy_after": 0.5, "difference": -0.4,
            "difference_ci": [-0.6, -0.2], "changed": 4,
            "per_class": [{"name": "a", "n": 10, "accuracy_before": 0.9, "accuracy_after": 0.5, "later": 1}],
            "control": [0.8, 0.8], "control_units": [[3, 4], [3, 4]], "control_as_large": 0.0,
            "a_field_from_a_newer_version": 1}
    r = AblateResult.from_json(base)
    assert r.difference_ci == (-0.6, -0.2) and r.per_class[0].name == "a" and r.notes == []
    assert "only 2 units besides these 3" in r.control_caveat() and "every control is the same" in r.control_caveat()
    assert "only 2 units" in result_html(r)
    fine = AblateResult.from_json({**base, "control_units": [[3, 4, 5], [4, 5, 6]]})
    assert fine.control_caveat() == ""
