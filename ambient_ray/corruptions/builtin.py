"""The built-in corruptions (``ambient-ray corrupt --list-corruptions``): blur, motion blur, JPEG, pixel,
block and box masks, additive noise, contrast and colour shifts, each a pure function of (image, spec, row seed).

The masks (``mask``, ``block_mask``, ``box_mask``) are registered with ``masks=True``: besides the image with
its hidden pixels set to 0 they return which pixels are observed, which the corrupt stage stores as the row's
``mask`` column (Ambient Diffusion trains on it). ``noise`` is registered with ``noisy=True``: besides the clipped
image it returns the unclipped noisy data and its σ_n, which the corrupt stage stores as the row's ``noisy`` and
``sigma_n`` columns (Denoising Score Distillation trains on them)."""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

from ambient_ray.corruptions import Param, register


@register("blur", sigma=Param(float, None, lo=0.0, lo_open=True))
def _blur(x, rngs, sigma):
    """Gaussian blur with standard deviation ``sigma`` pixels (reflecting borders)."""
    from scipy import ndimage  # here: the corruption registry (a --help, a config error) is read without scipy

    return ndimage.gaussian_filter(x, sigma=(0, sigma, sigma, 0), mode="reflect", truncate=4.0)


def motion_kernel(length: float, angle: float) -> np.ndarray:
    """A normalised line kernel of ``length`` pixels at ``angle`` degrees (bilinear rasterisation)."""
    half = (length - 1) / 2.0
    size = 2 * int(math.ceil(half)) + 1
    k = np.zeros((size, size), np.float64)
    c = size // 2
    theta = math.radians(angle)
    n = max(2, int(math.ceil(length)) * 4)
    for t in np.linspace(-half, half, n):
        # rows grow downwards, so a positive angle tilts the line up and to the right
        px, py = c + t * math.cos(theta), c - t * math.sin(theta)
        x0, y0 = int(math.floor(px)), int(math.floor(py))
        fx, fy = px - x0, py - y0
        for dy, wy in ((0, 1 - fy), (1, fy)):
            for dx, wx in ((0, 1 - fx), (1, fx)):
                if 0 <= y0 + dy < size and 0 <= x0 + dx < size:
                    k[y0 + dy, x0 + dx] += wx * wy
    return (k / k.sum()).astype(np.float32)


@register("motion_blur", length=Param(float, None, lo=1.0), angle=Param(float, 0.0, lo=-360.0, hi=360.0))
def _motion_blur(x, rngs, length, angle):
    """Linear motion blur along a line of ``length`` pixels at ``angle`` degrees."""
    from scipy import ndimage

    k = motion_kernel(length, angle)
    return ndimage.convolve(x, k[None, :, :, None], mode="reflect")


@register("jpeg", quality=Param(int, None, lo=1, hi=95))
def _jpeg(x, rngs, quality):
    """JPEG compression at ``quality`` (PIL, 4:2:0 chroma subsampling for colour images)."""
    out = np.empty_like(x)
    for i, img in enumerate(np.round(x * 255.0).astype(np.uint8)):
        pil = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
        buf = io.BytesIO()
        pil.save(buf, format="JPEG", quality=quality)
        dec = np.asarray(Image.open(io.BytesIO(buf.getvalue())), dtype=np.float32) / 255.0
        out[i] = dec.reshape(img.shape)
    return out


@register("mask", masks=True, p=Param(float, None, lo=0.0, hi=1.0))
def _mask(x, rngs, p):
    """Hide each pixel (all channels) independently with probability ``p`` (set to 0; one draw per pixel)."""
    keep = np.stack([rng.random(x.shape[1:3]) >= p for rng in rngs])
    return x * keep[..., None], keep


@register("block_mask", masks=True, size=Param(int, None, lo=1), count=Param(int, 1, lo=1))
def _block_mask(x, rngs, size, count):
    """Hide ``count`` square blocks of ``size`` pixels at uniformly random positions (set to 0)."""
    keep = np.ones(x.shape[:3], bool)
    h, w = x.shape[1:3]
    bh, bw = min(size, h), min(size, w)
    for i, rng in enumerate(rngs):
        for _ in range(count):
            top = int(rng.integers(0, h - bh + 1))
            left = int(rng.integers(0, w - bw + 1))
            keep[i, top : top + bh, left : left + bw] = False
    return x * keep[..., None], keep


def box_side(size: float, side: int) -> int:
    """The side in pixels of a box that covers the fraction ``size`` of an image side of ``side`` pixels."""
    return min(side, max(1, int(round(size * side))))


@register("box_mask", masks=True, size=Param(float, 0.5, lo=0.0, lo_open=True, hi=1.0))
def _box_mask(x, rngs, size):
    """Hide one box whose sides are the fraction ``size`` of the image's (rounded, at least one pixel), at a
    uniformly random position: ``size=0.5`` hides a quarter of the image, as the box of Ambient Diffusion's
    MRI experiments."""
    keep = np.ones(x.shape[:3], bool)
    h, w = x.shape[1:3]
    bh, bw = box_side(size, h), box_side(size, w)
    for i, rng in enumerate(rngs):
        top = int(rng.integers(0, h - bh + 1))
        left = int(rng.integers(0, w - bw + 1))
        keep[i, top : top + bh, left : left + bw] = False
    return x * keep[..., None], keep


@register("noise", noisy=True, sigma=Param(float, None, lo=0.0))
def _noise(x, rngs, sigma):
    """Additive Gaussian noise of standard deviation ``sigma`` in the [-1, 1] data scale: y = (2x − 1) + σ·z, kept
    unclipped as the row's ``noisy`` column with ``sigma_n`` = σ (DSD's σ_n); the PNG image is y clipped."""
    z = np.stack([rng.standard_normal(x.shape[1:], dtype=np.float32) for rng in rngs])
    return x + (sigma / 2.0) * z, sigma


@register("contrast", factor=Param(float, None, lo=0.0))
def _contrast(x, rngs, factor):
    """Scale each image's deviation from its own mean intensity by ``factor`` (<1 lowers contrast)."""
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    return (x - mean) * factor + mean


@register(
    "color_shift",
    r=Param(float, 0.0, lo=-1.0, hi=1.0),
    g=Param(float, 0.0, lo=-1.0, hi=1.0),
    b=Param(float, 0.0, lo=-1.0, hi=1.0),
    max=Param(float, 0.0, lo=0.0, hi=1.0),
)
def _color_shift(x, rngs, r, g, b, max):
    """Add per-channel offsets: fixed ``r,g,b`` plus, if ``max`` > 0, a per-image draw in [-max, max].

    On single-channel images the mean of the three offsets is added.
    """
    fixed = np.array([r, g, b], np.float32)
    shifts = np.stack([fixed + (rng.uniform(-max, max, 3).astype(np.float32) if max > 0 else 0.0) for rng in rngs])
    if x.shape[-1] == 1:
        shifts = shifts.mean(axis=1, keepdims=True)
    elif x.shape[-1] != 3:
        raise ValueError(f"color_shift expects 1 or 3 channels, got {x.shape[-1]}")
    return x + shifts[:, None, None, :]
