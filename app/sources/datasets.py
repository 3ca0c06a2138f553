"""Readers for image datasets on local disk: COCO, Broden (Network Dissection), labels.csv, ImageFolder and a plain
folder of images, with the format detected from the folder (or the annotation file) itself.

Every reader gives the same things: a sorted list of images keyed by their path relative to the dataset root, a
concept vocabulary, an image x concept presence matrix and, where the format has them, per-pixel concept masks,
captions or class labels. Opening reads only the annotation files (and lists folders to find missing images); the
images themselves are decoded later, one at a time, by `load_rgb`, so that a corrupt file costs one image and not the
job.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import re
import struct
import threading
import time
import warnings
import zlib
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from app.errors import DatasetError, json_problem

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)
FORMATS: tuple[str, ...] = ("coco", "broden", "labels-csv", "imagefolder", "folder")
IMAGE_COLUMNS: tuple[str, ...] = ("image", "file", "filename", "path")
BRODEN_META_COLUMNS: tuple[str, ...] = ("image", "split", "ih", "iw", "sh", "sw")
REPORT_EXAMPLES = 5

_FORMAT_HELP = (
    "point at a dataset folder (COCO with annotations/instances*.json, Broden with index.csv, a folder with "
    "labels.csv, ImageFolder class folders, or any folder of images), or at a COCO instances JSON, a Broden "
    "index.csv or a labels CSV"
)


@dataclass(frozen=True)
class Concept:
    name: str
    category: str
    source: str  # where the vocabulary came from: "coco", "broden", "labels.csv", "imagefolder"


@dataclass(frozen=True)
class ImageRecord:
    key: str  # path relative to the dataset root with "/" separators: the image's stable id
    path: Path  # absolute
    width: int | None = None
    height: int | None = None


# ---- images ------------------------------------------------------------------------------------------------------

def load_rgb(path: Path) -> Image.Image:
    """Open, verify and decode one image as RGB. Raises DatasetError naming the file when it is missing, not an image,
    truncated or corrupt. EXIF orientation is deliberately not applied: annotations (COCO masks in particular) are
    drawn on the stored pixel grid."""
    path = Path(path)
    try:
        # verify() checks the container (chunk CRCs for PNG) without decoding; load() then catches truncated data.
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            im.load()
            return _to_rgb8(im)
    except FileNotFoundError:
        raise DatasetError("the image file is missing", file=path,
                           fix="put the file back, or remove it from the dataset") from None
    except IsADirectoryError:
        raise DatasetError("expected an image file, found a folder", file=path,
                           fix="remove the folder from the dataset's annotations") from None
    except PermissionError:
        raise DatasetError("the image file cannot be read (permission denied)", file=path,
                           fix="give your user read access to the file") from None
    except UnidentifiedImageError:
        raise DatasetError("the file is not an image that can be decoded", file=path,
                           fix="replace it with a valid image, or delete it") from None
    except Image.DecompressionBombError as exc:
        raise DatasetError(f"the image is too large to decode safely ({exc})", file=path,
                           fix="downscale the image") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error) as exc:
        raise DatasetError(f"the image is truncated or corrupt ({exc})", file=path,
                           fix="replace it with a valid copy, or delete it") from None


_WIDE_GRAY_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def _to_rgb8(im: Image.Image) -> Image.Image:
    """RGB with 8 bits per channel. Pillow's convert("RGB") clips wide grayscale (16-bit PNGs open as "I;16") to
    0..255, which turns almost every pixel white; those are scaled by their bit depth instead. 48-bit RGB opens as
    "RGB" already reduced to the high byte of each sample."""
    if im.mode not in _WIDE_GRAY_MODES:
        return im.convert("RGB")
    arr = np.asarray(im)
    if im.mode == "F":
        a = arr.astype(np.float64)
        hi = 1.0 if np.nanmax(a, initial=0.0) <= 1.0 else 255.0  # float images are 0..1, or 0..255 when larger
        gray = np.clip(np.nan_to_num(a / hi), 0.0, 1.0) * 255.0
    else:
        a = arr.astype(np.float64)
        # 16-bit modes say so; a 32-bit "I" image came from a 16-bit PNG (older Pillow) when it fits 16 bits.
        bits = 16 if im.mode.startswith("I;16") or (im.format == "PNG") or a.max(initial=0) <= 65535 else 32
        gray = np.clip(a, 0, 2.0**bits - 1) * (255.0 / (2.0**bits - 1))
    return Image.fromarray(np.rint(gray).astype(np.uint8), "L").convert("RGB")


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _walk_files(top: Path, images_only: bool = True) -> list[str]:
    """Files below `top` as sorted "/"-separated relative paths; hidden files and folders are left out. os.walk uses
    scandir, so this lists folders without a stat per file."""
    out: list[str] = []
    top_s = str(top)
    for dirpath, dirnames, filenames in os.walk(top_s):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = os.path.relpath(dirpath, top_s)
        prefix = "" if rel == "." else rel.replace(os.sep, "/") + "/"
        for f in filenames:
            if f.startswith("."):
                continue
            if images_only and not _is_image_name(f):
                continue
            out.append(prefix + f)
    out.sort()
    return out


def _has_image(top: Path) -> bool:
    for _, dirnames, filenames in os.walk(str(top)):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        if any(_is_image_name(f) for f in filenames):
            return True
    return False


def _key_for(path: str, root: Path) -> str:
    """The key of a file: its path relative to the root, or its absolute path where it lies outside the root."""
    norm = os.path.normpath(path)
    root_s = str(root)
    if norm.startswith(root_s + os.sep):
        return norm[len(root_s) + 1:].replace(os.sep, "/")
    return Path(norm).as_posix()


class _Locator:
    """Finds the file an annotation names among a few plausible folders, trying first the folder that held the
    previous file (datasets almost always keep their images in one place, so that is one stat per image)."""

    def __init__(self, dirs: Iterable[Path]):
        seen: list[str] = []
        for d in dirs:
            s = os.path.normpath(str(d))
            if s not in seen and os.path.isdir(s):
                seen.append(s)
        self.dirs = seen
        self.hint = 0

    def find(self, name: str) -> str | None:
        rel = name.replace("\\", "/")
        if os.path.isabs(rel):
            return rel if os.path.isfile(rel) else None
        order = [self.hint] + [i for i in range(len(self.dirs)) if i != self.hint]
        for i in order:
            if i >= len(self.dirs):
                continue
            cand = os.path.join(self.dirs[i], rel)
            if os.path.isfile(cand):
                self.hint = i
                return os.path.normpath(cand)
        return None


# ---- masks -------------------------------------------------------------------------------------------------------

def _nearest_index(src: int, dst: int) -> np.ndarray:
    # Sample each output pixel at its centre (torch's "nearest-exact"); integer arithmetic so that no float
    # rounding moves a boundary.
    return ((2 * np.arange(dst, dtype=np.int64) + 1) * src) // (2 * dst)


def resize_nearest(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize the last two axes of `arr` to size=(H, W) with nearest-neighbour sampling at pixel centres."""
    h, w = arr.shape[-2:]
    H, W = size
    if (h, w) == (H, W):
        return arr
    return arr[..., _nearest_index(h, H)[:, None], _nearest_index(w, W)[None, :]]


def _check_size(size: tuple[int, int]) -> tuple[int, int]:
    try:
        H, W = (int(v) for v in size)
    except (TypeError, ValueError):
        raise ValueError(f"size must be (height, width), not {size!r}") from None
    if H <= 0 or W <= 0:
        raise ValueError(f"size must be positive, not {size!r}")
    return H, W


def _empty_masks(size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    H, W = size
    return np.zeros(0, np.int64), np.zeros((0, H, W), bool)


# ---- the reader interface ----------------------------------------------------------------------------------------

class _Skips:
    """What was left out while reading annotations: a count per reason and the first few examples."""

    def __init__(self) -> None:
        self.items: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()  # Broden presence reads segmentations in threads

    def add(self, code: str, reason: str, example: str) -> None:
        with self._lock:
            item = self.items.setdefault(code, {"reason": reason, "count": 0, "examples": []})
            item["count"] += 1
            if len(item["examples"]) < REPORT_EXAMPLES:
                item["examples"].append(example)

    def __getstate__(self) -> dict[str, Any]:  # readers travel to DataLoader workers; locks do not pickle
        return {"items": self.items}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.items = state["items"]
        self._lock = threading.Lock()

    def count(self, code: str) -> int:
        return self.items.get(code, {}).get("count", 0)

    def as_dict(self) -> dict[str, dict[str, Any]]:
        return {k: {"reason": v["reason"], "count": v["count"], "examples": list(v["examples"])}
                for k, v in self.items.items()}


class DatasetReader:
    """One dataset as read from disk. Subclasses fill `images`, `concepts` and `categories` when they are built and
    override what their format provides."""

    format: str = ""

    def __init__(self, root: Path, source: Path):
        self.root = root  # the folder image keys are relative to
        self.source = source  # what to pass to open_dataset to read this dataset again (folder or annotation file)
        self.images: list[ImageRecord] = []
        self.concepts: list[Concept] = []  # index-aligned with presence columns and mask concept indices
        self.categories: list[str] = []
        self._skips = _Skips()
        self._notes: list[str] = []

    def __len__(self) -> int:
        return len(self.images)

    def presence(self) -> np.ndarray:
        """[N, C] bool: which concepts each image contains."""
        return np.zeros((len(self.images), len(self.concepts)), bool)

    @property
    def has_masks(self) -> bool:
        return False

    def masks(self, index: int, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """(concept indices int64 [k], bool masks [k, H, W]) of the concepts present in image `index`, resized with
        nearest-neighbour sampling to size=(H, W)."""
        return _empty_masks(_check_size(size))

    def annotated_categories(self, index: int) -> np.ndarray:
        """[K] bool: which categories carry annotations for image `index`."""
        return np.ones(len(self.categories), bool)

    def captions(self) -> list[list[str]] | None:
        return None

    def class_labels(self) -> tuple[list[str], np.ndarray] | None:
        return None

    def annotation_files(self) -> list[Path]:
        """The files whose bytes define the annotations (hashed by `content_fingerprint`)."""
        return []

    def annotation_refs(self) -> list[Path]:
        """Per-image annotation files beside the images (Broden segmentations): fingerprinted by size and time."""
        return []

    def report(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "source": str(self.source),
            "images": len(self.images),
            "concepts": len(self.concepts),
            "skipped": self._skips.as_dict(),
            "notes": list(self._notes),
        }

    def __repr__(self) -> str:
        return (f"<{type(self).__name__} {self.format} {self.source}: {len(self.images)} images, "
                f"{len(self.concepts)} concepts>")


# ---- plain folder ------------------------------------------------------------------------------------------------

class FolderReader(DatasetReader):
    """Every image below the folder, no annotations."""

    format = "folder"

    def __init__(self, path: Path):
        if not path.is_dir():
            raise DatasetError("expected a folder of images, found a file", file=path, fix=_FORMAT_HELP)
        super().__init__(path, path)
        self.images = [ImageRecord(k, path / k) for k in _walk_files(path)]

    def annotated_categories(self, index: int) -> np.ndarray:
        return np.zeros(0, bool)


# ---- ImageFolder -------------------------------------------------------------------------------------------------

def _class_folders(root: Path) -> tuple[list[str], list[str], bool]:
    """(subfolders holding images, subfolders without images, whether images lie directly in root)."""
    with_images, without = [], []
    loose = False
    with os.scandir(root) as it:
        entries = sorted(it, key=lambda e: e.name)
    for e in entries:
        if e.name.startswith("."):
            continue
        if e.is_dir():
            (with_images if _has_image(Path(e.path)) else without).append(e.name)
        elif _is_image_name(e.name):
            loose = True
    return with_images, without, loose


class ImageFolderReader(DatasetReader):
    """torchvision's ImageFolder layout: one subfolder per class, images anywhere below it."""

    format = "imagefolder"

    def __init__(self, path: Path):
        if not path.is_dir():
            raise DatasetError("expected a folder of class folders, found a file", file=path, fix=_FORMAT_HELP)
        super().__init__(path, path)
        classes, empty, _ = _class_folders(path)
        if not classes:
            raise DatasetError("no class folder holds any image", file=path,
                               fix="put each class's images in a subfolder named after the class")
        for name in empty:
            self._skips.add("folders_without_images", "subfolders without images (not used as classes)", name)
        for k in _walk_files(path):
            if "/" not in k:
                self._skips.add("images_outside_class_folders", "images not inside a class folder", k)
        records: list[tuple[str, int]] = []
        for c, name in enumerate(classes):
            records.extend((f"{name}/{k}", c) for k in _walk_files(path / name))
        records.sort()
        self.images = [ImageRecord(k, path / k) for k, _ in records]
        self._labels = np.fromiter((c for _, c in records), np.int64, len(records))
        self._classes = classes
        self.concepts = [Concept(name, "class", "imagefolder") for name in classes]
        self.categories = ["class"]

    def presence(self) -> np.ndarray:
        p = np.zeros((len(self.images), len(self.concepts)), bool)
        p[np.arange(len(self.images)), self._labels] = True
        return p

    def class_labels(self) -> tuple[list[str], np.ndarray]:
        return list(self._classes), self._labels.copy()


# ---- CSV helpers -------------------------------------------------------------------------------------------------

def _open_text(path: Path):
    try:
        return open(path, newline="", encoding="utf-8-sig")
    except FileNotFoundError:
        raise DatasetError("the file does not exist", file=path, fix=_FORMAT_HELP) from None
    except OSError as exc:
        raise DatasetError(f"the file cannot be read ({exc.strerror or exc})", file=path,
                           fix="check that the file is readable") from None


def _csv_rows(path: Path) -> Iterable[tuple[int, list[str]]]:
    """(line number, cells) of every row, header included; blank lines are skipped. Decoding and CSV syntax errors
    become DatasetError naming the line."""
    with _open_text(path) as f:
        reader = csv.reader(f)
        try:
            for row in reader:
                if not row or not any(c.strip() for c in row):
                    continue
                yield reader.line_num, row
        except UnicodeDecodeError as exc:
            raise DatasetError(f"the file is not UTF-8 text (line {reader.line_num + 1}: {exc.reason})", file=path,
                               fix="save it as UTF-8 CSV") from None
        except csv.Error as exc:
            raise DatasetError(f"line {reader.line_num}: not valid CSV ({exc})", file=path,
                               fix="fix the CSV syntax on that line") from None


def _csv_header(path: Path) -> list[str]:
    try:
        for _, row in _csv_rows(path):
            return [c.strip() for c in row]
    except DatasetError:
        return []
    return []


def _csv_error(path: Path, line: int, problem: str, expected: str) -> DatasetError:
    return DatasetError(f"line {line}: {problem}; expected {expected}", file=path,
                        fix=f"correct line {line} of the file")


# ---- labels.csv --------------------------------------------------------------------------------------------------

class LabelsCsvReader(DatasetReader):
    """A CSV with one image column and one 0/1 column per concept; captions optionally in captions.jsonl beside it."""

    format = "labels-csv"

    def __init__(self, path: Path):
        csv_file = path if path.is_file() else path / "labels.csv"
        root = csv_file.parent
        super().__init__(root, path)
        self.csv_file = csv_file
        rows = _csv_rows(csv_file)
        first = next(iter(rows), None)
        if first is None:
            raise DatasetError("the file is empty", file=csv_file,
                               fix="write a header row: an image column (image, file, filename or path) and one "
                                   "column per concept")
        header_line, header = first
        names = [h.strip() for h in header]
        lower = [n.lower() for n in names]
        img_col = next((lower.index(c) for c in IMAGE_COLUMNS if c in lower), None)
        if img_col is None:
            raise _csv_error(csv_file, header_line, f"no image column among {names}",
                             "a column named image, file, filename or path")
        concept_cols = [j for j in range(len(names)) if j != img_col]
        seen: dict[str, int] = {}
        for j in concept_cols:
            if not names[j]:
                raise _csv_error(csv_file, header_line, f"column {j + 1} has no name", "a concept name in every column")
            if names[j] in seen:
                raise _csv_error(csv_file, header_line, f"the concept {names[j]!r} is named twice",
                                 "distinct column names")
            seen[names[j]] = j

        cells: list[str] = []
        lines: list[int] = []
        values: list[list[str]] = []
        for line, row in rows:
            if len(row) != len(names):
                raise _csv_error(csv_file, line, f"{len(row)} values", f"{len(names)}, one per column of the header")
            cell = row[img_col].strip()
            if not cell:
                raise _csv_error(csv_file, line, "the image cell is empty", "an image path")
            cells.append(cell)
            lines.append(line)
            values.append(row[1:] if img_col == 0 else [row[j] for j in concept_cols])

        C = len(concept_cols)
        vals = np.array(values, dtype=str).reshape(len(values), C)
        ones, zeros = vals == "1", vals == "0"
        bad = ~(ones | zeros)
        if bad.any():  # tolerate padding around the digits, checked only when needed
            vals = np.char.strip(vals)
            ones, zeros = vals == "1", vals == "0"
            bad = ~(ones | zeros)
        if bad.any():
            r, c = (int(v) for v in np.argwhere(bad)[0])
            raise _csv_error(csv_file, lines[r], f"column {names[concept_cols[c]]!r} holds {str(vals[r, c])!r}",
                             "0 or 1")

        locator = _Locator([root, root / "images"])
        first_line: dict[str, int] = {}
        found: list[tuple[str, str, int]] = []  # key, absolute path, row
        for r, cell in enumerate(cells):
            if cell in first_line:
                raise _csv_error(csv_file, lines[r], f"the image {cell!r} is listed again (first at line "
                                 f"{first_line[cell]})", "each image once")
            first_line[cell] = lines[r]
            p = locator.find(cell)
            if p is None:
                self._skips.add("missing_image", "image files listed in the annotations but not found on disk",
                                f"line {lines[r]}: {cell}")
                continue
            found.append((_key_for(p, root), p, r))
        found.sort()
        keys = [k for k, _, _ in found]
        if len(set(keys)) != len(keys):
            dup = next(k for k, n in zip(keys, keys[1:]) if k == n)
            raise DatasetError(f"two rows name the same image file {dup!r}", file=csv_file,
                               fix="list each image once")
        order = np.array([r for _, _, r in found], np.int64)
        self.images = [ImageRecord(k, Path(p)) for k, p, _ in found]
        self._presence = ones[order] if len(order) else np.zeros((0, C), bool)
        self.concepts = [Concept(names[j], "label", "labels.csv") for j in concept_cols]
        self.categories = ["label"] if C else []

        lookup = {cells[r]: i for i, (_, _, r) in enumerate(found)}
        lookup.update({k: i for i, k in enumerate(keys)})
        self._captions: list[list[str]] | None = None
        cap_file = root / "captions.jsonl"
        if cap_file.is_file():
            self._captions = self._read_captions(cap_file, lookup)

    def annotation_files(self) -> list[Path]:
        caps = self.root / "captions.jsonl"
        return [self.csv_file] + ([caps] if caps.is_file() else [])

    def _read_captions(self, path: Path, lookup: dict[str, int]) -> list[list[str]]:
        caps: list[list[str]] = [[] for _ in self.images]
        expected = 'a JSON object {"image": <image>, "caption": <text>} or {"image": ..., "captions": [<text>, ...]}'
        with _open_text(path) as f:
            try:
                for line_no, line in enumerate(f, 1):
                    s = line.strip()
                    if not s:
                        continue
                    try:
                        obj = json.loads(s)
                    except json.JSONDecodeError as exc:
                        raise _csv_error(path, line_no, f"not valid JSON ({json_problem(exc, line=False)})",
                                         expected) from None
                    if not isinstance(obj, dict) or not isinstance(obj.get("image"), str):
                        raise _csv_error(path, line_no, "no string \"image\"", expected)
                    if "caption" in obj:
                        texts = [obj["caption"]]
                    elif "captions" in obj and isinstance(obj["captions"], list):
                        texts = obj["captions"]
                    else:
                        raise _csv_error(path, line_no, "neither \"caption\" nor a \"captions\" list", expected)
                    if not all(isinstance(t, str) for t in texts):
                        raise _csv_error(path, line_no, "a caption that is not text", expected)
                    i = lookup.get(obj["image"].strip())
                    if i is None:
                        self._skips.add("captions_unknown_image", "captions of images that are not in the dataset",
                                        f"{path.name} line {line_no}: {obj['image']}")
                        continue
                    caps[i].extend(texts)
            except UnicodeDecodeError as exc:
                raise DatasetError(f"the file is not UTF-8 text ({exc.reason})", file=path,
                                   fix="save it as UTF-8") from None
        return caps

    def presence(self) -> np.ndarray:
        return self._presence.copy()

    def captions(self) -> list[list[str]] | None:
        return None if self._captions is None else [list(c) for c in self._captions]


# ---- COCO --------------------------------------------------------------------------------------------------------

def _load_json(path: Path) -> Any:
    with _open_text(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"not valid JSON: {json_problem(exc)}", file=path,
                               fix="repair or re-download the file") from None
        except UnicodeDecodeError as exc:
            raise DatasetError(f"the file is not UTF-8 text ({exc.reason})", file=path,
                               fix="save it as UTF-8") from None


def _json_error(path: Path, where: str, problem: str, expected: str) -> DatasetError:
    return DatasetError(f"{where}: {problem}; expected {expected}", file=path,
                        fix="repair the file (a COCO instances file holds \"images\", \"annotations\" and "
                            "\"categories\" lists)")


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    name = {dict: "an object", list: "a list", str: "text", bool: "a boolean", int: "a number",
            float: "a number"}.get(type(value), type(value).__name__)
    return name


def _coco_candidates(folder: Path) -> list[Path]:
    cands = sorted((folder / "annotations").glob("instances*.json")) + sorted(folder.glob("instances*.json"))
    for name in ("annotations.json", "annotations/annotations.json"):
        if (folder / name).is_file():
            cands.append(folder / name)
    return [c for c in cands if c.is_file()]


def _is_id(v: Any) -> bool:
    return isinstance(v, (int, str)) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# Polygon vertices may lie outside the image (annotation tools clip late), but not absurdly far: pycocotools
# rasterises every edge point by point, so a vertex at 1e12 asks for terabytes. A vertex may stray one image side
# beyond each border; where the size is not in the annotations yet, this absolute bound applies until it is known.
COORD_MARGIN = 1.0
COORD_LIMIT_UNKNOWN_SIZE = 1e7
# What rasterising one annotation's polygons may cost (pycocotools keeps ~16 bytes per boundary point at 5x).
MASK_MEMORY_BUDGET = 256 * 2**20
# What decoding one image's masks may hold at once (one mask at the stored size and the output stack, 1 byte/pixel).
MASK_DECODE_BUDGET = 1024 * 2**20


def _coordinate_bounds(width: int | None, height: int | None) -> tuple[float, float, float, float]:
    """(x_min, x_max, y_min, y_max) a vertex may take for an image of this size."""
    if not width or not height:
        return (-COORD_LIMIT_UNKNOWN_SIZE, COORD_LIMIT_UNKNOWN_SIZE, -COORD_LIMIT_UNKNOWN_SIZE,
                COORD_LIMIT_UNKNOWN_SIZE)
    m = COORD_MARGIN * max(width, height)
    return -m, width + m, -m, height + m


def _check_coordinates(values: list[Any], width: int | None, height: int | None, what: str) -> str | None:
    """None when `values` (x, y, x, y, ...) are finite numbers within the generous bounds of the image."""
    x0, x1, y0, y1 = _coordinate_bounds(width, height)
    for j, v in enumerate(values):
        if not _is_number(v):
            if isinstance(v, list):
                return (f"a {what} whose coordinate {j} is itself a list (nested coordinates); a polygon is a flat "
                        "list [x1, y1, x2, y2, ...]")
            return f"a {what} whose coordinate {j} is {_describe(v)}"
        if not np.isfinite(v):
            return f"a {what} whose coordinate {j} is {v!r}"
        lo, hi = (x0, x1) if j % 2 == 0 else (y0, y1)
        if not lo <= v <= hi:
            size = f"an image of {width}x{height}" if width and height else "an image"
            return (f"a {what} whose {'x' if j % 2 == 0 else 'y'} coordinate {j} is {v!r}, far outside {size} "
                    f"(allowed {lo:g} to {hi:g})")
    return None


def _polygon_cost(polys: list[list[float]]) -> float:
    """Bytes pycocotools needs to rasterise these polygons (it walks every edge at 5x resolution)."""
    total = 0.0
    for p in polys:
        xy = np.asarray(p, np.float64).reshape(-1, 2)
        d = np.abs(np.diff(np.vstack([xy, xy[:1]]), axis=0)).max(axis=1)
        total += float(d.sum()) * 5 + len(xy)
    return total * 16


def _check_segmentation(seg: Any, width: int | None = None, height: int | None = None) -> str | None:
    """None when `seg` has the shape of a COCO segmentation (polygons or an RLE) with sane coordinates, else what
    is wrong."""
    if isinstance(seg, list):
        for p in seg:
            if not isinstance(p, list):
                return f"a polygon that is {_describe(p)}"
            wrong = _check_coordinates(p, width, height, "polygon")
            if wrong is not None:
                return wrong
            if len(p) % 2:
                return f"a polygon with an odd number of coordinates ({len(p)})"
        return None
    if isinstance(seg, dict):
        counts, size = seg.get("counts"), seg.get("size")
        if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and v >= 0 for v in size)):
            return "an RLE without a [height, width] \"size\""
        if isinstance(counts, str):
            return None
        if isinstance(counts, list) and all(isinstance(v, int) and v >= 0 for v in counts):
            return None
        return "an RLE whose \"counts\" is neither text nor a list of counts"
    return _describe(seg)


_SEG_EXPECTED = 'a list of polygons [[x1, y1, x2, y2, ...], ...] or an RLE {"size": [h, w], "counts": ...}'


def _image_classes(names: list[Any], info: Any) -> tuple[list[str], np.ndarray] | None:
    """Image classes from a non-standard but common COCO extension: every image entry carries a "class" name
    (class order from info.classes when it lists them all, else sorted). None unless every image has one."""
    if not names or not all(isinstance(n, str) and n for n in names):
        return None
    listed = info.get("classes") if isinstance(info, dict) else None
    if isinstance(listed, list) and all(isinstance(c, str) for c in listed) and set(names) <= set(listed):
        classes = list(listed)
    else:
        classes = sorted(set(names))
    index = {c: i for i, c in enumerate(classes)}
    return classes, np.array([index[n] for n in names], dtype=np.int64)


class CocoReader(DatasetReader):
    """A COCO instances JSON: categories become concepts (grouped by supercategory), annotations give presence and
    per-pixel masks (polygons, uncompressed and compressed RLE); captions from a sibling captions*.json."""

    format = "coco"

    def __init__(self, path: Path):
        if path.is_file():
            ann_file = path
        else:
            cands = _coco_candidates(path)
            if not cands:
                raise DatasetError("no COCO instances JSON found (looked for annotations/instances*.json, "
                                   "instances*.json and annotations.json)", file=path, fix=_FORMAT_HELP)
            if len(cands) > 1:
                names = ", ".join(c.relative_to(path).as_posix() for c in cands)
                raise DatasetError(f"several COCO annotation files ({names})", file=path,
                                   fix="open one of them directly")
            ann_file = cands[0]
        root = path if path.is_dir() else (
            ann_file.parent.parent if ann_file.parent.name == "annotations" else ann_file.parent)
        super().__init__(root, path)
        self.annotation_file = ann_file
        t0 = time.perf_counter()
        data = _load_json(ann_file)
        if not isinstance(data, dict):
            raise _json_error(ann_file, "the top level", f"it is {_describe(data)}", "an object")
        for key in ("images", "categories"):
            if key not in data:
                raise _json_error(ann_file, "the top level", f"there is no \"{key}\" key", f"a \"{key}\" list")
            if not isinstance(data[key], list):
                raise _json_error(ann_file, key, f"it is {_describe(data[key])}", "a list")
        anns = data.get("annotations", [])
        if not isinstance(anns, list):
            raise _json_error(ann_file, "annotations", f"it is {_describe(anns)}", "a list")

        # categories -> concepts
        cat_index: dict[Any, int] = {}
        for j, c in enumerate(data["categories"]):
            if not isinstance(c, dict) or not _is_id(c.get("id")) or not isinstance(c.get("name"), str):
                raise _json_error(ann_file, f"categories[{j}]", "no id and name",
                                  'an object with an "id" and a string "name"')
            if c["id"] in cat_index:
                raise _json_error(ann_file, f"categories[{j}].id", f"the id {c['id']!r} is used twice",
                                  "distinct category ids")
            sup = c.get("supercategory")
            category = sup.strip() if isinstance(sup, str) and sup.strip() else "object"
            cat_index[c["id"]] = j
            self.concepts.append(Concept(c["name"], category, "coco"))
        self.categories = list(dict.fromkeys(c.category for c in self.concepts))

        # images: locate each file among the plausible folders
        split = ann_file.stem.split("_", 1)[1] if "_" in ann_file.stem else None
        dirs = [root / "images" / split, root / split] if split else []
        dirs += [root / "images", root, ann_file.parent]
        locator = _Locator(dirs)
        found: list[tuple[str, str, int | None, int | None, Any]] = []
        known_ids: set[Any] = set()
        missing_ids: set[Any] = set()
        image_class: dict[Any, Any] = {}  # an image-level "class" name (classification sets kept as COCO)
        for i, im in enumerate(data["images"]):
            if not isinstance(im, dict) or not _is_id(im.get("id")):
                raise _json_error(ann_file, f"images[{i}]", "no id", 'an object with an "id" and a "file_name"')
            name = im.get("file_name")
            if not isinstance(name, str) or not name.strip():
                raise _json_error(ann_file, f"images[{i}].file_name", f"it is {_describe(name)}", "a file name")
            if im["id"] in known_ids:
                raise _json_error(ann_file, f"images[{i}].id", f"the id {im['id']!r} is used twice",
                                  "distinct image ids")
            known_ids.add(im["id"])
            dims = []
            for dim in ("width", "height"):
                v = im.get(dim)
                if v is not None and not (isinstance(v, int) and not isinstance(v, bool) and v > 0):
                    raise _json_error(ann_file, f"images[{i}].{dim}", f"it is {v!r}", "a positive integer")
                dims.append(v)
            p = locator.find(name.strip())
            if p is None:
                missing_ids.add(im["id"])
                self._skips.add("missing_image", "image files listed in the annotations but not found on disk",
                                name)
                continue
            found.append((_key_for(p, root), p, dims[0], dims[1], im["id"]))
            image_class[im["id"]] = im.get("class")
        found.sort(key=lambda r: r[0])
        for a, b in zip(found, found[1:]):
            if a[0] == b[0]:
                raise _json_error(ann_file, "images", f"two entries name the same file {a[0]!r}",
                                  "each image listed once")
        self.images = [ImageRecord(k, Path(p), w, h) for k, p, w, h, _ in found]
        self._id_to_index = {r[4]: i for i, r in enumerate(found)}
        self._classes = _image_classes([image_class[r[4]] for r in found], data.get("info"))

        # annotations: validated for shape here, decoded only when masks are asked for
        sizes = {im["id"]: (im.get("width"), im.get("height")) for im in data["images"]}
        img_of: list[int] = []
        cat_of: list[int] = []
        pos_of: list[int] = []
        segs: list[Any] = []
        box_only = 0
        for k, a in enumerate(anns):
            if not isinstance(a, dict):
                raise _json_error(ann_file, f"annotations[{k}]", f"it is {_describe(a)}", "an object")
            for key in ("image_id", "category_id"):
                if not _is_id(a.get(key)):
                    raise _json_error(ann_file, f"annotations[{k}].{key}", f"it is {_describe(a.get(key))}",
                                      "an id")
            size = sizes.get(a["image_id"], (None, None))
            seg = a.get("segmentation")
            if seg is not None:
                wrong = _check_segmentation(seg, *size)
                if wrong is not None:
                    raise _json_error(ann_file, f"annotations[{k}].segmentation", f"found {wrong}", _SEG_EXPECTED)
            else:
                box = a.get("bbox")
                if box is not None:
                    if not (isinstance(box, list) and len(box) == 4 and all(_is_number(v) for v in box)):
                        raise _json_error(ann_file, f"annotations[{k}].bbox", f"it is {box!r}",
                                          "[x, y, width, height]")
                    corners = [box[0], box[1], box[0] + box[2], box[1] + box[3]]
                    wrong = _check_coordinates(corners, *size, "box")
                    if wrong is not None:
                        raise _json_error(ann_file, f"annotations[{k}].bbox", f"found {wrong}",
                                          "[x, y, width, height] within the image")
                    seg = ("bbox", box)
                    box_only += 1
            idx = self._id_to_index.get(a["image_id"])
            if idx is None:
                if a["image_id"] in missing_ids:
                    self._skips.add("annotations_of_missing_images", "annotations of images missing on disk",
                                    f"annotations[{k}]")
                else:
                    self._skips.add("unknown_image_id", "annotations whose image_id is not in \"images\"",
                                    f"annotations[{k}].image_id = {a['image_id']!r}")
                continue
            c = cat_index.get(a["category_id"])
            if c is None:
                self._skips.add("unknown_category_id", "annotations whose category_id is not in \"categories\"",
                                f"annotations[{k}].category_id = {a['category_id']!r}")
                continue
            img_of.append(idx)
            cat_of.append(c)
            pos_of.append(k)
            segs.append(seg)
        if box_only:
            self._notes.append(f"{box_only} annotations have no segmentation; their bbox is used as the mask")

        img_arr = np.array(img_of, np.int64)
        order = np.argsort(img_arr, kind="stable")
        self._img_of = img_arr[order]
        self._cat_of = np.array(cat_of, np.int64)[order]
        self._pos_of = np.array(pos_of, np.int64)[order]
        self._segs = [segs[i] for i in order.tolist()]
        self._starts = np.searchsorted(self._img_of, np.arange(len(self.images) + 1))
        self._has_masks = any(s is not None for s in self._segs)
        del data

        self._captions: list[list[str]] | None = None
        self.captions_file = self._captions_file(ann_file)
        if self.captions_file is not None:
            self._captions = self._read_captions(self.captions_file)
        log.info("read %s: %d images, %d annotations, %d categories in %.2fs", ann_file, len(self.images),
                 len(self._segs), len(self.concepts), time.perf_counter() - t0)

    def annotation_files(self) -> list[Path]:
        return [self.annotation_file] + ([self.captions_file] if self.captions_file is not None else [])

    # -- captions
    def _captions_file(self, ann_file: Path) -> Path | None:
        if ann_file.name.startswith("instances"):
            twin = ann_file.with_name("captions" + ann_file.name[len("instances"):])
            if twin.is_file():
                return twin
        cands = sorted(ann_file.parent.glob("captions*.json"))
        if len(cands) == 1:
            return cands[0]
        if cands:
            self._notes.append("several captions*.json beside the annotations and none matches its name; "
                               "captions were not read")
        return None

    def _read_captions(self, path: Path) -> list[list[str]]:
        data = _load_json(path)
        if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
            raise _json_error(path, "annotations", "there is no \"annotations\" list",
                              'a COCO captions file {"annotations": [{"image_id": ..., "caption": ...}, ...]}')
        caps: list[list[str]] = [[] for _ in self.images]
        for k, a in enumerate(data["annotations"]):
            if not isinstance(a, dict) or not _is_id(a.get("image_id")) or not isinstance(a.get("caption"), str):
                raise _json_error(path, f"annotations[{k}]", "no image_id and caption",
                                  'an object with an "image_id" and a string "caption"')
            i = self._id_to_index.get(a["image_id"])
            if i is None:
                self._skips.add("captions_unknown_image", "captions of images that are not in the dataset",
                                f"{path.name}: annotations[{k}].image_id = {a['image_id']!r}")
                continue
            caps[i].append(a["caption"].strip())
        return caps

    def captions(self) -> list[list[str]] | None:
        return None if self._captions is None else [list(c) for c in self._captions]

    def class_labels(self) -> tuple[list[str], np.ndarray] | None:
        return None if self._classes is None else (list(self._classes[0]), self._classes[1].copy())

    # -- presence and masks
    def presence(self) -> np.ndarray:
        p = np.zeros((len(self.images), len(self.concepts)), bool)
        p[self._img_of, self._cat_of] = True
        return p

    @property
    def has_masks(self) -> bool:
        return self._has_masks

    def _image_size(self, index: int) -> tuple[int, int]:
        rec = self.images[index]
        if rec.width is not None and rec.height is not None:
            return rec.height, rec.width
        try:
            with Image.open(rec.path) as im:  # reads the header only
                w, h = im.size
        except Exception as exc:
            raise DatasetError(f"cannot read the image size ({exc})", file=rec.path,
                               fix="add width and height to its entry in the annotations") from None
        return h, w

    def _rles(self, t: int, h: int, w: int) -> list[dict]:
        from pycocotools import mask as mask_utils

        seg = self._segs[t]
        where = f"annotations[{int(self._pos_of[t])}].segmentation"
        if seg is None:
            return []
        try:
            if isinstance(seg, tuple):  # ("bbox", [x, y, w, h])
                x, y, bw, bh = seg[1]
                self._check_polygons([[x, y, x + bw, y, x + bw, y + bh, x, y + bh]], h, w, where)
                return list(mask_utils.frPyObjects(np.array([seg[1]], np.float64), h, w))
            if isinstance(seg, list):
                # Polygons of fewer than 3 points enclose nothing, and pycocotools would read a 4-number one as a box.
                polys = [[float(v) for v in p] for p in seg if len(p) >= 6]
                self._check_polygons(polys, h, w, where)
                return list(mask_utils.frPyObjects(polys, h, w)) if polys else []
            size = [int(v) for v in seg["size"]]
            if size != [h, w]:
                raise _json_error(self.annotation_file, where + ".size", f"it is {size} for an image of {h}x{w}",
                                  "[height, width] of the image")
            counts = seg["counts"]
            if isinstance(counts, list):
                if sum(counts) != h * w:
                    raise _json_error(self.annotation_file, where + ".counts",
                                      f"the counts add up to {sum(counts)} pixels", f"{h * w} (height x width)")
                return [mask_utils.frPyObjects({"size": size, "counts": counts}, h, w)]
            return [{"size": size, "counts": counts.encode("ascii")}]
        except DatasetError:
            raise
        except (TypeError, ValueError, UnicodeEncodeError) as exc:
            raise _json_error(self.annotation_file, where, f"it cannot be decoded ({exc})", _SEG_EXPECTED) from None

    def _check_polygons(self, polys: list[list[float]], h: int, w: int, where: str) -> None:
        """Checked again at decoding, against the real image size (the annotations may not have given it)."""
        for p in polys:
            wrong = _check_coordinates(p, w, h, "polygon")
            if wrong is not None:
                raise _json_error(self.annotation_file, where, f"found {wrong}", _SEG_EXPECTED)
        cost = _polygon_cost(polys) if polys else 0.0
        if cost > MASK_MEMORY_BUDGET:
            raise _json_error(self.annotation_file, where,
                              f"its polygons would need {cost / 2**20:.0f} MB to rasterise "
                              f"(the budget is {MASK_MEMORY_BUDGET // 2**20} MB)", "polygons of a sane length")

    def masks(self, index: int, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        from pycocotools import mask as mask_utils

        size = _check_size(size)
        s, e = int(self._starts[index]), int(self._starts[index + 1])
        if s == e:
            return _empty_masks(size)
        h, w = self._image_size(index)
        # One decoded mask at the stored size plus the output stack: refuse what would not fit the budget.
        need = h * w + len(np.unique(self._cat_of[s:e])) * size[0] * size[1]
        if need > MASK_DECODE_BUDGET:
            raise DatasetError(f"the masks of image {self.images[index].key} ({w}x{h}) would need "
                               f"{need / 2**20:.0f} MB to decode", file=self.annotation_file,
                               fix="downscale the image and its annotations")
        cats = self._cat_of[s:e]
        present = np.unique(cats)
        out = np.zeros((len(present), *size), bool)
        for j, c in enumerate(present.tolist()):
            rles = [r for t in range(s, e) if cats[t - s] == c for r in self._rles(t, h, w)]
            if not rles:
                continue
            rle = rles[0] if len(rles) == 1 else mask_utils.merge(rles, intersect=False)
            try:
                with warnings.catch_warnings():  # pycocotools' own numpy-2 copy= deprecation, not ours to fix
                    warnings.simplefilter("ignore", DeprecationWarning)
                    m = mask_utils.decode(rle)
            except Exception as exc:  # a damaged compressed RLE string
                raise DatasetError(f"a mask of image {self.images[index].key} cannot be decoded ({exc})",
                                   file=self.annotation_file, fix="repair the segmentation of that image") from None
            if m.shape != (h, w):
                raise DatasetError(f"a mask of image {self.images[index].key} decodes to {m.shape}, not {(h, w)}",
                                   file=self.annotation_file, fix="repair the segmentation of that image")
            out[j] = resize_nearest(m.astype(bool, copy=False), size)
        return present.astype(np.int64), out


# ---- Broden ------------------------------------------------------------------------------------------------------

_CATEGORY_FIELD = re.compile(r"^\s*([^()]*?)\s*(?:\(\s*(\d+)\s*\))?\s*$")


def _read_label_csv(path: Path) -> dict[int, tuple[str, dict[str, float]]]:
    """label.csv (number,name,category,frequency,coverage,syns) -> {number: (name, {category: count})}."""
    rows = _csv_rows(path)
    first = next(iter(rows), None)
    if first is None:
        raise DatasetError("the file is empty", file=path, fix="write the header number,name,category,...")
    hline, header = first
    cols = {h.strip().lower(): j for j, h in enumerate(header)}
    for need in ("number", "name"):
        if need not in cols:
            raise _csv_error(path, hline, f"no {need!r} column", "the header number,name,category,frequency,...")
    out: dict[int, tuple[str, dict[str, float]]] = {}
    for line, row in rows:
        if len(row) < len(header):
            raise _csv_error(path, line, f"{len(row)} values", f"{len(header)}, one per column of the header")
        num = row[cols["number"]].strip()
        if not num.isdigit():
            raise _csv_error(path, line, f"the label number is {num!r}", "a non-negative integer")
        cats: dict[str, float] = {}
        if "category" in cols:
            for part in row[cols["category"]].split(";"):
                if not part.strip():
                    continue
                m = _CATEGORY_FIELD.match(part)
                if m is None or not m.group(1):
                    raise _csv_error(path, line, f"the category field holds {part!r}",
                                     "entries like object(123) separated by ';'")
                cats[m.group(1)] = float(m.group(2) or 0)
        out[int(num)] = (row[cols["name"]].strip(), cats)
    return out


def _read_c_csv(path: Path) -> dict[int, tuple[str, float]]:
    """c_<category>.csv (code,number,name,frequency,coverage) -> {number: (name, coverage)}."""
    rows = _csv_rows(path)
    first = next(iter(rows), None)
    if first is None:
        return {}
    hline, header = first
    cols = {h.strip().lower(): j for j, h in enumerate(header)}
    if "number" not in cols:
        raise _csv_error(path, hline, "no 'number' column", "the header code,number,name,frequency,coverage")
    out: dict[int, tuple[str, float]] = {}
    for line, row in rows:
        if len(row) < len(header):
            raise _csv_error(path, line, f"{len(row)} values", f"{len(header)}, one per column of the header")
        num = row[cols["number"]].strip()
        if not num.isdigit():
            raise _csv_error(path, line, f"the label number is {num!r}", "a non-negative integer")
        cov = 0.0
        if "coverage" in cols and row[cols["coverage"]].strip():
            try:
                cov = float(row[cols["coverage"]])
            except ValueError:
                raise _csv_error(path, line, f"the coverage is {row[cols['coverage']]!r}", "a number") from None
        name = row[cols["name"]].strip() if "name" in cols else ""
        out[int(num)] = (name, cov)
    return out


def _label_map(path: Path) -> np.ndarray:
    """A Broden segmentation PNG as an int32 label map: label = R + 256 * G (as NetDissect decodes them); a
    single-channel PNG holds the label itself."""
    with Image.open(path) as im:
        im.load()
        if im.mode in ("L", "I", "I;16", "I;16B", "I;16L"):
            return np.asarray(im, dtype=np.int32)
        if im.mode not in ("RGB", "RGBA"):
            im = im.convert("RGB")
        a = np.asarray(im)
    return a[:, :, 0].astype(np.int32) + (a[:, :, 1].astype(np.int32) << 8)


class BrodenReader(DatasetReader):
    """The Network Dissection layout: index.csv lists each image with, per category, ';'-separated segmentation PNGs
    (pixel label = R + 256 G) or whole-image label numbers; label.csv (or c_<category>.csv) names the labels."""

    format = "broden"

    def __init__(self, path: Path):
        index = path if path.is_file() else path / "index.csv"
        root = index.parent
        super().__init__(root, path)
        self.index_file = index
        self.image_dir = root / "images"
        t0 = time.perf_counter()
        rows = _csv_rows(index)
        first = next(iter(rows), None)
        if first is None:
            raise DatasetError("the file is empty or missing its header", file=index,
                               fix="write the header image,split,ih,iw,sh,sw,<category>,...")
        hline, header = first
        names = [h.strip() for h in header]
        if "image" not in names:
            raise _csv_error(index, hline, "no 'image' column", "the header image,split,ih,iw,sh,sw,<category>,...")
        col = {n: j for j, n in enumerate(names)}
        cat_cols = [(j, n) for j, n in enumerate(names) if n and n not in BRODEN_META_COLUMNS]
        self.categories = [n for _, n in cat_cols]
        self._build_concepts(root)

        existing = set(_walk_files(self.image_dir, images_only=False)) if self.image_dir.is_dir() else set()
        records: list[tuple[str, int | None, int | None, list[tuple[int, int | str]], int]] = []
        seen: dict[str, int] = {}
        for line, row in rows:
            if len(row) != len(names):
                raise _csv_error(index, line, f"{len(row)} values", f"{len(names)}, one per column of the header")
            image = row[col["image"]].strip().replace("\\", "/")
            if not image:
                raise _csv_error(index, line, "the image cell is empty", "an image path relative to images/")
            if image in seen:
                raise _csv_error(index, line, f"the image {image!r} is listed again (first at line {seen[image]})",
                                 "each image once")
            seen[image] = line
            dims = []
            for dim in ("iw", "ih"):
                v = row[col[dim]].strip() if dim in col else ""
                if v and not v.isdigit():
                    raise _csv_error(index, line, f"{dim} is {v!r}", "a whole number of pixels")
                dims.append(int(v) if v else None)
            if image not in existing:
                self._skips.add("missing_image", "image files listed in the annotations but not found on disk",
                                f"line {line}: {image}")
                continue
            layers: list[tuple[int, int | str]] = []
            for k, (j, cat) in enumerate(cat_cols):
                for entry in row[j].split(";"):
                    entry = entry.strip()
                    if not entry:
                        continue
                    if entry.isdigit():
                        layers.append((k, int(entry)))
                        continue
                    entry = entry.replace("\\", "/")
                    if entry not in existing:
                        self._skips.add("missing_mask", "segmentation files listed in index.csv but not found "
                                        "on disk", f"line {line}: {entry}")
                        continue
                    layers.append((k, entry))
            records.append((f"images/{image}", dims[0], dims[1], layers, line))
        records.sort(key=lambda r: r[0])
        self.images = [ImageRecord(key, root / key, w, h) for key, w, h, _, _ in records]
        self._layers = [r[3] for r in records]
        K = len(self.categories)
        self._annotated = np.zeros((len(records), K), bool)
        for i, layers in enumerate(self._layers):
            for k, _ in layers:
                self._annotated[i, k] = True
        self._presence: np.ndarray | None = None
        log.info("read %s: %d images, %d concepts in %.2fs", index, len(self.images), len(self.concepts),
                 time.perf_counter() - t0)

    def _build_concepts(self, root: Path) -> None:
        """Concepts from label.csv, each in its primary category: the one where the label covers the most area
        (c_<category>.csv coverage, as NetDissect picks it), else where it occurs most often (label.csv counts)."""
        label_file = root / "label.csv"
        c_files = {cat: root / f"c_{cat}.csv" for cat in self.categories if (root / f"c_{cat}.csv").is_file()}
        coverage: dict[int, dict[str, float]] = {}
        c_names: dict[int, str] = {}
        for cat, f in c_files.items():
            for num, (name, cov) in _read_c_csv(f).items():
                coverage.setdefault(num, {})[cat] = cov
                c_names.setdefault(num, name)
        if label_file.is_file():
            labels = _read_label_csv(label_file)
        elif coverage:
            labels = {num: (c_names[num], dict(covs)) for num, covs in coverage.items()}
        else:
            raise DatasetError("no label.csv (or c_<category>.csv files) beside index.csv", file=root,
                               fix="add label.csv with the columns number,name,category,frequency,coverage,syns")
        order = {cat: k for k, cat in enumerate(self.categories)}
        numbers = sorted(n for n in labels if n > 0)  # 0 marks unlabelled pixels
        lut = np.full((max(numbers) + 1) if numbers else 1, -1, np.int64)
        for num in numbers:
            name, counts = labels[num]
            scores = coverage.get(num) if coverage else None
            if not scores:
                scores = counts
            listed = {c: v for c, v in scores.items() if c in order} or scores
            if not listed:
                self._skips.add("labels_without_category", "labels with no category (left out)",
                                f"{num}: {name}")
                continue
            # ties go to the later category, as in NetDissect's max over (coverage, category index)
            best = max(listed, key=lambda c: (listed[c], order.get(c, len(order))))
            if best not in order:
                order[best] = len(self.categories)
                self.categories.append(best)
            lut[num] = len(self.concepts)
            self.concepts.append(Concept(name or str(num), best, "broden"))
        self._lut = lut

    @property
    def has_masks(self) -> bool:
        return bool(self.concepts)

    def annotation_files(self) -> list[Path]:
        return [self.index_file] + sorted(p for p in self.root.glob("*.csv") if p.name == "label.csv"
                                          or p.name.startswith("c_"))

    def annotation_refs(self) -> list[Path]:
        return [self.image_dir / ref for layers in self._layers for _, ref in layers if isinstance(ref, str)]

    def annotated_categories(self, index: int) -> np.ndarray:
        out = np.zeros(len(self.categories), bool)
        out[: self._annotated.shape[1]] = self._annotated[index]
        return out

    def _concepts_of(self, labels: np.ndarray, where: str) -> np.ndarray:
        labels = labels[labels > 0]
        inside = labels < len(self._lut)
        idx = np.full(labels.shape, -1, np.int64)
        idx[inside] = self._lut[labels[inside]]
        if (idx < 0).any():
            self._skips.add("unknown_labels", "label numbers in the masks that label.csv does not name (ignored)",
                            f"{where}: {int(labels[idx < 0][0])}")
        return idx[idx >= 0]

    def _read_map(self, rel: str, strict: bool = False) -> np.ndarray | None:
        """A segmentation's label map. Unreadable: None (noted in the report) while listing presence; with
        `strict` (decoding one image's masks) a DatasetError, so the image's masks are left out and reported
        rather than silently counted with one of its segmentations missing."""
        path = self.image_dir / rel
        try:
            return _label_map(path)
        except Exception as exc:  # one damaged mask file must not end a long extraction
            if strict:
                raise DatasetError(f"the segmentation cannot be decoded ({exc})", file=path,
                                   fix="replace the file with a valid PNG") from None
            log.warning("skipping unreadable segmentation %s: %s", path, exc)
            self._skips.add("unreadable_mask", "segmentation files that cannot be decoded (ignored)",
                            f"{rel}: {exc}")
            return None

    def _image_concepts(self, index: int) -> np.ndarray:
        found: list[np.ndarray] = []
        for _, ref in self._layers[index]:
            if isinstance(ref, int):
                found.append(self._concepts_of(np.array([ref], np.int64), self.images[index].key))
            else:
                m = self._read_map(ref)
                if m is not None:
                    found.append(self._concepts_of(np.unique(m).astype(np.int64), ref))
        return np.unique(np.concatenate(found)) if found else np.zeros(0, np.int64)

    def presence(self, progress: Any = None) -> np.ndarray:
        """Pixel categories are only known from their PNGs, so the first call reads every segmentation file (in a
        few threads: PNG decoding releases the GIL); the result is kept."""
        if self._presence is None:
            t0 = time.perf_counter()
            n = len(self.images)
            rows: list[np.ndarray] = []
            cols: list[np.ndarray] = []
            with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
                for i, c in enumerate(pool.map(self._image_concepts, range(n), chunksize=64)):
                    rows.append(np.full(len(c), i, np.int64))
                    cols.append(c)
                    if progress is not None and (i % 512 == 511 or i == n - 1):
                        progress.update(i + 1, n, "reading segmentations")
            p = np.zeros((n, len(self.concepts)), bool)
            if rows:
                p[np.concatenate(rows), np.concatenate(cols)] = True
            self._presence = p
            log.info("Broden presence from %d images in %.1fs", n, time.perf_counter() - t0)
        return self._presence.copy()

    def masks(self, index: int, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        size = _check_size(size)
        maps: list[np.ndarray] = []
        labels: list[np.ndarray] = []
        whole: list[int] = []
        for _, ref in self._layers[index]:
            if isinstance(ref, int):
                whole.append(ref)
                continue
            m = self._read_map(ref, strict=True)
            if m is None:
                continue
            labels.append(np.unique(m))
            # nearest sampling picks pixels, so resizing the label map equals resizing each concept mask
            maps.append(resize_nearest(m, size))
        masks: dict[int, np.ndarray] = {}
        if maps:
            stack = np.stack(maps)  # [P, H, W]
            uniq = np.unique(np.concatenate(labels)).astype(np.int64)
            uniq = uniq[uniq > 0]
            idx = np.full(uniq.shape, -1, np.int64)
            inside = uniq < len(self._lut)
            idx[inside] = self._lut[uniq[inside]]
            keep = idx >= 0
            if keep.any():
                uniq, idx = uniq[keep], idx[keep]
                hit = (stack[None] == uniq[:, None, None, None]).any(axis=1)  # [k, H, W]
                for c, m in zip(idx.tolist(), hit):
                    masks[c] = masks[c] | m if c in masks else m
        for label in whole:
            if 0 < label < len(self._lut) and self._lut[label] >= 0:
                masks[int(self._lut[label])] = np.ones(size, bool)
        if not masks:
            return _empty_masks(size)
        order = sorted(masks)
        return np.array(order, np.int64), np.stack([masks[c] for c in order])


# ---- content fingerprint -----------------------------------------------------------------------------------------

FINGERPRINT_VERSION = "content-v2"


def _stat_token(path: Path) -> bytes:
    try:
        st = os.stat(path)
    except OSError as exc:
        return f"unreadable:{exc.errno}".encode()
    return f"{st.st_size}:{st.st_mtime_ns}".encode()


def content_fingerprint(reader: DatasetReader) -> str:
    """A key of everything that can change what an extraction computes from this dataset: where it lies, the bytes
    of its annotation files, and each image's (and per-image segmentation's) name, size and modification time.

    Images are not read (that would mean decoding the whole dataset to open it); a file rewritten in place keeps
    its name but changes its size or modification time, which is what the key watches. Two copies of a dataset
    in different folders get different keys on purpose: a result is only reused for the files it was made from.
    """
    import hashlib

    h = hashlib.sha256()
    h.update(f"{FINGERPRINT_VERSION}\0{reader.format}\0{Path(reader.root).resolve()}\0{reader.source}\0".encode())
    for f in reader.annotation_files():
        h.update(f"{f}\0".encode())
        try:
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
        except OSError as exc:
            h.update(f"unreadable:{exc.errno}".encode())
        h.update(b"\0")
    for im in reader.images:
        h.update(im.key.encode())
        h.update(b"\0")
        h.update(_stat_token(im.path))
        h.update(b"\0")
    for ref in reader.annotation_refs():
        h.update(f"{ref}\0".encode())
        h.update(_stat_token(ref))
    for c in reader.concepts:
        h.update(f"{c.name}\0{c.category}\0".encode())
    return h.hexdigest()


# ---- detection ---------------------------------------------------------------------------------------------------

def _is_broden_header(names: list[str]) -> bool:
    lower = {n.lower() for n in names}
    return "image" in lower and bool(lower & {"split", "ih", "iw", "sh", "sw"})


def detect_format(path: str | Path) -> str:
    """The format of a dataset folder or annotation file, tried in this order: coco, broden, labels-csv,
    imagefolder, folder."""
    p = Path(path).expanduser()
    if not p.exists():
        raise DatasetError("the path does not exist", file=p, fix="check the path")
    if p.is_file():
        suffix = p.suffix.lower()
        if suffix == ".json":
            return "coco"
        if suffix == ".csv":
            header = _csv_header(p)
            if _is_broden_header(header):
                return "broden"
            if any(h.lower() in IMAGE_COLUMNS for h in header):
                return "labels-csv"
            raise DatasetError(f"cannot tell what this CSV describes (header {header})", file=p,
                               fix="a labels CSV needs an image, file, filename or path column; a Broden "
                                   "index.csv starts image,split,ih,iw,sh,sw")
        raise DatasetError("not a dataset folder or annotation file", file=p, fix=_FORMAT_HELP)
    if _coco_candidates(p):
        return "coco"
    if (p / "index.csv").is_file() and _is_broden_header(_csv_header(p / "index.csv")):
        return "broden"
    if (p / "labels.csv").is_file():
        return "labels-csv"
    classes, _, loose = _class_folders(p)
    if len(classes) >= 2 and not loose:
        return "imagefolder"
    return "folder"


_READERS: dict[str, type[DatasetReader]] = {
    "coco": CocoReader,
    "broden": BrodenReader,
    "labels-csv": LabelsCsvReader,
    "imagefolder": ImageFolderReader,
    "folder": FolderReader,
}


def open_dataset(path: str | Path, format: str | None = None) -> DatasetReader:
    """Read a dataset's annotations (not its images). `format` is one of FORMATS, or None to detect it."""
    p = Path(path).expanduser()
    if not p.exists():
        raise DatasetError("the path does not exist", file=p, fix="check the path")
    p = p.resolve()
    fmt = format.strip().lower().replace("_", "-") if format else detect_format(p)
    cls = _READERS.get(fmt)
    if cls is None:
        raise DatasetError(f"unknown dataset format {format!r}", file=p, fix=f"use one of: {', '.join(FORMATS)}")
    reader = cls(p)
    log.info("opened %r", reader)
    return reader
