"""Time from `neuron-studio demo` to a populated units table, against the window opening on an empty project.

    python benchmarks/demo_first_window.py [--images 3000] [--device cpu] [--timeout 600]

Each measurement starts a fresh Python process (as a user's command does) that opens the main window offscreen:
(1) baseline: the window opens on an empty project and has painted; (2) demo: the window opens, the demo's setup
job (dataset, the shipped weights, project) and its extraction job run in the window's child-process job runner,
and the units table has rows. Prints both times from process start, their ratio, when the first labels showed up,
the load average before and after, and the CPU time of the process and its children (the job processes).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def child(mode: str, folder: Path, images: int, device: str, t_start: float) -> None:
    """Runs in the measured process: open the window, report times as JSON lines on stdout."""
    import resource

    from PySide6.QtCore import QTimer
    from PySide6.QtWidgets import QApplication

    from app.project.store import Project
    from app.ui.main_window import MainWindow
    from app.ui.settings import Preferences

    def cpu() -> dict[str, float]:
        me = resource.getrusage(resource.RUSAGE_SELF)
        return {"cpu_self": me.ru_utime + me.ru_stime}

    job_cpu: dict[int, float] = {}  # CPU seconds of every process below this one (the jobs), last seen

    def sample_jobs() -> None:
        """On Linux, the CPU time of this process's descendants from /proc: the job processes are children of a
        fork server, which os._exit does not reap, so getrusage cannot see them. Sampled every 0.25 s, so it
        misses at most that much of each job's end."""
        tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        parent: dict[int, int] = {}
        times: dict[int, float] = {}
        for d in Path("/proc").glob("[0-9]*"):
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parent[int(d.name)] = int(fields[1])
            times[int(d.name)] = (int(fields[11]) + int(fields[12])) / tick
        me = os.getpid()
        for pid in times:
            up, seen = parent.get(pid), set()
            while up and up not in seen and up != me:
                seen.add(up)
                up = parent.get(up)
            if up == me:
                job_cpu[pid] = max(job_cpu.get(pid, 0.0), times[pid])

    def say(event: str, **extra: object) -> None:
        print(json.dumps({"event": event, "t": time.time() - t_start, **cpu(),
                          "cpu_jobs": round(sum(job_cpu.values()), 1), **extra}), flush=True)

    import logging

    # stderr: shown on failure; the job lines give the timeline (their time since the measured process started)
    logging.basicConfig(level=logging.INFO, format="%(created).3f %(name)s: %(message)s")
    app = QApplication.instance() or QApplication(["bench"])
    window = MainWindow(prefs=Preferences(path=folder / "prefs.json"))
    window.show()
    seen: set[str] = set()

    last = [0.0]
    last_sample = [0.0]

    def poll() -> None:
        rows = window.units.model.rowCount()
        if time.time() - last_sample[0] >= 0.25:
            last_sample[0] = time.time()
            sample_jobs()
        if os.environ.get("BENCH_DEBUG") and time.time() - last[0] > 3:
            last[0] = time.time()
            print("debug", window.project_path, window.model_id, window.layer_id, rows, file=sys.stderr, flush=True)
        if mode == "empty" and window.project is not None:
            say("window", rows=rows)
            app.quit()
        if mode == "demo" and rows:
            say("units table populated", rows=rows)
            # Measured: leave at once (app.quit() can wait behind the jobs' relays). Queued jobs are cancelled; the
            # running one sees its stop pipe close and ends.
            window.manager.cancel_all()
            os._exit(0)

    timer = QTimer()
    timer.timeout.connect(poll)
    timer.start(20)
    if mode == "empty":
        Project.create(folder / "empty.nstudio").close()
        QTimer.singleShot(0, lambda: window.open_project(folder / "empty.nstudio"))
    else:
        QTimer.singleShot(0, lambda: window.start_demo(folder / "demo", n_images=images, device=device))
    app.exec()
    os._exit(0)


def timeline(stderr: str, t0: float) -> str:
    """The window's job lines ("run <title>: process N started/ended"), each at its second since the start."""
    out = []
    for line in stderr.splitlines():
        stamp, _, rest = line.partition(" ")
        if "app.ui.workers: run" in rest:
            try:
                out.append(f"  {float(stamp) - t0:6.1f} s  {rest.split(': run ', 1)[1]}")
            except ValueError:
                out.append("  " + line)
    return "\n".join(out)


def measure(mode: str, images: int, device: str, timeout: float) -> list[dict]:
    import resource

    kids0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, QT_QPA_PLATFORM="offscreen", PYTHONPATH=str(ROOT))
        t0 = time.time()
        try:
            proc = subprocess.run([sys.executable, __file__, "--child", mode, "--folder", tmp, "--images",
                                   str(images), "--device", device, "--t0", repr(t0)], env=env, capture_output=True,
                                  text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            err = exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
            print(f"{mode}: no result within {timeout:.0f} s; the window's jobs so far:")
            print(timeline(err, t0))
            raise SystemExit(1) from None
        if mode == "demo":  # when each job started and ended, for the record
            print(timeline(proc.stderr, t0))
        events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
        if not events:
            raise SystemExit(f"{mode} run reported nothing (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        kids1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        # the measured process, its job processes and their fork server, until it quit and its jobs were cancelled
        events[-1]["cpu_tree"] = (kids1.ru_utime + kids1.ru_stime) - (kids0.ru_utime + kids0.ru_stime)
        events[-1]["wall_total"] = time.time() - t0
        return events


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--child")
    ap.add_argument("--folder")
    ap.add_argument("--t0", type=float)
    args = ap.parse_args()
    if args.child:
        child(args.child, Path(args.folder), args.images, args.device, args.t0)
        return
    load0 = os.getloadavg()
    empty = measure("empty", args.images, args.device, args.timeout)
    demo = measure("demo", args.images, args.device, args.timeout)
    load1 = os.getloadavg()
    base = next(e for e in empty if e["event"] == "window")
    table = next((e for e in demo if e["event"] == "units table populated"), None)
    print(f"cores: {os.cpu_count()}, load average before {load0[0]:.2f}, after {load1[0]:.2f}")
    print(f"window open on an empty project: {base['t']:6.1f} s (cpu {base['cpu_self']:.1f} s)")
    if table is None:
        print("the units table never filled:", demo)
        return
    print(f"demo, units table populated:     {table['t']:6.1f} s ({table['rows']} units; cpu {table['cpu_self']:.1f} s "
          f"in the window's process, {table['cpu_jobs']:.1f} s in its job processes)")
    # On a shared machine the wall time grows with the load; the CPU time of the whole tree is what an idle machine
    # would need at least, one core's worth (the window's process and the jobs mostly take turns).
    print(f"cpu time of the window and its jobs until then: {table['cpu_self'] + table['cpu_jobs']:.1f} s")
    print(f"ratio demo / empty window: {table['t'] / base['t']:.1f}x")


if __name__ == "__main__":
    main()
