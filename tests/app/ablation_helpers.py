"""A project with a random ShapesCNN, a labelled image folder and one ablation run made by the CLI (for the
Ablation tab's and the HTML report's tests)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.app.naming_helpers import SIZE
from tests.app.test_audit import _imagefolder


def ablated_project(tmp: Path) -> Path:
    from safetensors.torch import save_file

    from app.cli import main
    from app.demo.train import ShapesCNN

    torch.manual_seed(0)
    net = ShapesCNN(num_classes=3, width=4).eval()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp / "w.safetensors"), metadata={
        "neuron_studio.architecture": "shapes_cnn",
        "neuron_studio.arch_kwargs": json.dumps({"num_classes": 3, "width": 4}),
        "neuron_studio.preprocess": json.dumps({"resize": SIZE, "crop": SIZE, "mean": [0.5] * 3, "std": [0.25] * 3}),
        "neuron_studio.classes": json.dumps(["a", "b", "c"])})
    proj = tmp / "p.nstudio"
    assert main(["new", str(proj)]) == 0
    assert main(["add-model", str(proj), "builtin:shapes_cnn", "--weights", str(tmp / "w.safetensors"), "-q"]) == 0
    assert main(["add-dataset", str(proj), str(_imagefolder(tmp / "test")), "--name", "test", "-q"]) == 0
    assert main(["ablate", str(proj), "--layer", "block4", "--units", "0,1,2", "--dataset", "test", "--controls",
                 "3", "--bootstrap", "50", "--device", "cpu", "-q"]) == 0
    return proj


def stored_ablations(proj: Path) -> list:
    from app.audit import AblateResult
    from app.project.store import Project

    with Project.open(proj) as p:
        return [(r, AblateResult.from_json(r.report)) for r in p.runs("ablate")]
