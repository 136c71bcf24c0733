"""The sampler registry: what a sampler is, what it gets per batch, and :data:`SAMPLERS` (``sampler.name``).

A sampler is one function ``sample(net, batch, cfg) -> x``: from a batch of standard-normal latents to samples
(B, C, R, R) in the network's space (pixels in [-1, 1], or normalised latents the caller decodes). It gets the
network (after its ``prepare``), the :class:`Batch` (latents, labels, captions, the draw's generator) and the
knobs of the ``sampler:`` section (:class:`~ambient_ray.sampling.config.SamplerConfig`). Adding one: a function
in a module of ``ambient_ray/sampling/`` and a ``SAMPLERS.register(name, Sampler(lazy("module:function"), about))``
in :mod:`ambient_ray.sampling.builtin`: :func:`lazy` imports the module (torch) at the first call, so that a
stage's ``--help``, which lists the samplers, stays free of torch (docs/design/extending.md, "A sampler").
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ambient_ray.registry import Registry

if TYPE_CHECKING:  # annotations only: the registry and the sampler config are read without torch (a --help)
    import torch

# the knobs, a :class:`~ambient_ray.sampling.config.SamplerConfig` (which reads this registry: not imported here)
Knobs = Any


@dataclass(frozen=True)
class Batch:
    """One batch to sample, as every sampler gets it."""

    latents: torch.Tensor  # (B, C, R, R) standard normal, on the network's device
    class_labels: torch.Tensor | None  # (B,) class indices of a class-conditional network, else None
    captions: tuple[torch.Tensor, torch.Tensor] | None  # (B, T, D) embeddings, (B, T) masks of a caption network
    generator: torch.Generator  # the draw's CPU generator: the latents came from it; stochastic steps draw from it


def no_guidance(cfg: Knobs) -> None:
    """The default :attr:`Sampler.check`: the guidance knobs are for the guided samplers."""
    if cfg.guide:
        raise ValueError(f"sampler {cfg.name!r} takes no guiding model ('guide' is for sampler autoguidance)")
    if cfg.guidance != 1.0:
        raise ValueError(
            f"sampler {cfg.name!r} takes no guidance weight: a weight other than 1 needs a guiding model ('guide', "
            "sampler autoguidance) or, for a text-to-image model, prompts (classifier-free guidance)"
        )


def heun_evaluations(cfg: Knobs) -> int:
    """The default :attr:`Sampler.nfe`: EDM's Heun solver, 2·steps − 1 network evaluations per image (two per step,
    one for the last, the Euler step to σ = 0)."""
    return 2 * cfg.steps - 1


@dataclass(frozen=True)
class Sampler:
    """A registered sampler: ``sample`` draws one batch; ``about`` is its line in the CLI's help (with the paper);
    ``prepare`` runs once per draw, network -> the denoiser the batches use (a guide loaded, a network of the
    wrong kind refused: :class:`~ambient_ray.config.ConfigError`); ``check`` refuses knobs that do not fit the
    sampler when the config is built (a ``ValueError`` naming them); ``nfe`` counts the network evaluations per
    image its knobs cost (an image through a network once; a guided sampler's two halves count two; a backward is
    not counted), torch-free like ``check``."""

    sample: Callable[[Any, Batch, Knobs], torch.Tensor]
    about: str
    prepare: Callable[[Any, Knobs], Any] | None = None
    check: Callable[[Knobs], None] = no_guidance
    nfe: Callable[[Knobs], int] = heun_evaluations


SAMPLERS: Registry[Sampler] = Registry("sampler.name")


def lazy(ref: str) -> Callable:
    """The function ``module:name``, imported at its first call: an entry registered without importing its module
    (torch), so that the sampler config and its ``--help`` list the samplers without it."""
    module, _, name = ref.partition(":")

    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    call.__doc__ = f"{ref} (imported at its first call)"
    return call


def nfe(cfg: Knobs) -> int:
    """Network evaluations per image of the sampler ``cfg.name`` with the knobs ``cfg`` (its :attr:`Sampler.nfe`):
    what reports show beside the time per image (``heun``: 2·steps − 1; ``one-step``: 1)."""
    return SAMPLERS.get(cfg.name).nfe(cfg)
