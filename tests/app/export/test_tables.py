from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from app.errors import ProjectError
from app.export import imports
from app.export.tables import ANNOTATION_COLUMNS, LABEL_COLUMNS
from app.project.store import Project
from tests.app.export.conftest import export


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_labels_csv_rows_are_the_projects_latest_labels(study, tmp_path):
    out = tmp_path / "labels.csv"
    export(study["path"], "labels-csv", out)
    with open(out, newline="") as fh:
        assert next(csv.reader(fh)) == list(LABEL_COLUMNS)
    rows = read_csv(out)
    with Project.open(study["path"]) as p:
        want = p.labels()
        older = p.labels(latest_only=False)
    assert len(rows) == len(want) == 18  # 8 netdissect (newer run) + 4 invert + 3 clip_dissect + 3 milan
    assert len(older) == 22
    key = {(r["layer"], r["unit"], r["method"], r["rank"]): r for r in want}
    for row in rows:
        ref = key[(row["layer"], int(row["unit"]), row["method"], int(row["rank"]))]
        assert row["label"] == ref["label"] and float(row["score"]) == ref["score"]
        assert int(row["run_id"]) == ref["run_id"] and json.loads(row["extra"]) == ref["extra"]
        assert (row["p_value"] == "") == (ref["p_value"] is None)
    assert {r["run_id"] for r in rows if r["method"] == "netdissect"} == {str(study["netdissect_run"])}
    quoted = [r for r in rows if r["label"] == "sky, blue"]
    assert len(quoted) == 1 and float(quoted[0]["score"]) == -0.25

    export(study["path"], "labels-csv", out, latest_only="false")
    assert len(read_csv(out)) == 22
    export(study["path"], "labels-csv", out, methods="invert", max_rank="1")
    assert [r["label"] for r in read_csv(out)] == ["(red OR blue)", "(blue OR square)", "(square OR disc)"]
    export(study["path"], "labels-csv", out, layers="fc")
    assert {r["layer"] for r in read_csv(out)} == {"fc"} and len(read_csv(out)) == 3


def test_labels_parquet_and_jsonl_open_with_their_libraries(study, tmp_path):
    export(study["path"], "labels-parquet", tmp_path / "l.parquet")
    table = pq.read_table(tmp_path / "l.parquet")
    assert table.column_names == list(LABEL_COLUMNS) and table.num_rows == 18
    assert table.schema.field("score").type == pa.float64() and table.schema.field("unit").type == pa.int64()
    rows = table.to_pylist()
    assert sum(r["p_value"] is not None for r in rows) == 4
    assert json.loads(rows[0]["extra"]) == {"auc": 0.9, "length": 2, "significant": True}
    export(study["path"], "labels-jsonl", tmp_path / "l.jsonl")
    lines = [json.loads(x) for x in (tmp_path / "l.jsonl").read_text().splitlines()]
    assert len(lines) == 18 and list(lines[0]) == list(LABEL_COLUMNS)
    assert [(r["unit"], r["method"], r["rank"], r["label"]) for r in lines] == \
        [(r["unit"], r["method"], r["rank"], r["label"]) for r in rows]


def test_annotations_table_holds_names_descriptions_and_groups(study, tmp_path):
    out = tmp_path / "a.csv"
    export(study["path"], "annotations-csv", out)
    rows = read_csv(out)
    assert list(rows[0]) == list(ANNOTATION_COLUMNS)
    kinds = [r["kind"] for r in rows]
    assert kinds.count("name") == 2 and kinds.count("description") == 3 and kinds.count("group") == 5
    multiline = [r for r in rows if r["annotator"] == "bob" and r["kind"] == "description"]
    assert multiline[0]["text"] == 'blue "things", left\nand right'
    groups = [r for r in rows if r["kind"] == "group"]
    empty = [r for r in groups if r["text"] == "later"]
    assert len(empty) == 1 and empty[0]["image"] == "" and empty[0]["unit"] == ""
    assert sorted(r["unclear"] for r in groups) == ["false"] * 4 + ["true"]
    stripes = [r for r in groups if r["text"] == "stripes" and r["annotator"] == "alice"]
    assert {r["image"] for r in stripes} == {"img/008.png", "img/004.png"} and {r["unit"] for r in stripes} == {"0"}
    export(study["path"], "annotations-parquet", tmp_path / "a.parquet", kinds="group", annotators="bob")
    t = pq.read_table(tmp_path / "a.parquet")
    assert t.num_rows == 1 and t.column("pool").to_pylist() == ["conv top 3"]
    assert t.schema.field("unclear").type == pa.bool_()


@pytest.mark.parametrize("kind", ["labels", "annotations"])
@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_round_trip_through_a_fresh_project_is_lossless(study, fresh, tmp_path, kind, fmt):
    first = tmp_path / f"first.{fmt}"
    export(study["path"], f"{kind}-{fmt}", first)
    target = fresh()
    with Project.open(target["path"]) as p:
        added = imports.import_tables(p, first)
        assert added == (18 if kind == "labels" else 10)
        assert imports.import_tables(p, first) == 0  # importing again adds nothing
    second = tmp_path / f"second.{fmt}"
    export(target["path"], f"{kind}-{fmt}", second)
    if fmt == "parquet":
        assert pq.read_table(second).equals(pq.read_table(first))
    else:
        assert second.read_bytes() == first.read_bytes()
    if kind == "annotations":
        with Project.open(target["path"]) as p:
            # the naming pool was rebuilt from the fresh project's extraction, with the maps the groups hold
            pool = p.one("SELECT id, name FROM pools")
            assert pool["name"] == "conv top 3"
            assert p.one("SELECT COUNT(*) AS n FROM pool_maps WHERE pool_id=?", (pool["id"],))["n"] == 4


@pytest.mark.parametrize("kind", ["labels", "annotations"])
def test_importing_a_projects_own_tables_adds_nothing(study, tmp_path, kind):
    first = tmp_path / "t.jsonl"
    export(study["path"], f"{kind}-jsonl", first)
    with Project.open(study["path"]) as p:
        runs = len(p.runs("label"))
        assert imports.import_tables(p, first) == 0
        assert len(p.runs("label")) == runs
    export(study["path"], f"{kind}-jsonl", tmp_path / "again.jsonl")
    assert (tmp_path / "again.jsonl").read_bytes() == first.read_bytes()


def test_labels_import_when_run_ids_are_taken(study, fresh, tmp_path):
    first = tmp_path / "l.jsonl"
    export(study["path"], "labels-jsonl", first)
    target = fresh()
    with Project.open(target["path"]) as p:
        for _ in range(6):  # occupy the ids the source used
            p.create_run(kind="other", key="x", params={})
        assert imports.import_tables(p, first) == 18
        assert p.labels()[0]["run_id"] > 6
    export(target["path"], "labels-jsonl", tmp_path / "again.jsonl")
    strip = lambda path: [{k: v for k, v in json.loads(x).items() if k != "run_id"}  # noqa: E731
                          for x in path.read_text().splitlines()]
    assert strip(tmp_path / "again.jsonl") == strip(first)


def test_import_refuses_rows_that_do_not_fit_the_model(study, fresh, tmp_path):
    first = tmp_path / "l.jsonl"
    export(study["path"], "labels-jsonl", first)
    lines = first.read_text().splitlines()
    bad = json.loads(lines[4])
    bad["layer"] = "layer9"
    (tmp_path / "bad.jsonl").write_text("\n".join(lines[:4] + [json.dumps(bad)]) + "\n")
    over = json.loads(lines[0])
    over["unit"] = 99
    (tmp_path / "over.jsonl").write_text(json.dumps(over) + "\n")
    target = fresh()
    with Project.open(target["path"]) as p:
        with pytest.raises(ProjectError, match=r"row 5: layer 'layer9' is not a layer of model tiny"):
            imports.import_tables(p, tmp_path / "bad.jsonl")
        with pytest.raises(ProjectError, match="layer conv has units 0..3, the file names unit 99"):
            imports.import_tables(p, tmp_path / "over.jsonl")
        assert p.labels() == []  # nothing of a refused file is kept
        (tmp_path / "odd.csv").write_text("a,b\n1,2\n")
        with pytest.raises(ProjectError, match="neither labels nor annotations"):
            imports.import_tables(p, tmp_path / "odd.csv")
        with pytest.raises(ProjectError, match="does not exist"):
            imports.import_tables(p, tmp_path / "missing.jsonl")


def test_milan_export_and_import(study, fresh, tmp_path):
    out = tmp_path / "milan.json"
    export(study["path"], "milan", out)
    doc = json.loads(out.read_text())
    assert doc["format"] == "milannotations" and doc["model"] == "tiny" and doc["dataset"] == "shapes"
    units = {(r["layer"], r["unit"]): r for r in doc["units"]}
    assert set(units) == {("conv", 0), ("conv", 1)}
    assert units[("conv", 1)]["descriptions"] == ["blue squares", 'blue "things", left\nand right']
    assert units[("conv", 1)]["annotators"] == ["alice", "bob"]
    with Project.open(study["path"]) as p:
        res_dir = p.path / p.layer_stats(study["conv"])["array_dir"]
        keys = p.image_keys(study["dataset_id"])
    import numpy as np

    top = np.load(res_dir / "topk_index.npy")
    assert units[("conv", 0)]["exemplars"] == [keys[i] for i in top[0]]
    export(study["path"], "milan", tmp_path / "all.json", all_units="true", exemplars="2")
    doc_all = json.loads((tmp_path / "all.json").read_text())
    assert len(doc_all["units"]) == 7 and all(len(r["exemplars"]) == 2 for r in doc_all["units"])

    target = fresh()
    with Project.open(target["path"]) as p:
        assert imports.import_milan(p, out) == 3
        assert imports.import_milan(p, out) == 0
        got = {(a["layer"], a["unit"], a["annotator"], a["text"]) for a in p.annotations()}
    assert ("conv", 1, "bob", 'blue "things", left\nand right') in got and len(got) == 3
    export(target["path"], "milan", tmp_path / "again.json")
    assert json.loads((tmp_path / "again.json").read_text()) == doc

    # descriptions from elsewhere: a bare list, one string per record
    (tmp_path / "other.json").write_text(json.dumps([{"layer": "fc", "unit": 2, "description": "sky"},
                                                     {"layer": "fc", "unit": 0, "summary": "stripes"}]))
    with Project.open(target["path"]) as p:
        assert imports.import_milan(p, tmp_path / "other.json", annotator="turk") == 2
        assert {a["annotator"] for a in p.annotations() if a["layer"] == "fc"} == {"turk"}
        (tmp_path / "bad.json").write_text(json.dumps([{"layer": "fc", "unit": 0, "descriptions": ["ok"]},
                                                       {"layer": "layer4", "unit": 1, "descriptions": ["x"]}]))
        with pytest.raises(ProjectError, match=r"record 1: layer 'layer4' is not a layer of model tiny"):
            imports.import_milan(p, tmp_path / "bad.json")
        (tmp_path / "unit.json").write_text(json.dumps({"units": [{"layer": "fc", "unit": 3, "descriptions": []}]}))
        with pytest.raises(ProjectError, match=r"record 0: layer fc has units 0..2, not 3"):
            imports.import_milan(p, tmp_path / "unit.json")
        assert sum(1 for a in p.annotations() if a["text"] == "ok") == 0
