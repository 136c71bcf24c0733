"""The sample stage: draw images from a trained model with the EDM Heun sampler.

``ambient-ray sample --checkpoint URI --num N --out URI`` loads the inference weights (safetensors
and ``model.json``; nothing is unpickled) from a training output folder or its ``model/`` folder,
and writes ``OUT/samples.npy`` (uint8, N x H x W x C), ``OUT/grid.png`` and ``OUT/config.yaml``.
"""

from __future__ import annotations

import io
import math
from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from ambient_ray import config as cfgmod
from ambient_ray.config import ConfigError, Strict, flag
from ambient_ray.io import storage, weights
from ambient_ray.io.tracking import MlflowConfig
from ambient_ray.stages.results import SampleResult


class SampleConfig(Strict):
    """Config of ``ambient-ray sample``."""

    checkpoint: str = Field(
        ...,
        description="training output folder, or a folder with model.json + ema.safetensors",
        json_schema_extra=flag("--checkpoint"),
    )
    out: str = Field(..., description="output URI", json_schema_extra=flag("--out"))
    num: int = Field(64, ge=1, description="number of images", json_schema_extra=flag("--num"))
    steps: int = Field(
        18, ge=1, description="Heun steps (2*steps-1 network evaluations)", json_schema_extra=flag("--steps")
    )
    weights: Literal["ema", "raw"] = "ema"
    stochastic: bool = Field(
        False,
        description="EDM stochastic sampler (Algorithm 2) instead of the deterministic one",
        json_schema_extra=flag("--stochastic"),
    )
    s_churn: float = Field(40.0, ge=0)
    s_min: float = Field(0.05, ge=0)
    s_max: float = Field(50.0, ge=0)
    s_noise: float = Field(1.003, ge=0)
    sigma_max: float = Field(80.0, gt=0)
    seed: int = Field(0, ge=0, json_schema_extra=flag("--seed"))
    batch_size: int = Field(256, ge=1)
    class_label: int | None = Field(
        None, ge=0, description="class for a class-conditional model (default: cycle through classes)"
    )
    guidance: float = Field(
        1.0,
        ge=0,
        description="guidance weight w: D_guide + w*(D - D_guide) (EDM2's guidance by a weaker model; 1: none)",
        json_schema_extra=flag("--guidance"),
    )
    guide: str | None = Field(
        None,
        description="the guiding model (a smaller or shorter-trained run on the same data), for guidance != 1",
        json_schema_extra=flag("--guide"),
    )
    guide_weights: Literal["ema", "raw"] = "ema"
    prompts: list[str] = Field(
        default_factory=list,
        description="for a text-to-image model: the captions, image i drawn for prompt i % len(prompts), with "
        "classifier-free guidance weight 'guidance' (none: the null caption, unconditional)",
        json_schema_extra=flag("--prompt", "a caption (repeatable)"),
    )
    text_encoder: str | None = Field(
        None, description="the text encoder's folder, where it is not where the model's precompute stage had it"
    )
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)

    @model_validator(mode="after")
    def _guide(self) -> SampleConfig:
        if self.guidance != 1.0 and not self.guide and not self.prompts:
            raise ValueError(
                "config key 'guidance': a weight other than 1 needs a guiding model ('guide') or, for a "
                "text-to-image model, prompts (classifier-free guidance)"
            )
        return self


def guided(net, guide_uri: str | None, weight: float, weights_kind: str = "ema"):
    """``net`` guided by the model at ``guide_uri`` with weight ``weight`` (:class:`~ambient_ray.diffusion.samplers.
    Guided`); ``net`` itself without a guide. The guide must share the main model's interface."""
    from ambient_ray.diffusion.samplers import Guided

    if not guide_uri:
        return net
    guide = weights.load(guide_uri, "denoiser", weights_kind)
    a, b = net.config, guide.config
    for key in ("img_resolution", "in_channels", "label_dim"):
        if getattr(a, key) != getattr(b, key):
            raise ConfigError(
                f"config key 'guide': the guiding model {guide_uri} has {key}={getattr(b, key)} but the model "
                f"has {getattr(a, key)}; a guide must be trained on the same data"
            )
    if (getattr(net, "meta", None) or {}).get("latents") != (getattr(guide, "meta", None) or {}).get("latents"):
        raise ConfigError(f"config key 'guide': {guide_uri} was trained on other latents than the model")
    return Guided(net, guide, weight)


def draw(
    net,
    num: int,
    *,
    seed: int = 0,
    steps: int = 18,
    stochastic: bool = False,
    batch_size: int = 256,
    class_label: int | None = None,
    s_churn: float = 40.0,
    s_min: float = 0.05,
    s_max: float = 50.0,
    s_noise: float = 1.003,
    sigma_max: float = 80.0,
    progress: bool = False,
    device: torch.device | str = "cpu",
    decode=None,
    captions: tuple[torch.Tensor, torch.Tensor] | None = None,
    guidance: float = 1.0,
) -> np.ndarray:
    """``num`` images as uint8 (N, H, W, C); a progress bar over the batches with ``progress``. A model
    trained on precomputed latents (``latents`` in its model.json) has its samples decoded by its VAE
    (``decode``: a :func:`latent_decoder` already built, else one is built here). The noise is drawn on the
    CPU from ``seed`` and moved to ``device`` (the network's), so a seed gives the same images anywhere.

    A network of captions draws image i for caption ``i % len(captions)`` of ``captions`` ((K, T, D) embeddings,
    (K, T) masks; :func:`encode_prompts`) with classifier-free guidance weight ``guidance``; without captions,
    from the null caption (unconditional)."""
    from tqdm.auto import tqdm

    from ambient_ray.diffusion.samplers import ClassifierFree, heun_sample, to_uint8
    from ambient_ray.models.registry import takes_captions

    cfg = net.config
    text = takes_captions(cfg.arch)
    if text and captions is None:
        captions = (torch.zeros(1, cfg.caption_tokens, cfg.caption_dim), torch.zeros(1, cfg.caption_tokens))
    decode = decode or latent_decoder(getattr(net, "meta", None))
    g = torch.Generator().manual_seed(seed)
    out = []
    starts = range(0, num, batch_size)
    for start in tqdm(starts, desc="sample", unit="batch", disable=not progress or len(starts) < 2):
        n = min(batch_size, num - start)
        latents = torch.randn(n, cfg.in_channels, cfg.img_resolution, cfg.img_resolution, generator=g).to(device)
        labels = None
        if getattr(cfg, "label_dim", 0):
            base = torch.arange(start, start + n) % cfg.label_dim
            labels = (torch.full((n,), class_label) if class_label is not None else base).to(device)
        den = net
        if text:
            pick = torch.arange(start, start + n) % len(captions[0])
            den = ClassifierFree(net, captions[0][pick].float(), captions[1][pick].float(), guidance)
        x = heun_sample(
            den,
            latents,
            num_steps=steps,
            sigma_max=sigma_max,
            class_labels=labels,
            generator=g,
            s_churn=s_churn if stochastic else 0.0,
            s_min=s_min,
            s_max=s_max,
            s_noise=s_noise,
        )
        out.append(to_uint8(decode(x.cpu()) if decode else x))
    return np.concatenate(out)


def encode_prompts(meta: dict | None, prompts: list[str], text_encoder: str | None = None):
    """Caption embeddings and masks of ``prompts`` by the text encoder a model's captions were made with (the
    precompute stage's, recorded in its model.json; ``text_encoder`` overrides the location, e.g. on another
    machine). Another encoder than that one (other weights) is refused."""
    from ambient_ray.models import encoders

    info = (meta or {}).get("latents") or {}
    uri = text_encoder or info.get("text_encoder")
    if not uri:
        raise ConfigError("config key 'text_encoder': the model records no text encoder; give its folder")
    enc = encoders.load_text_encoder(uri)
    if info.get("text_fingerprint") and enc.fingerprint != info["text_fingerprint"]:
        raise ConfigError(f"the text encoder at {uri} is not the one this model's captions were made with")
    emb, mask = enc.encode(list(prompts))
    if info.get("emb_dtype") == "float16":  # as the training rows were stored
        emb = emb.half()
    return emb.float(), mask.float()


def latent_decoder(meta: dict | None):
    """For a model trained on precomputed latents: normalised latents -> images in [-1, 1] (the
    normalisation undone, then the VAE's decoder; grey data averages the VAE's RGB back to one channel).
    None for a pixel-space model. A VAE other than the one the latents were made with is refused."""
    from ambient_ray.diffusion.ambient import Latents

    info = (meta or {}).get("latents")
    if not info:
        return None
    lat = Latents(torch.zeros(0), torch.tensor(info["shift"]), torch.tensor(info["scale"]))
    if info["vae"] == "pixels":
        return lat.undo
    from ambient_ray.stages.precompute import image_encoder

    vae = image_encoder(info["vae"], info.get("vae_subfolder"), info["channels"])
    if vae.fingerprint != info["vae_fingerprint"]:
        raise ConfigError(
            f"the VAE at {info['vae']} is not the one this model's latents were made with (its weights changed)"
        )

    @torch.no_grad()
    def decode(x: torch.Tensor) -> torch.Tensor:
        return vae.decode(lat.undo(x), channels=info["channels"]).float()

    return decode


def run(cfg: SampleConfig, progress: bool = True) -> SampleResult:
    from ambient_ray.io import plots, tracking

    out = storage.normalize(cfg.out)
    storage.check_reachable(out)
    from ambient_ray.models.registry import takes_captions

    net = weights.load(cfg.checkpoint, "denoiser", cfg.weights)
    text = takes_captions(net.config.arch)
    if cfg.class_label is not None and not getattr(net.config, "label_dim", 0):
        raise ConfigError("config key 'class_label': the model is not class-conditional")
    if cfg.prompts and not text:
        raise ConfigError("config key 'prompts': the model does not take captions")
    if text and cfg.guide:
        raise ConfigError("config key 'guide': a text-to-image model is guided classifier-free ('guidance', 'prompts')")
    captions = encode_prompts(net.meta, cfg.prompts, cfg.text_encoder) if cfg.prompts else None
    if not text:
        net = guided(net, cfg.guide, cfg.guidance, cfg.guide_weights)
    cfgmod.save_resolved(cfg, out)
    imgs = draw(
        net,
        cfg.num,
        seed=cfg.seed,
        steps=cfg.steps,
        stochastic=cfg.stochastic,
        batch_size=cfg.batch_size,
        class_label=cfg.class_label,
        s_churn=cfg.s_churn,
        s_min=cfg.s_min,
        s_max=cfg.s_max,
        s_noise=cfg.s_noise,
        sigma_max=cfg.sigma_max,
        progress=progress,
        captions=captions,
        guidance=cfg.guidance,
    )
    buf = io.BytesIO()
    np.save(buf, imgs)
    storage.write_bytes(storage.join(out, "samples.npy"), buf.getvalue())
    grid = plots.image_grid_png(imgs[: min(len(imgs), 256)], ncols=int(math.ceil(math.sqrt(min(len(imgs), 256)))))
    storage.write_bytes(storage.join(out, "grid.png"), grid)
    run_id, uri = tracking.start_run(cfg.mlflow, out, params=cfgmod.flatten(cfg), tags={"stage": "sample"})
    tracking.log_files(run_id, uri, {"grid.png": grid})
    tracking.finish(run_id, uri)
    return {
        "out": out,
        "samples": storage.join(out, "samples.npy"),
        "grid": storage.join(out, "grid.png"),
        "mlflow_run_id": run_id,
    }
