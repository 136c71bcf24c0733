"""The model registry: every network ambient-ray trains, chosen by ``model.arch`` (pure torch, no Ray).

An :class:`Arch` names its config class (a pydantic model whose ``arch`` field is its tag), its role
(``denoiser``: D(x; σ) for training and sampling; ``classifier``: the annotation classifiers) and how to
build the network from a ``model.json``. The interface of a network (image resolution and channels) comes
from the data (:func:`with_interface`); ``model.json`` records ``arch`` (a file without it is ``ddpmpp``, or
``classifier`` for a noise or crops classifier, as written before the registry existed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Callable, Literal, Union

from pydantic import BaseModel, BeforeValidator, Field

from ambient_ray.models import ddpmpp_config, dit_config, edm2_config
from ambient_ray.registry import Registry

if TYPE_CHECKING:  # the networks (torch) are imported when one is built: a config and ``--help`` need no torch
    import torch
    from torch import nn

Role = Literal["denoiser", "classifier"]


def image_inputs(cfg, batch: int, generator: torch.Generator | None = None) -> tuple:
    """A forward's positional inputs for a network of images: x (B, C, R, R), σ (B,), and one-hot labels
    (B, label_dim) for a class-conditional one; zeros (meta-device friendly) or, with ``generator``, random."""
    import torch

    r, c, k = cfg.img_resolution, cfg.in_channels, getattr(cfg, "label_dim", 0)
    if generator is None:
        x, sigma = torch.zeros(batch, c, r, r), torch.ones(batch)
    else:
        x, sigma = torch.randn(batch, c, r, r, generator=generator), torch.rand(batch, generator=generator) + 0.1
    return (x, sigma) + ((torch.eye(k)[torch.arange(batch) % k],) if k else ())


@dataclass(frozen=True)
class Arch:
    role: Role
    config: type[BaseModel]
    build: Callable[[Any, dict], nn.Module]  # (validated config, model.json) -> network
    presets: dict[str, dict]
    inputs: Callable[..., tuple] = image_inputs  # (config, batch[, generator]) -> example forward inputs
    # a transformer with patch masking: (config, mask_ratio) -> tokens its backbone runs on per image; its
    # ``inputs`` then take ``mask_ratio`` and add the kept indices. None: no tokens, no patch masking
    tokens: Callable[[Any, float], int] | None = None


def _build_ddpmpp(cfg, meta: dict) -> nn.Module:
    from ambient_ray.models import ddpmpp

    return ddpmpp.build_denoiser(cfg, sigma_data=meta.get("sigma_data", 0.5))


def _build_edm2(cfg, meta: dict) -> nn.Module:
    from ambient_ray.models import edm2

    return edm2.build_denoiser(cfg, sigma_data=meta.get("sigma_data", 0.5))


def _build_dit(cfg, meta: dict) -> nn.Module:
    from ambient_ray.models import dit

    return dit.build_denoiser(cfg, sigma_data=meta.get("sigma_data", 0.5))


def _dit_inputs(*args, **kwargs) -> tuple:
    from ambient_ray.models import dit

    return dit.example_inputs(*args, **kwargs)


def _build_classifier(cfg, meta: dict) -> nn.Module:
    from ambient_ray.models import classifier

    return classifier.build_classifier(cfg, meta["kind"], meta.get("sigma_data", 0.5))


ARCHS: Registry[Arch] = Registry("model.arch")
ARCHS.register("ddpmpp", Arch("denoiser", ddpmpp_config.UNetConfig, _build_ddpmpp, ddpmpp_config.PRESETS))
ARCHS.register("edm2", Arch("denoiser", edm2_config.EDM2Config, _build_edm2, edm2_config.PRESETS))
ARCHS.register(
    "dit",
    Arch(
        "denoiser",
        dit_config.DiTConfig,
        _build_dit,
        dit_config.PRESETS,
        _dit_inputs,
        lambda cfg, mask_ratio: dit_config.kept_tokens(cfg.tokens(), mask_ratio),
    ),
)
ARCHS.register(
    "classifier",
    Arch("classifier", ddpmpp_config.ClassifierConfig, _build_classifier, ddpmpp_config.PRESETS),
)


def example_inputs(
    cfg: BaseModel, batch: int, generator: torch.Generator | None = None, mask_ratio: float = 0.0
) -> tuple:
    """Example positional inputs of the network of a model config (its arch's ``inputs``): for counting FLOPs and
    memory on the meta device (zeros), or for tests (random, from ``generator``). ``mask_ratio`` > 0: with patch
    masking's kept token indices (an arch with ``tokens`` only)."""
    arch = ARCHS.get(cfg.arch)
    if not mask_ratio:
        return arch.inputs(cfg, batch, generator)
    _check_mask_ratio(cfg.arch, mask_ratio)
    return arch.inputs(cfg, batch, generator, mask_ratio=mask_ratio)


def tokens_per_image(cfg: BaseModel, mask_ratio: float = 0.0) -> int | None:
    """The tokens a transformer's backbone runs on per image after patch masking; None for an arch without tokens."""
    _check_mask_ratio(cfg.arch, mask_ratio)
    tokens = ARCHS.get(cfg.arch).tokens
    return None if tokens is None else tokens(cfg, mask_ratio)


def _check_mask_ratio(arch: str, mask_ratio: float) -> None:
    from ambient_ray.config import ConfigError

    if not 0 <= mask_ratio < 1:
        raise ConfigError(f"config key 'mask_ratio': {mask_ratio} is not in [0, 1)")
    if mask_ratio and ARCHS.get(arch).tokens is None:
        raise ConfigError(f"config key 'mask_ratio': model.arch {arch!r} has no patch masking (only a transformer has)")


def takes_captions(arch: str) -> bool:
    """Whether the arch's network is conditioned on caption embeddings (text-to-image), not on class labels."""
    return ARCHS.get(arch).inputs is not image_inputs


def names(role: Role) -> list[str]:
    return [n for n, a in ARCHS.items() if a.role == role]


def _default_arch(role: Role):
    allowed = names(role)

    def fill(data):
        if isinstance(data, dict):
            arch = data.get("arch", allowed[0])
            if arch not in allowed:
                raise ValueError(f"unknown model.arch {arch!r}; allowed here: {', '.join(allowed)}")
            data = {**data, "arch": arch}
        return data

    return fill


def config_type(role: Role):
    """The type of a stage's ``model`` key: the union of the role's configs, told apart by ``arch``
    (which defaults to the role's first arch, so configs written before the registry still load)."""
    classes = tuple(ARCHS.get(n).config for n in names(role))
    union = classes[0] if len(classes) == 1 else Annotated[Union[classes], Field(discriminator="arch")]
    return Annotated[union, BeforeValidator(_default_arch(role))]


def arch_of(meta: dict) -> str:
    """The arch a ``model.json`` records; files written before the registry have none."""
    return (
        meta.get("arch")
        or meta.get("model", {}).get("arch")
        or ("ddpmpp" if meta.get("kind", "denoiser") == "denoiser" else "classifier")
    )


def config_of(meta: dict) -> BaseModel:
    """The validated model config of a ``model.json``."""
    arch = ARCHS.get(arch_of(meta))
    return arch.config.model_validate({**meta["model"], "arch": arch_of(meta)})


def build(meta: dict) -> nn.Module:
    """A fresh network (global torch seed) for a ``model.json``-shaped dict: ``{"model": ..., "kind": ...}``."""
    return ARCHS.get(arch_of(meta)).build(config_of(meta), meta)


def with_interface(model: BaseModel, resolution: int, channels: int, key: str = "model") -> BaseModel:
    """The model config with the data's image resolution and channels; a value the user set must agree."""
    from ambient_ray.config import ConfigError

    given = model.model_fields_set
    for name, value in (("img_resolution", resolution), ("in_channels", channels)):
        if name in given and getattr(model, name) != value:
            raise ConfigError(
                f"config key '{key}.img_resolution'/'{key}.in_channels': the data is {resolution}x{resolution} with "
                f"{channels} channels but the model is {model.img_resolution}x{model.img_resolution} with "
                f"{model.in_channels}; drop them (the data sets them) or set --set {key}.img_resolution={resolution} "
                f"--set {key}.in_channels={channels}"
            )
    return type(model).model_validate({**model.model_dump(), "img_resolution": resolution, "in_channels": channels})
