"""The project's record of its language models: folders trained in the app (inside the project) or brought by the
user (referenced where they lie). The folders themselves are regular transformers folders; this table says which
kind each is, where it is, where it came from and what its model card says.

Used as a mixin of `Project` (all SQL lives in app/project); the schema comes in through `store.MIGRATIONS`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.errors import ProjectError

if TYPE_CHECKING:
    import sqlite3

LANGUAGE_DIR = "language"

SCHEMA_LANGUAGE_MODELS = """
-- Language models of the project (kind: clip, captioner, lm, sentence). path is relative to the project folder
-- for a model trained in the app (source 'trained') and absolute for a brought folder (source 'added').
CREATE TABLE language_models (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL CHECK (kind IN ('clip','captioner','lm','sentence')),
    source TEXT NOT NULL CHECK (source IN ('trained','added')),
    path TEXT NOT NULL,
    dataset_id INTEGER REFERENCES datasets(id) ON DELETE SET NULL,
    run_id INTEGER REFERENCES runs(id) ON DELETE SET NULL,
    card TEXT NOT NULL DEFAULT '{}',
    added_at TEXT NOT NULL
);
CREATE INDEX language_models_kind ON language_models(kind, id)
"""


class LanguageModelsMixin:
    """Typed access to the language_models table. The newest model of a kind is the one labelers get."""

    path: Path
    conn: "sqlite3.Connection"

    def language_dir(self) -> Path:
        return self.path / LANGUAGE_DIR

    def _lm_row(self, row: Any) -> dict[str, Any]:
        out = dict(row)
        out["card"] = json.loads(out["card"] or "{}")
        p = Path(out["path"])
        out["abs_path"] = p if p.is_absolute() else self.path / p
        return out

    def add_language_model(self, *, name: str, kind: str, source: str, path: str | Path, card: dict[str, Any],
                           dataset_id: int | None = None, run_id: int | None = None) -> int:
        from app.project.common import now, to_json as _json

        p = Path(path)
        if p.is_absolute():
            try:  # a folder inside the project is stored relative to it, so the project can move
                p = p.resolve().relative_to(self.path.resolve())
            except ValueError:
                pass
        if self.conn.execute("SELECT 1 FROM language_models WHERE name=?", (name,)).fetchone():
            raise ProjectError(f"the project already has a language model named {name!r}",
                               fix="choose another --name")
        with self.transaction():  # type: ignore[attr-defined]
            cur = self.conn.execute(
                "INSERT INTO language_models (name, kind, source, path, dataset_id, run_id, card, added_at)"
                " VALUES (?,?,?,?,?,?,?,?)",
                (name, kind, source, str(p), dataset_id, run_id, _json(card) or "{}", now()),
            )
            return int(cur.lastrowid)

    def language_models(self, kind: str | None = None) -> list[dict[str, Any]]:
        sql, args = "SELECT * FROM language_models", ()
        if kind:
            sql, args = sql + " WHERE kind=?", (kind,)
        return [self._lm_row(r) for r in self.conn.execute(sql + " ORDER BY id", args)]

    def language_model(self, ref: int | str | None = None, kind: str | None = None) -> dict[str, Any] | None:
        """By id or name; with only `kind`, the newest model of that kind; None when there is none."""
        if ref is not None:
            row = self.conn.execute("SELECT * FROM language_models WHERE id=? OR name=?", (ref, str(ref))).fetchone()
            if row is None:
                names = ", ".join(r["name"] for r in self.language_models()) or "none"
                raise ProjectError(f"no language model named {ref!r} in the project (it has: {names})")
            return self._lm_row(row)
        if kind is None:
            raise ValueError("give a reference or a kind")
        row = self.conn.execute("SELECT * FROM language_models WHERE kind=? ORDER BY id DESC LIMIT 1",
                                (kind,)).fetchone()
        return self._lm_row(row) if row is not None else None

    def language_model_names(self) -> set[str]:
        return {r[0] for r in self.conn.execute("SELECT name FROM language_models")}

    def remove_language_model(self, ref: int | str) -> dict[str, Any]:
        """Forget a model (its folder stays on disk; the caller decides about files)."""
        row = self.language_model(ref)
        assert row is not None
        with self.transaction():  # type: ignore[attr-defined]
            self.conn.execute("DELETE FROM language_models WHERE id=?", (row["id"],))
        return row
