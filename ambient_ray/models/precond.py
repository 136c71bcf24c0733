"""EDM preconditioning of a denoiser network (Karras et al. 2022, Table 1), pure torch."""

from __future__ import annotations

import torch
from torch import nn


def edm_precond(sigma: torch.Tensor, sigma_data: float = 0.5) -> tuple[torch.Tensor, ...]:
    """EDM preconditioning (Karras et al. 2022, Table 1): c_skip, c_out, c_in, c_noise.

    D(x; σ) = c_skip(σ)·x + c_out(σ)·F(c_in(σ)·x, c_noise(σ)).
    """
    s2 = sigma**2 + sigma_data**2
    c_skip = sigma_data**2 / s2
    c_out = sigma * sigma_data / s2.sqrt()
    c_in = 1.0 / s2.sqrt()
    c_noise = sigma.log() / 4.0
    return c_skip, c_out, c_in, c_noise


class EDMPrecond(nn.Module):
    """The EDM-preconditioned denoiser every model family wraps its network F in (Karras et al. 2022, Table 1 and
    Eq. 7): D(x; σ) = c_skip(σ)·x + c_out(σ)·F(c_in(σ)·x, c_noise(σ), ...).

    A subclass keeps F at its own attribute (its state-dict keys), names the parameter whose dtype F runs in
    (``dtype_param``, e.g. ``"unet.conv_in.weight"``: bf16 under DeepSpeed), implements :meth:`network` and
    calls :meth:`precondition` from its ``forward``. ``sigma`` is (B,) or a scalar and is broadcast over the
    batch; the preconditioning runs in float32 and D comes back in x's dtype, or, with ``wide``, both in
    ``promote_types(x.dtype, float32)`` (a float64 sampler state stays float64, a bf16 x gives a float32 D).
    """

    dtype_param: str
    wide: bool = False

    def __init__(self, cfg, sigma_data: float = 0.5):
        super().__init__()
        self.config, self.sigma_data = cfg, float(sigma_data)

    def network(self, x: torch.Tensor, c_noise: torch.Tensor, *extra) -> torch.Tensor:
        """F(c_in·x, c_noise, *extra): ``x`` already scaled and cast to the network's dtype."""
        raise NotImplementedError

    def precondition(
        self, x: torch.Tensor, sigma: torch.Tensor | float, *extra, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(D(x; σ), c_noise), ``extra`` passed on to :meth:`network`.

        A network of masked data (``config.mask_input``; Ambient Diffusion, seed 003 Sec. 3.1) takes ``mask``
        Ã (N, 1, H, W) or (N, H, W), 1 = seen: every pixel of x outside Ã is set to exactly 0 (``where``, so a
        NaN there cannot leak), F sees (c_in·(Ã⊙x), Ã) and the skip term is c_skip·(Ã⊙x). The mask channel is
        *not* scaled by c_in, unlike the reference code (which preconditions all 2C channels alike): 0/1 says
        "seen" the same way at every σ, and σ reaches F through c_noise already. A pixel outside Ã is
        preconditioned as a pixel of infinite noise (EDM Table 1 at σ → ∞: c_skip = 0, c_out = σ_data): D = σ_data·F
        there. With the reference's c_skip·(Ã⊙x) + c_out·F, an unseen pixel's prediction is c_out(σ)·F, and
        c_out → 0 as σ → 0: near the end of sampling F would have to reach ~x0/σ (500 at σ = 0.002), which a network
        does not learn, and the samplers' last prediction left unseen pixels near 0 (measured on digits: error
        0.70 at σ = 0.002 against 0.25 at σ = 0.1-0.5). The loss weights those pixels by 1/σ_data² to match
        (:func:`ambient_ray.diffusion.ambient.batch_loss`). ``mask`` None on such a network means every pixel
        seen (Ã = 1)."""
        dtype = torch.promote_types(x.dtype, torch.float32) if self.wide else torch.float32
        sigma = torch.as_tensor(sigma, device=x.device).to(dtype).reshape(-1)
        if sigma.numel() == 1:
            sigma = sigma.expand(x.shape[0])
        c_skip, c_out, c_in, c_noise = edm_precond(sigma, self.sigma_data)
        view = (-1,) + (1,) * (x.ndim - 1)
        x_wide = x.to(dtype)
        net_dtype = self.get_parameter(self.dtype_param).dtype
        if getattr(self.config, "mask_input", False):
            m = torch.ones_like(x_wide[:, :1]) if mask is None else seen_channel(mask, x_wide)
            x_wide = torch.where(m.bool(), x_wide, torch.zeros_like(x_wide))
            x_in = torch.cat([c_in.view(view) * x_wide, m], dim=1).to(net_dtype)
        elif mask is not None:
            raise ValueError("this network takes no mask (build it with model.mask_input: true)")
        else:
            x_in = (c_in.view(view) * x_wide).to(net_dtype)
        f = self.network(x_in, c_noise, *extra)
        d = c_skip.view(view) * x_wide + c_out.view(view) * f.to(dtype)
        if getattr(self.config, "mask_input", False):  # an unseen pixel is infinitely noisy: D = σ_data·F there
            d = torch.where(m.bool(), d, self.sigma_data * f.to(dtype))
        return d.to(dtype if self.wide else x.dtype), c_noise


def seen_channel(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A mask (N, H, W), (N, 1, H, W) or (1, H, W) broadcastable, as an (N, 1, H, W) 0/1 channel in ``like``'s
    dtype and device; a ValueError where it does not fit ``like`` (N, C, H, W)."""
    m = mask if mask.dim() == like.dim() else mask.unsqueeze(1)
    if m.dim() != like.dim() or m.shape[1] != 1 or m.shape[-2:] != like.shape[-2:] or m.shape[0] not in (1, len(like)):
        raise ValueError(f"a mask of shape {tuple(mask.shape)} does not fit images of shape {tuple(like.shape)}")
    return (m != 0).to(device=like.device, dtype=like.dtype).expand(len(like), -1, -1, -1)
