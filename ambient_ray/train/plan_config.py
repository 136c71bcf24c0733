"""The ``plan`` stage's config (:class:`PlanConfig`, its flags) without torch: what its ``--help`` and a config
error need (the planner is :mod:`ambient_ray.train.planner`, which re-exports these)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ambient_ray.config import Strict, flag

Precision = Literal["bf16", "fp32"]


class PlanConfig(Strict):
    """``ambient-ray plan``: the per-GPU memory of training a preset (or distilling it, ``--distill``), and the ZeRO
    stage and node count to use."""

    model: str = Field(
        ...,
        description="a model preset of any arch, e.g. edm2-xxl",
        json_schema_extra=flag("--model", metavar="PRESET"),
    )
    gpus: int = Field(8, ge=1, description="GPUs per node", json_schema_extra=flag("--gpus"))
    nodes: int | None = Field(
        None, ge=1, description="nodes (None: the fewest that fit)", json_schema_extra=flag("--nodes")
    )
    max_nodes: int = Field(64, ge=1, description="the most nodes the recommendation considers")
    gpu_mem: float = Field(80.0, gt=0, description="memory per GPU in GiB", json_schema_extra=flag("--gpu-mem"))
    headroom: float = Field(
        0.1, ge=0, lt=1, description="fraction of gpu_mem kept free (CUDA context, allocator fragmentation)"
    )
    batch: int = Field(32, ge=1, description="micro-batch per GPU", json_schema_extra=flag("--batch"))
    global_batch: int | None = Field(
        None,
        ge=1,
        description="global batch, for the accumulation steps (None: 2048 for edm2 and dit, the papers'; else and "
        "with --distill none)",
        json_schema_extra=flag("--global-batch"),
    )
    resolution: int | None = Field(
        None,
        ge=1,
        description="image or latent side (None: the preset's paper setting)",
        json_schema_extra=flag("--resolution"),
    )
    channels: int | None = Field(
        None,
        ge=1,
        description="image or latent channels (None: the paper setting)",
        json_schema_extra=flag("--channels"),
    )
    label_dim: int | None = Field(
        None, ge=0, description="classes (None: the paper setting)", json_schema_extra=flag("--label-dim")
    )
    precision: Precision = Field(
        "bf16", description="bf16 mixed precision (GPU) or fp32", json_schema_extra=flag("--precision")
    )
    offload: bool = Field(
        False,
        description="ZeRO-Offload of the optimizer states to CPU (stages 1-3)",
        json_schema_extra=flag("--offload"),
    )
    offload_params: bool = Field(
        False,
        description="ZeRO-Infinity's parameter offload to CPU (ZeRO-3 only): each rank's partition of the parameters "
        "in host memory (the train stage's offload_params)",
        json_schema_extra=flag("--offload-params"),
    )
    reduce_bucket: int | None = Field(
        None,
        ge=1,
        description="DeepSpeed's reduce bucket in elements (the train stage's reduce_bucket_size); None: DeepSpeed's "
        "default, 5e8 (1 GB in bf16, allocated once per trained engine under ZeRO-3)",
        json_schema_extra=flag("--reduce-bucket"),
    )
    live_params: int | None = Field(
        None,
        ge=1,
        description="ZeRO-3's most parameters kept gathered (the train stage's zero3_live_parameters); None: "
        "DeepSpeed's default, 1e9 (the whole network below a billion parameters, from the forward to the backward)",
        json_schema_extra=flag("--live-params"),
    )
    ema: Literal["auto", "warmup", "power"] = Field(
        "auto",
        description="the EMA (fp32 copies: warmup 1, power 2); auto: power for edm2, else warmup (with --distill "
        "warmup, the distill stage's: the generator's EMA)",
        json_schema_extra=flag("--ema"),
    )
    mask_ratio: float | None = Field(
        None,
        ge=0,
        lt=1,
        description="a transformer's share of patches dropped before its backbone (the train stage's "
        "text.mask_ratio); fewer tokens in the activations and FLOPs. None: 0.75 for dit (MicroDiT's "
        "pretraining), else 0; with --distill 0 (the distill stage runs the whole network)",
        json_schema_extra=flag("--mask-ratio"),
    )
    distill: bool = Field(
        False,
        description="plan a Denoising Score Distillation of this preset as teacher (ambient-ray distill): three "
        "networks, a generator and a fake score trained (each its own DeepSpeed engine and Adam; the generator's "
        "EMA) and the frozen teacher",
        json_schema_extra=flag("--distill"),
    )
