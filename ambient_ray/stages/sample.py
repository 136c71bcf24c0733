"""The sample stage: draw images from a trained model with a registered sampler (:mod:`ambient_ray.sampling`).

``ambient-ray sample --checkpoint URI --num N --out URI [--sampler NAME]`` loads the inference weights
(safetensors and ``model.json``; nothing is unpickled) from a training output folder or its ``model/`` folder,
and writes ``OUT/samples.npy`` (uint8, N x H x W x C), ``OUT/grid.png`` and ``OUT/config.yaml``. The ``sampler:``
section picks the sampler and its knobs (:class:`~ambient_ray.sampling.SamplerConfig`); ``--one-step`` is
``--sampler one-step`` (a distilled generator, DSD), which a generator's folder (``meta.one_step`` in its
model.json) gets when no sampler is named. The summary has the network evaluations per image (``nfe``) and the
draw's wall time per 1,000 images.
"""

from __future__ import annotations

import io
import math
import time
from typing import Any, Literal

import numpy as np
from pydantic import Field, ValidationError, model_validator

from ambient_ray import config as cfgmod
from ambient_ray.config import ConfigError, Strict, flag
from ambient_ray.io import storage
from ambient_ray.io.tracking import MlflowConfig
from ambient_ray.sampling import SamplerConfig, encode_prompts, nfe
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
    one_step: bool = Field(
        False,
        description="sample a distilled one-step generator (DSD): the same as sampler.name one-step (--sampler "
        "one-step), x = D(σ_init·z; σ_init); with another sampler.name an error. A generator's folder "
        "(meta.one_step in its model.json) gets one-step anyway when no sampler is named",
        json_schema_extra=flag("--one-step"),
    )
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)

    @model_validator(mode="before")
    @classmethod
    def _pick_sampler(cls, data):
        """No ``sampler.name`` given: ``one_step`` picks one-step, a guide autoguidance, and prompts with a guidance
        weight other than 1 classifier-free guidance (what ``--guide`` and ``--prompt ... --guidance W`` have
        always meant)."""
        if not isinstance(data, dict):
            return data
        s = data.get("sampler")
        if s is None and _true(data.get("one_step")):
            s = {}
        if not isinstance(s, dict) or "name" in s:
            return data
        if _true(data.get("one_step")):
            return {**data, "sampler": {**s, "name": "one-step"}}
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
        if self.one_step and self.sampler.name != "one-step":
            raise ValueError(
                f"config key 'one_step': --one-step is the sampler 'one-step' (a distilled generator); it cannot go "
                f"with sampler.name {self.sampler.name!r} (--sampler {self.sampler.name}): give one of the two"
            )
        return self


def _true(value: Any) -> bool:
    """A YAML or flag value of ``one_step`` that means yes (the before-validator sees it unparsed)."""
    return value is True or (isinstance(value, str) and value.strip().lower() in ("true", "yes", "on", "1"))


def for_generator(cfg: SampleConfig, meta: dict | None) -> SampleConfig:
    """``cfg`` for the loaded model: a one-step generator (``meta.one_step``) gets the one-step sampler when no
    sampler was named (``sampler.name`` unset, its other knobs kept), and is refused a multi-step one; any other
    model keeps ``cfg``."""
    if not (meta or {}).get("one_step") or cfg.sampler.name == "one-step":
        return cfg
    if "name" in cfg.sampler.model_fields_set:
        raise ConfigError(
            f"config key 'sampler.name': the model is a one-step generator (meta.one_step in its model.json): "
            f"sample it with --one-step (sampler 'one-step'), not {cfg.sampler.name!r}"
        )
    try:
        sampler = SamplerConfig.model_validate({**cfg.sampler.model_dump(exclude_unset=True), "name": "one-step"})
    except ValidationError as e:
        msg = "; ".join(err["msg"] for err in e.errors())
        raise ConfigError(f"config key 'sampler': the model is a one-step generator (meta.one_step): {msg}") from None
    return cfg.model_copy(update={"sampler": sampler, "one_step": True})


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
    cfg = for_generator(cfg, net.meta)
    cfgmod.save_resolved(cfg, out)
    started = time.perf_counter()
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
    seconds = time.perf_counter() - started
    figures = {"nfe": nfe(cfg.sampler), "seconds_per_1000_images": 1000.0 * seconds / cfg.num}
    buf = io.BytesIO()
    np.save(buf, imgs)
    storage.write_bytes(storage.join(out, "samples.npy"), buf.getvalue())
    grid = plots.image_grid_png(imgs[: min(len(imgs), 256)], ncols=int(math.ceil(math.sqrt(min(len(imgs), 256)))))
    storage.write_bytes(storage.join(out, "grid.png"), grid)
    run_id, uri = tracking.start_run(cfg.mlflow, out, params=cfgmod.flatten(cfg), tags={"stage": "sample"})
    tracking.log_files(run_id, uri, {"grid.png": grid})
    tracking.log_metrics(run_id, uri, figures)
    tracking.finish(run_id, uri)
    return {
        "out": out,
        "samples": storage.join(out, "samples.npy"),
        "grid": storage.join(out, "grid.png"),
        "mlflow_run_id": run_id,
        "sampler": cfg.sampler.name,
        "seconds": seconds,
        **figures,
    }
