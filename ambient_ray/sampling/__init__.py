"""Sampling a trained denoiser (pure torch: no Ray, DeepSpeed or MLflow; nothing from the stages, the training
engine, the workflows or the CLI).

- :mod:`~ambient_ray.sampling.registry`: :data:`SAMPLERS` (``sampler.name``), a :class:`Sampler` entry, the
  :class:`Batch` it samples and :func:`nfe`, its network evaluations per image;
- :mod:`~ambient_ray.sampling.edm`: ``heun``, EDM's Heun sampler (Algorithms 1 and 2);
- :mod:`~ambient_ray.sampling.guidance`: ``autoguidance`` (EDM2's guidance by a weaker model) and
  ``classifier-free`` (for caption networks);
- :mod:`~ambient_ray.sampling.masked`: ``fixed-mask`` and ``reconstruction-guidance``, Ambient Diffusion's samplers
  of a network of masked data (seed 003, Eq. 3.3 and 3.4), and the inpaint stage's ``posterior_mean``/``restore``;
- :mod:`~ambient_ray.sampling.dsd`: ``ambient-full`` and ``ambient-truncated``, DSD's teacher baselines on a network
  trained on noisy data, and ``one-step``, its distilled generator (seed 004);
- :mod:`~ambient_ray.sampling.config`: :class:`SamplerConfig`, the ``sampler:`` config section;
- :mod:`~ambient_ray.sampling.draw`: :func:`draw`, N images of a network with a sampler;
- :mod:`~ambient_ray.sampling.decode`, :mod:`~ambient_ray.sampling.prompts`: latents back to images through the
  run's VAE; prompts to caption embeddings through the run's text encoder.
"""

# the built-in samplers register their entries when imported (without torch: their functions are imported at
# their first call); a new one is imported here, before the config (whose --sampler help lists the samplers).
# This package imports no torch, so a stage's --help stays light: ``draw`` (``sampling.draw``), ``guided``
# (``sampling.guidance``) and ``latent_decoder`` (``sampling.decode``) are imported from their modules.
from ambient_ray.sampling import builtin  # noqa: F401  (registers every built-in sampler)
from ambient_ray.sampling.config import SamplerConfig
from ambient_ray.sampling.prompts import encode_prompts
from ambient_ray.sampling.registry import SAMPLERS, Batch, Sampler, nfe

__all__ = ["SAMPLERS", "Batch", "Sampler", "SamplerConfig", "encode_prompts", "nfe"]
