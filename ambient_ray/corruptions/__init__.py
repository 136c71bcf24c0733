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

A corruption that hides pixels registers with ``masks=True`` and returns ``(x', mask)``: ``mask`` is
(N, H, W) (or (N, 1, H, W) or (N, H, W, 1)), nonzero = observed, one value per pixel shared by every
channel. The caller zeroes the hidden pixels of ``x'`` and the corrupt stage stores the mask as the
row's ``mask`` column (Ambient Diffusion: the mask is data)::

    @register("left_half", masks=True)
    def left_half(x, rngs):
        keep = np.ones(x.shape[:3], bool)
        keep[:, :, : x.shape[2] // 2] = False
        return x, keep

Calling a :class:`Corruption` gives the image alone; :meth:`Corruption.run` and :func:`apply_with_masks`
give the masks too (all ones for a corruption that hides nothing).
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np


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
    masks: bool = False  # fn returns (image, mask): the corruption hides pixels and says which


_REGISTRY: dict[str, CorruptionType] = {}


def register(name: str, masks: bool = False, **params: Param) -> Callable:
    """Decorator: register ``fn(x, rngs, **params) -> x'`` under ``name``.

    ``x`` is float32 (N, H, W, C) in [0, 1]; ``rngs`` holds one ``numpy.random.Generator`` per image.
    The result is clipped to [0, 1] by the caller. With ``masks=True`` the function returns ``(x', mask)``,
    ``mask`` (N, H, W) with nonzero = observed; the caller sets the hidden pixels of ``x'`` to 0.
    """

    def deco(fn: Callable[..., np.ndarray]) -> Callable[..., np.ndarray]:
        _REGISTRY[name] = CorruptionType(name, fn, dict(params), bool(masks))
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
    masks: bool = field(compare=False, default=False)

    @property
    def spec(self) -> str:
        """Canonical spec string (parameters sorted, defaults filled in)."""
        if not self.params:
            return self.name
        return self.name + ":" + ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.params)

    def __call__(self, x: np.ndarray, rngs: list[np.random.Generator]) -> np.ndarray:
        return self.run(x, rngs)[0]

    def run(self, x: np.ndarray, rngs: list[np.random.Generator]) -> tuple[np.ndarray, np.ndarray | None]:
        """(corrupted float32 (N, H, W, C) in [0, 1], bool (N, H, W) mask of the observed pixels, or None
        for a corruption that hides nothing); the hidden pixels of the image are 0."""
        if x.ndim != 4:
            raise ValueError(f"corruption {self.spec}: expected a (N, H, W, C) batch, got shape {x.shape}")
        out = self.fn(x.astype(np.float32, copy=False), rngs, **dict(self.params))
        if not self.masks:
            return np.clip(out, 0.0, 1.0).astype(np.float32, copy=False), None
        if not (isinstance(out, tuple) and len(out) == 2):
            raise ValueError(f"corruption {self.spec}: registered with masks=True, must return (image, mask)")
        out, mask = out
        mask = _mask_batch(np.asarray(mask), x.shape, self.spec)
        return (np.clip(out, 0.0, 1.0) * mask[..., None]).astype(np.float32, copy=False), mask


def _mask_batch(mask: np.ndarray, shape: tuple[int, ...], spec: str) -> np.ndarray:
    """A corruption's mask as bool (N, H, W), from (N, H, W), (N, 1, H, W) or (N, H, W, 1)."""
    n, h, w = shape[:3]
    if mask.shape == (n, 1, h, w):
        mask = mask[:, 0]
    elif mask.shape == (n, h, w, 1):
        mask = mask[..., 0]
    if mask.shape != (n, h, w):
        raise ValueError(f"corruption {spec}: mask of shape {mask.shape} for images of shape {tuple(shape)}")
    return mask != 0


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
    return Corruption(name, tuple(sorted(values.items())), ctype.fn, ctype.masks)


def apply(corruption: Corruption, images: list[np.ndarray], seeds: list[int]) -> list[np.ndarray]:
    """Corrupt a list of uint8 (H, W, C) images, grouping equal shapes into vectorised batches.

    Returns uint8 images of the same shapes, in order.
    """
    return apply_with_masks(corruption, images, seeds)[0]


def apply_with_masks(
    corruption: Corruption, images: list[np.ndarray], seeds: list[int]
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """:func:`apply`, and per image its uint8 (H, W) mask, 1 = observed (all ones for a corruption that
    hides nothing); a hidden pixel is 0 in every channel of its image."""
    if len(images) != len(seeds):
        raise ValueError("apply: one seed per image is required")
    out: list[np.ndarray | None] = [None] * len(images)
    masks: list[np.ndarray | None] = [None] * len(images)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, img in enumerate(images):
        groups.setdefault(img.shape, []).append(i)
    for shape, idx in groups.items():
        batch = np.stack([images[i] for i in idx]).astype(np.float32) / 255.0
        rngs = [np.random.default_rng(seeds[i]) for i in idx]
        result, mask = corruption.run(batch, rngs)
        result = np.round(result * 255.0).astype(np.uint8)
        mask = np.ones((len(idx), *shape[:2]), np.uint8) if mask is None else mask.astype(np.uint8)
        for j, i in enumerate(idx):
            out[i] = result[j]
            masks[i] = mask[j]
    return out, masks  # type: ignore[return-value]


importlib.import_module(f"{__name__}.builtin")  # registers the built-in corruptions
