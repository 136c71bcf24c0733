"""Timing two (or more) sides of a benchmark fairly: interleaved repeats, medians, their spread.

Timing each side once puts warm-up and machine noise into the ratio (train_overhead.py once gave the
plain loop 111.9 then 104.7 ms/step on two back-to-back runs). ``interleave`` runs one untimed
warm-up round of every side, then ``repeats`` rounds of side A, side B, ... in turn, so a slow spell of
the machine lands on every side alike; ``Stat`` keeps every figure and reports the median and the
spread (min..max); ``ratio`` is the ratio of the medians.

Each side is a function of the round number (``-1`` for the warm-up) that returns the figure it
measured (seconds per step, seconds per image, ...), so a side may time only part of what it does.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Stat:
    name: str
    values: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def spread(self) -> float:
        """(max - min) / median: how far apart the repeats were."""
        return (max(self.values) - min(self.values)) / self.median if self.median else float("nan")

    def show(self, scale: float = 1.0, unit: str = "") -> str:
        """``median [min..max] unit (n=K, spread S%)``, the values times ``scale``."""
        lo, hi = min(self.values) * scale, max(self.values) * scale
        return (
            f"{self.median * scale:9.2f} [{lo:.2f}..{hi:.2f}] {unit} (n={len(self.values)}, spread {self.spread:.1%})"
        )


def interleave(
    sides: dict[str, Callable[[int], float]], repeats: int, warmup: bool = True, log: bool = True
) -> dict[str, Stat]:
    """Each side once untimed (``warmup``), then ``repeats`` rounds of all sides in turn; the kept figures."""
    stats = {name: Stat(name) for name in sides}
    if warmup:
        for name, fn in sides.items():
            fn(-1)
            if log:
                print(f"  warm-up: {name}", flush=True)
    for r in range(repeats):
        for name, fn in sides.items():
            stats[name].values.append(fn(r))
            if log:
                print(f"  round {r + 1}/{repeats}: {name} {stats[name].values[-1]:.4g}", flush=True)
    return stats


def ratio(a: Stat, b: Stat) -> float:
    """Ratio of the medians, a / b."""
    return a.median / b.median
