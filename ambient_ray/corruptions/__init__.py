"""Deterministic image corruptions, parsed from spec strings such as ``blur:sigma=0.6``.

A corruption is a pure function of (image, spec, seed): every row carries its own seed, and the
random draws of a corruption come from ``numpy.random.default_rng(row_seed)`` alone, so the result
does not depend on how rows are batched or which worker runs them.

Images are float32 arrays of shape (N, H, W, C) with values in [0, 1]; a batch holds images of one
shape (see :func:`apply`, which groups a mixed list). Noise levels (``noise:sigma``) are given in the
diffusion data scale [-1, 1] used by the rest of ambient-ray, so ``noise:sigma=0.2`` is the same σ
as a diffusion noise level of 0.2 (in [0, 1] pixel units it is a standard deviation of 0.1).

Users add their own corruption with :func:`register`::

    from ambient_ray.corruptions import register, Param

    @register("posterize", levels=Param(int, 4, lo=2, hi=256))
    def posterize(x, rngs, levels):
        return np.round(x * (levels - 1)) / (levels - 1)

and name its module in the ``plugins`` config list (or ``--plugin``) so workers import it too.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from PIL import Image
from scipy import ndimage


class CorruptionError(ValueError):
    """A corruption spec that cannot be parsed or names something unknown."""


@dataclass(frozen=True)
class Param:
    """One parameter of a corruption: its type, default (None = required) and allowed range."""

    type: type
    default: Any = None
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False  # True: value must be > lo rather than >= lo

    def describe(self) -> str:
        if self.lo is None and self.hi is None:
            return self.type.__name__
        left = "(" if self.lo_open else "["
        lo = "-inf" if self.lo is None else f"{self.lo:g}"
        hi = "inf" if self.hi is None else f"{self.hi:g}"
        return f"{self.type.__name__} in {left}{lo}, {hi}]"

    def check(self, name: str, key: str, raw: Any) -> Any:
        try:
            value = self.type(raw)
            if self.type is int and float(raw) != value:
                raise ValueError
        except (TypeError, ValueError):
            raise CorruptionError(
                f"corruption '{name}': parameter '{key}'={raw!r} is not a {self.type.__name__}"
            ) from None
        if isinstance(value, float) and not math.isfinite(value):
            raise CorruptionError(f"corruption '{name}': parameter '{key}'={raw!r} must be finite")
        too_low = self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo)
        too_high = self.hi is not None and value > self.hi
        if too_low or too_high:
            raise CorruptionError(
                f"corruption '{name}': parameter '{key}'={raw!r} out of range; allowed: {self.describe()}"
            )
        return value


@dataclass(frozen=True)
class CorruptionType:
    name: str
    fn: Callable[..., np.ndarray]
    params: dict[str, Param] = field(default_factory=dict)


_REGISTRY: dict[str, CorruptionType] = {}


def register(name: str, **params: Param) -> Callable:
    """Decorator: register ``fn(x, rngs, **params) -> x'`` under ``name``.

    ``x`` is float32 (N, H, W, C) in [0, 1]; ``rngs`` holds one ``numpy.random.Generator`` per image.
    The result is clipped to [0, 1] by the caller.
    """

    def deco(fn: Callable[..., np.ndarray]) -> Callable[..., np.ndarray]:
        _REGISTRY[name] = CorruptionType(name, fn, dict(params))
        return fn

    return deco


def registered() -> dict[str, CorruptionType]:
    return dict(_REGISTRY)


@dataclass(frozen=True)
class Corruption:
    """A parsed spec: the corruption type and its validated parameters."""

    name: str
    params: tuple[tuple[str, Any], ...]
    # the function travels with the spec, so workers need not have imported the plugin that registered it
    fn: Callable[..., np.ndarray] = field(compare=False, repr=False, default=None)

    @property
    def spec(self) -> str:
        """Canonical spec string (parameters sorted, defaults filled in)."""
        if not self.params:
            return self.name
        return self.name + ":" + ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.params)

    def __call__(self, x: np.ndarray, rngs: list[np.random.Generator]) -> np.ndarray:
        if x.ndim != 4:
            raise ValueError(f"corruption {self.spec}: expected a (N, H, W, C) batch, got shape {x.shape}")
        out = self.fn(x.astype(np.float32, copy=False), rngs, **dict(self.params))
        return np.clip(out, 0.0, 1.0).astype(np.float32, copy=False)


def parse(spec: str) -> Corruption:
    """Parse ``name:key=value,key=value`` into a validated :class:`Corruption`."""
    if not isinstance(spec, str) or not spec.strip():
        raise CorruptionError(f"empty corruption spec {spec!r}; expected e.g. 'blur:sigma=0.6'")
    name, _, rest = spec.strip().partition(":")
    name = name.strip()
    if name not in _REGISTRY:
        raise CorruptionError(f"unknown corruption '{name}' in spec {spec!r}; known: {', '.join(sorted(_REGISTRY))}")
    ctype = _REGISTRY[name]
    given: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = part.partition("=")
        key = key.strip()
        if not eq:
            raise CorruptionError(f"corruption spec {spec!r}: '{part}' is not key=value")
        if key not in ctype.params:
            allowed = ", ".join(f"{k} ({p.describe()})" for k, p in ctype.params.items()) or "none"
            raise CorruptionError(f"corruption '{name}' has no parameter '{key}'; allowed: {allowed}")
        if key in given:
            raise CorruptionError(f"corruption spec {spec!r}: parameter '{key}' given twice")
        given[key] = value.strip()
    values = {}
    for key, p in ctype.params.items():
        if key in given:
            values[key] = p.check(name, key, given[key])
        elif p.default is None:
            raise CorruptionError(
                f"corruption '{name}' needs parameter '{key}' ({p.describe()}), e.g. '{name}:{key}=...'"
            )
        else:
            values[key] = p.default
    return Corruption(name, tuple(sorted(values.items())), ctype.fn)


def apply(corruption: Corruption, images: list[np.ndarray], seeds: list[int]) -> list[np.ndarray]:
    """Corrupt a list of uint8 (H, W, C) images, grouping equal shapes into vectorised batches.

    Returns uint8 images of the same shapes, in order.
    """
    if len(images) != len(seeds):
        raise ValueError("apply: one seed per image is required")
    out: list[np.ndarray | None] = [None] * len(images)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, img in enumerate(images):
        groups.setdefault(img.shape, []).append(i)
    for idx in groups.values():
        batch = np.stack([images[i] for i in idx]).astype(np.float32) / 255.0
        rngs = [np.random.default_rng(seeds[i]) for i in idx]
        result = corruption(batch, rngs)
        result = np.round(result * 255.0).astype(np.uint8)
        for j, i in enumerate(idx):
            out[i] = result[j]
    return out  # type: ignore[return-value]


# ----------------------------------------------------------------------------- built-ins


@register("blur", sigma=Param(float, None, lo=0.0, lo_open=True))
def _blur(x, rngs, sigma):
    """Gaussian blur with standard deviation ``sigma`` pixels (reflecting borders)."""
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


@register("mask", p=Param(float, None, lo=0.0, hi=1.0))
def _mask(x, rngs, p):
    """Hide each pixel (all channels) independently with probability ``p`` (set to 0)."""
    keep = np.stack([rng.random(x.shape[1:3]) >= p for rng in rngs])
    return x * keep[..., None]


@register("block_mask", size=Param(int, None, lo=1), count=Param(int, 1, lo=1))
def _block_mask(x, rngs, size, count):
    """Hide ``count`` square blocks of ``size`` pixels at uniformly random positions (set to 0)."""
    out = x.copy()
    h, w = x.shape[1:3]
    bh, bw = min(size, h), min(size, w)
    for i, rng in enumerate(rngs):
        for _ in range(count):
            top = int(rng.integers(0, h - bh + 1))
            left = int(rng.integers(0, w - bw + 1))
            out[i, top : top + bh, left : left + bw, :] = 0.0
    return out


@register("noise", sigma=Param(float, None, lo=0.0))
def _noise(x, rngs, sigma):
    """Additive Gaussian noise of standard deviation ``sigma`` in the [-1, 1] data scale."""
    z = np.stack([rng.standard_normal(x.shape[1:], dtype=np.float32) for rng in rngs])
    return x + (sigma / 2.0) * z


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
