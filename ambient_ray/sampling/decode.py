"""Samples of a model trained on precomputed latents, back to images through the VAE they were made with."""

from __future__ import annotations

import torch

from ambient_ray.config import ConfigError


def latent_decoder(meta: dict | None):
    """For a model trained on precomputed latents: normalised latents -> images in [-1, 1] (the
    normalisation undone, then the VAE's decoder; grey data averages the VAE's RGB back to one channel).
    None for a pixel-space model. A VAE other than the one the latents were made with is refused."""
    from ambient_ray.diffusion.ambient import Latents
    from ambient_ray.models.encoders import image_encoder

    info = (meta or {}).get("latents")
    if not info:
        return None
    lat = Latents(torch.zeros(0), torch.tensor(info["shift"]), torch.tensor(info["scale"]))
    if info["vae"] == "pixels":
        return lat.undo
    vae = image_encoder(info["vae"], info.get("vae_subfolder"), info["channels"])
    if vae.fingerprint != info["vae_fingerprint"]:
        raise ConfigError(
            f"the VAE at {info['vae']} is not the one this model's latents were made with (its weights changed)"
        )

    @torch.no_grad()
    def decode(x: torch.Tensor) -> torch.Tensor:
        return vae.decode(lat.undo(x), channels=info["channels"]).float()

    return decode
