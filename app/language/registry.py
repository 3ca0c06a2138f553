"""Bringing a local language model folder into a project, and listing the project's models.

A brought folder stays where it is (models can be large); the project records its absolute path. It is validated
before anything is written: the architecture must match the kind, the config must not ask for custom code, weights
must be safetensors or a `.bin` readable with `torch.load(weights_only=True)`, the tokenizer must be there, and the
whole model must load (`labelers.textmodels.load`, which refuses partly random weights).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.errors import ModelLoadError

KINDS = ("clip", "captioner", "lm", "sentence")
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "vocab.txt", "spiece.model", "sentencepiece.bpe.model",
                   "tokenizer.model")


@dataclass
class LanguageModelInfo:
    id: int
    name: str
    kind: str
    source: str  # trained | added
    path: Path
    in_use: bool  # the newest of its kind: what the labelers get
    card: dict[str, Any]
    exists: bool


def validate_folder(folder: str | Path, kind: str) -> dict[str, Any]:
    """Check a folder for `kind` and load it once on the CPU; returns its config. Raises ModelLoadError naming the
    folder and the fix."""
    from labelers.base import LabelerError
    from labelers.textmodels import load, read_config

    folder = Path(folder).expanduser()
    if kind not in KINDS:
        raise ModelLoadError(f"unknown kind {kind!r}", fix=f"--kind is one of {', '.join(KINDS)}")
    try:
        config = read_config(folder, kind)
    except LabelerError as exc:
        raise ModelLoadError(str(exc)) from None
    if not any((folder / f).exists() for f in TOKENIZER_FILES):
        raise ModelLoadError(
            "the folder has no tokenizer files (tokenizer.json, vocab.json/merges.txt or vocab.txt)", file=folder,
            fix="save the model's tokenizer into the same folder (tokenizer.save_pretrained(folder))")
    if kind in ("clip", "captioner") and not (folder / "preprocessor_config.json").exists():
        raise ModelLoadError(
            "the folder has no image processor (preprocessor_config.json), so images cannot be prepared as the model "
            "expects", file=folder, fix="save the model's image processor into the same folder "
            "(processor.save_pretrained(folder))")
    try:
        load(folder, kind, "cpu")
    except LabelerError as exc:
        raise ModelLoadError(str(exc)) from None
    return config


def add_folder(project: Any, folder: str | Path, kind: str, name: str | None = None) -> LanguageModelInfo:
    """Validate and register a brought folder (see the module docstring)."""
    folder = Path(folder).expanduser().resolve()
    config = validate_folder(folder, kind)
    name = name or folder.name
    row_id = project.add_language_model(
        name=name, kind=kind, source="added", path=folder,
        card={"name": name, "kind": kind, "architecture": (config.get("architectures") or [config.get("model_type")])[0],
              "model_type": config.get("model_type"), "brought_from": str(folder)})
    return next(m for m in list_models(project) if m.id == row_id)


def list_models(project: Any, kind: str | None = None) -> list[LanguageModelInfo]:
    rows = project.language_models(kind)
    newest: dict[str, int] = {}
    for r in rows:
        newest[r["kind"]] = r["id"]
    return [LanguageModelInfo(id=r["id"], name=r["name"], kind=r["kind"], source=r["source"], path=r["abs_path"],
                              in_use=newest[r["kind"]] == r["id"], card=r["card"],
                              exists=Path(r["abs_path"]).is_dir())
            for r in rows]
