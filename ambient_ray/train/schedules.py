"""Learning-rate schedules (multipliers of ``optim.lr`` per optimizer step), chosen by ``optim.decay``.

Each is ``f(step) -> factor`` after a linear warm-up over ``optim.warmup_steps``:
``cosine`` and ``linear`` decay to 0 at the last step, ``none`` keeps 1, and ``inv_sqrt`` is EDM2's
1/sqrt(max(t / t_ref, 1)) with t_ref = ``optim.ref_steps`` (Karras et al. 2024, Eq. 16).
"""

from __future__ import annotations

import math
from typing import Callable

from ambient_ray.registry import Registry

Schedule = Callable[[int, int, object], float]  # (step after warm-up, steps after warm-up, OptimConfig) -> factor
SCHEDULES: Registry[Schedule] = Registry("optim.decay")
SCHEDULES.register("none", lambda t, n, o: 1.0)
SCHEDULES.register("cosine", lambda t, n, o: 0.5 * (1 + math.cos(math.pi * min(1.0, t / max(1, n)))))
SCHEDULES.register("linear", lambda t, n, o: 1.0 - min(1.0, t / max(1, n)))
SCHEDULES.register("inv_sqrt", lambda t, n, o: 1.0 / math.sqrt(max((t + o.warmup_steps) / o.ref_steps, 1.0)))


def lr_lambda(cfg, steps: int) -> Callable[[int], float]:
    """The factor of ``cfg.lr`` at each step of a run of ``steps`` optimizer steps (``cfg``: an OptimConfig)."""
    schedule = SCHEDULES.get(cfg.decay)

    def f(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        return schedule(step - cfg.warmup_steps, steps - cfg.warmup_steps, cfg)

    return f
