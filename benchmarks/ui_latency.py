"""How long the window's event loop stalls while runs go (in child processes, or with --threads in threads).

A QTimer asks to fire every 10 ms on the window's thread and records the time between ticks; any gap beyond
10 ms is a pause a user would feel as a frozen window. Meanwhile the window runs, through its jobs panel, an
extraction of one layer and labeling runs of another layer (two at a time), and a simulated user steps through
units every 250 ms (each step loads exemplar thumbnails and a histogram on the pool).

    .venv/bin/python benchmarks/ui_latency.py                # synthetic COCO squares + a small CNN
    .venv/bin/python benchmarks/ui_latency.py --demo /tmp/demo-ui   # the demo's shapes dataset and CNN

    .venv/bin/python benchmarks/ui_latency.py --threads      # the same runs in threads of the window's process

Prints the longest pause and its percentiles, next to the same figures for a few seconds with nothing running
(on a shared machine, other processes' load shows there). Goal: longest pause under 100 ms.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_synthetic(tmp: Path, images: int) -> tuple[Path, list[str], list[str]]:
    from tests.app.ui.conftest import FACTORY, PREPROCESS, write_coco

    from app.project.store import Project
    from app.workspace import add_dataset, add_model

    (tmp / "net.py").write_text(FACTORY)
    write_coco(tmp / "coco", images)
    proj = tmp / "bench.nstudio"
    with Project.create(proj) as p:
        add_model(p, f"python:{tmp / 'net.py'}:make", None, name="tiny", trust_code=True,
                  preprocess_overrides=PREPROCESS)
        add_dataset(p, tmp / "coco", name="coco")
    return proj, ["features.1"], ["features.3"]


def build_from_demo(tmp: Path, demo: Path) -> tuple[Path, list[str], list[str]]:
    from app.demo.pipeline import DATASET_DIR, WEIGHTS_NAME, demo_layers
    from app.project.store import Project
    from app.workspace import add_dataset, add_model

    proj = tmp / "bench.nstudio"
    with Project.create(proj) as p:
        add_model(p, "builtin:shapes_cnn", demo / WEIGHTS_NAME, name="shapes_cnn")
        add_dataset(p, demo / DATASET_DIR, name="shapes")
        layers = demo_layers(p, p.model()["id"])
    return proj, layers[:1], layers[1:2] or layers[:1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--demo", type=Path, help="folder of a built demo (uses its dataset and CNN)")
    ap.add_argument("--images", type=int, default=1500, help="synthetic images (without --demo)")
    ap.add_argument("--workers", type=int, default=None, help="image decoding processes (default: the engine's)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--methods", default="netdissect,invert,compexp,textsum",
                    help="labelers run on the pre-extracted layer")
    ap.add_argument("--idle", type=float, default=5.0, help="seconds of baseline with nothing running")
    ap.add_argument("--threads", action="store_true",
                    help="run the jobs in threads of the window's process instead of child processes (to compare)")
    args = ap.parse_args()

    from PySide6.QtCore import QElapsedTimer, QSettings, QTimer
    from PySide6.QtWidgets import QApplication

    from app.engine.extract import ExtractJob, ExtractOptions
    from app.jobs import JobProgress

    tmp = Path(tempfile.mkdtemp(prefix="ns-ui-latency-"))
    try:
        t0 = time.perf_counter()
        if args.demo:
            proj, labeled, extracted = build_from_demo(tmp, args.demo)
        else:
            proj, labeled, extracted = build_synthetic(tmp, args.images)
        app = QApplication.instance() or QApplication(sys.argv[:1])
        # the layer to label is extracted before measuring (in a run thread, as the window would: torch's compute
        # threads and the decoding workers' fork server start there); the other one is extracted while measuring
        from app.ui.workers import JobThread

        setup = JobThread(ExtractJob(proj, ExtractOptions(layers=labeled, device=args.device,
                                                          num_workers=args.workers)), JobProgress(),
                          in_process=not args.threads)
        setup.start()
        setup.wait()
        print(f"setup: {time.perf_counter() - t0:.1f} s (project {proj})")

        from app.ui.main_window import MainWindow
        from app.ui.settings import Preferences

        prefs = Preferences(path=tmp / "prefs.json")
        prefs.device, prefs.num_workers, prefs.parallel_jobs = args.device, args.workers, 2
        window = MainWindow(prefs=prefs, settings=QSettings(str(tmp / "s.ini"), QSettings.Format.IniFormat),
                            in_process=not args.threads)
        window.confirm = lambda *_: True
        window.report_error = lambda title, text: print(f"error: {title}: {text}")
        window.resize(1500, 950)
        window.show()
        assert window.open_project(proj)

        def spin(seconds: float) -> None:
            end = time.perf_counter() + seconds
            while time.perf_counter() < end:
                app.processEvents()
                time.sleep(0.002)

        while window.device_label.text() == "detecting device...":  # the window's start-up warm-up
            spin(0.1)
        spin(1.0)
        gaps: list[float] = []
        clock = QElapsedTimer()
        clock.start()
        last = [clock.nsecsElapsed()]

        def tick() -> None:
            now = clock.nsecsElapsed()
            gaps.append((now - last[0]) / 1e6)
            last[0] = now

        timer = QTimer()
        timer.setInterval(10)
        timer.timeout.connect(tick)

        # Baseline: the same timer with nothing running, so that a busy machine's own scheduling delays (other
        # processes on the cores) can be told apart from what the runs cost the window.
        timer.start()
        spin(args.idle)
        import numpy as np

        idle = np.asarray(gaps) - 10.0
        gaps.clear()

        window.layer_tree.set_checked(extracted)
        handles = [window.extract_checked(options=ExtractOptions(layers=extracted, device=args.device,
                                                                 num_workers=args.workers))]
        for m in args.methods.split(","):
            handles.append(window.submit_label(labeled[0], m.strip()))
        handles = [h for h in handles if h is not None]
        step = QTimer()
        step.setInterval(250)
        step.timeout.connect(lambda: window.step_unit(1))
        step.start()
        t_run = time.perf_counter()
        while not all(h.state.finished for h in handles):
            app.processEvents()
            time.sleep(0.001)
        seconds = time.perf_counter() - t_run
        step.stop()
        timer.stop()
        for h in handles:
            print(f"  {h.title}: {h.state.value} in {h.elapsed:.1f} s" + (f" ({h.error})" if h.error else ""))
        g = np.asarray(gaps)
        pause = g - 10.0
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        print(f"machine: {os.cpu_count()} cores, load average {load:.1f}")
        print(f"idle window ({args.idle:.0f} s): longest pause {idle.max():.1f} ms, "
              f"p99 {np.percentile(idle, 99):.1f} ms")
        print(f"while the runs went ({seconds:.1f} s, {len(g)} ticks): longest UI pause {pause.max():.1f} ms, "
              f"p99 {np.percentile(pause, 99):.1f} ms, p95 {np.percentile(pause, 95):.1f} ms, "
              f"{int((pause > 50).sum())} pauses > 50 ms, {int((pause > 100).sum())} > 100 ms")
        window.close()
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
