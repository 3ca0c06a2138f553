"""Extraction on a Ray cluster: the dataset is split into shards of whole batches, each shard is a Ray task that
runs the same tally loop as a single process (`extract.tally`) and returns the states of its statistics, and this
process, the coordinator, merges them, writes the arrays and commits the run. Workers never open the project: the
SQLite database keeps one writer, and a worker only needs the model file and the dataset folder at the same paths.

Exactness: shards are contiguous runs of whole batches, so every image meets the same batch neighbours as in one
process and its maps are the same bit for bit; every statistic merges exactly (see `stats`), so the arrays equal
the single-process run's.

Failures: a worker that dies (or a node that is lost) has its shard rerun by Ray (`max_retries`); a user error in a
shard (a changed model file, a missing dataset) ends the job with that error. A killed coordinator resumes: after
every merge the merged state and the ids of the merged shards go to the run's checkpoint (atomic rename), after the
pooled rows they carry were flushed, and only the other shards are run again.

Ray is an optional extra, imported only here and only when a job asks for it.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.engine.device import describe, pick_device
from app.engine.extract import (
    RAY_STATE_FILE,
    ExtractJob,
    ExtractOptions,
    LayerState,
    MapRunner,
    PassesDone,
    layer_info,
    load_project_model,
    make_loader,
    new_layer_states,
    new_mask_counts,
    open_project_dataset,
    safe_name,
    shard_plan,
    tally,
)
from app.engine.labeling import LabelJob, LabelSources
from app.errors import JobError, NeuronStudioError
from app.jobs import Cancelled, JobProgress
from app.project import arrays
from app.project.store import Project

log = logging.getLogger(__name__)

INSTALL_FIX = "install the extra: pip install 'neuron-studio[ray]' (or pip install 'ray>=2.9'), or run without --ray"
SHARDS_PER_SLOT = 4  # more shards than slots: a slow or retried shard holds up less of the job
TASK_RETRIES = 3  # reruns of a shard whose worker died or whose node was lost


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise JobError("Ray is not installed in this environment", fix=INSTALL_FIX) from None
    return ray


def connect(address: str) -> tuple[Any, bool]:
    """Ray connected to `address` ("auto": the cluster this machine belongs to, else a local Ray; "local": a Ray
    over this machine only; otherwise a cluster address such as ray://head:10001). Returns (ray, started here)."""
    ray = import_ray()
    if ray.is_initialized():
        return ray, False
    quiet = {"include_dashboard": False, "log_to_driver": False}
    try:
        if address == "local":
            ray.init(**quiet)
        elif address == "auto":
            try:
                ray.init(address="auto", log_to_driver=False)
            except ConnectionError:
                log.info("no Ray cluster found: starting a local Ray on this machine")
                ray.init(**quiet)
        else:
            ray.init(address=address, log_to_driver=False)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise JobError(f"cannot reach the Ray cluster at {address!r} ({exc})",
                       fix="check the address (ray status on the head node prints it), or use --ray local") from None
    return ray, True


@dataclass
class ShardTask:
    """Everything a worker needs: rows of the project (plain data), never the project itself."""

    shard: int
    start: int
    stop: int
    stage: int  # 1: pooled rows, quantiles, exemplars; 2: mask counts
    model_row: dict[str, Any]
    ds_row: dict[str, Any]
    layer_rows: list[dict[str, Any]]
    options: ExtractOptions
    n_images: int
    mask_size: int
    thresholds: dict[str, torch.Tensor] | None = None  # stage 2: per layer, from the merged pass 1
    decode_workers: int = 0  # image decoding processes when the options leave it open


class ProgressBoard:
    """A small Ray actor the shards report to (images done per shard), so progress and ETA cover all of them."""

    def __init__(self) -> None:
        self.done: dict[int, int] = {}

    def report(self, shard: int, done: int) -> None:
        self.done[shard] = done  # set, not add: a retried shard starts again from 0

    def snapshot(self) -> dict[int, int]:
        return dict(self.done)


def run_shard(task: ShardTask, board: Any = None) -> dict[str, Any]:
    """One shard on a worker: the same tally loop as a single process, over images start..stop-1; returns the
    states of its statistics (CPU tensors) and its per-image problems."""
    opts = task.options
    device = pick_device(opts.device)
    model = load_project_model(task.model_row, device)
    reader = open_project_dataset(task.ds_row)
    layers = new_layer_states(task.layer_rows, None, task.n_images, opts, device, task.start, task.stop,
                              seed=task.start)
    infos = {r["name"]: layer_info(r) for r in task.layer_rows}
    runner = MapRunner(model, infos, device, amp=opts.amp, batch_size=opts.batch_size)
    masks = task.stage == 2
    loader = make_loader(reader, model.preprocess, list(range(task.start, task.stop)), opts.batch_size,
                         task.decode_workers if opts.num_workers is None else opts.num_workers, device,
                         task.mask_size if masks else None)
    if masks:
        assert task.thresholds is not None
        for name, ls in layers.items():
            ls.counts = new_mask_counts(ls, reader, task.thresholds[name], task.mask_size, device)
        stats = {n: [ls.counts] for n, ls in layers.items()}
    else:
        stats = {n: ls.pass1() for n, ls in layers.items()}

    def on_batch(next_index: int) -> None:
        if board is not None:
            board.report.remote(task.shard, next_index - task.start)

    problems: dict[int, str] = {}
    tally(loader, runner, stats, problems, on_batch, mask_size=task.mask_size if masks else None)
    states = {name: [{k: v.detach().cpu() for k, v in st.state().items()} for st in stats[name]]
              for name in stats}
    return {"shard": task.shard, "stage": task.stage, "states": states, "problems": problems,
            "device": describe(device), "micro": runner.micro}


class RayExtractJob(ExtractJob):
    """The extraction job with its passes run as shards on Ray. Same options, same run key and the same arrays as
    `ExtractJob`: a run started one way may be finished the other way (each keeps its own checkpoint)."""

    def __init__(self, project_path: str | Path, options: ExtractOptions, address: str = "auto",
                 shards: int | None = None, model: str | int | None = None, dataset: str | int | None = None):
        super().__init__(project_path, options, model=model, dataset=dataset)
        self.address = address
        self.shards = shards
        self.title += " on Ray"

    def _passes(self, project: Project, run_id: int, run_dir: Path, model: Any, reader: Any, ds_row: dict[str, Any],
                layers: dict[str, LayerState], n_images: int, with_masks: bool, mask_size: int, device: torch.device,
                progress: JobProgress) -> PassesDone:
        coordinator = RayCoordinator(self, project, run_id, run_dir, reader, layers, n_images, with_masks, mask_size,
                                     device, progress, project.model(self.model_ref), ds_row)
        return coordinator.run()


class RayCoordinator:
    """Runs an extraction's passes as shards on Ray and merges them into the run's layer states."""

    def __init__(self, job: RayExtractJob, project: Project, run_id: int, run_dir: Path, reader: Any,
                 layers: dict[str, LayerState], n_images: int, with_masks: bool, mask_size: int,
                 device: torch.device, progress: JobProgress, model_row: dict[str, Any], ds_row: dict[str, Any]):
        self.job = job
        self.opts = job.options
        self.project = project
        self.run_id = run_id
        self.state_path = run_dir / RAY_STATE_FILE
        self.reader = reader
        self.layers = layers
        self.n_images = n_images
        self.with_masks = with_masks
        self.mask_size = mask_size
        self.device = device
        self.progress = progress
        self.model_row = model_row
        self.ds_row = ds_row
        self.passes = 2 if with_masks else 1
        self.micro = self.opts.batch_size
        self.problems: dict[int, str] = {}
        self.mask_problems: dict[int, str] = {}
        self.decode_workers = 0
        self.devices: set[str] = set()

    # ---- checkpoint ----------------------------------------------------------------------------------------
    def _checkpoint(self, stage: int, plan: list[tuple[int, int]], merged: set[int]) -> None:
        for ls in self.layers.values():
            ls.pooled.flush()  # rows first: the checkpoint must never name a shard whose rows are not on disk
        tensors: dict[str, torch.Tensor] = {}
        for name, ls in self.layers.items():
            p = safe_name(name) + "/"
            if stage == 1:
                tensors.update({p + "q/" + k: v for k, v in ls.quant.state().items()})
                tensors.update({p + "k/" + k: v for k, v in ls.topk.state().items()})
            elif ls.counts is not None:
                tensors[p + "thresholds"] = ls.counts.thresholds
                tensors.update({p + "c/" + k: v for k, v in ls.counts.state().items()})
        arrays.save_state(self.state_path, tensors, {
            "stage": stage, "plan": [list(r) for r in plan], "merged": sorted(merged),
            "problems": {str(k): v for k, v in self.problems.items()},
            "mask_problems": {str(k): v for k, v in self.mask_problems.items()},
        })
        done = (stage - 1) * self.n_images + sum(b - a for i, (a, b) in enumerate(plan) if i in merged)
        self.project.update_run(self.run_id, done=done, total=self.n_images * self.passes,
                                message=f"pass {stage} of {self.passes}: {len(merged)} of {len(plan)} shards merged")

    def _resume(self) -> tuple[int, list[tuple[int, int]] | None, set[int]]:
        if not self.state_path.exists():
            return 1, None, set()
        tensors, meta = arrays.load_state(self.state_path)
        stage = int(meta["stage"])
        self.problems = {int(k): v for k, v in meta.get("problems", {}).items()}
        self.mask_problems = {int(k): v for k, v in meta.get("mask_problems", {}).items()}
        for name, ls in self.layers.items():
            p = safe_name(name) + "/"

            def part(prefix: str) -> dict[str, torch.Tensor]:
                return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

            if stage == 1:
                ls.quant.load_state(part(p + "q/"))
                ls.topk.load_state(part(p + "k/"))
            elif self.with_masks:
                ls.counts = new_mask_counts(ls, self.reader, tensors[p + "thresholds"], self.mask_size, self.device)
                ls.counts.load_state(part(p + "c/"))
        merged = {int(i) for i in meta["merged"]}
        log.info("resuming run %d on Ray at pass %d with %d shards merged", self.run_id, stage, len(merged))
        return stage, [(int(a), int(b)) for a, b in meta["plan"]], merged

    # ---- the passes ----------------------------------------------------------------------------------------
    def run(self) -> PassesDone:
        ray, started = connect(self.job.address)
        try:
            return self._run(ray)
        finally:
            if started:
                ray.shutdown()

    def _run(self, ray: Any) -> PassesDone:
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0)) if self.opts.device != "cpu" else 0
        slots = gpus or max(1, int(resources.get("CPU", 1)))
        stage, plan, merged = self._resume()
        if plan is None:
            plan = shard_plan(self.n_images, self.job.shards or SHARDS_PER_SLOT * slots, self.opts.batch_size)
        done_at_start = (stage - 1) * self.n_images + sum(b - a for i, (a, b) in enumerate(plan) if i in merged)
        # One GPU per task where the cluster has GPUs: each worker then has its own device, and its share of the
        # CPUs (at most 8) to decode images for it. Without GPUs, a task is one CPU that decodes for itself.
        cpus = max(1, min(8, int(resources.get("CPU", 1)) // gpus)) if gpus else 1
        self.decode_workers = cpus - 1
        resource = {"num_gpus": 1, "num_cpus": cpus} if gpus else {"num_cpus": 1}
        remote = ray.remote(run_shard).options(max_retries=TASK_RETRIES, **resource)
        log.info("extracting on Ray: %d shards over %d %s slots", len(plan), slots, "GPU" if gpus else "CPU")
        if stage == 1:
            self._stage(ray, remote, 1, plan, merged)
            self.job.write_pass1(self.layers)
            if self.with_masks:
                for ls in self.layers.values():
                    ls.counts = new_mask_counts(ls, self.reader, self.job.thresholds(ls), self.mask_size, self.device)
            stage, merged = 2, set()
            self._checkpoint(2, plan, merged)
        if self.with_masks:
            self._stage(ray, remote, 2, plan, merged)
            self.job.write_pass2(self.layers, self.reader)
        where = ", ".join(sorted(self.devices)) or "workers"
        return PassesDone(self.problems, self.mask_problems, done_at_start, self.micro,
                          f"Ray, {len(plan)} shards on {where}")

    def _stage(self, ray: Any, remote: Any, stage: int, plan: list[tuple[int, int]], merged: set[int]) -> None:
        from ray.exceptions import RayError

        message = "pass 1: activations, quantiles, exemplars" if stage == 1 else "pass 2: mask overlap counts"
        sizes = [b - a for a, b in plan]
        base = (stage - 1) * self.n_images
        total = self.n_images * self.passes
        self.progress.begin_stage(f"{message} (Ray)", base + sum(sizes[i] for i in merged))
        thresholds = None
        if stage == 2:  # U floats per layer: small enough to travel with each task
            thresholds = {n: ls.counts.thresholds.cpu() for n, ls in self.layers.items() if ls.counts is not None}
        board = ray.remote(ProgressBoard).options(num_cpus=0).remote()
        layer_rows = [ls.info for ls in self.layers.values()]
        pending: dict[Any, int] = {}
        for i, (a, b) in enumerate(plan):
            if i in merged:
                continue
            task = ShardTask(shard=i, start=a, stop=b, stage=stage, model_row=self.model_row, ds_row=self.ds_row,
                             layer_rows=layer_rows, options=self.opts, n_images=self.n_images,
                             mask_size=self.mask_size, thresholds=thresholds, decode_workers=self.decode_workers)
            pending[remote.remote(task, board)] = i
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
                for ref in ready:
                    shard = pending.pop(ref)
                    self._merge(stage, self._get(ray, ref))
                    merged.add(shard)
                    self._checkpoint(stage, plan, merged)
                try:
                    running = ray.get(board.snapshot.remote(), timeout=5)
                except (RayError, TimeoutError):  # progress is best effort; the shards' results are what counts
                    running = {}
                done = sum(sizes[i] for i in merged)
                done += sum(min(n, sizes[i]) for i, n in running.items() if i not in merged)
                self.progress.update(base + done, total, f"{message}: {len(merged)} of {len(plan)} shards")
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
        finally:
            ray.kill(board)

    @staticmethod
    def _get(ray: Any, ref: Any) -> dict[str, Any]:
        from ray.exceptions import RayTaskError

        try:
            return ray.get(ref)
        except RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, (NeuronStudioError, Cancelled)):
                raise cause from None
            raise JobError(f"a shard failed on a Ray worker: {cause or exc}",
                           fix="see the log for the worker's traceback; run again to resume") from exc

    def _merge(self, stage: int, out: dict[str, Any]) -> None:
        for name, states in out["states"].items():
            ls = self.layers[name]
            stats = ls.pass1() if stage == 1 else [ls.counts]
            for st, state in zip(stats, states):
                st.merge(state)
        (self.problems if stage == 1 else self.mask_problems).update(out["problems"])
        self.micro = min(self.micro, int(out["micro"]))
        self.devices.add(out["device"])



# ---- labeling: the units of a slow labeler split over Ray workers -----------------------------------------------

UNIT_SPLIT_METHODS = ("compexp",)  # per-unit searches over mask batches: each unit's labels depend on that unit only


@dataclass
class LabelTask:
    """One group of units for a worker: the job and the rows its inputs come from, never the project."""

    job: LabelJob  # its batch size, decoding workers and device preference
    method: str
    params: dict[str, Any]
    units: list[int]
    concepts: list[Any]
    sources: LabelSources


def run_label_units(task: LabelTask) -> Any:
    """A labeler over some units on a worker: the mask batches are read again from the model and the dataset, and
    only these units' maps are kept; the labels come back numbered as in the whole layer."""
    import labelers.base as lb

    src = task.sources
    device = pick_device(task.job.device)
    reader = open_project_dataset(src.ds_row)
    model = load_project_model(src.model_row, device)
    rows = np.nonzero(src.results.valid)[0]
    from app.engine.inputs import InputOptions, mask_batches

    every = mask_batches(src.layer_row, src.model_row, src.ds_row, src.results, rows, reader, model, device,
                         InputOptions(batch_size=task.job.batch_size, num_workers=task.job.num_workers))
    keep = torch.tensor(task.units, dtype=torch.int64)

    def batches() -> Any:
        for b in every():
            yield dataclasses.replace(b, unit_masks=b.unit_masks[:, keep.to(b.unit_masks.device)])

    inputs = lb.LabelerInputs(layer=src.layer_row["name"], num_units=len(task.units), device=device,
                              concepts=task.concepts, mask_batches=batches)
    out = lb.get(task.method)(inputs, task.params, JobProgress())
    for label in out.labels:
        label.unit = task.units[label.unit]
    return out


def _unit_groups(units: int, groups: int) -> list[list[int]]:
    groups = max(1, min(groups, units))
    return [list(range(units))[round(i * units / groups):round((i + 1) * units / groups)] for i in range(groups)]


class RayLabelJob(LabelJob):
    """A labeling job whose units are split over Ray workers (for the methods in `UNIT_SPLIT_METHODS`; the
    others, already fast, run in this process). Labels equal the single-process run's."""

    def __init__(self, *args: Any, address: str = "auto", groups: int | None = None, **kw: Any):
        super().__init__(*args, **kw)
        self.address = address
        self.groups = groups
        self.title += " on Ray"

    def _run_labeler(self, labeler: Any, inputs: Any, params: dict[str, Any], progress: JobProgress,
                     sources: Any) -> Any:
        if labeler.name not in UNIT_SPLIT_METHODS:
            return labeler(inputs, params, progress)
        import labelers.base as lb

        ray, started = connect(self.address)
        try:
            slots = max(1, int(ray.cluster_resources().get("CPU", 1)))
            groups = _unit_groups(inputs.num_units, self.groups or slots)
            plain = LabelJob(self.project_path, self.method, self.layer, self.params, model=self.model_ref,
                             device=self.device, batch_size=self.batch_size, num_workers=self.num_workers or 0,
                             extraction_run=self.extraction_run)
            remote = ray.remote(run_label_units).options(max_retries=TASK_RETRIES, num_cpus=1)
            pending = [remote.remote(LabelTask(plain, labeler.name, params, g, inputs.concepts, sources))
                       for g in groups]
            parts: list[Any] = []
            try:
                left = list(pending)
                while left:
                    ready, left = ray.wait(left, num_returns=1, timeout=0.5)
                    parts += [RayCoordinator._get(ray, r) for r in ready]
                    progress.update(len(parts), len(groups), f"{len(parts)} of {len(groups)} unit groups")
            except BaseException:
                for ref in pending:
                    ray.cancel(ref, force=True)
                raise
        finally:
            if started:
                ray.shutdown()
        labels = sorted((lab for part in parts for lab in part.labels), key=lambda lab: (lab.unit, lab.rank))
        summary = dict(parts[0].summary)
        for key in ("units", "units_labeled"):
            if all(key in part.summary for part in parts):
                summary[key] = sum(part.summary[key] for part in parts)
        summary["ray_unit_groups"] = len(groups)
        return lb.LabelingResult(labels, summary)
