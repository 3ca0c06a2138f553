"""Unexpected errors on the command line: one message with the path, the problem and what to do; the traceback
only in the log file."""
from __future__ import annotations

import errno
import logging
import warnings
from pathlib import Path

import pytest

import app.cli as cli
import app.logs as logs


@pytest.fixture
def log_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("TQDM_DISABLE", "1")
    yield tmp_path
    logging.captureWarnings(False)
    for h in list(logging.getLogger().handlers):
        logging.getLogger().removeHandler(h)
        h.close()


def _run_failing(monkeypatch, capsys, exc_factory):
    def boom(args):
        raise exc_factory()

    monkeypatch.setattr(cli, "cmd_info", boom)
    code = cli.main(["info", "whatever"])
    err = capsys.readouterr().err
    return code, err


def _safetensor_error():
    import tempfile

    from safetensors.torch import load_file

    path = Path(tempfile.mkdtemp()) / "damaged.safetensors"
    path.write_bytes(b"\xff" * 100)  # a header length no file has: a real SafetensorError
    try:
        load_file(str(path))
    except Exception as exc:  # noqa: BLE001
        return exc
    raise AssertionError(path)


CASES = [
    (lambda: PermissionError(errno.EACCES, "Permission denied", "/data/locked/labels.csv"), 2,
     ["/data/locked/labels.csv: permission denied", "give your user access"]),
    (lambda: OSError(errno.ENOSPC, "No space left on device", "/data/full/run.npy"), 2,
     ["/data/full/run.npy: the disk is full", "free space"]),
    (_safetensor_error, 2, ["damaged.safetensors: a safetensors file cannot be read", "replace the file"]),
    (lambda: RuntimeError("DataLoader worker (pid(s) 4242) exited unexpectedly"), 2,
     ["image decoding process (pid 4242) stopped", "--workers 0"]),
    (lambda: RuntimeError("DataLoader worker (pid 77) is killed by signal: Killed. "), 2,
     ["(pid 77) stopped: Killed", "resumes"]),
    (lambda: ValueError("an internal slip"), 3, ["unexpected ValueError: an internal slip", "please report it"]),
]


@pytest.mark.parametrize("make, code, needles", CASES)
def test_unexpected_errors_are_one_message_and_the_traceback_is_logged(log_dir, monkeypatch, capsys, make,
                                                                       code, needles):
    got, err = _run_failing(monkeypatch, capsys, make)
    assert got == code
    assert "Traceback" not in err and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, err
    log_file = logs.log_file()
    assert f"(details in {log_file})" in err
    assert "Traceback" in log_file.read_text()


def test_library_warnings_go_to_the_log_not_the_terminal(log_dir, monkeypatch, capsys):
    def noisy(args):
        warnings.warn("Palette images with Transparency expressed in bytes should be converted", UserWarning)
        print("fine")
        return 0

    monkeypatch.setattr(cli, "cmd_info", noisy)
    assert cli.main(["info", "x"]) == 0
    out = capsys.readouterr()
    assert "Palette" not in out.err and out.out == "fine\n"
    assert "Palette images" in logs.log_file().read_text()


def test_add_dataset_says_nothing_about_annotations_when_nothing_was_left_out(log_dir, capsys):
    import json

    from tests.app.engine.conftest import write_coco

    data = log_dir / "coco"
    write_coco(data, 3)
    proj = log_dir / "p.nstudio"
    assert cli.main(["new", str(proj)]) == 0
    assert cli.main(["add-dataset", str(proj), str(data), "-q"]) == 0
    out = capsys.readouterr().out
    assert "added dataset coco: 3 images" in out and "while reading annotations" not in out
    ann = data / "annotations" / "instances.json"
    doc = json.loads(ann.read_text())
    doc["images"].append({"id": 99, "file_name": "gone.png", "width": 16, "height": 16})
    ann.write_text(json.dumps(doc))
    assert cli.main(["add-dataset", str(proj), str(data), "--name", "again", "-q"]) == 0
    out = capsys.readouterr().out
    assert "while reading annotations" in out and "gone.png" in out and '"format"' not in out


def test_window_says_the_same_for_known_causes():
    pytest.importorskip("PySide6")
    from app.ui.jobproc import readable_error

    text = readable_error(PermissionError(errno.EACCES, "Permission denied", "/data/locked/out.csv"))
    assert text.startswith("/data/locked/out.csv: permission denied") and "unexpected" not in text
    assert "disk is full" in readable_error(OSError(errno.ENOSPC, "No space left on device", "/x/y.npy"))
