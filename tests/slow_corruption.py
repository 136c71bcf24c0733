"""A test plugin: a corruption that sleeps, so a run can be killed half-way."""

import time

from ambient_ray.corruptions import Param, register


@register("slow", seconds=Param(float, 0.5, lo=0.0))
def slow(x, rngs, seconds):
    time.sleep(seconds)
    return 1.0 - x


@register("crash")
def crash(x, rngs):
    """Kills the worker process: a task failure that Ray cannot recover from."""
    import os

    os._exit(3)
