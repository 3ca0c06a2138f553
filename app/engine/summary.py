"""How a finished extraction is told to a user, in the same words on the command line and in the window (Qt-free
and torch-free: the window imports it at start)."""
from __future__ import annotations

import math
from typing import Any

MAX_LISTED = 100  # problems kept in a run's report; all of them are in the project (its image problems)


def report_summary(rep: Any) -> str:
    """One line about a finished extraction (`app.engine.extract.ExtractReport`)."""
    left_out = f", masks of {rep.masks_skipped} left out" if getattr(rep, "masks_skipped", 0) else ""
    rate_value = rep.images_per_second
    if rate_value and math.isfinite(rate_value):
        rate = f" ({rate_value:.1f} images/s)"
    else:
        rate = " (resumed: nothing was left to compute)" if getattr(rep, "resumed", False) else ""
    return (f"{len(rep.layers)} layer(s) over {rep.images} images ({rep.skipped} skipped{left_out}) on "
            f"{rep.device} in {rep.seconds:.1f} s{rate}")


def report_problems(rep: Any) -> list[str]:
    """Every problem of the run worth a line: unreadable images, then images whose masks were left out."""
    listed = list(getattr(rep, "problems", []) or [])
    more = rep.skipped + getattr(rep, "masks_skipped", 0) - len(listed)
    return listed + ([f"... and {more} more (all of them are in the project's image problems of this run)"]
                     if more > 0 else [])
