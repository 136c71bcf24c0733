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

A corruption that adds noise whose level is known registers with ``noisy=True`` and returns ``(x', sigma_n)``:
``x'`` the noisy batch in the [0, 1] pixel scale, **unclipped**, and ``sigma_n`` (a float, or one per image) the
noise's standard deviation in the [-1, 1] data scale. The caller stores the image clipped and quantised as before,
and y = 2·x' − 1 unclipped and unquantised as the row's ``noisy`` column with ``sigma_n`` beside it (DSD: noisy
data is data; :mod:`ambient_ray.data.noisy`). The built-in ``noise`` is one::

    @register("noise", noisy=True, sigma=Param(float, None, lo=0.0))
    def noise(x, rngs, sigma):
        z = np.stack([rng.standard_normal(x.shape[1:], dtype=np.float32) for rng in rngs])
        return x + (sigma / 2.0) * z, sigma

A corruption is one or the other (masks or noisy), never both. Specs are not chained: a row gets one corruption.

Calling a :class:`Corruption` gives the image alone; :meth:`Corruption.run` and :func:`apply_with_masks`
give the masks too (all ones for a corruption that hides nothing); :meth:`Corruption.outcome` and
:func:`apply_all` give the masks, the unclipped noisy data and σ_n as well.
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
    noisy: bool = False  # fn returns (unclipped image, sigma_n): the corruption adds noise of a known level


_REGISTRY: dict[str, CorruptionType] = {}


def register(name: str, masks: bool = False, noisy: bool = False, **params: Param) -> Callable:
    """Decorator: register ``fn(x, rngs, **params) -> x'`` under ``name``.

    ``x`` is float32 (N, H, W, C) in [0, 1]; ``rngs`` holds one ``numpy.random.Generator`` per image.
    The result is clipped to [0, 1] by the caller. With ``masks=True`` the function returns ``(x', mask)``,
    ``mask`` (N, H, W) with nonzero = observed; the caller sets the hidden pixels of ``x'`` to 0. With
    ``noisy=True`` it returns ``(x', sigma_n)``: ``x'`` unclipped in the [0, 1] scale, ``sigma_n`` (a float or
    (N,) floats >= 0) the noise's standard deviation in the [-1, 1] data scale; the caller keeps y = 2·x' − 1
    unclipped as the noisy data.
    """
    if masks and noisy:
        raise ValueError(f"corruption {name!r}: masks=True and noisy=True together are not supported")

    def deco(fn: Callable[..., np.ndarray]) -> Callable[..., np.ndarray]:
        _REGISTRY[name] = CorruptionType(name, fn, dict(params), bool(masks), bool(noisy))
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
    noisy: bool = field(compare=False, default=False)

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
        o = self.outcome(x, rngs)
        return o.image, o.mask

    def outcome(self, x: np.ndarray, rngs: list[np.random.Generator]) -> Outcome:
        """The image (as :meth:`run`), the mask, and for a ``noisy=True`` corruption the noisy data y = 2·x' − 1
        (float32 (N, H, W, C), the [-1, 1] data scale, unclipped) and σ_n per image."""
        if x.ndim != 4:
            raise ValueError(f"corruption {self.spec}: expected a (N, H, W, C) batch, got shape {x.shape}")
        out = self.fn(x.astype(np.float32, copy=False), rngs, **dict(self.params))
        if self.noisy:
            if not (isinstance(out, tuple) and len(out) == 2):
                raise ValueError(f"corruption {self.spec}: registered with noisy=True, must return (image, sigma_n)")
            out, sigma_n = out
            out = np.asarray(out, np.float32)
            if out.shape != x.shape:
                raise ValueError(f"corruption {self.spec}: noisy images of shape {out.shape} for {x.shape}")
            sigma_n = np.broadcast_to(np.asarray(sigma_n, np.float64), (len(x),)).copy()
            if not (np.isfinite(sigma_n).all() and (sigma_n >= 0).all()):
                raise ValueError(f"corruption {self.spec}: sigma_n {sigma_n[:4].tolist()} must be finite and >= 0")
            noisy = out * np.float32(2.0) - np.float32(1.0)
            return Outcome(np.clip(out, 0.0, 1.0).astype(np.float32, copy=False), None, noisy, sigma_n)
        if not self.masks:
            return Outcome(np.clip(out, 0.0, 1.0).astype(np.float32, copy=False), None)
        if not (isinstance(out, tuple) and len(out) == 2):
            raise ValueError(f"corruption {self.spec}: registered with masks=True, must return (image, mask)")
        out, mask = out
        mask = _mask_batch(np.asarray(mask), x.shape, self.spec)
        return Outcome((np.clip(out, 0.0, 1.0) * mask[..., None]).astype(np.float32, copy=False), mask)


@dataclass(frozen=True)
class Outcome:
    """What a corruption made of a batch: ``image`` float32 (N, H, W, C) in [0, 1] (clipped; hidden pixels 0),
    ``mask`` bool (N, H, W) or None (hides nothing), and for a noisy corruption ``noisy`` float32 (N, H, W, C) in
    the [-1, 1] data scale (unclipped, unquantised) and ``sigma_n`` float64 (N,); else None."""

    image: np.ndarray
    mask: np.ndarray | None = None
    noisy: np.ndarray | None = None
    sigma_n: np.ndarray | None = None


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
    return Corruption(name, tuple(sorted(values.items())), ctype.fn, ctype.masks, ctype.noisy)


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
    a = apply_all(corruption, images, seeds)
    return a.images, a.masks


@dataclass(frozen=True)
class Applied:
    """Per image (in order): ``images`` uint8 (H, W, C), ``masks`` uint8 (H, W) 1 = observed, and for a noisy
    corruption ``noisy`` float32 (C, H, W) in the [-1, 1] data scale (unclipped, unquantised; None per image
    otherwise) and ``sigma_n`` (0.0 otherwise)."""

    images: list[np.ndarray]
    masks: list[np.ndarray]
    noisy: list[np.ndarray | None]
    sigma_n: list[float]


def apply_all(corruption: Corruption, images: list[np.ndarray], seeds: list[int]) -> Applied:
    """:func:`apply_with_masks`, and the noisy data and σ_n of a ``noisy=True`` corruption."""
    if len(images) != len(seeds):
        raise ValueError("apply: one seed per image is required")
    n = len(images)
    out: list = [None] * n
    masks: list = [None] * n
    noisy: list = [None] * n
    sigma_n = [0.0] * n
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, img in enumerate(images):
        groups.setdefault(img.shape, []).append(i)
    for shape, idx in groups.items():
        batch = np.stack([images[i] for i in idx]).astype(np.float32) / 255.0
        rngs = [np.random.default_rng(seeds[i]) for i in idx]
        o = corruption.outcome(batch, rngs)
        result = np.round(o.image * 255.0).astype(np.uint8)
        mask = np.ones((len(idx), *shape[:2]), np.uint8) if o.mask is None else o.mask.astype(np.uint8)
        for j, i in enumerate(idx):
            out[i] = result[j]
            masks[i] = mask[j]
            if o.noisy is not None:
                noisy[i] = np.ascontiguousarray(o.noisy[j].transpose(2, 0, 1))
                sigma_n[i] = float(o.sigma_n[j])
    return Applied(out, masks, noisy, sigma_n)


importlib.import_module(f"{__name__}.builtin")  # registers the built-in corruptions
