"""A stage's progress line, free of Ray (and of torch): the pure-torch modules (models/, sampling/) use it too.

:class:`Progress` draws a tqdm bar when stderr is a terminal (:func:`on_terminal`), else prints one plain line
per ``INTERVAL_S`` on stdout, so that a job's log holds lines, never carriage-return bar frames.
:mod:`ambient_ray.io.ray_runtime` re-exports these names.
"""

from __future__ import annotations

import sys
import time

INTERVAL_S = 10.0  # one progress line per interval off a terminal


def on_terminal() -> bool:
    """Whether progress bars may be drawn: tqdm writes to stderr, so only when stderr is a terminal (a job's
    log gets the plain lines of :class:`Progress` instead of carriage-return bar frames)."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


class Progress:
    """A stage's progress over ``total`` items: a bar on a terminal (:func:`on_terminal`), else a line per
    ``INTERVAL_S`` on stdout. Also a context manager (closes the bar)."""

    def __init__(self, label: str, total: int, unit: str, enabled: bool = True):
        self.label, self.total, self.unit, self.n = label, total, unit, 0
        self.t0 = self.last = time.perf_counter()
        self.bar = None
        self.postfix = ""
        if enabled and on_terminal():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=label, unit=f" {unit}", leave=False, dynamic_ncols=True)
        self.enabled = enabled

    def set_postfix(self, **values) -> None:
        """Values shown after the count (the bar's postfix, or the end of the plain line)."""
        if self.bar is not None:
            self.bar.set_postfix(**values, refresh=False)
        self.postfix = "  " + " ".join(f"{k} {v}" for k, v in values.items()) if values else ""

    def update(self, k: int = 1) -> None:
        self.n += k
        if self.bar is not None:
            self.bar.update(k)
            return
        now = time.perf_counter()
        if self.enabled and now - self.last >= INTERVAL_S and self.n < self.total:
            self.last = now
            print(f"  {self.label}: {self.n}/{self.total} {self.unit} ({now - self.t0:.0f}s){self.postfix}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
