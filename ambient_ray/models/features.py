"""Feature networks for the sample-quality metrics: what FD, precision/recall and Vendi are measured in.

A feature spec names the network and, for pretrained ones, the weights file (local path or S3 URI;
nothing is downloaded at run time):

- ``inception@URI``: the standard FID Inception-v3 of the ``pytorch-fid`` package (2,048-d pool3
  features; its weights file is ``pt_inception-2015-12-05-6726825d.pth``, a state dict; safetensors
  also read). Inputs are resized to 299x299 by the package; grey images are repeated to RGB.
- ``dinov2@URI`` or ``dinov2:ARCH@URI``: DINOv2 through timm (default ``vit_small_patch14_dinov2``;
  the weights are timm's ``model.safetensors`` of ``timm/vit_small_patch14_dinov2.lvd142m``), the
  CLS embedding at 224x224 with ImageNet normalisation (timm resamples the position embedding).
- ``net@URI``: a small feature network trained in-project on built-in data (``ambient-ray
  features``), so digits and faces get an honest FD with no download.
- ``pixels``: the raw pixels in [0, 1] (a baseline, and fast for tests).

Every extractor takes uint8 images (N, H, W, C) and returns float64 features (N, D).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ambient_ray.io import storage
from ambient_ray.io.progress import Progress

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"


INCEPTION_HELP = (
    f"the FID Inception weights are not downloaded at run time: fetch {INCEPTION_FILE} once from "
    "https://github.com/mseitzer/pytorch-fid/releases (v0.1.0 assets) and give --features inception@PATH_OR_S3_URI"
)


DINOV2_ARCH = "vit_small_patch14_dinov2"


DINOV2_HELP = (
    "DINOv2 weights are not downloaded at run time: save timm's model.safetensors of "
    "timm/vit_small_patch14_dinov2.lvd142m once and give --features dinov2@PATH_OR_S3_URI "
    "(dinov2:ARCH@URI for another timm DINOv2 architecture)"
)


@dataclass
class Extractor:
    name: str
    fn: Callable[[torch.Tensor], torch.Tensor]  # float (B, C, H, W) in [0, 1] -> (B, D)
    batch_size: int = 256
    device: str = "cpu"

    @torch.no_grad()
    def __call__(self, images: np.ndarray, progress: bool = False) -> np.ndarray:
        """uint8 (N, H, W, C) -> float64 (N, D)."""
        images = np.asarray(images)
        if images.ndim != 4 or images.dtype != np.uint8:
            raise ValueError(f"features: expected uint8 images (N, H, W, C), got {images.dtype} {images.shape}")
        out = []
        starts = range(0, len(images), self.batch_size)
        with Progress(f"features ({self.name})", len(starts), "batches", enabled=progress) as bar:
            for s in starts:
                x = torch.from_numpy(np.array(images[s : s + self.batch_size])).permute(0, 3, 1, 2).float().div(255.0)
                out.append(self.fn(x.to(self.device)).reshape(len(x), -1).double().cpu())
                bar.update()
        return torch.cat(out).numpy()


def _local_copy(uri: str, what: str, help_text: str) -> tuple[str, Callable[[], None]]:
    """A local path for ``uri`` (S3 objects are copied to a temporary file) and its clean-up."""
    if not storage.exists(uri):
        raise FileNotFoundError(f"{what} weights: no file at {uri}; {help_text}")
    if not storage.is_s3(uri):
        return storage.normalize(uri), lambda: None
    suffix = os.path.splitext(uri)[1]
    fd, path = tempfile.mkstemp(suffix=suffix)
    with os.fdopen(fd, "wb") as f:
        f.write(storage.read_bytes(uri))
    return path, lambda: os.unlink(path)


def _state_dict(path: str, what: str) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors file or a torch file (weights only: nothing else is unpickled)."""
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any unreadable file gets the same clear message
        raise ValueError(
            f"{what} weights: {path} is not a readable state dict ({str(e).splitlines()[0][:200]})"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{what} weights: {path} does not hold a state dict of tensors")
    return state


def _mismatch(what: str, path: str, e: Exception, help_text: str) -> ValueError:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return ValueError(
        f"{what} weights: {path} does not fit the architecture ({' '.join(lines[:2])[:400]}); {help_text}"
    )


def _rgb(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x.expand(-1, 3, -1, -1)
    if x.shape[1] != 3:
        raise ValueError(f"features: images with {x.shape[1]} channels; the pretrained networks take 1 or 3")
    return x


def inception(uri: str, device: str = "cpu") -> Extractor:
    """pytorch-fid's FID Inception-v3 (pool3, 2,048-d) with the weights in ``uri``."""
    from pytorch_fid import inception as pfi

    path, cleanup = _local_copy(uri, "Inception", INCEPTION_HELP)
    try:
        state = _state_dict(path, "Inception")
    finally:
        cleanup()
    # pytorch-fid builds its FID network and then fetches the weights by URL; hand it ours instead
    fetch = pfi.load_state_dict_from_url
    pfi.load_state_dict_from_url = lambda *a, **k: state
    try:
        net = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]], resize_input=True, normalize_input=True)
    except RuntimeError as e:
        raise _mismatch("Inception", uri, e, INCEPTION_HELP) from None
    finally:
        pfi.load_state_dict_from_url = fetch
    net = net.eval().to(device)
    return Extractor("inception", lambda x: net(_rgb(x))[0], batch_size=64, device=device)


def dinov2(uri: str, arch: str = DINOV2_ARCH, device: str = "cpu", img_size: int = 224) -> Extractor:
    """DINOv2 (timm ``arch``) CLS features at ``img_size`` with the weights in ``uri``."""
    import timm

    path, cleanup = _local_copy(uri, "DINOv2", DINOV2_HELP)
    try:
        net = timm.create_model(
            arch, pretrained=True, pretrained_cfg_overlay={"file": path}, num_classes=0, img_size=img_size
        )
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise ValueError(f"DINOv2: unknown timm architecture {arch!r}") from None
        raise _mismatch("DINOv2", uri, e, DINOV2_HELP) from None
    finally:
        cleanup()
    net = net.eval().to(device)
    cfg = net.pretrained_cfg
    mean = torch.tensor(cfg.get("mean", (0.485, 0.456, 0.406)), device=device).view(1, 3, 1, 1)
    std = torch.tensor(cfg.get("std", (0.229, 0.224, 0.225)), device=device).view(1, 3, 1, 1)

    def fn(x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(_rgb(x), size=(img_size, img_size), mode="bicubic", align_corners=False).clamp(0, 1)
        return net((x - mean) / std)

    return Extractor(f"dinov2:{arch}", fn, batch_size=64, device=device)


class FeatureNet(nn.Module):
    """A small CNN: three conv stages (GroupNorm, SiLU), global average pooling, a ``dim``-d embedding.

    Trained as a classifier (the dataset's labels, or which of 4 rotations was applied when it has
    none); the embedding before the classification head is the feature.
    """

    def __init__(self, in_channels: int, classes: int, width: int = 32, dim: int = 64):
        super().__init__()
        layers, c = [], in_channels
        for i, w in enumerate((width, 2 * width, 4 * width)):
            layers += [nn.Conv2d(c, w, 3, padding=1, stride=1 if i == 0 else 2), nn.GroupNorm(8, w), nn.SiLU()]
            layers += [nn.Conv2d(w, w, 3, padding=1), nn.GroupNorm(8, w), nn.SiLU()]
            c = w
        self.body = nn.Sequential(*layers)
        self.embed = nn.Linear(c, dim)
        self.head = nn.Linear(dim, classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(self.body(2.0 * x - 1.0).mean(dim=(2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.silu(self.features(x)))


def train_feature_net(
    images: np.ndarray,
    labels: np.ndarray | None,
    *,
    steps: int = 400,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    width: int = 16,
    dim: int = 64,
    progress: bool = False,
):
    """Train a :class:`FeatureNet` on uint8 (N, H, W, C) images; returns (net, meta, held-out accuracy).

    With labels the task is the labels; without, the rotation (0/90/180/270°) of square images.
    A random tenth of the rows is held out to report the accuracy.
    """
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x_all = torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).float().div(255.0)
    n, c, h, w = x_all.shape
    task = "labels" if labels is not None else "rotation"
    if labels is None and h != w:
        raise ValueError("features: rotation pre-training needs square images")
    y_all = (
        torch.as_tensor(np.asarray(labels), dtype=torch.long)
        if labels is not None
        else torch.zeros(n, dtype=torch.long)
    )
    classes = int(y_all.max()) + 1 if labels is not None else 4
    perm = torch.randperm(n, generator=g)
    n_val = max(1, n // 10)
    val, tr = perm[:n_val], perm[n_val:]

    def batch(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = x_all[idx], y_all[idx]
        if task == "rotation":
            y = torch.randint(0, 4, (len(idx),), generator=g)
            x = torch.stack([torch.rot90(xi, int(k), dims=(1, 2)) for xi, k in zip(x, y)])
        return x, y

    net = FeatureNet(c, classes, width, dim)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    with Progress(f"feature net ({task})", steps, "steps", enabled=progress) as bar:
        for _ in range(steps):
            idx = tr[torch.randint(0, len(tr), (batch_size,), generator=g)]
            x, y = batch(idx)
            # a one-pixel random shift: features that do not hinge on exact pixel positions
            dx, dy = (int(v) for v in torch.randint(-1, 2, (2,), generator=g))
            x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
            bar.update()
    net.eval()
    with torch.no_grad():
        x, y = batch(val)
        accuracy = float((net(x).argmax(1) == y).float().mean())
    meta = {
        "kind": "features",
        "task": task,
        "classes": classes,
        "in_channels": c,
        "img_resolution": h,
        "width": width,
        "dim": dim,
        "held_out_accuracy": accuracy,
        "rows": n,
    }
    return net, meta, accuracy


def save_feature_net(net: FeatureNet, meta: dict, out: str) -> None:
    from safetensors.torch import save

    storage.write_bytes(
        storage.join(out, "features.safetensors"), save({k: v.contiguous() for k, v in net.state_dict().items()})
    )
    storage.write_bytes(storage.join(out, "features.json"), json.dumps(meta, indent=1).encode())


def feature_net(uri: str, device: str = "cpu") -> Extractor:
    """The in-project feature network saved in ``uri`` (``features.json`` + ``features.safetensors``)."""
    from safetensors.torch import load

    uri = storage.normalize(uri)
    try:
        meta = json.loads(storage.read_bytes(storage.join(uri, "features.json")))
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no features.json in {uri}: train one with 'ambient-ray features --dataset digits --out {uri}'"
        ) from None
    if meta.get("kind") != "features":
        raise ValueError(f"{uri}/features.json is not an ambient-ray feature network")
    net = FeatureNet(meta["in_channels"], meta["classes"], meta["width"], meta["dim"])
    try:
        net.load_state_dict(load(storage.read_bytes(storage.join(uri, "features.safetensors"))))
    except RuntimeError as e:
        raise _mismatch("feature net", uri, e, "retrain it with 'ambient-ray features'") from None
    net = net.eval().to(device)
    size, channels = meta["img_resolution"], meta["in_channels"]

    def fn(x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != channels or x.shape[2] != size or x.shape[3] != size:
            raise ValueError(
                f"the feature net in {uri} takes {size}x{size} images with {channels} channels; "
                f"got {tuple(x.shape[1:])}"
            )
        return net.features(x)

    return Extractor(f"net:{uri}", fn, device=device)


def load(spec: str, device: str = "cpu") -> Extractor:
    """An :class:`Extractor` from a feature spec (see the module docstring)."""
    spec = spec.strip()
    if spec == "pixels":
        return Extractor("pixels", lambda x: x.flatten(1), device=device)
    name, at, uri = spec.partition("@")
    if name == "inception":
        if not at or not uri:
            raise ValueError(f"features {spec!r}: {INCEPTION_HELP}")
        return inception(uri, device)
    if name == "dinov2" or name.startswith("dinov2:"):
        if not at or not uri:
            raise ValueError(f"features {spec!r}: {DINOV2_HELP}")
        arch = name.partition(":")[2] or DINOV2_ARCH
        return dinov2(uri, arch, device)
    if name == "net" and at and uri:
        return feature_net(uri, device)
    raise ValueError(f"unknown features {spec!r}: give pixels, inception@WEIGHTS, dinov2[:ARCH]@WEIGHTS or net@FOLDER")
