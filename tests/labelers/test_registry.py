"""The method registry: a method module that is absent is left out; one that fails to import is an error."""
import importlib

import pytest

import labelers.base as lb


def _failing(name, missing):
    real = importlib.import_module

    def fake(modname, *args, **kwargs):
        if modname == name:
            raise ModuleNotFoundError(f"No module named {missing!r}", name=missing)
        return real(modname, *args, **kwargs)

    return fake


def test_an_absent_method_module_is_left_out(monkeypatch):
    monkeypatch.setattr(importlib, "import_module", _failing("labelers.texplain", "labelers.texplain"))
    assert "netdissect" in lb.available()


def test_a_method_module_that_fails_to_import_is_an_error(monkeypatch):
    monkeypatch.setattr(importlib, "import_module", _failing("labelers.textsum", "some_dependency"))
    with pytest.raises(ModuleNotFoundError, match="some_dependency"):
        lb.available()
