"""The root of every error a user can cause. It lives in `labelers/` (which imports nothing from `app`) so that both
`app.errors.NeuronStudioError` and `labelers.base.LabelerError` derive from it, and the CLI and the window catch
one class to show a message instead of a traceback."""
from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix; `str(exc)` says what is wrong and what to do."""
