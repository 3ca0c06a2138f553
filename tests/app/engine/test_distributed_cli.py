"""Without Ray, or with Ray options that do not fit, the command says what to do before anything starts.
(Apart from the local-Ray tests: hiding the `ray` module while a Ray runs could break its background threads.)"""
from __future__ import annotations

import pytest

from app.project.store import Project


def test_without_ray_the_option_says_how_to_get_it(monkeypatch):
    import sys

    from app.engine.distributed import import_ray
    from app.errors import JobError

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(JobError, match=r"neuron-studio\[ray\]"):
        import_ray()


def test_cli_says_what_ray_options_need(tiny_project, monkeypatch, capsys, tmp_path):
    import logging
    import sys

    from app import cli

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    try:
        assert cli.main(["extract", str(tiny_project), "--layers", "conv1", "--shards", "2"]) != 0
        assert "--shards needs --ray" in capsys.readouterr().err
        monkeypatch.setitem(sys.modules, "ray", None)
        assert cli.main(["extract", str(tiny_project), "--layers", "conv1", "--ray", "local"]) != 0
        err = capsys.readouterr().err
        assert "Ray is not installed" in err and "neuron-studio[ray]" in err
        with Project.open(tiny_project) as p:
            assert p.runs("extract") == []  # nothing started
    finally:
        logging.captureWarnings(False)
        for h in list(logging.getLogger().handlers):
            logging.getLogger().removeHandler(h)
            h.close()
