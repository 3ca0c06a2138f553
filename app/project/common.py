"""Small value helpers the store and its table-family modules share (a module of its own so those modules do not
import the store, which imports them)."""
from __future__ import annotations

import datetime as _dt
import json
from typing import Any


def now() -> str:
    """The current UTC time as the ISO text every timestamp column holds."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def to_json(value: Any) -> str | None:
    """A JSON column's text (keys sorted, so equal values store equal text); None stays NULL."""
    return None if value is None else json.dumps(value, sort_keys=True)
