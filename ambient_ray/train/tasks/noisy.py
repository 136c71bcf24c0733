"""DSD's Phase I, the teacher (``objective: noisy``; seed paper 004, Sec. 3.1): every row is observed only as
y = x + σ_n·z, a float ``noisy`` column never clipped or quantised (``noise:sigma=`` in corrupt, or the users'
own), with its σ_n in ``sigma_n`` (0: a clean row, plain EDM).

The loss is the ambient loss with each row at σ_min = σ_n and y itself as x_{σ_n} (no noise is added to it):
x_σ = y + sqrt(σ² − σ_n²)·ε and λ(σ)·‖((σ² − σ_n²)/σ²)·D(x_σ; σ) + (σ_n²/σ²)·x_σ − y‖², whose minimiser is the
clean posterior mean E[x | x_σ] at every σ > σ_n (Tweedie; tests/test_dsd.py checks the slope on 1-D Gaussian
data). σ is drawn from EDM's log-normal restricted to σ > σ_n by the σ-first sampler (a row pairs only with
σ above its σ_n), where the authors' code clamps σ to σ_n: at σ_n = 0.2 about 37% of its draws then sit at σ_n,
where the loss is identically 0. Ambient-o's extra weight σ⁴/(σ² − σ_n²)² is the switch ``noisy.extra_weight``
(off, as in DSD; on, σ keeps the ``ambient.lambda_max`` buffer above σ_n, where that weight stays bounded).
"""

from __future__ import annotations

import math

from ambient_ray.train.tasks.ambient import AmbientTask
from ambient_ray.train.worker import Worker


class NoisyTask(AmbientTask):
    observed_noisy = True

    def __init__(self, cfg, rows):
        super().__init__(cfg, rows)
        self.extra_weight = cfg.noisy.extra_weight

    def lambda_max(self) -> float:
        return self.cfg.ambient.lambda_max if self.extra_weight else math.inf

    def extra_columns(self) -> dict[str, list[int]]:
        return {"noisy": self.rows.noisy["shape"]}

    def setup(self, w: Worker) -> None:
        super().setup(w)
        self.images = self.columns["noisy"].float()  # y in the [-1, 1] data scale, as observed

    def meta(self) -> dict:
        return {**super().meta(), "noisy": self.rows.noisy["meta"]}
