"""The sample stage: draw images from a trained model with a registered sampler (:mod:`ambient_ray.sampling`).

``ambient-ray sample --checkpoint URI --num N --out URI [--sampler NAME]`` loads the inference weights
(safetensors and ``model.json``; nothing is unpickled) from a training output folder or its ``model/`` folder,
and writes ``OUT/samples.npy`` (uint8, N x H x W x C), ``OUT/grid.png`` and ``OUT/config.yaml``. The ``sampler:``
section picks the sampler and its knobs (:class:`~ambient_ray.sampling.SamplerConfig`).
"""

from __future__ import annotations

import io
import math
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from ambient_ray import config as cfgmod
from ambient_ray.config import ConfigError, Strict, flag
from ambient_ray.io import storage
from ambient_ray.io.tracking import MlflowConfig
from ambient_ray.sampling import SamplerConfig, encode_prompts
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
    weights: Literal["ema", "raw"] = Field(
        "ema", description="denoiser weights: ema (ema.safetensors) or raw (model.safetensors, the last step's)"
    )
    sampler: SamplerConfig = Field(
        default_factory=SamplerConfig,
        description="the sampler (sampler.name) and its knobs; without a name, --guide picks autoguidance and "
        "--prompt with --guidance != 1 classifier-free guidance",
    )
    seed: int = Field(
        0,
        ge=0,
        description="seed of the noise (drawn on the CPU: the same images on any device)",
        json_schema_extra=flag("--seed"),
    )
    batch_size: int = Field(256, ge=1, description="images per sampler batch")
    class_label: int | None = Field(
        None, ge=0, description="class for a class-conditional model (default: cycle through classes)"
    )
    prompts: list[str] = Field(
        default_factory=list,
        description="for a text-to-image model: the captions, image i drawn for prompt i % len(prompts), with "
        "classifier-free guidance weight 'sampler.guidance' (none: the null caption, unconditional)",
        json_schema_extra=flag("--prompt", "a caption (repeatable)"),
    )
    text_encoder: str | None = Field(
        None, description="the text encoder's folder, where it is not where the model's precompute stage had it"
    )
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)

    @model_validator(mode="before")
    @classmethod
    def _pick_sampler(cls, data):
        """No ``sampler.name`` given: a guide picks autoguidance, and prompts with a guidance weight other than 1
        classifier-free guidance (what ``--guide`` and ``--prompt ... --guidance W`` have always meant)."""
        if not isinstance(data, dict) or not isinstance(data.get("sampler"), dict) or "name" in data["sampler"]:
            return data
        s = data["sampler"]
        if s.get("guide"):
            return {**data, "sampler": {**s, "name": "autoguidance"}}
        if data.get("prompts") and s.get("guidance", 1.0) != 1.0:
            return {**data, "sampler": {**s, "name": "classifier-free"}}
        return data

    @model_validator(mode="after")
    def _prompts(self) -> SampleConfig:
        if self.sampler.name == "classifier-free" and self.sampler.guidance != 1.0 and not self.prompts:
            raise ValueError(
                "config key 'sampler.guidance': classifier-free guidance with a weight other than 1 needs prompts"
            )
        return self


def run(cfg: SampleConfig, progress: bool = True) -> SampleResult:
    from ambient_ray.io import plots, tracking

    out = storage.normalize(cfg.out)
    storage.check_reachable(out)
    from ambient_ray.models import weights
    from ambient_ray.models.registry import takes_captions
    from ambient_ray.sampling.draw import draw

    net = weights.load(cfg.checkpoint, "denoiser", cfg.weights)
    text = takes_captions(net.config.arch)
    if cfg.class_label is not None and not getattr(net.config, "label_dim", 0):
        raise ConfigError("config key 'class_label': the model is not class-conditional")
    if cfg.prompts and not text:
        raise ConfigError("config key 'prompts': the model does not take captions")
    captions = encode_prompts(net.meta, cfg.prompts, cfg.text_encoder) if cfg.prompts else None
    cfgmod.save_resolved(cfg, out)
    imgs = draw(
        net,
        cfg.num,
        cfg.sampler,
        seed=cfg.seed,
        batch_size=cfg.batch_size,
        class_label=cfg.class_label,
        captions=captions,
        progress=progress,
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
