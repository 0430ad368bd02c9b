"""How long the property-based (Hypothesis) tests search.

Each test names the example count CI runs; ``RINGFENCE_FUZZ_SCALE=N`` multiplies
it, for a longer local search after changing a parser or the session's reading
of replies: ``RINGFENCE_FUZZ_SCALE=50 ./dev.sh test -k 'replies or postgres or classify'``.
"""

from __future__ import annotations

import os

VARIABLE = "RINGFENCE_FUZZ_SCALE"


def examples(count: int) -> int:
    """``count`` times the scale from the environment (1 when unset)."""
    value = os.environ.get(VARIABLE, "1")
    try:
        scale = int(value)
    except ValueError:
        scale = 0
    if scale < 1:
        raise ValueError(f"{VARIABLE} must be a whole number of at least 1, not {value!r}")
    return count * scale
