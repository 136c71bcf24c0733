"""The Ambient Diffusion objective (``objective: masked``; seed paper 003, Sec. 3.1, Eq. 3.2), with every other
kind of row in the same run.

A masked row (its mask A hides some pixels) is hidden further, Ã = B ⊙ A with B_ii ~ Bernoulli(1 − δ)
(:func:`ambient_ray.diffusion.masked.further_mask`; drawn afresh at every use, or once per row with
``masked.fixed_per_row``); the network sees (Ã ⊙ x_σ, Ã) and is graded on every pixel of A, so it learns
E[x0 | Ã x_σ, Ã] on the pixels it did not see too (Theorem 4.1). A row without hidden pixels keeps Ã = A = 1: a
σ_min-annotated row (blurred, JPEG, ...) then trains with Ambient-o's loss above its buffer and a clean row with
the plain EDM loss, the very loss of ``objective: ambient``
(:func:`ambient_ray.diffusion.ambient.batch_loss`, which grades only A's pixels). A masked row that is also
annotated (σ_min > 0) gets both: the ambient loss on A's pixels.

Normalisation: a row's loss is the sum over A's C·H·W entries divided by C·H·W (the crop's, for a crop), the
same divisor for every row, so it is the reference code's sum over pixels up to a constant, and a fully observed
row's loss is exactly the ambient objective's mean. Dividing by |A| instead would make a heavily masked row count
as much as a whole one. The mask channel is not scaled by c_in, and a pixel the network did not see is
predicted as σ_data·F (a pixel of infinite noise) and weighted 1/σ_data² in place of λ(σ)
(:meth:`ambient_ray.models.precond.EDMPrecond.precondition` says why).
"""

from __future__ import annotations

import hashlib

import torch

from ambient_ray.diffusion import ambient
from ambient_ray.diffusion.masked import further_mask
from ambient_ray.train.tasks.ambient import AmbientTask
from ambient_ray.train.worker import Worker


def row_seed(seed: int, row_id: str) -> int:
    """A row's own seed for a fixed Ã: the same on every worker and world size."""
    return int.from_bytes(hashlib.blake2b(f"{seed}/{row_id}".encode(), digest_size=8).digest(), "big") % (2**63)


class MaskedTask(AmbientTask):
    def extra_columns(self) -> dict[str, list[int]]:
        shape = self.rows.masks["shape"]
        return {"mask": shape} if shape else {}

    def setup(self, w: Worker) -> None:
        super().setup(w)
        n = len(self.smin)
        a = self.columns.get("mask")
        self.observed = (a != 0) if a is not None else torch.ones(n, 1, 1, 1, dtype=torch.bool)
        self.masked_row = ~self.observed.flatten(1).all(dim=1)
        self.images = torch.where(self.observed, self.images, torch.zeros_like(self.images))  # hidden pixels: 0
        self.fixed = None
        if self.cfg.masked.fixed_per_row:  # B drawn once per row, from the row's id (the reference's way)
            shape = self.observed.shape[1:]
            self.fixed = torch.stack(
                [
                    further_mask(
                        torch.ones(shape),
                        self.cfg.masked.delta,
                        torch.Generator().manual_seed(row_seed(self.cfg.seed, i)),
                    )
                    for i in self.ids
                ]
            ).bool()
        if self.val_rows is not None:  # the validation loss is measured on fully observed clean rows only
            clean = torch.nonzero((self.smin == 0) & ~self.masked_row).flatten()
            self.val_rows = clean[: self.cfg.val_rows] if len(clean) else None

    def masks(self, index: torch.Tensor, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, Ã) of rows ``index``, (B, 1, H, W) float: Ã = B ⊙ A on masked rows, A (all ones) on the others."""
        a = self.observed[index].float()
        if self.fixed is not None:
            b = self.fixed[index].float()
        else:
            b = further_mask(torch.ones(len(index), *a.shape[1:]), self.cfg.masked.delta, generator)
        keep = self.masked_row[index].view(-1, 1, 1, 1)
        return a, torch.where(keep, a * b, a)

    def objective(self, w: Worker, b: ambient.Batch, args: tuple, kw: dict) -> tuple[torch.Tensor, torch.Tensor]:
        a, seen = self.masks(b.index, w.generator)
        if a.shape[-1] == 1:  # no mask column: every row fully observed
            a, seen = (m.expand(-1, -1, *b.x_sigma.shape[-2:]) for m in (a, seen))
        out = w.engine(
            b.x_sigma.to(w.device),
            b.sigma.to(w.device),
            *args,
            **kw,
            mask=seen.to(w.device),
            **({"return_logvar": True} if self.logvar else {}),
        )
        d_out, u = out if self.logvar else (out, None)
        loss, per_sample = ambient.batch_loss(d_out.float(), b, self.cfg.ambient.sigma_data, observed=a, seen=seen)
        if u is not None:  # EDM2 Sec. 2.5, as the ambient objective
            loss = (per_sample / u.reshape(-1).exp() + u.reshape(-1)).mean()
        return loss, per_sample

    def meta(self) -> dict:
        return {**super().meta(), "masked": self.rows.masks["meta"]}
