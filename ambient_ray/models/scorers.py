"""Quality scorers for fixed annotation: a score per image, higher = better; the top k % form S_G.

Ambient-o App. E ("constructing S_G and S_B"): given a quality measure, the good set is the images
scoring above a threshold and the bad set the rest. Built in: ``sharpness``, a no-reference score,
the variance of the Laplacian of the grey image (blur and JPEG smoothing lower it). Pluggable: any
torch model from a local or S3 path, either a TorchScript file (``model.pt``, ``torch.jit.save``)
or a timm architecture with safetensors weights (``timm:resnet18@s3://bucket/w.safetensors``); it
receives float images in [0, 1], (B, C, H, W), and returns (B,) or (B, 1) scores.
"""

from __future__ import annotations

import io
from typing import Callable

import torch
import torch.nn.functional as F

from ambient_ray.io import storage

Scorer = Callable[[torch.Tensor], torch.Tensor]

LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])


@torch.no_grad()
def sharpness(images: torch.Tensor) -> torch.Tensor:
    """Variance of the Laplacian of the grey image (float (B, C, H, W) in [0, 1]), per image."""
    grey = images.float().mean(dim=1, keepdim=True)
    lap = F.conv2d(grey, LAPLACIAN.view(1, 1, 3, 3).to(grey.device))
    return lap.flatten(1).var(dim=1)


def scorer_file(spec: str) -> str | None:
    """The file a scorer spec reads (TorchScript file, or timm weights), None for built-ins."""
    if spec == "sharpness":
        return None
    return spec[len("timm:") :].partition("@")[2] or None if spec.startswith("timm:") else spec


def load_scorer(spec: str, device: str = "cpu") -> Scorer:
    """``sharpness``, a TorchScript URI, or ``timm:ARCH@WEIGHTS_URI``; a clear error for anything else."""
    if spec == "sharpness":
        return sharpness
    if spec.startswith("timm:"):
        import timm
        from safetensors.torch import load

        arch, at, uri = spec[len("timm:") :].partition("@")
        if not at or not arch or not uri:
            raise ValueError(f"scorer {spec!r}: expected timm:ARCH@WEIGHTS_URI (safetensors)")
        try:
            net = timm.create_model(arch, pretrained=False, num_classes=1)
        except RuntimeError as e:
            raise ValueError(f"scorer {spec!r}: unknown timm architecture {arch!r}: {e}") from None
        state = load(storage.read_bytes(uri))
        try:
            net.load_state_dict(state)
        except RuntimeError as e:
            raise ValueError(
                f"scorer {spec!r}: the weights in {uri} do not fit timm's {arch} with one output: {str(e)[:300]}"
            ) from None
        model = net.eval().to(device)
    else:
        try:
            data = storage.read_bytes(spec)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"scorer {spec!r}: no such file (give 'sharpness', a TorchScript file, or timm:ARCH@WEIGHTS)"
            ) from None
        try:
            model = torch.jit.load(io.BytesIO(data), map_location=device).eval()
        except RuntimeError as e:
            raise ValueError(f"scorer {spec!r}: not a TorchScript file ({str(e).splitlines()[0][:200]})") from None

    @torch.no_grad()
    def score(images: torch.Tensor) -> torch.Tensor:
        return model(images.float().to(device)).float().reshape(len(images), -1)[:, 0].cpu()

    return score
