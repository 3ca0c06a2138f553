"""The extraction job: run the model over a dataset once (twice when the dataset has masks) and keep, per unit of
each chosen layer, what the labelers need, with memory bounded independently of the dataset size.

Pass 1, every image: per-image spatial max and mean (memory-mapped [N, U] arrays), exact upper quantiles
(`stats.TopQuantiles`) and the top-k exemplars with their maps (`stats.TopKExemplars`).
Pass 2, only when the dataset has per-pixel masks: unit maps upsampled to the mask size, thresholded at the
Network Dissection quantile, counted against every concept present in the batch (intersection, active area per
annotated category, concept area): the `MaskCounts` of Network Dissection. Pass 1 then also loads the masks and
keeps its decoded batches for pass 2 while they fit `reuse_mb`, so a small dataset is decoded once.

Every statistic follows the merge protocol of `stats` and is fed by one loop, `tally`, which a single process runs
over the whole dataset and a Ray worker over its shard (`distributed.RayExtractJob`: same arrays, bit for bit).

Resume: every few seconds the streaming state goes to a safetensors checkpoint (atomic rename) after the
memory-mapped rows before it were flushed; a killed or cancelled run continues from its last checkpoint.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.sources import instrument as hooks
from app.engine.claims import claim_or_wait
from app.engine.device import cpu_threads, describe, pick_device
from app.engine.stats import (
    LayerBatch,
    MaskBatch,
    MaskCounts,
    PooledRows,
    Statistic,
    TopKExemplars,
    TopQuantiles,
)
from app.engine.summary import MAX_LISTED
from app.errors import DatasetError, JobError, ModelLoadError
from app.jobs import JobProgress
from app.project import arrays
from app.project.store import MASKS_LEFT_OUT, Project

log = logging.getLogger(__name__)

STATE_FILE = "state.safetensors"
RAY_STATE_FILE = "ray-state.safetensors"  # the Ray coordinator's: merged shards and their merged state


@dataclass
class ExtractOptions:
    layers: list[str]
    batch_size: int = 32
    device: str = "auto"
    num_workers: int | None = None  # None: one fewer than the CPU count, at most 8
    topk: int = 15  # MILAN's exemplar count
    quantiles: tuple[float, ...] = (0.99, 0.995)  # MILAN masks at 0.99; Network Dissection thresholds at 0.995
    iou_quantile: float = 0.995
    mask_size: int | None = None  # side of the square mask grid; None: the input crop, at most 112 (Broden's)
    mask_stats: bool = True
    amp: bool = True  # mixed precision on CUDA
    memory_budget_mb: int = 512  # per layer, for the exact quantile buffers
    checkpoint_seconds: float = 10.0
    max_images: int | None = None
    # Pass 1 loads the masks too and keeps its decoded batches for pass 2 while they fit this (the demo's 3000
    # images and masks: about 250 MB), so pass 2 decodes nothing a second time. 0: decode twice.
    reuse_mb: int = 512
    threads: int | None = None  # torch's CPU threads for this job; None: torch's default (one per core)

    def key_fields(self) -> dict[str, Any]:
        # What changes the results (not batch size, workers, device or checkpoint cadence).
        return {
            "layers": sorted(self.layers), "topk": self.topk, "quantiles": list(self.quantiles),
            "iou_quantile": self.iou_quantile, "mask_size": self.mask_size, "mask_stats": self.mask_stats,
            "max_images": self.max_images,
        }


def safe_name(layer: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", layer) or "_"


def load_project_model(model_row: dict[str, Any], device: torch.device) -> Any:
    """Load a model the way it was added, and refuse it if its file changed since."""
    from app.sources.models import load_model

    model = load_model(
        model_row["spec"], model_row["weights_path"], trust_code=bool(model_row["trust_code"]),
        preprocess_overrides=model_row["preprocess"], device=device,
    )
    if model.fingerprint != model_row["fingerprint"]:
        raise ModelLoadError(
            "the model file changed since it was added to the project (its checksum differs)",
            file=model_row["weights_path"] or model_row["spec"],
            fix="restore the original file, or add the new file as another model",
        )
    return model


def open_project_dataset(ds_row: dict[str, Any]) -> Any:
    from app.sources.datasets import open_dataset

    root = Path(ds_row["root"])
    if not root.exists():
        raise DatasetError(
            "the dataset folder is gone", file=root, fix="put it back at this path, or add the dataset again"
        )
    reader = open_dataset(root, ds_row["format"])
    if len(reader.images) != ds_row["num_images"]:
        raise DatasetError(
            f"the dataset now lists {len(reader.images)} images, the project recorded {ds_row['num_images']}",
            file=root,
            fix="add it again as a new dataset",
        )
    return reader


def masks_in_model_view(masks: np.ndarray, preprocess: dict[str, Any], size: int) -> np.ndarray:
    """Concept masks [k, H, W] of a stored image -> [k, size, size] over exactly what the model saw (its resize
    and centre crop; outside the image, where the model saw padding, nothing), sampled at pixel centres."""
    from app.imaging import model_view_box

    k, h, w = masks.shape
    left, top, right, bottom = model_view_box(w, h, preprocess)
    centres = (np.arange(size) + 0.5) / size
    ys = np.floor(top + centres * (bottom - top)).astype(np.int64)
    xs = np.floor(left + centres * (right - left)).astype(np.int64)
    inside = (ys[:, None] >= 0) & (ys[:, None] < h) & (xs[None, :] >= 0) & (xs[None, :] < w)
    out = masks[:, ys.clip(0, h - 1)][:, :, xs.clip(0, w - 1)]
    return out & inside[None]


class ImageSet(torch.utils.data.Dataset):
    """Decodes images (in DataLoader workers); a corrupt image becomes ok=False with its message, never a crash."""

    def __init__(self, reader: Any, transform: Any, indices: list[int], crop: int, mask_size: int | None,
                 preprocess: dict[str, Any] | None = None):
        self.reader = reader
        self.transform = transform
        self.indices = indices
        self.crop = crop
        self.mask_size = mask_size
        self.preprocess = preprocess or {"resize": crop, "crop": crop}

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        from app.sources.datasets import load_rgb

        idx = self.indices[i]
        item: dict[str, Any] = {"index": idx, "ok": True, "error": ""}
        try:
            image = load_rgb(self.reader.images[idx].path)
            item["x"] = self.transform(image)
        except DatasetError as exc:
            item.update(ok=False, error=str(exc), x=torch.zeros(3, self.crop, self.crop))
        except Exception as exc:  # a decoder crash on one odd file must not end the job
            item.update(ok=False, error=f"{self.reader.images[idx].path}: cannot decode ({exc})",
                        x=torch.zeros(3, self.crop, self.crop))
        if self.mask_size is not None:
            no_masks = {
                "concepts": torch.zeros(0, dtype=torch.int64),
                "masks": torch.zeros((0, self.mask_size, self.mask_size), dtype=torch.bool),
                "annotated": torch.zeros(len(self.reader.categories), dtype=torch.bool),
            }
            item.update(no_masks)
            if item["ok"]:
                try:
                    # Masks at the stored size, then through the same geometry as the image the model saw.
                    cidx, masks = self.reader.masks(idx, (image.height, image.width))
                    masks = masks_in_model_view(np.asarray(masks, dtype=bool), self.preprocess, self.mask_size)
                    annotated = self.reader.annotated_categories(idx)
                except DatasetError as exc:
                    # The image still counts for activations; its masks are left out of the overlap counts.
                    item["mask_error"] = str(exc)
                else:
                    item["concepts"] = torch.as_tensor(np.asarray(cidx, dtype=np.int64))
                    item["masks"] = torch.from_numpy(np.ascontiguousarray(masks, dtype=bool))
                    item["annotated"] = torch.from_numpy(np.asarray(annotated, dtype=bool))
        return item


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "index": torch.tensor([it["index"] for it in items], dtype=torch.int64),
        "ok": torch.tensor([it["ok"] for it in items], dtype=torch.bool),
        "error": [it["error"] for it in items],
        "x": torch.stack([it["x"] for it in items]),
    }
    if "masks" in items[0]:
        out["concepts"] = [it["concepts"] for it in items]
        out["masks"] = [it["masks"] for it in items]
        out["annotated"] = torch.stack([it["annotated"] for it in items])
        out["mask_error"] = [it.get("mask_error", "") for it in items]
    return out


def layer_info(row: dict[str, Any]) -> Any:
    """The `LayerInfo` of a project's layers row."""
    from app.sources.models import LayerInfo

    return LayerInfo(name=row["name"], type=row["type"], shape=tuple(row["shape"]), kind=row["kind"],
                     units=row["units"], grid=tuple(row["grid"]) if row["grid"] else None,
                     prefix_tokens=row["prefix_tokens"], channels_last=bool(row["channels_last"]), note=row["note"])


def _die_with_parent(parent_pid: int, worker_id: int) -> None:
    """DataLoader worker start: on Linux, ask the kernel to kill this worker the moment its parent dies. Without
    it a worker of a killed job only notices at its next 5-second status check, holding memory and files."""
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os._exit(1)


def make_loader(reader: Any, preprocess: Any, indices: list[int], batch_size: int, num_workers: int | None,
                device: torch.device, mask_size: int | None = None) -> torch.utils.data.DataLoader:
    workers = min(8, max(0, (os.cpu_count() or 1) - 1)) if num_workers is None else num_workers
    ds = ImageSet(reader, preprocess.transform(), indices, int(preprocess.crop), mask_size, preprocess.to_dict())
    import functools

    return torch.utils.data.DataLoader(
        ds, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate,
        pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None,
        worker_init_fn=functools.partial(_die_with_parent, os.getpid()) if workers else None,
        multiprocessing_context=_worker_context() if workers else None,
    )


def _worker_context() -> Any:
    """Decoding workers are forked from this process on Linux, whatever start method the process inherited. A job
    the window runs is itself started by a fork server, and multiprocessing makes that the default of the job's
    process too: its workers would then be children of the fork server, so `_die_with_parent` (which asks the
    kernel to kill a worker with its parent) would watch the wrong process and refuse to start them."""
    import multiprocessing as mp
    import sys

    if sys.platform.startswith("linux") and "fork" in mp.get_all_start_methods():
        return mp.get_context("fork")
    return None


class MapRunner:
    """Runs the model on a batch and returns the unit maps [B, U, h, w] (float32) of the chosen layers, stopping
    the forward pass after the deepest of them, with mixed precision on CUDA and a micro-batch that halves when
    the device runs out of memory (and stays halved)."""

    def __init__(self, model: Any, infos: dict[str, Any], device: torch.device, amp: bool = True,
                 batch_size: int = 32):
        self.model = model
        self.infos = infos
        self.device = device
        self.amp = amp and device.type == "cuda"
        self.micro = max(1, batch_size)
        if device.type == "cuda":
            model.module.to(memory_format=torch.channels_last)

    def maps(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        from app.sources.models import unit_maps

        results: dict[str, list[torch.Tensor]] = {n: [] for n in self.infos}
        start = 0
        with hooks.capture(self.model.module, list(self.infos), stop_after_last=True) as outs:
            while start < x.shape[0]:
                chunk = x[start:start + self.micro].to(self.device, non_blocking=True)
                if self.device.type == "cuda":
                    chunk = chunk.contiguous(memory_format=torch.channels_last)
                try:
                    with torch.inference_mode(), torch.autocast(device_type=self.device.type, enabled=self.amp):
                        got = hooks.run_captured(self.model.forward, chunk, outs)
                except torch.OutOfMemoryError:
                    if self.micro == 1:
                        raise JobError("the device ran out of memory even with one image per batch",
                                       fix="use --device cpu or fewer layers at once") from None
                    self.micro = max(1, self.micro // 2)
                    log.warning("out of memory: batch size lowered to %d", self.micro)
                    torch.cuda.empty_cache()
                    continue
                for name, info in self.infos.items():
                    results[name].append(unit_maps(info, got[name]).float())
                start += chunk.shape[0]
        return {n: torch.cat(v) for n, v in results.items()}


@dataclass
class LayerState:
    info: dict[str, Any]  # the layers row of the project
    dir: Path
    pooled: PooledRows
    quant: TopQuantiles
    topk: TopKExemplars
    counts: MaskCounts | None = None

    def pass1(self) -> list[Statistic]:
        return [self.pooled, self.quant, self.topk]


def batch_masks(batch: dict[str, Any], keep: list[int], mask_size: int, device: torch.device) -> MaskBatch:
    """The masks of a collated batch's valid images, dense over the concepts present in the batch."""
    present = torch.unique(torch.cat([batch["concepts"][i] for i in keep]))
    dense = torch.zeros((len(keep), len(present), mask_size, mask_size), dtype=torch.bool)
    if present.numel():
        col = {int(c): j for j, c in enumerate(present.tolist())}
        for row, i in enumerate(keep):
            cols = [col[int(c)] for c in batch["concepts"][i].tolist()]
            if cols:
                dense[row, cols] = batch["masks"][i]
    return MaskBatch(dense.to(device), present.to(device), batch["annotated"][keep].to(device))


def tally(batches: Iterable[dict[str, Any]], runner: MapRunner, stats: dict[str, list[Statistic]],
          problems: dict[int, str], on_batch: Callable[[int], None], mask_size: int | None = None) -> None:
    """The one loop of extraction, in a single process and in every shard: run the model on each batch of valid
    images and let each layer's statistics observe its maps. `problems` collects per-image errors (decoding in a
    pass without masks, masks in a pass with them); `on_batch(next_index)` reports progress and checkpoints."""
    err_key = "error" if mask_size is None else "mask_error"
    for batch in batches:
        ok = batch["ok"]
        for i, err in zip(batch["index"].tolist(), batch[err_key]):
            if err:
                problems[i] = err
        if ok.any():
            maps_all = runner.maps(batch["x"][ok])
            idx = batch["index"][ok]
            masks = None
            if mask_size is not None:
                masks = batch_masks(batch, ok.nonzero().flatten().tolist(), mask_size, runner.device)
            for name, maps in maps_all.items():
                lb = LayerBatch(idx, maps, masks)
                for st in stats[name]:
                    st.observe(lb)
        on_batch(int(batch["index"][-1]) + 1)


def shard_plan(n_images: int, shards: int, batch_size: int) -> list[tuple[int, int]]:
    """Contiguous ranges of whole batches: every image then meets the same batch neighbours as in one process, so
    its maps, and everything computed from them, are the same bit for bit."""
    batches = max(1, math.ceil(n_images / batch_size))
    shards = max(1, min(shards, batches))
    bounds = [round(i * batches / shards) * batch_size for i in range(shards + 1)]
    bounds[-1] = n_images
    return [(a, min(b, n_images)) for a, b in itertools.pairwise(bounds) if a < min(b, n_images)]


def new_layer_states(layer_rows: list[dict[str, Any]], run_dir: Path | None, n_images: int, opts: ExtractOptions,
                     device: torch.device, start: int = 0, stop: int | None = None,
                     seed: int = 0) -> dict[str, LayerState]:
    """Pass-1 statistics of every layer: over the run's memory-mapped files when `run_dir` is given, else in
    memory for the images start..stop-1 (a shard). The quantile buffers are sized by the whole dataset, so that a
    shard keeps every value the whole could need."""
    stop = n_images if stop is None else stop
    budget = opts.memory_budget_mb * 2**20
    layers: dict[str, LayerState] = {}
    for r in layer_rows:
        grid = tuple(r["grid"] or (1, 1))
        per_unit = n_images * int(np.prod(grid))
        rows_max = rows_mean = None
        d = Path()
        if run_dir is not None:
            d = run_dir / safe_name(r["name"])
            d.mkdir(exist_ok=True)
            rows_max = arrays.open_rows(d / "pooled_max.npy", (n_images, r["units"]), np.float32)
            rows_mean = arrays.open_rows(d / "pooled_mean.npy", (n_images, r["units"]), np.float32)
        layers[r["name"]] = LayerState(
            info=r, dir=d,
            pooled=PooledRows(start, stop - start, r["units"], rows_max, rows_mean),
            quant=TopQuantiles(r["units"], per_unit, list(opts.quantiles), device, budget_bytes=budget, seed=seed),
            topk=TopKExemplars(r["units"], opts.topk, grid, device),
        )
    return layers


def concept_categories(reader: Any, device: torch.device) -> torch.Tensor:
    cat_index = {c: i for i, c in enumerate(reader.categories)}
    return torch.tensor([cat_index[c.category] for c in reader.concepts], dtype=torch.int64, device=device)


def new_mask_counts(layer: LayerState, reader: Any, thresholds: torch.Tensor, mask_size: int,
                    device: torch.device) -> MaskCounts:
    return MaskCounts(layer.info["units"], len(reader.concepts), len(reader.categories), thresholds,
                      concept_categories(reader, device), mask_size, device)


class KeptBatches:
    """Pass 1's collated batches (images and masks, as decoded), kept for pass 2 up to a byte budget; past it,
    they are dropped and pass 2 decodes everything again."""

    def __init__(self, budget_bytes: int):
        self.budget = budget_bytes
        self.batches: list[dict[str, Any]] = []
        self.bytes = 0
        self.complete = budget_bytes > 0

    def keep(self, batches: Iterable[dict[str, Any]]) -> Iterable[dict[str, Any]]:
        for batch in batches:
            if self.complete:
                # A copy: a batch from a loader process lives in shared memory that its worker would have to hold
                kept = {k: v.clone() if isinstance(v, torch.Tensor) else
                        [t.clone() for t in v] if k in ("concepts", "masks") else v for k, v in batch.items()}
                self.bytes += kept["x"].nbytes + sum(m.nbytes for m in kept["masks"])
                if self.bytes > self.budget:
                    self.complete = False
                    self.batches.clear()
                else:
                    self.batches.append(kept)
            yield batch


@dataclass
class PassesDone:
    """What the passes leave for the commit, whichever way they ran."""

    problems: dict[int, str]  # image index -> why it was skipped
    mask_problems: dict[int, str]  # image index -> why its masks were left out
    done_at_start: int  # work units already done when this session began (a resumed run)
    micro: int  # the batch size the model ran with
    device: str  # where, in words


@dataclass
class ExtractReport:
    images: int
    skipped: int
    seconds: float
    images_per_second: float
    device: str
    batch_size: int
    quantile_exact: bool
    layers: list[str] = field(default_factory=list)
    mask_counts: bool = False
    masks_skipped: int = 0
    problems: list[str] = field(default_factory=list)  # "key: what went wrong", images first, at most MAX_LISTED
    resumed: bool = False


class ExtractJob:
    """Extract activation statistics of chosen layers of a project's model over one of its datasets."""

    kind = "extract"

    def __init__(self, project_path: str | Path, options: ExtractOptions, model: str | int | None = None,
                 dataset: str | int | None = None):
        self.project_path = Path(project_path)
        self.options = options
        self.model_ref = model
        self.dataset_ref = dataset
        self.title = f"Extract {', '.join(options.layers)}"
        self.run_id: int | None = None

    # ---- setup ---------------------------------------------------------------------------------------------
    def _key(self, model_row: dict[str, Any], ds_row: dict[str, Any], dataset_content: str) -> str:
        # The dataset part is its content as it is on disk now (root, annotation bytes, image sizes and times),
        # not what was recorded when it was added: a finished run is only reused for the very files it read.
        blob = json.dumps(
            {"model": model_row["fingerprint"], "spec": model_row["spec"], "dataset_id": ds_row["id"],
             "dataset": dataset_content, "preprocess": model_row["preprocess"], **self.options.key_fields()},
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()

    def execute(self, progress: JobProgress) -> ExtractReport:
        project = Project.open(self.project_path)
        try:
            return self._execute(project, progress)
        finally:
            project.close()

    def _execute(self, project: Project, progress: JobProgress) -> ExtractReport:
        opts = self.options
        model_row = project.model(self.model_ref)
        ds_row = project.dataset(self.dataset_ref)
        if not opts.layers:
            raise JobError("no layer was chosen", fix="name layers with --layers (see `neuron-studio info`)")
        layer_rows = [project.layer(model_row["id"], name) for name in opts.layers]
        for row in layer_rows:
            if row["units"] <= 0:
                raise JobError(f"layer {row['name']} ({row['type']}) has no units to extract",
                               fix="pick a convolution, linear or transformer block layer")
        device = pick_device(opts.device)
        from app.sources.datasets import content_fingerprint

        reader = open_project_dataset(ds_row)
        key = self._key(model_row, ds_row, content_fingerprint(reader))
        done_run = project.finished_run(self.kind, key)
        if done_run is not None:
            log.info("extraction already done as run %d", done_run.id)
            self.run_id = done_run.id
            return ExtractReport(**{k: v for k, v in (done_run.report or {}).items()
                                    if k in {f.name for f in dataclasses.fields(ExtractReport)}})
        model = load_project_model(model_row, device)
        run_id, finished = claim_or_wait(
            project, progress, kind=self.kind, key=key, params=dataclasses.asdict(opts) | {"device": str(device)},
            model_id=model_row["id"], dataset_id=ds_row["id"],
        )
        self.run_id = run_id
        if finished is not None:  # the same extraction, done meanwhile by another process
            return ExtractReport(**{k: v for k, v in (finished.report or {}).items()
                                    if k in {f.name for f in dataclasses.fields(ExtractReport)}})
        t_start = time.monotonic()
        prior_seconds = project.run(run_id).seconds
        with (project.finishing(run_id, t_start, seconds_before=prior_seconds,
                                cancelled="cancelled; run the same extraction again to resume"),
              cpu_threads(opts.threads)):
            report = self._extract(project, run_id, model, reader, ds_row, layer_rows, device, progress)
        report.seconds = prior_seconds + time.monotonic() - t_start
        total = project.run(run_id).total
        if total:  # the last checkpoint may be a few batches behind: a finished run has done them all
            project.update_run(run_id, done=total, total=total, message="done")
        project.finish_run(run_id, "done", report=dataclasses.asdict(report), seconds=report.seconds,
                           message=f"{report.images} images, {report.skipped} skipped"
                                   + (f", masks of {report.masks_skipped} left out" if report.masks_skipped else ""))
        return report

    # ---- the passes ----------------------------------------------------------------------------------------
    def _extract(self, project: Project, run_id: int, model: Any, reader: Any, ds_row: dict[str, Any],
                 layer_rows: list[dict[str, Any]], device: torch.device, progress: JobProgress) -> ExtractReport:
        opts = self.options
        n_images = len(reader.images) if opts.max_images is None else min(opts.max_images, len(reader.images))
        with_masks = bool(opts.mask_stats and reader.has_masks and reader.concepts)
        mask_size = opts.mask_size or min(112, int(model.preprocess.crop))
        run_dir = project.arrays_dir / f"run-{run_id}"
        run_dir.mkdir(parents=True, exist_ok=True)
        layers = new_layer_states(layer_rows, run_dir, n_images, opts, device)
        t_first = time.monotonic()
        done = self._passes(
            project, run_id, run_dir, model, reader, ds_row, layers, n_images, with_masks, mask_size, device, progress)
        return self._commit(project, run_id, reader, layers, n_images, with_masks, mask_size, done, t_first)

    def write_pass1(self, layers: dict[str, LayerState]) -> None:
        """Quantiles and exemplars are final after pass 1: write them, and set the Network Dissection thresholds."""
        opts = self.options
        for name, ls in layers.items():
            qres = ls.quant.result()
            top = ls.topk.result()
            arrays.save_npy(ls.dir / "quantiles.npy", qres.values)
            arrays.save_npy(ls.dir / "topk_index.npy", top["index"])
            arrays.save_npy(ls.dir / "topk_scores.npy", top["scores"])
            arrays.save_npy(ls.dir / "topk_maps.npy", top["maps"])
            (ls.dir / "meta.json").write_text(json.dumps({
                "layer": name, "quantiles": qres.quantiles, "exact": qres.exact, "sample_rate": qres.sample_rate,
                "expected_relative_error": qres.expected_relative_error, "topk": opts.topk,
                "iou_quantile": opts.iou_quantile,
            }, indent=1))

    def thresholds(self, layer: LayerState) -> torch.Tensor:
        opts = self.options
        row = list(opts.quantiles).index(opts.iou_quantile) if opts.iou_quantile in opts.quantiles else -1
        return layer.quant.result().values[row]

    @staticmethod
    def write_pass2(layers: dict[str, LayerState], reader: Any) -> None:
        for ls in layers.values():
            assert ls.counts is not None
            counts = ls.counts.result()
            arrays.save_npy(ls.dir / "mask_intersection.npy", counts["inter"])
            arrays.save_npy(ls.dir / "mask_unit_area.npy", counts["unit_area"])
            arrays.save_npy(ls.dir / "mask_concept_area.npy", counts["concept_area"])
            arrays.save_npy(ls.dir / "concept_category.npy", concept_categories(reader, torch.device("cpu")))

    def _passes(self, project: Project, run_id: int, run_dir: Path, model: Any, reader: Any, ds_row: dict[str, Any],
                layers: dict[str, LayerState], n_images: int, with_masks: bool, mask_size: int, device: torch.device,
                progress: JobProgress) -> PassesDone:
        """Both passes in this process (`distributed.RayExtractJob` runs them as shards on Ray instead).
        """
        opts = self.options
        state_path = run_dir / STATE_FILE
        infos = {ls.info["name"]: layer_info(ls.info) for ls in layers.values()}
        # Resume point: the checkpoint, not the database, says which rows are valid and what the state was.
        stage, next_index = 1, 0
        problems: dict[int, str] = {}
        mask_problems: dict[int, str] = {}
        if state_path.exists():
            tensors, meta = arrays.load_state(state_path)
            stage, next_index = int(meta["stage"]), int(meta["next_index"])
            problems = {int(k): v for k, v in meta.get("problems", {}).items()}
            mask_problems = {int(k): v for k, v in meta.get("mask_problems", {}).items()}
            for name, ls in layers.items():
                p = safe_name(name) + "/"
                ls.quant.load_state({k[len(p) + 2:]: v for k, v in tensors.items() if k.startswith(p + "q/")})
                ls.topk.load_state({k[len(p) + 2:]: v for k, v in tensors.items() if k.startswith(p + "k/")})
                if stage == 2 and with_masks:
                    ls.counts = new_mask_counts(ls, reader, tensors[p + "thresholds"], mask_size, device)
                    ls.counts.load_state({k: tensors[p + k] for k in ("inter", "unit_area", "concept_area")})
            log.info("resuming run %d at stage %d, image %d", run_id, stage, next_index)

        passes = 2 if with_masks else 1
        total = n_images * passes
        done_at_start = (stage - 1) * n_images + next_index if with_masks or stage == 1 else total
        runner = MapRunner(model, infos, device, amp=opts.amp, batch_size=opts.batch_size)
        last_ckpt = [time.monotonic()]

        def checkpoint(stage_now: int, next_idx: int) -> None:
            for ls in layers.values():
                ls.pooled.flush()  # the pooled rows' state is their file
            tensors: dict[str, torch.Tensor] = {}
            for name, ls in layers.items():
                p = safe_name(name) + "/"
                tensors.update({p + "q/" + k: v for k, v in ls.quant.state().items()})
                tensors.update({p + "k/" + k: v for k, v in ls.topk.state().items()})
                if stage_now == 2 and ls.counts is not None:
                    tensors[p + "thresholds"] = ls.counts.thresholds
                    tensors.update({p + k: v for k, v in ls.counts.state().items()})
            arrays.save_state(state_path, tensors, {"stage": stage_now, "next_index": next_idx,
                                                    "problems": {str(k): v for k, v in problems.items()},
                                                    "mask_problems": {str(k): v for k, v in mask_problems.items()}})
            done = (stage_now - 1) * n_images + next_idx
            project.update_run(run_id, done=done, total=total, message=f"pass {stage_now} of {passes}")
            last_ckpt[0] = time.monotonic()

        def loader(start: int, masks: bool) -> torch.utils.data.DataLoader:
            return make_loader(reader, model.preprocess, list(range(start, n_images)), opts.batch_size,
                               opts.num_workers, device, mask_size if masks else None)

        def after_batch(stage_now: int, message: str) -> Callable[[int], None]:
            def on_batch(next_idx: int) -> None:
                progress.update((stage_now - 1) * n_images + next_idx, total, message)
                if time.monotonic() - last_ckpt[0] >= opts.checkpoint_seconds:
                    checkpoint(stage_now, next_idx)
            return on_batch

        # Pass 2 needs every image again, from the first: a pass 1 that starts there can keep them for it.
        kept = (KeptBatches(opts.reuse_mb * 2**20) if stage == 1 and next_index == 0 and with_masks and opts.reuse_mb > 0
                else None)
        if stage == 1:
            msg = "pass 1: activations, quantiles, exemplars"
            progress.begin_stage(msg, next_index)
            batches: Iterable[dict[str, Any]] = loader(next_index, masks=kept is not None)
            tally(kept.keep(batches) if kept is not None else batches, runner,
                  {n: ls.pass1() for n, ls in layers.items()}, problems, after_batch(1, msg))
            self.write_pass1(layers)
            stage, next_index = 2, 0
            if with_masks:
                for ls in layers.values():
                    ls.counts = new_mask_counts(ls, reader, self.thresholds(ls), mask_size, device)
            checkpoint(2, 0)

        if with_masks:
            msg = "pass 2: mask overlap counts"
            progress.begin_stage(msg, n_images + next_index)
            again = kept.batches if kept is not None and kept.complete and next_index == 0 else None
            tally(again if again is not None else loader(next_index, masks=True), runner,
                  {n: [ls.counts] for n, ls in layers.items()}, mask_problems, after_batch(2, msg), mask_size=mask_size)
            if kept is not None:
                kept.batches.clear()
            self.write_pass2(layers, reader)
        return PassesDone(problems, mask_problems, done_at_start, runner.micro, describe(device))

    def _commit(self, project: Project, run_id: int, reader: Any, layers: dict[str, LayerState], n_images: int,
                with_masks: bool, mask_size: int, done: PassesDone, t_first: float) -> ExtractReport:
        """The layer statistics become visible together with the run's 'done'."""
        opts = self.options
        problems, mask_problems, done_at_start = done.problems, done.mask_problems, done.done_at_start
        passes = 2 if with_masks else 1
        total = n_images * passes
        exact = all((ls.dir / "meta.json").exists() and json.loads((ls.dir / "meta.json").read_text())["exact"]
                    for ls in layers.values())
        skipped = len(problems)
        keys = [im.key for im in reader.images]
        listed = [f"skipped {keys[i]}: {msg}" for i, msg in sorted(problems.items())]
        listed += [f"masks left out for {keys[i]}: {msg}" for i, msg in sorted(mask_problems.items())]
        if problems or mask_problems:
            project.record_image_problems(
                run_id, sorted({**{k: f"{MASKS_LEFT_OUT}{v}" for k, v in mask_problems.items()}, **problems}.items()))
        for ls in layers.values():
            ls.pooled.flush()
            project.add_layer_stats(
                run_id=run_id, layer_id=ls.info["id"], array_dir=str(ls.dir.relative_to(project.path)),
                quantiles=list(opts.quantiles), quantile_method="exact" if exact else "sampled",
                has_mask_counts=with_masks, mask_size=(mask_size, mask_size) if with_masks else None,
            )
        run_dir = project.arrays_dir / f"run-{run_id}"
        for name in (STATE_FILE, RAY_STATE_FILE):
            (run_dir / name).unlink(missing_ok=True)
        elapsed = time.monotonic() - t_first
        # Images per second over what this session computed, both passes counted as one image each time: a run
        # resumed in its second pass reports that pass's speed, not 0.
        work = (total - done_at_start) / passes
        return ExtractReport(
            images=n_images - skipped, skipped=skipped, seconds=elapsed,
            images_per_second=work / elapsed if elapsed > 0 and work > 0 else math.nan,
            device=done.device, batch_size=done.micro, quantile_exact=exact, layers=list(layers),
            mask_counts=with_masks, masks_skipped=len(mask_problems), problems=listed[:MAX_LISTED],
            resumed=done_at_start > 0,
        )
