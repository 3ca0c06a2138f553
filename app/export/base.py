"""Exports: one writer per format behind one registry, run as a job that never leaves a half-written file.

A format is a function `write(ctx) -> summary` registered with `@exporter(...)`. It writes everything under
`ctx.path`, a temporary file or folder next to the target, and calls `ctx.progress.update` as it goes (which may
raise `Cancelled`). `ExportJob` renames the temporary path onto the target only when the writer returned; on
cancellation or any error it deletes it, so the target is either the previous complete export or the new complete
one. A process killed outright leaves only a hidden `.NAME.nstudio-tmp-PID-*` entry, removed by the next export to
the same target. Each export is recorded in the project as a run of kind "export".
"""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.engine.claims import claim_or_wait
from app.errors import DiskFullError, JobError, NeuronStudioError, disk_full
from app.jobs import Cancelled, JobProgress
from app.project.arrays import fsync_path
from app.project.store import Project, pid_alive
from labelers.base import LabelerError, Param, Progress

log = logging.getLogger(__name__)

__all__ = ["Exporter", "ExportContext", "ExportJob", "ExportReport", "EXPORTERS", "exporter", "get_exporter",
           "list_formats", "formats_help", "resolve_options", "split_names"]

TARGETS = ("file", "folder")
MARKER = ".neuron-studio-export.json"  # inside every exported folder: lets a later export replace it safely
_TMP_TAG = ".nstudio-tmp-"


@dataclass
class ExportContext:
    """What a writer gets. `path` is where to write (a fresh empty folder for folder formats, a path that does not
    exist yet for file formats); `target` is the name it will have afterwards."""

    project: Project
    path: Path
    target: Path
    options: dict[str, Any]
    progress: Progress
    notes: list[str] = field(default_factory=list)

    def update(self, done: int, total: int, message: str = "") -> None:
        self.progress.update(done, total, message)


@dataclass(frozen=True)
class Exporter:
    name: str
    title: str
    target: str  # "file" or "folder"
    suffix: str  # usual file suffix (".csv"), "" for folders
    description: str
    params: tuple[Param, ...]
    write: Callable[[ExportContext], dict[str, Any]]


EXPORTERS: dict[str, Exporter] = {}


def exporter(name: str, *, title: str, target: str, suffix: str = "", params: tuple[Param, ...] = (),
             description: str | None = None) -> Callable[[Callable[[ExportContext], dict[str, Any]]], Any]:
    """Register `write(ctx) -> summary dict` as the writer of format `name`."""
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}")

    def register(fn: Callable[[ExportContext], dict[str, Any]]) -> Callable[[ExportContext], dict[str, Any]]:
        if name in EXPORTERS and EXPORTERS[name].write is not fn:
            raise ValueError(f"two exporters are named {name!r}")
        doc = (fn.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
        EXPORTERS[name] = Exporter(name=name, title=title, target=target, suffix=suffix,
                                   description=description or doc, params=tuple(params), write=fn)
        return fn

    return register


def _load_all() -> None:
    # Importing the format modules runs their @exporter decorators (heavy libraries load inside the writers).
    import importlib

    for mod in ("tables", "tools", "milan", "activations", "concepts", "coco", "report", "texplain"):
        importlib.import_module(f"app.export.{mod}")


def get_exporter(name: str) -> Exporter:
    _load_all()
    if name not in EXPORTERS:
        raise JobError(f"no export format named {name!r}", fix=f"use one of: {', '.join(sorted(EXPORTERS))}")
    return EXPORTERS[name]


def list_formats() -> list[Exporter]:
    _load_all()
    return [EXPORTERS[k] for k in sorted(EXPORTERS)]


def formats_help() -> str:
    """One paragraph per format, with its options, for `neuron-studio export --help`."""
    lines = []
    for exp in list_formats():
        lines.append(f"{exp.name} ({exp.target}{', ' + exp.suffix if exp.suffix else ''}): {exp.description}")
        for p in exp.params:
            default = "" if p.default in (None, "") else f" [default: {p.default}]"
            lines.append(f"    --option {p.name}=...  {p.help}{default}")
    return "\n".join(lines)


def resolve_options(exp: Exporter, given: dict[str, Any] | None) -> dict[str, Any]:
    """Typed options from strings (CLI) or values (window); unknown names are refused with the known ones."""
    given = dict(given or {})
    known = {p.name: p for p in exp.params}
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise JobError(f"format {exp.name} has no option {', '.join(unknown)}",
                       fix=f"its options are: {', '.join(known) or 'none'}")
    out: dict[str, Any] = {}
    for name, p in known.items():
        try:
            out[name] = p.coerce(given[name]) if name in given else p.default
        except LabelerError as exc:
            raise JobError(f"format {exp.name}: {exc}") from None
    return out


def split_names(value: str | None) -> list[str] | None:
    """'a,b' -> ['a', 'b']; '' or 'all' -> None (no filter)."""
    if value is None:
        return None
    names = [v.strip() for v in str(value).split(",") if v.strip()]
    return None if not names or names == ["all"] else names


@dataclass
class ExportReport:
    format: str
    path: str
    seconds: float
    run_id: int | None
    summary: dict[str, Any]

    def __str__(self) -> str:
        counts = ", ".join(f"{v} {k}" for k, v in self.summary.items()
                           if isinstance(v, int) and not isinstance(v, bool))
        return f"{self.path}{f' ({counts})' if counts else ''}"


# ---- the temporary path and the rename ---------------------------------------------------------------------------
def _tmp_prefix(target: Path) -> str:
    return f".{target.name}{_TMP_TAG}"


def _remove(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    except FileNotFoundError:
        pass


def _write_error(exc: OSError, target: Path) -> NeuronStudioError | None:
    """The message for an OS error while writing an export: about the target the user chose, never about the
    hidden temporary name it is written under. None for errors that are not about writing there."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return disk_full(target)
    reasons = {errno.EACCES: "permission denied", errno.EPERM: "permission denied",
               errno.EROFS: "the file system is read-only"}
    if exc.errno not in reasons:
        return None
    where = Path(exc.filename) if exc.filename else target.parent
    if any(_TMP_TAG in part for part in where.parts) or where == target:
        where = target.parent
    return JobError(f"cannot write here: {reasons[exc.errno]} (in {where})", file=target,
                    fix="choose a folder you can write to, or give your user write access to that one")


def _clean_stale(target: Path) -> None:
    """Remove what exports to this target left when their process was killed (their pid is gone)."""
    prefix = _tmp_prefix(target)
    if not target.parent.is_dir():
        return
    for entry in target.parent.iterdir():
        if not entry.name.startswith(prefix):
            continue
        pid_text = entry.name[len(prefix):].split("-", 1)[0]
        if pid_text.isdigit() and not pid_alive(int(pid_text)):
            log.info("removing %s, left by an export that was killed", entry)
            try:
                _remove(entry)
            except OSError as exc:  # not ours to fail on: the export itself reports the real problem
                log.warning("could not remove %s: %s", entry, exc)


def _check_target(target: Path, exp: Exporter) -> None:
    if exp.target == "file" and target.is_dir():
        raise JobError("a folder is in the way of the file to write", file=target,
                       fix="choose a file name (e.g. ending in " + (exp.suffix or ".out") + ")")
    if exp.target == "folder" and target.exists():
        if not target.is_dir():
            raise JobError(f"{exp.name} writes a folder, and a file is in the way", file=target,
                           fix="choose a new folder name")
        if any(target.iterdir()) and not (target / MARKER).exists():
            raise JobError("the folder exists and holds other files", file=target,
                           fix="choose a new folder, or empty this one")


def _commit(tmp: Path, target: Path, is_folder: bool) -> None:
    if not is_folder:
        fsync_path(tmp)
        os.replace(tmp, target)
    else:
        old = None
        if target.exists():
            # A previous export of ours: move it aside first, so the target is never a mix of both.
            old = target.with_name(f"{_tmp_prefix(target)}{os.getpid()}-old-{uuid.uuid4().hex[:8]}")
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            _remove(old)
    fsync_path(target.parent)


class ExportJob:
    """Export a project in one format. `execute` returns an `ExportReport` whose str() is the path written."""

    kind = "export"

    def __init__(self, project_path: str | Path, format: str, out_path: str | Path,
                 options: dict[str, Any] | None = None):
        self.project_path = Path(project_path)
        self.format = format
        self.out_path = Path(out_path)
        self.options = dict(options or {})
        self.title = f"Export {format} to {self.out_path.name}"
        self.run_id: int | None = None

    def execute(self, progress: JobProgress | Progress) -> ExportReport:
        exp = get_exporter(self.format)
        options = resolve_options(exp, self.options)
        target = self.out_path.expanduser().absolute()
        _check_target(target, exp)
        project = Project.open(self.project_path)
        try:
            return self._execute(project, exp, options, target, progress)
        finally:
            project.close()

    def _execute(self, project: Project, exp: Exporter, options: dict[str, Any], target: Path,
                 progress: Progress) -> ExportReport:
        params = {"format": exp.name, "path": str(target), "options": options}
        key = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()
        # An export to this target that was killed, cancelled or failed is the same job: this run finishes it. The
        # same export running in another process is waited for, not written twice.
        run_id, finished = claim_or_wait(project, progress, kind=self.kind, key=key, params=params)
        self.run_id = run_id
        if finished is not None and finished.report:
            return ExportReport(**finished.report)
        t0 = time.monotonic()
        made: list[Path] = []  # parent folders this export created, removed again if it does not finish
        tmp: Path | None = None
        try:
            missing = [p for p in [target.parent, *target.parent.parents] if not p.exists()]
            target.parent.mkdir(parents=True, exist_ok=True)
            made = missing
            _clean_stale(target)
            tmp = target.with_name(f"{_tmp_prefix(target)}{os.getpid()}-{uuid.uuid4().hex[:8]}")
            if exp.target == "folder":
                tmp.mkdir()
            ctx = ExportContext(project=project, path=tmp, target=target, options=options, progress=progress)
            summary = dict(exp.write(ctx) or {})
            if ctx.notes:
                summary["notes"] = list(ctx.notes)
            if exp.target == "folder":
                (tmp / MARKER).write_text(json.dumps(
                    {"format": exp.name, "project": str(project.path), "run_id": run_id, "options": options,
                     "summary": summary}, indent=1, sort_keys=True, default=str))
            elif not tmp.exists():
                raise JobError(f"the {exp.name} writer wrote nothing", file=target)
            _commit(tmp, target, exp.target == "folder")
            tmp = None
        except (Cancelled, KeyboardInterrupt):  # Ctrl+C in the CLI is a cancel, as it reports
            self._discard(tmp, made)
            project.finish_run(run_id, "cancelled", seconds=time.monotonic() - t0, message="cancelled; nothing written")
            raise
        except BaseException as exc:
            self._discard(tmp, made)
            clear = _write_error(exc, target) if isinstance(exc, OSError) else None
            if isinstance(exc, DiskFullError) and _TMP_TAG in (exc.file or ""):
                clear = disk_full(target, exc.needed)
            try:
                project.finish_run(run_id, "failed", error=str(clear or exc) or type(exc).__name__,
                                   seconds=time.monotonic() - t0)
            except Exception:  # e.g. a full disk under the project too: the first error is the one to report
                log.warning("could not record the failure of export run %d", run_id, exc_info=True)
            if clear is not None:
                raise clear from exc
            raise
        seconds = time.monotonic() - t0
        report = ExportReport(format=exp.name, path=str(target), seconds=seconds, run_id=run_id, summary=summary)
        project.finish_run(run_id, "done", report=dataclasses.asdict(report), seconds=seconds,
                           message=f"wrote {target}")
        log.info("export %s written to %s in %.1f s", exp.name, target, seconds)
        return report

    @staticmethod
    def _discard(tmp: Path | None, made: list[Path]) -> None:
        """Best effort, never raising: a cleanup error (EROFS where the write failed with EROFS) must not hide the
        error that made the export stop."""
        if tmp is not None:
            try:
                _remove(tmp)
            except OSError as exc:
                log.warning("could not remove %s: %s", tmp, exc)
        for folder in made:  # deepest first
            try:
                folder.rmdir()
            except OSError:
                break


# The format modules register themselves on import; importing them here fills EXPORTERS for whoever reads it.
_load_all()
