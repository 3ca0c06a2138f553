"""The command line, end to end on a tiny project, and its error handling."""
import json
from pathlib import Path

import pytest
import torch

from app.cli import main
from app.project.store import Project
from tests.app.engine.conftest import SIZE, write_coco

FACTORY = """
import torch
from tests.app.engine.conftest import TinyNet

def make():
    torch.manual_seed(0)
    return TinyNet()
"""


@pytest.fixture
def setup(tmp_path, monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    data = tmp_path / "coco"
    write_coco(data, 12)
    factory = tmp_path / "tiny_model.py"
    factory.write_text(FACTORY)
    return tmp_path, data, factory


def test_full_cli_workflow(setup, capsys):
    tmp, data, factory = setup
    proj = tmp / "s.nstudio"
    assert main(["new", str(proj)]) == 0
    assert main(["add-model", str(proj), f"python:{factory}:make", "--trust-code", "--resize", str(SIZE),
                 "--crop", str(SIZE), "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25"]) == 0
    assert main(["add-dataset", str(proj), str(data)]) == 0
    out = capsys.readouterr().out
    assert "12 images, 3 concepts, masks: yes, 12 captions" in out
    assert main(["extract", str(proj), "--layers", "conv1,conv2", "--workers", "0", "--device", "cpu", "-q"]) == 0
    assert "extracted 2 layer(s) over 12 images (0 skipped)" in capsys.readouterr().out
    assert main(["label", str(proj), "--method", "netdissect,invert", "--layer", "all", "--device", "cpu",
                 "--param", "top_n=2", "-q"]) == 0
    out = capsys.readouterr().out
    assert "netdissect on conv1" in out and "invert on conv2" in out
    out_csv = tmp / "labels.csv"
    assert main(["export", str(proj), "--format", "labels-csv", "-o", str(out_csv), "-q"]) == 0
    import csv

    rows = list(csv.DictReader(out_csv.open()))
    assert list(rows[0])[:8] == ["model", "layer", "unit", "method", "rank", "label", "score", "p_value"]
    with Project.open(proj) as p:
        assert len(rows) == len(p.labels())
    assert {r["method"] for r in rows} == {"netdissect", "invert"}
    assert main(["info", str(proj)]) == 0
    out = capsys.readouterr().out
    assert "conv1" in out and "netdissect" in out and "labels:" in out
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in ("netdissect", "compexp", "invert", "textsum", "clip_dissect"):
        assert f"{name}:" in out


def test_wrong_weights_refused_before_anything_is_written(setup, capsys):
    tmp, data, factory = setup
    proj = tmp / "s.nstudio"
    main(["new", str(proj)])
    bad = tmp / "weights.pth"
    bad.write_bytes(b"PK\x03\x04 this is not a torch file")
    code = main(["add-model", str(proj), "torchvision:resnet18", "--weights", str(bad)])
    err = capsys.readouterr().err
    assert code == 2 and str(bad) in err and "Traceback" not in err
    with Project.open(proj) as p:
        assert p.all("SELECT * FROM models") == [] and p.all("SELECT * FROM layers") == []


def test_errors_are_messages_with_nonzero_exit(setup, capsys):
    tmp, data, factory = setup
    assert main(["info", str(tmp / "missing")]) == 2
    assert "no Neuron Studio project" in capsys.readouterr().err
    proj = tmp / "s.nstudio"
    main(["new", str(proj)])
    assert main(["add-model", str(proj), f"python:{factory}:make"]) == 2
    assert "--trust-code" in capsys.readouterr().err
    assert main(["extract", str(proj), "--layers", "conv1"]) == 2
    assert "no model" in capsys.readouterr().err
    assert main(["label", str(proj), "--method", "invert", "--layer", "x", "--param", "oops"]) == 2
    with pytest.raises(SystemExit) as exc:
        main(["extract", "--help"])
    assert exc.value.code == 0
    assert "--layers" in capsys.readouterr().out
