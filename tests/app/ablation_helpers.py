"""A project with a random ShapesCNN, a labelled image folder and one ablation run made by the CLI (for the
Ablation tab's and the HTML report's tests)."""
from __future__ import annotations

from pathlib import Path

from tests.app.test_audit import shapes_cnn_project


def ablated_project(tmp: Path) -> Path:
    from app.cli import main

    proj = shapes_cnn_project(tmp, ["a", "b", "c"])
    assert main(["ablate", str(proj), "--layer", "block4", "--units", "0,1,2", "--dataset", "test", "--controls",
                 "3", "--bootstrap", "50", "--device", "cpu", "-q"]) == 0
    return proj


def stored_ablations(proj: Path) -> list:
    from app.audit import AblateResult
    from app.project.store import Project

    with Project.open(proj) as p:
        return [(r, AblateResult.from_json(r.report)) for r in p.runs("ablate")]
