"""What a new user meets first on the command line: unknown commands, no display, a mistyped method, help texts,
the dataset summary, the layer list, and a TorchScript model's inner layer extracted and labeled."""
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from app.cli import build_parser, display_problem, main
from tests.app.engine.conftest import SIZE, TinyNet, write_coco

ROOT = Path(__file__).resolve().parents[2]


def test_unknown_command_is_refused_with_the_commands(tmp_path, capsys):
    assert main(["lable", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "'lable' is not a command (did you mean label?)" in err and "add-dataset" in err
    assert not (Path.cwd() / "lable").exists()


def test_no_display_is_our_message_before_qt(capsys):
    env = {"PATH": "/usr/bin"}
    problem = display_problem(env, platform="linux")
    assert problem is not None and "DISPLAY" in problem
    assert display_problem({**env, "QT_QPA_PLATFORM": "offscreen"}, platform="linux") is None
    assert display_problem(env, platform="darwin") is None
    # end to end, in a child without a display: exit 2, our words, the way out
    proc = subprocess.run([sys.executable, "-m", "app.cli", "demo"], cwd=ROOT, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(Path.home())}, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "--headless" in proc.stderr and "libxcb-cursor0" in proc.stderr and "add-model" in proc.stderr
    assert "Reinstalling" not in proc.stderr


def test_mistyped_method_is_refused_before_torch_is_imported(tmp_path):
    code = ("import sys, app.cli; rc = app.cli.main(['label', 'x.nstudio', '--method', 'netdisect', '--layer', 'a']);"
            "print(rc, 'torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.stdout.split() == ["2", "False"], proc.stdout + proc.stderr
    assert "Did you mean netdissect?" in proc.stderr


def test_help_texts_are_complete():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for action in sub.choices["label"]._actions:
        assert action.help, action.dest
    export_help = sub.choices["export"].format_help()
    assert "see `neuron-studio export --help`" not in export_help


def test_torchscript_inner_layer_extracted_and_labeled(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    data = tmp_path / "coco"
    write_coco(data, 12)
    torch.manual_seed(0)
    scripted = tmp_path / "tiny.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(TinyNet().eval()).save(str(scripted))
    proj = tmp_path / "s.nstudio"
    assert main(["new", str(proj)]) == 0
    assert main(["add-model", str(proj), f"torchscript:{scripted}", "--resize", str(SIZE), "--crop", str(SIZE)]) == 0
    assert main(["add-dataset", str(proj), str(data)]) == 0
    out = capsys.readouterr().out
    assert "while reading annotations" not in out  # nothing was skipped
    assert main(["info", str(proj), "--layers"]) == 0
    out = capsys.readouterr().out
    rows = [ln for ln in out.splitlines() if ln.startswith("    ") or ln.startswith("  *")]
    assert rows and all(ln[4:44].strip() for ln in rows), out  # no row without a name (the whole model)
    assert "conv1" in out
    assert main(["extract", str(proj), "--layers", "conv1", "--workers", "0", "--device", "cpu", "-q"]) == 0
    assert "extracted 1 layer(s) over 12 images" in capsys.readouterr().out
    assert main(["label", str(proj), "--method", "netdissect", "--layer", "conv1", "--device", "cpu", "-q"]) == 0
    assert "netdissect on conv1: " in capsys.readouterr().out
    assert main(["extract", str(proj), "--layers", "nosuch", "-q"]) == 2
    err = capsys.readouterr().err
    assert "pick one of: conv1" in err and "pick one of: ," not in err
