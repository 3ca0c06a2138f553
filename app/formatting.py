"""How numbers read on screen and in reports: one home, so a p-value looks the same in the table, the unit view,
the board and the HTML report."""
from __future__ import annotations

import math

# Below this a p-value only says "overwhelming": closed-form rank tests are not accurate that far out, and doubles
# turn subnormal (3.5e-318) or zero there. Printed as a floor rather than as digits that mean nothing.
P_FLOOR = 1e-300


def format_p(p: float | None) -> str:
    """A p-value for people: '' when unknown, '< 1e-300' at the floor (zero included), two significant digits in
    scientific notation below 0.001, three decimals above."""
    if p is None:
        return ""
    p = float(p)
    if not math.isfinite(p):
        return ""
    if p < P_FLOOR:
        return f"< {P_FLOOR:.0e}".replace("e-0", "e-")
    if p < 1e-3:
        return f"{p:.1e}".replace("e-0", "e-")
    return f"{p:.3f}"
