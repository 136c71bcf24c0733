"""The Ambient-o objective (``objective: ambient``; Ambient-o Sec. 3.1, Eq. 3.2-3.3 and App. D): the network's x0
prediction D(x_σ; σ) mapped to a prediction of x_{σ_min} and graded against the row's own noisy version, weighted
by σ⁴/(σ²−σ_min²)² (:func:`ambient_ray.diffusion.ambient.batch_loss`); a clean row (σ_min = 0) takes the EDM loss.
Everything else a denoiser task does is :class:`~ambient_ray.train.tasks.denoiser.DenoiserTask`'s."""

from __future__ import annotations

import torch

from ambient_ray.diffusion import ambient
from ambient_ray.train.tasks.denoiser import DenoiserTask
from ambient_ray.train.worker import Worker


class AmbientTask(DenoiserTask):
    extra_weight = True  # Ambient-o's σ⁴/(σ² − σ_min²)² (Eq. D.1)

    def setup(self, w: Worker) -> None:
        # a network with a learned log-variance u(σ) (EDM2) trains with its uncertainty weighting
        self.logvar = bool(getattr(w.net, "has_logvar", False))
        super().setup(w)

    def objective(self, w: Worker, b: ambient.Batch, args: tuple, kw: dict) -> tuple[torch.Tensor, torch.Tensor]:
        # x_σ and σ stay fp32: the denoiser computes its preconditioning in fp32 and casts the
        # network input to the parameters' dtype (bf16 under DeepSpeed on GPU) itself
        out = w.engine(
            b.x_sigma.to(w.device),
            b.sigma.to(w.device),
            *args,
            **kw,
            **({"return_logvar": True} if self.logvar else {}),
        )
        d_out, u = out if self.logvar else (out, None)
        loss, per_sample = ambient.batch_loss(
            d_out.float(), b, self.cfg.ambient.sigma_data, extra_weight=self.extra_weight
        )
        if u is not None:  # EDM2 Sec. 2.5: the ambient loss ℓ(σ) weighted by 1/e^u(σ), plus u(σ)
            loss = (per_sample / u.reshape(-1).exp() + u.reshape(-1)).mean()
        return loss, per_sample
