"""``draw``: N images of a trained network with a registered sampler, the same images for a seed anywhere."""

from __future__ import annotations

import numpy as np
import torch

from ambient_ray.diffusion.samplers import to_uint8
from ambient_ray.io.progress import Progress
from ambient_ray.models.registry import takes_captions
from ambient_ray.sampling.config import SamplerConfig
from ambient_ray.sampling.decode import latent_decoder
from ambient_ray.sampling.registry import SAMPLERS, Batch


def draw(
    net,
    num: int,
    sampler: SamplerConfig | None = None,
    *,
    seed: int = 0,
    batch_size: int = 256,
    class_label: int | None = None,
    captions: tuple[torch.Tensor, torch.Tensor] | None = None,
    device: torch.device | str = "cpu",
    decode=None,
    progress: bool = False,
) -> np.ndarray:
    """``num`` images as uint8 (N, H, W, C), drawn by ``sampler`` (default: :class:`SamplerConfig`'s, EDM's
    deterministic Heun sampler) in batches of ``batch_size``; a progress bar over the batches with ``progress``.

    The noise is drawn on the CPU from ``seed`` (per batch: its latents, then whatever the sampler draws) and moved
    to ``device`` (the network's), so a seed gives the same images anywhere. A class-conditional network cycles
    through its classes (0, 1, 2, ...), or draws ``class_label``. A network of captions draws image i for caption
    ``i % K`` of ``captions`` ((K, T, D) embeddings, (K, T) masks; :func:`~ambient_ray.sampling.encode_prompts`),
    without captions from the null caption (unconditional). A model trained on precomputed latents (``latents``
    in its model.json) has its samples decoded by its VAE (``decode``: a :func:`latent_decoder` already built,
    else one is built here)."""
    sampler = sampler or SamplerConfig()
    entry = SAMPLERS.get(sampler.name)
    cfg = net.config
    text = takes_captions(cfg.arch)
    if text and captions is None:
        captions = (torch.zeros(1, cfg.caption_tokens, cfg.caption_dim), torch.zeros(1, cfg.caption_tokens))
    decode = decode or latent_decoder(getattr(net, "meta", None))
    den = entry.prepare(net, sampler) if entry.prepare else net
    g = torch.Generator().manual_seed(seed)
    out = []
    starts = range(0, num, batch_size)
    with Progress("sample", len(starts), "batches", enabled=progress and len(starts) > 1) as bar:
        for start in starts:
            n = min(batch_size, num - start)
            latents = torch.randn(n, cfg.in_channels, cfg.img_resolution, cfg.img_resolution, generator=g).to(device)
            labels = None
            if getattr(cfg, "label_dim", 0):
                base = torch.arange(start, start + n) % cfg.label_dim
                labels = (torch.full((n,), class_label) if class_label is not None else base).to(device)
            batch_captions = None
            if text:
                pick = torch.arange(start, start + n) % len(captions[0])
                batch_captions = (captions[0][pick].float(), captions[1][pick].float())
            x = entry.sample(den, Batch(latents, labels, batch_captions, g), sampler)
            out.append(to_uint8(decode(x.cpu()) if decode else x))
            bar.update()
    return np.concatenate(out)
