"""Text: counts as the lines docembed prints say them ("1 unit", "2 units")."""

from __future__ import annotations


def plural(count: int, noun: str, many: str | None = None) -> str:
    """``count`` and ``noun``, in the plural unless ``count`` is 1: ``plural(1, "unit")`` is "1 unit",
    ``plural(0, "unit")`` "0 units". ``many``: the plural where it is not ``noun`` + "s"
    (``plural(n, "process", "processes")``). The noun may be several words: its last takes the "s"."""
    return f"{count} {noun if count == 1 else (many or noun + 's')}"
