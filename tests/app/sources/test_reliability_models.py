"""Reliability regressions of weights loading: a refusal explained by what the file holds, never by torch's
wording, and never with its advice to load with weights_only=False."""
from __future__ import annotations

import os
import pickle

import pytest
import torch

import app.sources.models as models
from app.errors import ModelLoadError
from app.sources.models import _first_line, _read_state_dict


class Payload:
    def __reduce__(self):
        return (os.system, ("echo should-never-run",))


def _refusal(path) -> str:
    with pytest.raises(ModelLoadError) as err:
        _read_state_dict(path)
    text = str(err.value)
    assert "weights_only" not in text and "will likely succeed" not in text
    return text


@pytest.mark.parametrize("protocol", [0, 2, 4])
def test_code_carrying_pickle_is_named_as_such(tmp_path, protocol):
    plain = tmp_path / f"evil{protocol}.pth"
    with open(plain, "wb") as fh:
        pickle.dump({"w": Payload()}, fh, protocol=protocol)
    text = _refusal(plain)
    assert "holds Python objects" in text and "system" in text and "truncated" not in text


def test_code_carrying_torch_save_is_named_whatever_torch_says(tmp_path, monkeypatch):
    path = tmp_path / "evil.pth"
    torch.save({"w": Payload()}, path)
    assert "holds Python objects" in _refusal(path)

    # A later torch rewording its refusal (and its advice) must not change the diagnosis.
    def reworded(*a, **k):
        raise pickle.UnpicklingError("Loading failed. Re-run with weights_only=False, it will likely succeed.")

    monkeypatch.setattr(torch, "load", reworded)
    text = _refusal(path)
    assert "holds Python objects" in text and ".system" in text


def test_random_bytes_are_not_a_weights_file(tmp_path):
    path = tmp_path / "noise.pth"
    path.write_bytes(bytes((i * 7919 + 13) % 251 for i in range(4096)))  # fixed junk: reproducible
    text = _refusal(path)
    assert "not a weights file" in text and "Python objects" not in text


def test_truncated_checkpoint_is_truncated_without_torch_advice(tmp_path):
    good = tmp_path / "good.pth"
    torch.save({"w": torch.zeros(4)}, good)
    half = tmp_path / "half.pth"
    half.write_bytes(good.read_bytes()[:200])
    text = _refusal(half)
    assert "truncated or corrupt" in text


def test_first_line_drops_unsafe_advice_and_cuts_at_a_word():
    exc = pickle.UnpicklingError(
        "Weights only load failed. Re-running `torch.load` with `weights_only` set to `False` will likely succeed, "
        "but it can result in arbitrary code execution.\n\nUnsupported operand 149")
    assert _first_line(exc) == "Unsupported operand 149"
    long = RuntimeError("word " * 100 + "tail")
    out = _first_line(long, limit=53)
    assert out.endswith("word ...") and len(out) <= 57
    assert models._first_line(RuntimeError("short")) == "short"
