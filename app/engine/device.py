"""Which device a job runs on: CUDA, then Apple's MPS, then the CPU, unless the user names one."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from app.errors import JobError


def pick_device(preference: str = "auto") -> torch.device:
    pref = (preference or "auto").lower()
    if pref == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(pref)
    except RuntimeError as exc:
        raise JobError(f"{preference!r} is not a device name", fix="use auto, cpu, cuda, cuda:N or mps") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise JobError("CUDA was asked for but no CUDA GPU is available", fix="use --device cpu or auto")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise JobError("MPS was asked for but is not available here", fix="use --device cpu or auto")
    return dev


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"GPU: {torch.cuda.get_device_name(device)}"
    if device.type == "mps":
        return "GPU: Apple MPS"
    return f"CPU ({torch.get_num_threads()} threads)"


@contextlib.contextmanager
def cpu_threads(n: int | None) -> Iterator[None]:
    """torch's CPU threads set to `n` for a while (None or 0: left as they are), then put back as they were."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
