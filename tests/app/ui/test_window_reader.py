"""Browsing layers reads through the window's one read-only connection: no reopening, no write, per click."""
import pytest

from app.project.store import Project

pytestmark = pytest.mark.qt


def test_layer_clicks_do_not_reopen_the_project(qtbot, window, tmp_path, monkeypatch):
    from tests.app import naming_helpers as nh

    built = nh.build_project(tmp_path)
    assert window.open_project(built["project"])
    opened = []
    real_open = Project.open.__func__
    monkeypatch.setattr(Project, "open", classmethod(lambda cls, *a, **k: opened.append(a) or real_open(cls, *a, **k)))
    for _ in range(3):
        window.table = None
        window.show_layer(built["layer_id"])
        qtbot.waitUntil(lambda: window.table is not None, timeout=60_000)
    assert opened == [] and window.errors == []
    with window.reader.use() as project:
        assert project.conn.execute("PRAGMA query_only").fetchone()[0] == 1
