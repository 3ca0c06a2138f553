"""The same label command started twice at once computes each job once: the run is claimed atomically before
computing, and the second process waits for the first and takes its result."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from app.engine.extract import ExtractJob, ExtractOptions
from app.jobs import JobProgress
from app.project.store import Project

ROOT = Path(__file__).resolve().parents[3]

RUNNER = """
import os, sys, time
from pathlib import Path
import labelers.base as lb
from app.engine.labeling import LabelJob
from app.jobs import JobProgress

proj, flags, me = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
real_call = lb.Labeler.__call__

def slow_call(self, inputs, params=None, progress=None):
    # Computing takes a while (up to 2 s, or until the other process computes too: the defect, seen at once).
    (flags / f"computing-{self.name}-{me}").touch()
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline and len(list(flags.glob(f"computing-{self.name}-*"))) < 2:
        time.sleep(0.02)
    return real_call(self, inputs, params, progress)

lb.Labeler.__call__ = slow_call
(flags / f"ready-{me}").touch()
while len(list(flags.glob("ready-*"))) < 2:  # both start together
    time.sleep(0.01)
for method in ("netdissect", "invert"):
    rep = LabelJob(proj, method, "conv1", device="cpu", num_workers=0).execute(JobProgress())
    print(method, rep.labels, flush=True)
"""


@pytest.mark.slow  # two processes that import torch
def test_two_identical_label_commands_compute_each_job_once(tiny_project, tmp_path):
    ExtractJob(tiny_project, ExtractOptions(layers=["conv1"], batch_size=8, num_workers=0, device="cpu",
                                            mask_stats=True)).execute(JobProgress())
    flags = tmp_path / "flags"
    flags.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", RUNNER, str(tiny_project), str(flags), name], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for name in ("a", "b")]
    outs = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        outs.append(out.split())
    assert outs[0] == outs[1]  # the waiting process reports the same labels
    computed = sorted(p.name.rsplit("-", 1)[0] for p in flags.glob("computing-*"))
    assert computed == ["computing-invert", "computing-netdissect"]  # each job computed by one process only
    with Project.open(tiny_project) as p:
        runs = p.runs("label")
    assert len(runs) == 2 and all(r.status == "done" for r in runs)


def test_claim_is_taken_over_from_a_dead_process(tiny_project):
    with Project.open(tiny_project) as p:
        run_id, other = p.claim_run(kind="label", key="k", params={})
        assert other is None
        again, other = p.claim_run(kind="label", key="k", params={})
        assert (again, other) == (run_id, None)  # this process already owns it
        p.finish_run(run_id, "interrupted")
        taken, other = p.claim_run(kind="label", key="k", params={})
        assert (taken, other) == (run_id, None) and p.run(run_id).status == "running"


LOADER = """
import sys, time
from pathlib import Path
import torch
from app.engine.extract import make_loader
from app.sources.datasets import open_dataset
from app.sources.preprocess import Preprocess

reader = open_dataset(sys.argv[1])
pre = Preprocess.from_dict({"resize": 16, "crop": 16, "mean": (0.5,) * 3, "std": (0.25,) * 3})
it = iter(make_loader(reader, pre, list(range(len(reader.images))), 2, 1, torch.device("cpu")))
next(it)
print(" ".join(str(w.pid) for w in it._workers), flush=True)
time.sleep(120)
"""


FORKSERVER_LOADER = """
import multiprocessing as mp
import sys
import torch
from app.engine.extract import make_loader
from app.sources.datasets import open_dataset
from app.sources.preprocess import Preprocess

if __name__ == "__main__":
    # what a job the window starts inherits: its fork server's start method as the process default
    mp.set_start_method("forkserver", force=True)
    reader = open_dataset(sys.argv[1])
    pre = Preprocess.from_dict({"resize": 16, "crop": 16, "mean": (0.5,) * 3, "std": (0.25,) * 3})
    n = sum(len(b["index"]) for b in make_loader(reader, pre, list(range(len(reader.images))), 4, 2,
                                                   torch.device("cpu")))
    print(n, flush=True)
"""


@pytest.mark.slow  # a process that imports torch
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_decoding_workers_start_in_a_process_whose_default_start_method_is_forkserver(tmp_path):
    """The window's jobs run in processes started by a fork server; their decoding workers used to be refused at
    start (their parent was the fork server, not the job) and every extraction from the window failed."""
    from tests.app.engine.conftest import write_coco

    write_coco(tmp_path / "c", 12)
    script = tmp_path / "loader.py"
    script.write_text(FORKSERVER_LOADER)
    out = subprocess.run([sys.executable, str(script), str(tmp_path / "c")], cwd=ROOT, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["12"]


@pytest.mark.slow  # a process that imports torch
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_dataloader_worker_dies_with_its_killed_parent(tmp_path):
    import signal
    import time

    from tests.app.engine.conftest import write_coco

    write_coco(tmp_path / "c", 24)
    proc = subprocess.Popen([sys.executable, "-c", LOADER, str(tmp_path / "c")], cwd=ROOT, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE)
    try:
        workers = [int(x) for x in proc.stdout.readline().split()]
        assert workers
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    killed = time.monotonic()
    # A worker only noticed its parent's death at its next 5 s status check; now the kernel ends it at once.
    while any(Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]
              for pid in workers) and time.monotonic() - killed < 10:
        time.sleep(0.05)
    assert time.monotonic() - killed < 2.5
