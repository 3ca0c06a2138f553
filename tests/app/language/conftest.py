"""The engine tests' tiny project (a small CNN, a COCO dataset with masks and captions), reused here."""
from tests.app.engine.conftest import tiny_model, tiny_project  # noqa: F401
