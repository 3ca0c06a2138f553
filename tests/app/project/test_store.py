import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass

import pytest

from app.errors import ProjectError
from app.project.store import DB_NAME, SCHEMA_VERSION, Project
from labelers.base import Label


@dataclass
class FakeLayer:
    name: str
    units: int
    type: str = "Conv2d"
    kind: str = "conv"
    shape: tuple = (4, 2, 2)
    grid: tuple = (2, 2)
    prefix_tokens: int = 0


def _model(project, name="m"):
    return project.add_model(name=name, spec="builtin:x", kind="builtin", weights_path=None, fingerprint="f",
                             preprocess={"crop": 8}, class_names=["a"], layers=[FakeLayer("conv1", 4),
                                                                               FakeLayer("pool", 0, kind="other")])


def test_create_open_schema_and_pragmas(tmp_path):
    p = Project.create(tmp_path / "s.nstudio")
    assert p.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert p.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert p.conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    tables = set(p.db.table_names())
    for t in ("models", "datasets", "images", "concepts", "concept_presence", "captions", "layers", "units", "runs",
              "labels", "annotators", "annotations", "pools", "pool_maps", "groups", "group_members"):
        assert t in tables
    p.close()
    with pytest.raises(ProjectError, match="already exists"):
        Project.create(tmp_path / "s.nstudio")
    with pytest.raises(ProjectError, match="no Neuron Studio project"):
        Project.open(tmp_path / "nothing")


def test_newer_schema_is_refused(tmp_path):
    p = Project.create(tmp_path / "s")
    p.conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    p.close()
    with pytest.raises(ProjectError, match="newer Neuron Studio"):
        Project.open(tmp_path / "s")


def test_model_layers_units_and_labels(tmp_path):
    p = Project.create(tmp_path / "s")
    mid = _model(p)
    layer = p.layer(mid, "conv1")
    assert layer["units"] == 4 and layer["grid"] == (2, 2)
    assert len(p.unit_ids(layer["id"])) == 4
    assert [r["name"] for r in p.layers(mid, extractable_only=True)] == ["conv1"]
    with pytest.raises(ProjectError, match="no layer named"):
        p.layer(mid, "nope")
    run = p.create_run(kind="label", key="k", params={}, model_id=mid, layer_id=layer["id"], method="x")
    p.start_run(run)
    p.replace_labels(run, layer["id"], "x", [Label(unit=u, rank=1, text=f"c{u}", score=0.5 + u, p_value=0.01)
                                            for u in range(4)])
    assert p.labels(layer_id=layer["id"]) == []  # not visible before the run is done
    p.finish_run(run, "done")
    rows = p.labels(layer_id=layer["id"])
    assert [(r["unit"], r["label"], r["score"]) for r in rows] == [(u, f"c{u}", 0.5 + u) for u in range(4)]
    assert rows[0]["model"] == "m" and rows[0]["layer"] == "conv1"


def test_failed_transaction_leaves_nothing(tmp_path):
    p = Project.create(tmp_path / "s")
    with pytest.raises(RuntimeError):
        with p.transaction():
            p.conn.execute("INSERT INTO annotators (name, created_at) VALUES ('a', 'now')")
            raise RuntimeError("boom")
    assert p.all("SELECT * FROM annotators") == []


def test_dead_running_run_becomes_interrupted(tmp_path):
    p = Project.create(tmp_path / "s")
    run = p.create_run(kind="extract", key="k", params={})
    p.start_run(run)
    p.conn.execute("UPDATE runs SET pid=999999999 WHERE id=?", (run,))
    p.close()
    p = Project.open(tmp_path / "s")
    assert p.run(run).status == "interrupted"
    assert p.resumable_run("extract", "k").id == run


def test_finishing_records_how_a_jobs_work_ended(tmp_path, caplog):
    from labelers.base import Cancelled

    p = Project.create(tmp_path / "s")
    runs = [p.create_run(kind="label", key=str(i), params={}) for i in range(4)]
    t0 = time.monotonic()
    with pytest.raises(Cancelled), p.finishing(runs[0], t0, cancelled="cancelled; run it again", seconds_before=5):
        raise Cancelled()
    with pytest.raises(KeyboardInterrupt), p.finishing(runs[1], t0):  # Ctrl+C in the CLI: a cancel
        raise KeyboardInterrupt
    with pytest.raises(ValueError, match="bad input"), p.finishing(runs[2], t0):
        raise ValueError("bad input")
    with p.finishing(runs[3], t0):  # success: the caller finishes the run with its report
        pass
    first, second, failed, done = (p.run(r) for r in runs)
    assert (first.status, first.message) == ("cancelled", "cancelled; run it again") and first.seconds >= 5
    assert second.status == "cancelled" and second.seconds < 5
    assert (failed.status, failed.error) == ("failed", "bad input")
    assert done.status not in ("cancelled", "failed")
    # a failure that cannot be recorded is logged, and the job's own error is the one raised
    p.finish_run = lambda *a, **k: (_ for _ in ()).throw(OSError("disk full"))
    with pytest.raises(ValueError, match="the first"), p.finishing(runs[3], t0):
        raise ValueError("the first")
    assert "could not record the failure" in caplog.text


WRITER = textwrap.dedent(
    """
    import sys
    from app.project.store import Project
    p = Project.open(sys.argv[1])
    i = 0
    while True:
        with p.transaction():
            aid = p.conn.execute("INSERT INTO annotators (name, created_at) VALUES (?, 'now')", (f"a{i}",)).lastrowid
            # 200 rows per transaction: a kill must never leave part of them
            p.conn.executemany(
                "INSERT INTO annotations (annotator_id, unit_id, kind, text, created_at, updated_at)"
                " VALUES (?, 1, 'description', ?, 'now', 'now')", [(aid, "x" * 50)] * 200)
        i += 1
        if i == 5:
            print("ready", flush=True)
    """
)


def test_kill_minus_nine_keeps_project_consistent(tmp_path):
    path = tmp_path / "s"
    p = Project.create(path)
    _model(p)
    p.close()
    for attempt in range(3):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE,
                                cwd=os.getcwd(), env={**os.environ, "PYTHONPATH": os.getcwd()})
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(0.05 + 0.07 * attempt)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        with Project.open(path) as q:
            assert q.integrity_check() == "ok"
            counts = q.all("SELECT annotator_id, COUNT(*) AS n FROM annotations GROUP BY annotator_id")
            assert counts and all(c["n"] == 200 for c in counts)
            assert len(q.all("SELECT id FROM annotators")) == len(counts)
            q.conn.execute("DELETE FROM annotators")
    assert (path / DB_NAME).exists()
