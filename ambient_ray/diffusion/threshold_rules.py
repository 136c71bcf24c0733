"""The names the annotation thresholds take, without torch: the pooling modes and the per-sample σ_min rules
(what the annotate stage's config and ``--help`` need; the thresholds are in
:mod:`ambient_ray.diffusion.thresholds`, which re-exports these)."""

from __future__ import annotations

from typing import Literal

Mode = Literal["per-sample", "per-dataset"]

Rule = Literal["first", "smoothed", "last", "isotonic", "confident", "shrunk"]
RULES: tuple[str, ...] = ("first", "smoothed", "last", "isotonic", "confident", "shrunk")
DRAW_RULES: tuple[str, ...] = ("confident", "shrunk")  # the rules that read the spread of the noise draws
