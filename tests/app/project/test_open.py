"""Opening and migrating the project database."""
import sqlite3

import pytest

from app.errors import ProjectError
from app.project import store
from app.project.store import Project, SharedReader, sql_statements


def test_statements_split_where_sqlite_says_they_end():
    script = """CREATE TABLE t (a TEXT DEFAULT 'x;y');  -- a comment; with a semicolon
CREATE TRIGGER tr AFTER INSERT ON t BEGIN UPDATE t SET a = a || ';!'; END;
INSERT INTO t VALUES ('q;'); INSERT INTO t VALUES ('r');
"""
    got = sql_statements(script)
    assert len(got) == 4
    assert got[1].startswith("-- a comment") and got[1].endswith("END;")


def test_a_migration_with_a_trigger_and_a_literal_applies(tmp_path, monkeypatch):
    Project.create(tmp_path / "p").close()
    extra = """
CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT NOT NULL DEFAULT 'a;b', n INTEGER NOT NULL DEFAULT 0);
CREATE TRIGGER notes_count AFTER INSERT ON notes BEGIN
    UPDATE notes SET n = (SELECT COUNT(*) FROM notes); UPDATE notes SET text = text || ';' WHERE id = new.id;
END;
"""
    monkeypatch.setattr(store, "MIGRATIONS", [*store.MIGRATIONS, extra])
    monkeypatch.setattr(store, "SCHEMA_VERSION", len(store.MIGRATIONS))
    with Project.open(tmp_path / "p") as p:
        p.conn.execute("INSERT INTO notes (id) VALUES (1)")
        assert p.all("SELECT text, n FROM notes") == [{"text": "a;b;", "n": 1}]
        assert p.conn.execute("PRAGMA user_version").fetchone()[0] == store.SCHEMA_VERSION
    assert (tmp_path / "p" / f"project.sqlite.bak-v{store.SCHEMA_VERSION - 1}").exists()  # backed up first


def test_opening_read_only_never_writes(tmp_path):
    with Project.create(tmp_path / "p") as p:
        run = p.create_run(kind="extract", key="k", params={})
        p.start_run(run)
        p.conn.execute("UPDATE runs SET pid=999999999 WHERE id=?", (run,))  # its process is gone
    blocker = sqlite3.connect(tmp_path / "p" / "project.sqlite", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # a job holds the write lock
    try:
        with Project.open(tmp_path / "p", readonly=True) as ro:
            assert ro.run(run).status == "running"  # not marked (that would wait for the lock)
            with pytest.raises(sqlite3.OperationalError):
                ro.conn.execute("DELETE FROM runs")
        reader = SharedReader(tmp_path / "p")
        with reader.use() as project:
            assert [r.id for r in project.runs()] == [run]
        reader.close()
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    with Project.open(tmp_path / "p") as p:
        assert p.run(run).status == "interrupted"


def test_read_only_refuses_a_project_that_needs_migrating(tmp_path, monkeypatch):
    Project.create(tmp_path / "p").close()
    monkeypatch.setattr(store, "SCHEMA_VERSION", store.SCHEMA_VERSION + 1)
    with pytest.raises(ProjectError, match="open it once for writing"):
        Project.open(tmp_path / "p", readonly=True)
