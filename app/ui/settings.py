"""What the window remembers between sessions.

Preferences (appearance, device, batch size, overlay look...) live in a versioned JSON file under the platformdirs
config folder, written atomically; QSettings keeps only window geometry, dock layout and the recent projects list,
which are Qt's own business.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PySide6.QtCore import QSettings

log = logging.getLogger(__name__)

APP_NAME = "neuron-studio"
ORG_NAME = "neuron-studio"
PREFS_FILE = "preferences.json"
PREFS_VERSION = 1
MAX_RECENT = 10

APPEARANCES = ("system", "light", "dark")
OVERLAY_MODES = ("outline", "heat", "region", "concept")


def config_dir() -> Path:
    from platformdirs import user_config_dir

    return Path(user_config_dir(APP_NAME, appauthor=False))


@dataclass
class Preferences:
    version: int = PREFS_VERSION
    appearance: str = "system"
    device: str = "auto"
    batch_size: int = 32
    num_workers: int | None = None  # None: the engine's default (cores - 1, at most 8)
    parallel_jobs: int = 1  # runs share one device; more than one at a time rarely finishes sooner
    thumbnail_size: int = 150
    overlay_opacity: float = 0.6
    overlay_mode: str = "outline"  # keeps the image's colours; heat maps hide them
    last_folder: str = ""
    path: Path | None = dataclasses.field(default=None, compare=False, repr=False)

    @classmethod
    def load(cls, path: str | Path | None = None) -> "Preferences":
        path = Path(path) if path is not None else config_dir() / PREFS_FILE
        prefs = cls(path=path)
        if not path.exists():
            return prefs
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as exc:
            # A damaged preferences file must not keep the window from starting; the defaults replace it on save.
            log.warning("ignoring unreadable preferences %s (%s)", path, exc)
            return prefs
        data = _migrate(data)
        fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in ("path", "version")}
        for name, value in data.items():
            if name in fields:
                setattr(prefs, name, value)
        prefs._sanitise()
        return prefs

    def _sanitise(self) -> None:
        defaults = Preferences()
        if self.appearance not in APPEARANCES:
            self.appearance = defaults.appearance
        if self.overlay_mode not in OVERLAY_MODES:
            self.overlay_mode = defaults.overlay_mode
        for name, lo, hi in (("batch_size", 1, 4096), ("parallel_jobs", 1, 8), ("thumbnail_size", 48, 512)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
                setattr(self, name, getattr(defaults, name))
        if self.num_workers is not None and (not isinstance(self.num_workers, int) or self.num_workers < 0):
            self.num_workers = None
        try:
            self.overlay_opacity = min(1.0, max(0.0, float(self.overlay_opacity)))
        except (TypeError, ValueError):
            self.overlay_opacity = defaults.overlay_opacity
        if not isinstance(self.device, str) or not self.device:
            self.device = "auto"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("path")
        d["version"] = PREFS_VERSION
        return d

    def save(self) -> None:
        path = Path(self.path) if self.path else config_dir() / PREFS_FILE
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            with open(tmp, "w", encoding="utf-8") as fh:
                json.dump(self.to_dict(), fh, indent=1, sort_keys=True)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("could not save preferences to %s (%s)", path, exc)


def _migrate(data: dict[str, Any]) -> dict[str, Any]:
    """Bring an older preferences file forward; one step per version, like the project schema."""
    version = data.get("version", 1)
    if not isinstance(version, int) or version > PREFS_VERSION:
        log.warning("preferences were written by a newer Neuron Studio (version %r); reading what is known", version)
    return data


def qsettings() -> QSettings:
    return QSettings(ORG_NAME, "Neuron Studio")


class RecentProjects:
    """The most recently opened project folders, newest first, kept in QSettings."""

    KEY = "recent/projects"

    def __init__(self, settings: QSettings):
        self.settings = settings

    def list(self) -> list[str]:
        value = self.settings.value(self.KEY, [])
        if isinstance(value, str):  # QSettings returns a lone string for a one-element list on some backends
            value = [value]
        return [str(v) for v in (value or []) if v]

    def add(self, path: str | Path) -> None:
        path = str(Path(path).resolve())
        items = [p for p in self.list() if p != path]
        self.settings.setValue(self.KEY, [path, *items][:MAX_RECENT])

    def remove(self, path: str | Path) -> None:
        path = str(Path(path).resolve())
        self.settings.setValue(self.KEY, [p for p in self.list() if p != path])

    def clear(self) -> None:
        self.settings.setValue(self.KEY, [])
