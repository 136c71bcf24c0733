"""What a training step costs and how well the hardware does it: exact parameter counts, FLOPs per image
(counted by ``torch.utils.flop_counter`` on a meta-device network, so a 1.5B model costs nothing to count),
achieved TFLOP/s, MFU against the device's peak, and peak memory. Pure torch, no Ray.

FLOPs follow the usual MFU convention: a multiply-add is 2 FLOPs (EDM2's paper counts it as 1, so its
"Gflops per image" are half of ``flops_forward`` here), only the matrix products, convolutions and attention
are counted (elementwise work is noise at scale), and a training step is the network's forward plus its
backward (about 3x the forward); the optimizer, the EMA and activation recomputation are not model FLOPs.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

# dense bf16 tensor-core peaks per device, TFLOP/s (vendors' datasheets, without sparsity); the first
# entry whose name occurs in the device's name wins (so the PCIe and NVL H100s come before "H100")
PEAK_BF16_TFLOPS: list[tuple[str, float]] = [
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("H800", 989.0),
    ("B200", 2250.0),
    ("B100", 1750.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("RTX 4090", 165.0),
    ("MI300X", 1307.0),
    ("MI250X", 383.0),
]


def peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak (TFLOP/s) of a device by its name (``torch.cuda.get_device_name()``); None if unknown."""
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops
    return None


@dataclass(frozen=True)
class Costs:
    """A network's size and FLOPs per image (2 per multiply-add); for a mixture of experts its active parameters,
    for a transformer the tokens its backbone runs on per image (after patch masking)."""

    parameters: int
    flops_forward: float
    flops_train: float
    active_parameters: int | None = None
    tokens_per_image: int | None = None

    def params(self, global_batch: int | None = None) -> dict[str, float | int]:
        """As MLflow params; with the ``global_batch`` (images per optimizer step) also ``tokens_per_step``."""
        out = {
            "parameters": self.parameters,
            "flops_per_image_forward": int(self.flops_forward),
            "flops_per_image_train": int(self.flops_train),
        }
        if self.active_parameters is not None:
            out["active_parameters"] = self.active_parameters
        if self.tokens_per_image is not None:
            out["tokens_per_image"] = self.tokens_per_image
            if global_batch:
                out["tokens_per_step"] = self.tokens_per_image * global_batch
        return out


def count(
    build: Callable[[], nn.Module], inputs: Callable[[int], tuple], batch: int = 2, tokens: int | None = None
) -> Costs:
    """Parameters and FLOPs per image of ``build()``'s network on ``inputs(batch)`` (positional arguments of
    its forward), built and run on the meta device: no memory, no arithmetic. The training step is the forward
    in training mode plus the backward of a scalar of its output (inputs take no gradient). The FLOPs are those
    the inputs make the network run: with patch masking's kept indices among them, the masked forward; an
    expert-choice MoE counts only its experts' chosen tokens. A network with ``active_parameters()`` reports
    them; ``tokens`` (per image) is passed through."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        net = build().to("meta")  # also the buffers a network makes on the CPU itself (seeded ones)
        args = inputs(batch)
    n = sum(p.numel() for p in net.parameters())
    net.eval()
    with FlopCounterMode(display=False) as fwd, torch.no_grad():
        net(*args)
    net.train()
    with FlopCounterMode(display=False) as step:
        out = net(*args)
        out.float().square().mean().backward()
    active = net.active_parameters() if callable(getattr(net, "active_parameters", None)) else None
    return Costs(n, fwd.get_total_flops() / batch, step.get_total_flops() / batch, active, tokens)


def denoiser_inputs(model_cfg, mask_ratio: float = 0.0) -> Callable[[int], tuple]:
    """Example inputs of a model config's network for :func:`count` (its arch's, from the registry: for a denoiser
    of images x, σ and one-hot labels; the meta device has no values for ``one_hot`` to read); ``mask_ratio``:
    a transformer's share of patches dropped (its kept indices among the inputs)."""
    from ambient_ray.models.registry import example_inputs

    return lambda b: example_inputs(model_cfg, b, mask_ratio=mask_ratio)


def count_denoiser(meta: dict, mask_ratio: float = 0.0) -> Costs:
    """:func:`count` for the denoiser of a ``model.json``-shaped dict, trained with ``mask_ratio`` of its patches
    dropped (a transformer's patch masking, e.g. the train stage's ``text.mask_ratio``; 0 for the others): the
    FLOPs of the masked step (what MFU is counted on), the active parameters, the tokens kept per image."""
    from ambient_ray.models import registry

    cfg = registry.config_of(meta)
    tokens = registry.tokens_per_image(cfg, mask_ratio)
    return count(lambda: registry.build(meta), denoiser_inputs(cfg, mask_ratio), tokens=tokens)


def achieved(costs: Costs | None, images: float, seconds: float, devices: int, peak: float | None) -> dict:
    """``tflop_per_s`` (the whole job's model TFLOP/s over ``images`` trained in ``seconds``; the FLOPs of the step
    as run: patch-masked, each expert on its tokens) and, with a per-device ``peak`` (TFLOP/s), ``mfu`` =
    achieved / (peak × devices); ``tokens_per_s`` for a transformer; {} without costs."""
    if costs is None or seconds <= 0:
        return {}
    tflops = costs.flops_train * images / seconds / 1e12
    out = {"tflop_per_s": tflops}
    if costs.tokens_per_image:
        out["tokens_per_s"] = costs.tokens_per_image * images / seconds
    if peak:
        out["mfu"] = tflops / (peak * devices)
    return out


def peak_memory(device: torch.device) -> torch.Tensor:
    """This process's peak memory in bytes, float64: [peak RSS, peak CUDA memory allocated (0 on CPU)]."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    cuda = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return torch.tensor([float(rss), float(cuda)], dtype=torch.float64)
