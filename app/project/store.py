"""The project: one folder holding `project.sqlite` (the record of everything) and memory-mapped arrays beside it.

Every write goes through one transaction (`with self.transaction():`), so a kill at any moment leaves the last
committed state. SQLite runs in WAL mode with foreign keys on; the schema version lives in `PRAGMA user_version`
and is raised by forward migrations, each applied in its own transaction after a backup of the database.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlite_utils

from app.errors import ProjectError
from app.project.common import now  # noqa: F401  (re-exported: callers import it from the store)
from app.project.common import to_json as _json
from app.project.language import SCHEMA_LANGUAGE_MODELS, LanguageModelsMixin

log = logging.getLogger(__name__)

DB_NAME = "project.sqlite"
ARRAYS_DIR = "arrays"
PROJECT_SUFFIX = ".nstudio"

# Run states. 'interrupted' is what a 'running' run becomes when its process is found dead.
RUN_STATES = ("queued", "running", "done", "failed", "cancelled", "interrupted")
RESUMABLE_STATES = ("running", "cancelled", "failed", "interrupted")
# An image_problems row whose problem starts so was read (its activations are valid) but its masks were not.
MASKS_LEFT_OUT = "masks left out: "


_SCHEMA_V1 = """
CREATE TABLE models (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    spec TEXT NOT NULL,
    kind TEXT NOT NULL,
    weights_path TEXT,
    fingerprint TEXT NOT NULL,
    preprocess TEXT NOT NULL,
    class_names TEXT,
    trust_code INTEGER NOT NULL DEFAULT 0,
    added_at TEXT NOT NULL
);
CREATE TABLE layers (
    id INTEGER PRIMARY KEY,
    model_id INTEGER NOT NULL REFERENCES models(id) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    name TEXT NOT NULL,
    type TEXT NOT NULL,
    kind TEXT NOT NULL,
    shape TEXT NOT NULL,
    units INTEGER NOT NULL,
    grid TEXT,
    prefix_tokens INTEGER NOT NULL DEFAULT 0,
    channels_last INTEGER NOT NULL DEFAULT 0,
    note TEXT NOT NULL DEFAULT '',
    UNIQUE (model_id, name)
);
CREATE TABLE units (
    id INTEGER PRIMARY KEY,
    layer_id INTEGER NOT NULL REFERENCES layers(id) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    UNIQUE (layer_id, idx)
);
CREATE TABLE datasets (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    format TEXT NOT NULL,
    root TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    num_images INTEGER NOT NULL,
    has_masks INTEGER NOT NULL DEFAULT 0,
    categories TEXT NOT NULL DEFAULT '[]',
    report TEXT,
    added_at TEXT NOT NULL
);
CREATE TABLE images (
    id INTEGER PRIMARY KEY,
    dataset_id INTEGER NOT NULL REFERENCES datasets(id) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    key TEXT NOT NULL,
    width INTEGER,
    height INTEGER,
    class_label INTEGER,
    UNIQUE (dataset_id, idx),
    UNIQUE (dataset_id, key)
);
-- Images that could not be read by an extraction: kept per run so a fixed file can be retried later.
CREATE TABLE image_problems (
    run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    image_id INTEGER NOT NULL REFERENCES images(id) ON DELETE CASCADE,
    problem TEXT NOT NULL,
    PRIMARY KEY (run_id, image_id)
);
CREATE TABLE concepts (
    id INTEGER PRIMARY KEY,
    dataset_id INTEGER REFERENCES datasets(id) ON DELETE CASCADE,
    idx INTEGER,
    name TEXT NOT NULL,
    category TEXT NOT NULL DEFAULT '',
    source TEXT NOT NULL,
    UNIQUE (dataset_id, idx)
);
CREATE TABLE concept_presence (
    image_id INTEGER NOT NULL REFERENCES images(id) ON DELETE CASCADE,
    concept_id INTEGER NOT NULL REFERENCES concepts(id) ON DELETE CASCADE,
    PRIMARY KEY (image_id, concept_id)
) WITHOUT ROWID;
CREATE TABLE captions (
    id INTEGER PRIMARY KEY,
    image_id INTEGER NOT NULL REFERENCES images(id) ON DELETE CASCADE,
    text TEXT NOT NULL
);
CREATE TABLE runs (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    key TEXT NOT NULL,
    model_id INTEGER REFERENCES models(id) ON DELETE CASCADE,
    dataset_id INTEGER REFERENCES datasets(id) ON DELETE CASCADE,
    layer_id INTEGER REFERENCES layers(id) ON DELETE CASCADE,
    source_run_id INTEGER REFERENCES runs(id) ON DELETE CASCADE,
    method TEXT,
    params TEXT NOT NULL DEFAULT '{}',
    status TEXT NOT NULL CHECK (status IN ('queued','running','done','failed','cancelled','interrupted')),
    done INTEGER NOT NULL DEFAULT 0,
    total INTEGER NOT NULL DEFAULT 0,
    message TEXT NOT NULL DEFAULT '',
    error TEXT,
    report TEXT,
    pid INTEGER,
    created_at TEXT NOT NULL,
    started_at TEXT,
    finished_at TEXT,
    seconds REAL NOT NULL DEFAULT 0
);
CREATE INDEX runs_key ON runs(key);
-- One row per (extraction run, layer): where its arrays live and what they hold.
CREATE TABLE layer_stats (
    id INTEGER PRIMARY KEY,
    run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    layer_id INTEGER NOT NULL REFERENCES layers(id) ON DELETE CASCADE,
    array_dir TEXT NOT NULL,
    quantiles TEXT NOT NULL,
    quantile_method TEXT NOT NULL,
    has_mask_counts INTEGER NOT NULL DEFAULT 0,
    mask_size TEXT,
    UNIQUE (run_id, layer_id)
);
CREATE TABLE labels (
    id INTEGER PRIMARY KEY,
    run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    unit_id INTEGER NOT NULL REFERENCES units(id) ON DELETE CASCADE,
    method TEXT NOT NULL,
    rank INTEGER NOT NULL,
    text TEXT NOT NULL,
    formula TEXT,
    category TEXT,
    score REAL NOT NULL,
    p_value REAL,
    extra TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX labels_unit ON labels(unit_id, method, rank);
CREATE INDEX labels_run ON labels(run_id);
CREATE TABLE annotators (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    created_at TEXT NOT NULL
);
-- Free-text descriptions and names of single units, by an annotator (MILAN-style annotations).
CREATE TABLE annotations (
    id INTEGER PRIMARY KEY,
    annotator_id INTEGER NOT NULL REFERENCES annotators(id) ON DELETE CASCADE,
    unit_id INTEGER NOT NULL REFERENCES units(id) ON DELETE CASCADE,
    kind TEXT NOT NULL CHECK (kind IN ('description','name')),
    text TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE INDEX annotations_unit ON annotations(unit_id);
-- Interactive naming: a pool of activation maps, annotators' groups of them, and the concepts they name.
CREATE TABLE pools (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('unit','decision')),
    layer_id INTEGER NOT NULL REFERENCES layers(id) ON DELETE CASCADE,
    source_run_id INTEGER REFERENCES runs(id) ON DELETE SET NULL,
    params TEXT NOT NULL DEFAULT '{}',
    created_at TEXT NOT NULL
);
CREATE TABLE pool_maps (
    id INTEGER PRIMARY KEY,
    pool_id INTEGER NOT NULL REFERENCES pools(id) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    image_id INTEGER NOT NULL REFERENCES images(id) ON DELETE CASCADE,
    unit_id INTEGER NOT NULL REFERENCES units(id) ON DELETE CASCADE,
    score REAL NOT NULL,
    UNIQUE (pool_id, position)
);
CREATE TABLE groups (
    id INTEGER PRIMARY KEY,
    pool_id INTEGER NOT NULL REFERENCES pools(id) ON DELETE CASCADE,
    annotator_id INTEGER NOT NULL REFERENCES annotators(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    is_unclear INTEGER NOT NULL DEFAULT 0,
    position INTEGER NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE TABLE group_members (
    group_id INTEGER NOT NULL REFERENCES groups(id) ON DELETE CASCADE,
    map_id INTEGER NOT NULL REFERENCES pool_maps(id) ON DELETE CASCADE,
    annotator_id INTEGER NOT NULL REFERENCES annotators(id) ON DELETE CASCADE,
    added_at TEXT NOT NULL,
    PRIMARY KEY (map_id, annotator_id)
);
"""

# Forward migrations: MIGRATIONS[i] takes the schema from version i to i + 1.
MIGRATIONS: list[str] = [_SCHEMA_V1]
MIGRATIONS.append(SCHEMA_LANGUAGE_MODELS)  # v2: language models (app/project/language.py)
SCHEMA_VERSION = len(MIGRATIONS)


def sql_statements(script: str) -> list[str]:
    """The statements of an SQL script, split where SQLite's own parser says a statement ends: a ';' inside a
    string literal, a comment or a trigger body does not end one."""
    statements: list[str] = []
    current = ""
    *pieces, rest = script.split(";")
    for piece in pieces:
        current += piece + ";"
        if sqlite3.complete_statement(current):
            if _has_code(current):
                statements.append(current.strip())
            current = ""
    tail = current + rest
    if _has_code(tail):
        # the last statement may omit its ';' (as sqlite3.executescript allows); anything else left is cut short
        if not sqlite3.complete_statement(tail + ";"):
            raise ValueError(f"incomplete SQL statement at the end of the script: {tail.strip()[:80]!r}")
        statements.append(tail.strip())
    return statements


def _has_code(text: str) -> bool:
    return any(ln.strip().strip(";").strip() and not ln.strip().startswith("--") for ln in text.splitlines())


@dataclass
class RunInfo:
    id: int
    kind: str
    key: str
    status: str
    model_id: int | None
    dataset_id: int | None
    layer_id: int | None
    source_run_id: int | None
    method: str | None
    params: dict[str, Any]
    done: int
    total: int
    message: str
    error: str | None
    report: dict[str, Any] | None
    created_at: str
    started_at: str | None
    finished_at: str | None
    seconds: float

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "RunInfo":
        return cls(
            id=row["id"], kind=row["kind"], key=row["key"], status=row["status"], model_id=row["model_id"],
            dataset_id=row["dataset_id"], layer_id=row["layer_id"], source_run_id=row["source_run_id"],
            method=row["method"], params=json.loads(row["params"] or "{}"), done=row["done"], total=row["total"],
            message=row["message"], error=row["error"],
            report=json.loads(row["report"]) if row["report"] else None, created_at=row["created_at"],
            started_at=row["started_at"], finished_at=row["finished_at"], seconds=row["seconds"],
        )


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _layer_suggestion(name: str, names: list[str]) -> str:
    """The nearest layer names to a mistyped one, else the list to pick from. The model's own output is the layer
    named "" and is shown as (output), never as an empty item."""
    import difflib

    shown = {n: n or "(output)" for n in names}
    close = difflib.get_close_matches(name, [n for n in names if n], n=3, cutoff=0.5)
    if close:
        return f"did you mean {' or '.join(close)}? (`neuron-studio info --layers` lists them all)"
    listed = [shown[n] for n in names if n]  # the whole model is no layer to pick
    return f"pick one of: {', '.join(listed[:30])}{' ...' if len(listed) > 30 else ''}"


class Project(LanguageModelsMixin):
    """An open project folder. Not thread-safe: each thread opens its own `Project` on the same folder."""

    def __init__(self, path: Path, conn: sqlite3.Connection):
        self.path = path
        self.conn = conn
        self.db = sqlite_utils.Database(conn)

    # ---- opening -------------------------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | Path) -> "Project":
        path = Path(path)
        if (path / DB_NAME).exists():
            raise ProjectError("a project already exists here", file=path, fix="open it, or choose a new folder")
        if path.exists() and any(path.iterdir()):
            raise ProjectError(
                "the folder is not empty and holds no project", file=path, fix="choose a new or empty folder"
            )
        path.mkdir(parents=True, exist_ok=True)
        (path / ARRAYS_DIR).mkdir(exist_ok=True)
        return cls._connect(path, create=True)

    @classmethod
    def open(cls, path: str | Path, *, readonly: bool = False) -> "Project":
        """`readonly`: a connection that never writes (no migration, no marking of dead runs, `query_only`), for
        readers such as the window's background loaders that must not wait for or block a job's writes."""
        path = Path(path)
        if path.is_file() and path.name == DB_NAME:
            path = path.parent
        if not (path / DB_NAME).exists():
            raise ProjectError(
                f"no Neuron Studio project here ({DB_NAME} is missing)",
                file=path,
                fix="create one with `neuron-studio new PATH`, or pick the project folder",
            )
        return cls._connect(path, create=False, readonly=readonly)

    @classmethod
    def open_or_create(cls, path: str | Path) -> "Project":
        path = Path(path)
        return cls.open(path) if (path / DB_NAME).exists() else cls.create(path)

    @classmethod
    def _connect(cls, path: Path, create: bool, readonly: bool = False) -> "Project":
        db_path = path / DB_NAME
        if readonly:
            return cls._connect_readonly(path)
        try:
            # isolation_level=None: we issue BEGIN/COMMIT ourselves so that each logical write is one transaction.
            conn = sqlite3.connect(db_path, timeout=30, isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA busy_timeout=30000")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            raise ProjectError(
                f"the project database cannot be read ({exc})",
                file=db_path,
                fix="restore it from a backup (project.sqlite.bak-* beside it) or create a new project",
            ) from exc
        if version > SCHEMA_VERSION:
            conn.close()
            raise ProjectError(
                f"the project was written by a newer Neuron Studio (schema {version}, this one knows {SCHEMA_VERSION})",
                file=db_path,
                fix="update Neuron Studio",
            )
        project = cls(path, conn)
        (path / ARRAYS_DIR).mkdir(exist_ok=True)
        if version < SCHEMA_VERSION:
            project._migrate(version, backup=not create and version > 0)
        project._mark_dead_runs()
        return project

    @classmethod
    def _connect_readonly(cls, path: Path) -> "Project":
        db_path = path / DB_NAME
        try:
            conn = sqlite3.connect(db_path, timeout=30, isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA query_only=ON")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA busy_timeout=30000")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            raise ProjectError(f"the project database cannot be read ({exc})", file=db_path,
                               fix="restore it from a backup (project.sqlite.bak-* beside it)") from exc
        if version != SCHEMA_VERSION:
            conn.close()
            raise ProjectError(
                f"the project has schema {version}, this Neuron Studio reads {SCHEMA_VERSION}", file=db_path,
                fix="open it once for writing (it is migrated then), or update Neuron Studio")
        return cls(path, conn)

    def _migrate(self, version: int, backup: bool) -> None:
        if backup:
            target = self.path / f"{DB_NAME}.bak-v{version}"
            log.info("backing up %s to %s before migrating", DB_NAME, target)
            self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            shutil.copy2(self.path / DB_NAME, target)
        for v in range(version, SCHEMA_VERSION):
            with self.transaction():
                # executescript would commit on its own; run statements one by one inside our transaction.
                for stmt in sql_statements(MIGRATIONS[v]):
                    self.conn.execute(stmt)
                self.conn.execute(f"PRAGMA user_version={v + 1}")

    def _mark_dead_runs(self) -> None:
        stale = [
            r["id"]
            for r in self.conn.execute("SELECT id, pid FROM runs WHERE status IN ('running','queued')")
            if not pid_alive(r["pid"])
        ]
        if stale:
            with self.transaction():
                self.conn.executemany(
                    "UPDATE runs SET status='interrupted', message='the process running it stopped' WHERE id=?",
                    [(i,) for i in stale],
                )

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self.conn.close()

    def __enter__(self) -> "Project":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        if self.conn.in_transaction:
            # Nested use joins the outer transaction: the outermost block decides commit or rollback.
            yield self.conn
            return
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        else:
            self.conn.execute("COMMIT")

    @property
    def arrays_dir(self) -> Path:
        return self.path / ARRAYS_DIR

    def integrity_check(self) -> str:
        return self.conn.execute("PRAGMA integrity_check").fetchone()[0]

    def one(self, sql: str, params: Sequence[Any] = ()) -> dict[str, Any] | None:
        row = self.conn.execute(sql, params).fetchone()
        return dict(row) if row is not None else None

    def all(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        return [dict(r) for r in self.conn.execute(sql, params)]

    def _pick(self, table: str, what: str, ref: int | str | None, add_command: str, option: str) -> dict[str, Any]:
        """A row of `table` by id or name; with None, the only one (several or none is the user's to resolve)."""
        rows = self.all(f"SELECT * FROM {table} ORDER BY id")
        if not rows:
            raise ProjectError(f"the project has no {what} yet", file=self.path,
                               fix=f"add one with `neuron-studio {add_command}`")
        names = ", ".join(r["name"] for r in rows)
        if ref is None:
            if len(rows) > 1:
                raise ProjectError(f"the project has several {what}s ({names})", fix=f"name one with {option}")
            return rows[0]
        match = [r for r in rows if r["id"] == ref or r["name"] == str(ref)]
        if not match:
            raise ProjectError(f"no {what} named {ref!r} in the project (it has: {names})")
        return match[0]

    # ---- models and layers ---------------------------------------------------------------------------------
    def add_model(
        self,
        *,
        name: str,
        spec: str,
        kind: str,
        weights_path: str | None,
        fingerprint: str,
        preprocess: dict[str, Any],
        class_names: list[str] | None,
        layers: Sequence[Any],
        trust_code: bool = False,
    ) -> int:
        """`layers` are `app.sources.models.LayerInfo`; all of them (units too) are written in one transaction."""
        if self.one("SELECT id FROM models WHERE name=?", (name,)):
            raise ProjectError(f"the project already has a model named {name!r}", fix="choose another --name")
        with self.transaction():
            cur = self.conn.execute(
                "INSERT INTO models (name, spec, kind, weights_path, fingerprint, preprocess, class_names, trust_code,"
                " added_at) VALUES (?,?,?,?,?,?,?,?,?)",
                (name, spec, kind, weights_path, fingerprint, _json(preprocess), _json(class_names),
                 int(trust_code), now()),
            )
            model_id = int(cur.lastrowid)
            for pos, layer in enumerate(layers):
                lcur = self.conn.execute(
                    "INSERT INTO layers (model_id, position, name, type, kind, shape, units, grid, prefix_tokens,"
                    " channels_last, note) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                    (model_id, pos, layer.name, layer.type, layer.kind, _json(list(layer.shape)), layer.units,
                     _json(list(layer.grid) if layer.grid else None), getattr(layer, "prefix_tokens", 0),
                     int(getattr(layer, "channels_last", False)), getattr(layer, "note", "")),
                )
                if layer.units:
                    lid = int(lcur.lastrowid)
                    self.conn.executemany(
                        "INSERT INTO units (layer_id, idx) VALUES (?, ?)", ((lid, u) for u in range(layer.units))
                    )
        return model_id

    def model(self, ref: int | str | None = None) -> dict[str, Any]:
        """A model by id or name; with None, the only model of the project."""
        row = self._pick("models", "model", ref, "add-model", "--model")
        row["preprocess"] = json.loads(row["preprocess"])
        row["class_names"] = json.loads(row["class_names"]) if row["class_names"] else None
        return row

    def layers(self, model_id: int, extractable_only: bool = False) -> list[dict[str, Any]]:
        rows = self.all("SELECT * FROM layers WHERE model_id=? ORDER BY position", (model_id,))
        for r in rows:
            r["shape"] = tuple(json.loads(r["shape"]))
            r["grid"] = tuple(json.loads(r["grid"])) if r["grid"] else None
        return [r for r in rows if r["units"] > 0] if extractable_only else rows

    def layer(self, model_id: int, name: str) -> dict[str, Any]:
        for r in self.layers(model_id):
            if r["name"] == name:
                return r
        raise ProjectError(f"the model has no layer named {name!r}",
                           fix=_layer_suggestion(name, [r["name"] for r in self.layers(model_id, extractable_only=True)]))

    def models(self) -> list[dict[str, Any]]:
        """Every model row (id, name, spec, kind, weights_path, ...), in the order they were added."""
        return self.all("SELECT id, name, spec, kind, weights_path, fingerprint, trust_code, added_at FROM models"
                        " ORDER BY id")

    def layer_by_id(self, layer_id: int) -> dict[str, Any] | None:
        """A layers row (shape and grid decoded), or None."""
        row = self.one("SELECT * FROM layers WHERE id=?", (layer_id,))
        if row is not None:
            row["shape"] = tuple(json.loads(row["shape"]))
            row["grid"] = tuple(json.loads(row["grid"])) if row["grid"] else None
        return row

    def find_layer(self, model_id: int, name: str) -> dict[str, Any] | None:
        """Like `layer`, but None where the model has no such layer."""
        return next((r for r in self.layers(model_id) if r["name"] == name), None)

    def unit_layers(self) -> dict[int, int]:
        """unit id -> layer id, for every unit of the project."""
        return dict(self.conn.execute("SELECT id, layer_id FROM units").fetchall())

    def unit_ids(self, layer_id: int) -> list[int]:
        return [r[0] for r in self.conn.execute("SELECT id FROM units WHERE layer_id=? ORDER BY idx", (layer_id,))]

    # ---- datasets ------------------------------------------------------------------------------------------
    def add_dataset(self, *, name: str, reader: Any, fingerprint: str) -> int:
        """`reader` is an `app.sources.datasets.DatasetReader`; images, concepts, presence and captions are
        written in one transaction (a kill leaves either the whole dataset or none of it)."""
        if self.one("SELECT id FROM datasets WHERE name=?", (name,)):
            raise ProjectError(f"the project already has a dataset named {name!r}", fix="choose another --name")
        presence = reader.presence()
        captions = reader.captions()
        classes = reader.class_labels()
        class_of = classes[1] if classes is not None else None
        with self.transaction():
            cur = self.conn.execute(
                "INSERT INTO datasets (name, format, root, fingerprint, num_images, has_masks, categories, report,"
                " added_at) VALUES (?,?,?,?,?,?,?,?,?)",
                # `source` is what was opened (a folder, or one annotation file among several), so it reopens alike.
                (name, reader.format, str(getattr(reader, "source", reader.root)), fingerprint, len(reader.images), int(reader.has_masks),
                 _json(list(reader.categories)), _json(reader.report()), now()),
            )
            ds_id = int(cur.lastrowid)
            self.conn.executemany(
                "INSERT INTO images (dataset_id, idx, key, width, height, class_label) VALUES (?,?,?,?,?,?)",
                (
                    (ds_id, i, im.key, im.width, im.height, int(class_of[i]) if class_of is not None else None)
                    for i, im in enumerate(reader.images)
                ),
            )
            self.conn.executemany(
                "INSERT INTO concepts (dataset_id, idx, name, category, source) VALUES (?,?,?,?,?)",
                ((ds_id, i, c.name, c.category, c.source) for i, c in enumerate(reader.concepts)),
            )
            first_image = self.conn.execute("SELECT MIN(id) FROM images WHERE dataset_id=?", (ds_id,)).fetchone()[0]
            first_concept = self.conn.execute(
                "SELECT MIN(id) FROM concepts WHERE dataset_id=?", (ds_id,)
            ).fetchone()[0]
            if presence is not None and presence.size and first_concept is not None:
                import numpy as np

                rows, cols = np.nonzero(presence)
                # ids are consecutive inside this transaction: the rows were inserted in index order just above.
                self.conn.executemany(
                    "INSERT INTO concept_presence (image_id, concept_id) VALUES (?, ?)",
                    zip((rows + first_image).tolist(), (cols + first_concept).tolist()),
                )
            if captions:
                self.conn.executemany(
                    "INSERT INTO captions (image_id, text) VALUES (?, ?)",
                    ((first_image + i, text) for i, caps in enumerate(captions) for text in caps),
                )
        return ds_id

    def dataset(self, ref: int | str | None = None) -> dict[str, Any]:
        row = self._pick("datasets", "dataset", ref, "add-dataset", "--dataset")
        row["categories"] = json.loads(row["categories"])
        row["report"] = json.loads(row["report"]) if row["report"] else None
        return row

    def datasets(self) -> list[dict[str, Any]]:
        """Every dataset row (id, name, format, root, num_images, has_masks, ...), in the order they were added."""
        return self.all("SELECT id, name, format, root, fingerprint, num_images, has_masks, added_at FROM datasets"
                        " ORDER BY id")

    def images(self, dataset_id: int) -> list[dict[str, Any]]:
        """The images of a dataset (idx, key, width, height), in index order."""
        return self.all("SELECT idx, key, width, height FROM images WHERE dataset_id=? ORDER BY idx", (dataset_id,))

    def text_counts(self, dataset_id: int) -> tuple[int, int]:
        """(concepts, captions) of a dataset."""
        concepts = self.conn.execute("SELECT COUNT(*) FROM concepts WHERE dataset_id=?", (dataset_id,)).fetchone()[0]
        captions = self.conn.execute("SELECT COUNT(*) FROM captions c JOIN images i ON i.id=c.image_id"
                                     " WHERE i.dataset_id=?", (dataset_id,)).fetchone()[0]
        return int(concepts), int(captions)

    def image_keys(self, dataset_id: int) -> list[str]:
        return [r[0] for r in self.conn.execute("SELECT key FROM images WHERE dataset_id=? ORDER BY idx", (dataset_id,))]

    def image_ids(self, dataset_id: int) -> list[int]:
        return [r[0] for r in self.conn.execute("SELECT id FROM images WHERE dataset_id=? ORDER BY idx", (dataset_id,))]

    def concepts(self, dataset_id: int) -> list[dict[str, Any]]:
        return self.all("SELECT * FROM concepts WHERE dataset_id=? ORDER BY idx", (dataset_id,))

    def presence_matrix(self, dataset_id: int) -> Any:
        """[N, C] bool numpy array of image-level concept presence."""
        import numpy as np

        n = self.dataset(dataset_id)["num_images"]
        c = self.conn.execute("SELECT COUNT(*) FROM concepts WHERE dataset_id=?", (dataset_id,)).fetchone()[0]
        out = np.zeros((n, c), dtype=bool)
        rows = self.conn.execute(
            "SELECT i.idx, c.idx FROM concept_presence p JOIN images i ON i.id=p.image_id"
            " JOIN concepts c ON c.id=p.concept_id WHERE i.dataset_id=?",
            (dataset_id,),
        ).fetchall()
        if rows:
            idx = np.asarray(rows, dtype=np.int64)
            out[idx[:, 0], idx[:, 1]] = True
        return out

    def captions(self, dataset_id: int) -> list[list[str]]:
        n = self.dataset(dataset_id)["num_images"]
        out: list[list[str]] = [[] for _ in range(n)]
        for idx, text in self.conn.execute(
            "SELECT i.idx, c.text FROM captions c JOIN images i ON i.id=c.image_id WHERE i.dataset_id=? ORDER BY c.id",
            (dataset_id,),
        ):
            out[idx].append(text)
        return out

    # ---- runs ----------------------------------------------------------------------------------------------
    def create_run(
        self,
        *,
        kind: str,
        key: str,
        params: dict[str, Any],
        model_id: int | None = None,
        dataset_id: int | None = None,
        layer_id: int | None = None,
        source_run_id: int | None = None,
        method: str | None = None,
        status: str = "queued",
        run_id: int | None = None,
    ) -> int:
        """`run_id`: the id to give the run where it is free (an import keeps the source's run ids); else a new one."""
        with self.transaction():
            if run_id is not None and self.conn.execute("SELECT 1 FROM runs WHERE id=?", (run_id,)).fetchone():
                run_id = None
            return self._insert_run(run_id, kind, key, params, model_id, dataset_id, layer_id, source_run_id, method,
                                    status)

    def _insert_run(self, run_id: int | None, kind: str, key: str, params: dict[str, Any], model_id: int | None,
                    dataset_id: int | None, layer_id: int | None, source_run_id: int | None, method: str | None,
                    status: str) -> int:
        """The one INSERT of a run row (inside the caller's transaction); a run created running is started now."""
        started = now() if status == "running" else None
        cur = self.conn.execute(
            "INSERT INTO runs (id, kind, key, model_id, dataset_id, layer_id, source_run_id, method, params, status,"
            " pid, created_at, started_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (run_id, kind, key, model_id, dataset_id, layer_id, source_run_id, method, _json(params), status,
             os.getpid(), now(), started),
        )
        return int(cur.lastrowid)

    def run(self, run_id: int) -> RunInfo:
        row = self.one("SELECT * FROM runs WHERE id=?", (run_id,))
        if row is None:
            raise ProjectError(f"the project has no run {run_id}", file=self.path)
        return RunInfo.from_row(row)

    def runs(self, kind: str | None = None) -> list[RunInfo]:
        if kind:
            rows = self.all("SELECT * FROM runs WHERE kind=? ORDER BY id", (kind,))
        else:
            rows = self.all("SELECT * FROM runs ORDER BY id")
        return [RunInfo.from_row(r) for r in rows]

    def resumable_run(self, kind: str, key: str) -> RunInfo | None:
        row = self.one(
            f"SELECT * FROM runs WHERE kind=? AND key=? AND status IN ({','.join('?' * len(RESUMABLE_STATES))})"
            " ORDER BY id DESC LIMIT 1",
            (kind, key, *RESUMABLE_STATES),
        )
        if row is None:
            return None
        info = RunInfo.from_row(row)
        if info.status == "running" and pid_alive(row["pid"]) and row["pid"] != os.getpid():
            raise ProjectError(
                f"run {info.id} ({kind}) is still running in another process (pid {row['pid']})",
                fix="wait for it or cancel it there",
            )
        return info

    def claim_run(
        self,
        *,
        kind: str,
        key: str,
        params: dict[str, Any],
        model_id: int | None = None,
        dataset_id: int | None = None,
        layer_id: int | None = None,
        source_run_id: int | None = None,
        method: str | None = None,
    ) -> tuple[int, int | None]:
        """Take the job `kind`/`key` for this process, atomically: two processes asking together cannot both get it.
        Returns (run id, None) when this process now runs it (the newest resumable run of the key, or a new one),
        or (run id, pid) when a live process already does."""
        with self.transaction():  # BEGIN IMMEDIATE: the look and the take happen under one write lock
            states = ("queued", *RESUMABLE_STATES)
            row = self.conn.execute(
                f"SELECT id, status, pid FROM runs WHERE kind=? AND key=? AND status IN ({','.join('?' * len(states))})"
                " ORDER BY id DESC LIMIT 1",
                (kind, key, *states),
            ).fetchone()
            if row is not None and row["status"] in ("running", "queued") and row["pid"] != os.getpid() \
                    and pid_alive(row["pid"]):
                return int(row["id"]), int(row["pid"])
            if row is not None:
                self.conn.execute(
                    "UPDATE runs SET status='running', pid=?, error=NULL, started_at=COALESCE(started_at, ?)"
                    " WHERE id=?",
                    (os.getpid(), now(), row["id"]),
                )
                return int(row["id"]), None
            return self._insert_run(None, kind, key, params, model_id, dataset_id, layer_id, source_run_id, method,
                                    "running"), None

    def finished_run(self, kind: str, key: str) -> RunInfo | None:
        row = self.one("SELECT * FROM runs WHERE kind=? AND key=? AND status='done' ORDER BY id DESC LIMIT 1", (kind, key))
        return RunInfo.from_row(row) if row else None

    def stopped_runs(self) -> list[RunInfo]:
        """Runs that stopped before finishing and were not finished later: cancelled or interrupted ones, and failed
        ones that had made progress (a run that failed at once, e.g. on a missing input, would only fail again)."""
        rows = self.all(
            "SELECT r.* FROM runs r WHERE (r.status IN ('cancelled','interrupted') OR (r.status='failed' AND r.done>0))"
            " AND r.id = (SELECT MAX(x.id) FROM runs x WHERE x.key=r.key AND x.kind=r.kind) ORDER BY r.id")
        return [RunInfo.from_row(r) for r in rows]

    def start_run(self, run_id: int) -> None:
        with self.transaction():
            self.conn.execute(
                "UPDATE runs SET status='running', pid=?, error=NULL, started_at=COALESCE(started_at, ?) WHERE id=?",
                (os.getpid(), now(), run_id),
            )

    def update_run(self, run_id: int, *, done: int, total: int, message: str = "", seconds: float | None = None) -> None:
        with self.transaction():
            if seconds is None:
                self.conn.execute("UPDATE runs SET done=?, total=?, message=? WHERE id=?", (done, total, message, run_id))
            else:
                self.conn.execute(
                    "UPDATE runs SET done=?, total=?, message=?, seconds=? WHERE id=?",
                    (done, total, message, seconds, run_id),
                )

    def finish_run(
        self, run_id: int, status: str, *, error: str | None = None, report: dict[str, Any] | None = None,
        seconds: float | None = None, message: str | None = None,
    ) -> None:
        if status not in RUN_STATES:
            raise ValueError(status)
        with self.transaction():
            self.conn.execute(
                "UPDATE runs SET status=?, error=?, report=COALESCE(?, report), finished_at=?,"
                " seconds=COALESCE(?, seconds), message=COALESCE(?, message) WHERE id=?",
                (status, error, _json(report), now(), seconds, message, run_id),
            )

    @contextlib.contextmanager
    def finishing(self, run_id: int, t0: float, *, cancelled: str | None = None,
                  seconds_before: float = 0.0) -> Iterator[None]:
        """Records how a job's work on run `run_id` ends when it raises: "cancelled" (a cancel, or Ctrl+C, which the
        CLI reports as a cancel; message `cancelled`) or "failed" with the error; the run's seconds are those since
        `t0` (time.monotonic) plus `seconds_before` (a resumed run's earlier time). The caller finishes a run that
        succeeds, with its report. A failure that cannot be recorded (the disk that just filled up holds the
        database too) is logged, and the job's own error is the one raised."""
        import time

        from labelers.base import Cancelled

        try:
            yield
        except (Cancelled, KeyboardInterrupt):
            self.finish_run(run_id, "cancelled", message=cancelled, seconds=seconds_before + time.monotonic() - t0)
            raise
        except BaseException as exc:
            try:
                self.finish_run(run_id, "failed", error=str(exc) or type(exc).__name__,
                                seconds=seconds_before + time.monotonic() - t0)
            except Exception:
                log.warning("could not record the failure of run %d", run_id, exc_info=True)
            raise

    def record_image_problems(self, run_id: int, problems: Iterable[tuple[int, str]]) -> None:
        """`problems` are (image idx in its dataset, message)."""
        run = self.run(run_id)
        ids = self.image_ids(run.dataset_id) if run.dataset_id else []
        with self.transaction():
            self.conn.executemany(
                "INSERT OR REPLACE INTO image_problems (run_id, image_id, problem) VALUES (?,?,?)",
                ((run_id, ids[i], msg) for i, msg in problems),
            )

    def image_problems(self, run_id: int) -> list[dict[str, Any]]:
        return self.all(
            "SELECT i.idx, i.key, p.problem FROM image_problems p JOIN images i ON i.id=p.image_id"
            " WHERE p.run_id=? ORDER BY i.idx",
            (run_id,),
        )

    def unread_images(self, run_id: int) -> list[int]:
        """Dataset indices of the images an extraction could not read (those with masks left out were read)."""
        return [r[0] for r in self.conn.execute(
            "SELECT i.idx FROM image_problems p JOIN images i ON i.id=p.image_id"
            " WHERE p.run_id=? AND substr(p.problem, 1, ?) != ? ORDER BY i.idx",
            (run_id, len(MASKS_LEFT_OUT), MASKS_LEFT_OUT))]

    # ---- layer statistics of extraction runs ---------------------------------------------------------------
    def add_layer_stats(
        self, *, run_id: int, layer_id: int, array_dir: str, quantiles: Sequence[float], quantile_method: str,
        has_mask_counts: bool, mask_size: tuple[int, int] | None,
    ) -> None:
        with self.transaction():
            self.conn.execute(
                "INSERT OR REPLACE INTO layer_stats (run_id, layer_id, array_dir, quantiles, quantile_method,"
                " has_mask_counts, mask_size) VALUES (?,?,?,?,?,?,?)",
                (run_id, layer_id, array_dir, _json(list(quantiles)), quantile_method, int(has_mask_counts),
                 _json(list(mask_size) if mask_size else None)),
            )

    def layer_stats(self, layer_id: int, run_id: int | None = None) -> dict[str, Any] | None:
        """The newest finished extraction of a layer (or that of `run_id`)."""
        sql = (
            "SELECT s.*, r.dataset_id, r.model_id FROM layer_stats s JOIN runs r ON r.id=s.run_id"
            " WHERE s.layer_id=? AND r.status='done'"
        )
        params: list[Any] = [layer_id]
        if run_id is not None:
            sql += " AND s.run_id=?"
            params.append(run_id)
        row = self.one(sql + " ORDER BY s.run_id DESC LIMIT 1", params)
        if row:
            row["quantiles"] = json.loads(row["quantiles"])
            row["mask_size"] = tuple(json.loads(row["mask_size"])) if row["mask_size"] else None
        return row

    def extracted_layers(self, model_id: int | None = None) -> list[dict[str, Any]]:
        sql = (
            "SELECT l.*, s.run_id, r.dataset_id FROM layer_stats s JOIN runs r ON r.id=s.run_id"
            " JOIN layers l ON l.id=s.layer_id WHERE r.status='done'"
        )
        params: tuple[Any, ...] = ()
        if model_id is not None:
            sql += " AND l.model_id=?"
            params = (model_id,)
        rows = self.all(sql + " ORDER BY l.model_id, l.position, s.run_id", params)
        newest: dict[int, dict[str, Any]] = {}
        for r in rows:
            newest[r["id"]] = r
        return list(newest.values())

    # ---- labels --------------------------------------------------------------------------------------------
    def replace_labels(self, run_id: int, layer_id: int, method: str, labels: Sequence[Any]) -> int:
        """Write a labeling run's labels (objects with the fields of `labelers.base.Label`) in one transaction."""
        unit_ids = self.unit_ids(layer_id)
        rows = (
            (run_id, unit_ids[lab.unit], method, lab.rank, lab.text, lab.formula, lab.category, float(lab.score),
             None if lab.p_value is None else float(lab.p_value), json.dumps(lab.extra, sort_keys=True, default=float))
            for lab in labels
        )
        with self.transaction():
            self.conn.execute("DELETE FROM labels WHERE run_id=?", (run_id,))
            self.conn.executemany(
                "INSERT INTO labels (run_id, unit_id, method, rank, text, formula, category, score, p_value, extra)"
                " VALUES (?,?,?,?,?,?,?,?,?,?)",
                rows,
            )
        return len(labels)

    def label_counts(self) -> list[dict[str, Any]]:
        """Per layer and method, how many units have labels and how many labels there are (every run)."""
        return self.all("SELECT l.name AS layer, lb.method, COUNT(DISTINCT lb.unit_id) AS units, COUNT(*) AS n"
                        " FROM labels lb JOIN units u ON u.id=lb.unit_id JOIN layers l ON l.id=u.layer_id"
                        " GROUP BY l.id, lb.method ORDER BY l.position, lb.method")

    def labels(
        self, *, layer_id: int | None = None, method: str | None = None, run_id: int | None = None,
        max_rank: int | None = None, latest_only: bool = True,
    ) -> list[dict[str, Any]]:
        """Labels joined with their unit, layer and model. `latest_only` keeps, per (layer, method), the newest
        finished run."""
        where = ["r.status='done'"]
        params: list[Any] = []
        if layer_id is not None:
            where.append("u.layer_id=?")
            params.append(layer_id)
        if method is not None:
            where.append("lb.method=?")
            params.append(method)
        if run_id is not None:
            where.append("lb.run_id=?")
            params.append(run_id)
        if max_rank is not None:
            where.append("lb.rank<=?")
            params.append(max_rank)
        if latest_only and run_id is None:
            where.append(
                "lb.run_id = (SELECT MAX(r2.id) FROM runs r2 WHERE r2.kind='label' AND r2.status='done'"
                " AND r2.layer_id=u.layer_id AND r2.method=lb.method)"
            )
        sql = (
            "SELECT m.name AS model, l.name AS layer, u.idx AS unit, lb.method, lb.rank, lb.text AS label,"
            " lb.formula, lb.category, lb.score, lb.p_value, lb.extra, lb.run_id, u.id AS unit_id, l.id AS layer_id"
            " FROM labels lb JOIN runs r ON r.id=lb.run_id JOIN units u ON u.id=lb.unit_id"
            " JOIN layers l ON l.id=u.layer_id JOIN models m ON m.id=l.model_id"
            f" WHERE {' AND '.join(where)} ORDER BY m.id, l.position, u.idx, lb.method, lb.rank"
        )
        out = self.all(sql, params)
        for r in out:
            r["extra"] = json.loads(r["extra"]) if r["extra"] else {}
        return out

    # ---- annotators and annotations ------------------------------------------------------------------------
    def annotator(self, name: str) -> int:
        name = name.strip()
        if not name:
            raise ProjectError("an annotator needs a name")
        row = self.one("SELECT id FROM annotators WHERE name=?", (name,))
        if row:
            return int(row["id"])
        with self.transaction():
            return int(self.conn.execute("INSERT INTO annotators (name, created_at) VALUES (?,?)", (name, now())).lastrowid)

    def set_annotation(self, *, annotator_id: int, unit_id: int, kind: str, text: str) -> int:
        """One name per (annotator, unit); descriptions accumulate."""
        stamp = now()
        with self.transaction():
            if kind == "name":
                row = self.one(
                    "SELECT id FROM annotations WHERE annotator_id=? AND unit_id=? AND kind='name'", (annotator_id, unit_id)
                )
                if row:
                    self.conn.execute("UPDATE annotations SET text=?, updated_at=? WHERE id=?", (text, stamp, row["id"]))
                    return int(row["id"])
            return int(
                self.conn.execute(
                    "INSERT INTO annotations (annotator_id, unit_id, kind, text, created_at, updated_at)"
                    " VALUES (?,?,?,?,?,?)",
                    (annotator_id, unit_id, kind, text, stamp, stamp),
                ).lastrowid
            )

    def annotations(self, layer_id: int | None = None) -> list[dict[str, Any]]:
        sql = (
            "SELECT a.id, a.kind, a.text, a.created_at, a.updated_at, an.name AS annotator, u.idx AS unit,"
            " l.name AS layer, m.name AS model, u.id AS unit_id, u.layer_id, l.position FROM annotations a"
            " JOIN annotators an ON an.id=a.annotator_id JOIN units u ON u.id=a.unit_id"
            " JOIN layers l ON l.id=u.layer_id JOIN models m ON m.id=l.model_id"
        )
        params: tuple[Any, ...] = ()
        if layer_id is not None:
            sql += " WHERE u.layer_id=?"
            params = (layer_id,)
        return self.all(sql + " ORDER BY m.id, l.position, u.idx, a.id", params)

    # ---- summary -------------------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        count = lambda table: self.conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]  # noqa: E731
        return {
            "path": str(self.path),
            "schema_version": self.conn.execute("PRAGMA user_version").fetchone()[0],
            "models": self.all("SELECT id, name, spec FROM models ORDER BY id"),
            "datasets": self.all("SELECT id, name, format, num_images FROM datasets ORDER BY id"),
            "runs": {r["status"]: r["n"] for r in self.all("SELECT status, COUNT(*) AS n FROM runs GROUP BY status")},
            "labels": count("labels"),
            "annotations": count("annotations"),
        }


class SharedReader:
    """One read-only connection to a project, lent to one background thread at a time: the window's loaders read
    through it instead of opening (and possibly writing to) the project on every click."""

    def __init__(self, path: str | Path):
        self._project = Project.open(path, readonly=True)
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def use(self) -> Iterator[Project]:
        with self._lock:
            yield self._project

    def close(self) -> None:
        with self._lock:
            self._project.close()
