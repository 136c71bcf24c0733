"""Pictures people would rather look at than read: image grids and previews (matplotlib, Agg)."""

from __future__ import annotations

import io
import math

import numpy as np


def figure_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def image_rows(rows: list[tuple[str, list[np.ndarray]]], title: str = "") -> bytes:
    """A PNG of labelled rows of uint8 (H, W, C) images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = max(len(imgs) for _, imgs in rows)
    fig, axes = plt.subplots(len(rows), ncols, figsize=(1.1 * ncols + 1.5, 1.2 * len(rows) + 0.4), squeeze=False)
    for r, (label, imgs) in enumerate(rows):
        for c in range(ncols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            for s in ax.spines.values():
                s.set_visible(False)
            if c < len(imgs):
                img = imgs[c]
                ax.imshow(
                    img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=255, interpolation="nearest"
                )
        axes[r][0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return figure_png(fig)


def image_grid(images: np.ndarray, ncols: int, pad: int = 0, pad_value: int = 255) -> np.ndarray:
    """Tile uint8 (N, H, W, C) images row by row into one (rows·H', ncols·W', C) uint8 array.

    ``pad`` pixels of ``pad_value`` go between and around the tiles; empty cells of the last row are
    ``pad_value`` too. Save it with ``PIL.Image.fromarray(grid[..., 0] if C == 1 else grid)``.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"image_grid expects uint8 (N, H, W, C), got {images.dtype} {images.shape}")
    if ncols < 1:
        raise ValueError(f"ncols must be >= 1 (got {ncols})")
    n, h, w, c = images.shape
    nrows = max(1, math.ceil(n / ncols))
    grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), pad_value, np.uint8)
    for k in range(n):
        r, q = divmod(k, ncols)
        top, left = pad + r * (h + pad), pad + q * (w + pad)
        grid[top : top + h, left : left + w] = images[k]
    return grid


def image_grid_png(images: np.ndarray, ncols: int | None = None) -> bytes:
    """A PNG of uint8 (N, H, W, C) images tiled in a grid (no axes), upscaled for small images."""
    from PIL import Image

    grid = image_grid(images, ncols or int(np.ceil(np.sqrt(len(images)))), pad=1, pad_value=255)
    im = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    scale = max(1, 256 // max(grid.shape[:2]))
    if scale > 1:
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def coverage_plot(donut: list[dict], title: str = "σ coverage") -> bytes:
    """The σ "donut" (Ambient-o Fig. 10): per σ bucket, samples eligible whole / via crops, and draws."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{d['sigma_lo']:g}–{d['sigma_hi']:g}" for d in donut]
    x = np.arange(len(donut))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.6))
    a1.bar(x, [d["eligible_full"] for d in donut], label="whole samples", color="tab:blue")
    a1.bar(
        x,
        [d["eligible_crops"] for d in donut],
        bottom=[d["eligible_full"] for d in donut],
        label="crops",
        color="tab:orange",
    )
    a1.set_title("samples eligible at the bucket's lower σ")
    a2.bar(x, [d["full_draws"] for d in donut], label="whole", color="tab:blue")
    a2.bar(
        x, [d["crop_draws"] for d in donut], bottom=[d["full_draws"] for d in donut], label="crops", color="tab:orange"
    )
    a2.set_title("training draws per σ bucket")
    for a in (a1, a2):
        a.set_xticks(x)
        a.set_xticklabels(labels, rotation=45, ha="right", fontsize=7)
        a.set_xlabel("σ bucket")
        a.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    return figure_png(fig)


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def prob_curves(
    x,
    series: dict,
    xlabel: str = "σ",
    *,
    tau: float | None = None,
    title: str = "",
    logx: bool | None = None,
    marks: dict | None = None,
) -> bytes:
    """Classifier probability against σ (or crop size), one line per group (Ambient-o Fig. 2), with
    the threshold τ as a dashed line and optional vertical ``marks`` (name -> x)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    xs = np.asarray(x, dtype=float)
    for name, curve in series.items():
        ax.plot(xs, np.asarray(curve, dtype=float), marker=".", label=name)
    if tau is not None:
        ax.axhline(tau, color="red", linestyle="--", linewidth=1, label=f"τ = {tau:g}")
    for name, at in (marks or {}).items():
        ax.axvline(at, color="grey", linestyle=":", linewidth=1)
        ax.text(at, 0.02, f" {name}", fontsize=7, rotation=90, va="bottom")
    if logx if logx is not None else xlabel == "σ":
        ax.set_xscale("log")
    ax.set_ylim(0, 1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("mean P(good)")
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title, fontsize=10)
    return figure_png(fig)


def sigma_histogram(groups: dict, title: str = "σ_min per sample", xlabel: str = "σ_min") -> bytes:
    """Histogram of an annotation (σ_min or σ_max) per group of rows (e.g. per corruption), log-spaced bins."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    vals = [np.asarray(v, dtype=float) for v in groups.values()]
    pos = np.concatenate([v[v > 0] for v in vals]) if vals else np.array([])
    if pos.size:
        bins = np.geomspace(max(pos.min() * 0.9, 1e-3), pos.max() * 1.1, 30)
        for name, v in zip(groups, vals):
            if (v > 0).any():
                ax.hist(v[v > 0], bins=bins, alpha=0.6, label=f"{name} (n={len(v)}, mean {v.mean():.2f})")
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("rows")
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=10)
    return figure_png(fig)


def locality_plot(contexts, sigmas, losses, crop) -> bytes:
    """Ambient-o Figs. 11-12: centre-patch denoising loss against the context size, one line per σ
    (the chosen crop(σ) marked), and crop(σ) against σ."""
    plt = pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.8))
    cmap = plt.get_cmap("viridis")
    losses = np.asarray(losses, dtype=float)
    for j, s in enumerate(sigmas):
        color = cmap(j / max(1, len(sigmas) - 1))
        a1.plot(contexts, losses[j] / losses[j, -1], color=color, marker=".", label=f"σ={s:.3g}")
        k = list(contexts).index(crop[j])
        a1.plot([crop[j]], [losses[j, k] / losses[j, -1]], "o", color=color, markersize=8)
    a1.set_xlabel("context size (pixels)")
    a1.set_ylabel("centre-patch loss / full-context loss")
    a1.set_yscale("log")
    a1.legend(fontsize=6, ncol=2)
    a2.plot(sigmas, crop, marker="o")
    a2.set_xscale("log")
    a2.set_xlabel("σ")
    a2.set_ylabel("crop(σ) (pixels)")
    a2.set_title("context needed for the full-context loss", fontsize=9)
    return figure_png(fig)
