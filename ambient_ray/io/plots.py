"""Pictures people would rather look at than read: image grids, previews and the stages' plots (matplotlib,
Agg), with one colour per kind of data (:data:`PALETTE`, :func:`colour`) in every plot."""

from __future__ import annotations

import io
import math
import re
import zlib

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
    fig, axes = plt.subplots(
        len(rows), ncols, figsize=(1.1 * ncols + 1.5, 1.2 * len(rows) + 0.4), squeeze=False, layout="constrained"
    )
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
        known = kind_of(label) in PALETTE  # a corruption's (or clean) row label in its kind's colour
        axes[r][0].set_ylabel(
            label, rotation=0, ha="right", va="center", fontsize=8, color=colour(label) if known else "black"
        )
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


# at least this many pixels along a sample grid's longer side: tiny images (8x8 digits) are scaled up by a whole
# factor with nearest-neighbour, so each pixel stays a sharp square
GRID_MIN_PX = 512


def image_grid_png(images: np.ndarray, ncols: int | None = None, min_px: int = GRID_MIN_PX) -> bytes:
    """A PNG of uint8 (N, H, W, C) images tiled in a grid (no axes): each image scaled up by the whole factor
    (nearest-neighbour) that brings the grid's longer side to at least ``min_px`` pixels, 2-pixel white gaps."""
    from PIL import Image

    images = np.asarray(images)
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"image_grid_png expects uint8 (N, H, W, C), got {images.dtype} {images.shape}")
    ncols = ncols or int(np.ceil(np.sqrt(len(images))))
    nrows = max(1, math.ceil(len(images) / ncols))
    _, h, w, _ = images.shape
    scale = max(1, math.ceil(min_px / max(nrows * h, ncols * w, 1)))
    if scale > 1:
        images = images.repeat(scale, axis=1).repeat(scale, axis=2)
    grid = image_grid(images, ncols, pad=2 if scale > 1 else 1, pad_value=255)
    im = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------------ one colour per kind

# Every plot colours a kind of data the same way: clean rows, each corruption (by its family: all blur:sigma=...
# share blur's colour), corrupted rows in general, and the whole samples and crops of the σ coverage.
PALETTE = {
    "clean": "#1f77b4",  # blue
    "corrupted": "#d62728",  # red: corrupted rows taken together ("bad (the rest)")
    "blur": "#ff7f0e",
    "jpeg": "#2ca02c",
    "noise": "#9467bd",
    "motion_blur": "#8c564b",
    "mask": "#e377c2",
    "block_mask": "#bcbd22",
    "contrast": "#17becf",
    "color_shift": "#7f7f7f",
    "whole": "#34495e",  # whole samples (σ coverage)
    "crops": "#e6ab02",  # crops (σ coverage, σ_max, crop(σ))
}
# kinds not listed above (a corruption registered elsewhere): a colour picked by the name, the same in every plot
EXTRA_COLOURS = ("#1b9e77", "#7570b3", "#e7298a", "#66a61e", "#a6761d", "#666666", "#0b6e4f", "#8e6c8a")
THRESHOLD_COLOUR = "black"  # τ


def kind_of(name: str) -> str:
    """The kind a series or group name shows: ``clean``, a corruption family (``blur`` for ``blur:sigma=0.6``),
    ``corrupted``, ``whole`` or ``crops``; otherwise the name's family (the part before ``:``). The
    classifier's ``good (FIELD=VALUE)`` / ``bad (FIELD=VALUE)`` take the kind of a single corruption or
    quality they name, else clean (good) or corrupted (bad)."""
    role = re.fullmatch(r"(good|bad)\s*\((.*)\)", name.strip(), re.IGNORECASE)
    if role:
        fld, _, values = role.group(2).partition("=")
        one = values.split(",")[0] if values and "," not in values else ""
        if one and (fld.strip().lower() == "corruption" or kind_of(one) in PALETTE):
            return kind_of(one)
        return "clean" if role.group(1).lower() == "good" else "corrupted"
    tokens = re.findall(r"[a-z_]+", name.lower())
    for t in tokens:
        if t in PALETTE:
            return t
        if t == "crop":
            return "crops"
    return name.split(":", 1)[0].strip().lower()


def colour(name: str) -> str:
    """The colour of ``name``'s kind (:func:`kind_of`), the same in every plot."""
    kind = kind_of(name)
    if kind in PALETTE:
        return PALETTE[kind]
    return EXTRA_COLOURS[zlib.crc32(kind.encode()) % len(EXTRA_COLOURS)]


# ------------------------------------------------------------------------------ plots


def coverage_figure(donut: list[dict], title: str = "σ coverage"):
    """The σ "donut" (Ambient-o Fig. 10) as a figure: per σ bucket, samples eligible whole / via crops, and
    training draws. The crops' bars (and legend entry) only where some bucket has crops."""
    plt = pyplot()
    labels = [f"{d['sigma_lo']:g}–{d['sigma_hi']:g}" for d in donut]
    x = np.arange(len(donut))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.0), layout="constrained")
    panels = (
        ("eligible_full", "eligible_crops", "samples eligible at the bucket's lower σ", "samples"),
        ("full_draws", "crop_draws", "training draws per σ bucket", "draws"),
    )
    for ax, (whole_key, crop_key, panel_title, ylabel) in zip(axes, panels):
        whole = np.array([d[whole_key] for d in donut], dtype=float)
        crops = np.array([d[crop_key] for d in donut], dtype=float)
        ax.bar(x, whole, width=0.7, label="whole samples", color=PALETTE["whole"])
        if crops.any():
            ax.bar(x, crops, width=0.7, bottom=whole, label="crops", color=PALETTE["crops"])
        top = float((whole + crops).max()) if len(x) else 0.0
        ax.set_ylim(0, top * 1.12 if top > 0 else 1.0)  # headroom: no bar touches the frame
        ax.set_xlim(-0.6, len(x) - 0.4)
        ax.set_xticks(x)
        ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=7)
        ax.set_xlabel("σ bucket")
        ax.set_ylabel(ylabel)
        ax.set_title(panel_title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
        ax.legend(fontsize=8, loc="upper left")
    fig.suptitle(title, fontsize=11)
    return fig


def coverage_plot(donut: list[dict], title: str = "σ coverage") -> bytes:
    """PNG of :func:`coverage_figure`."""
    return figure_png(coverage_figure(donut, title))


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def prob_curves_figure(
    x,
    series: dict,
    xlabel: str = "σ",
    *,
    tau: float | None = None,
    title: str = "",
    logx: bool | None = None,
    marks: dict | None = None,
):
    """Classifier probability against σ (or crop size), one line per group (Ambient-o Fig. 2) in its kind's
    colour, with the threshold τ as a dashed line. ``marks``: name -> x, or name -> (x, series name), a dotted
    vertical line (in that series' colour) named in the legend."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.8), layout="constrained")
    xs = np.asarray(x, dtype=float)
    for name, curve in series.items():
        ax.plot(xs, np.asarray(curve, dtype=float), marker=".", label=name, color=colour(name))
    if tau is not None:
        ax.axhline(tau, color=THRESHOLD_COLOUR, linestyle="--", linewidth=1, label=f"τ = {tau:g}")
    for name, at in (marks or {}).items():
        at, of = at if isinstance(at, (tuple, list)) else (at, None)
        ax.axvline(
            at, color=colour(of) if of else "grey", linestyle=":", linewidth=1.5, label=f"{name} = {float(at):.3g}"
        )
    if logx if logx is not None else xlabel == "σ":
        ax.set_xscale("log")
    ax.set_ylim(0, 1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("mean P(good)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    if title:
        ax.set_title(title, fontsize=10)
    return fig


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
    """PNG of :func:`prob_curves_figure`."""
    return figure_png(prob_curves_figure(x, series, xlabel, tau=tau, title=title, logx=logx, marks=marks))


def sigma_histogram_figure(groups: dict, title: str = "σ_min per sample", xlabel: str = "σ_min", kinds=None):
    """Histogram of an annotation (σ_min or σ_max) per group of rows (e.g. per corruption), log-spaced bins, each
    group in its kind's colour (``kinds``: group -> the name whose colour it takes, default the group's own)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.6), layout="constrained")
    vals = [np.asarray(v, dtype=float) for v in groups.values()]
    pos = np.concatenate([v[v > 0] for v in vals]) if vals else np.array([])
    if pos.size:
        bins = np.geomspace(max(pos.min() * 0.9, 1e-3), pos.max() * 1.1, 30)
        for name, v in zip(groups, vals):
            if (v > 0).any():
                c = colour((kinds or {}).get(name, name))
                label = f"{name} (n={len(v)}, mean {v.mean():.2f})"
                ax.hist(v[v > 0], bins=bins, alpha=0.55, color=c, edgecolor=c, linewidth=0.8, label=label)
        ax.set_xscale("log")
        ax.legend(fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("rows")
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.set_title(title, fontsize=10)
    return fig


def sigma_histogram(groups: dict, title: str = "σ_min per sample", xlabel: str = "σ_min", kinds=None) -> bytes:
    """PNG of :func:`sigma_histogram_figure`."""
    return figure_png(sigma_histogram_figure(groups, title, xlabel, kinds))


def locality_figure(contexts, sigmas, losses, crop):
    """Ambient-o Figs. 11-12: centre-patch denoising loss against the context size, one line per σ
    (the chosen crop(σ) marked), and crop(σ) against σ."""
    plt = pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.8), layout="constrained")
    cmap = plt.get_cmap("viridis")
    losses = np.asarray(losses, dtype=float)
    for j, s in enumerate(sigmas):
        c = cmap(j / max(1, len(sigmas) - 1))
        a1.plot(contexts, losses[j] / losses[j, -1], color=c, marker=".", label=f"σ={s:.3g}")
        k = list(contexts).index(crop[j])
        a1.plot([crop[j]], [losses[j, k] / losses[j, -1]], "o", color=c, markersize=8)
    a1.set_xlabel("context size (pixels)")
    a1.set_ylabel("centre-patch loss / full-context loss")
    a1.set_yscale("log")
    from matplotlib.ticker import FormatStrFormatter

    for fmt in (a1.yaxis.set_major_formatter, a1.yaxis.set_minor_formatter):
        fmt(FormatStrFormatter("%.3g"))  # 1.2, not 1.2 × 10⁰
    a1.grid(alpha=0.3)
    a1.legend(fontsize=6, ncol=2)
    a1.set_title("centre-patch loss by context (chosen crop(σ): large dot)", fontsize=9)
    a2.plot(sigmas, crop, marker="o", color=PALETTE["crops"])
    a2.set_xscale("log")
    a2.set_xlabel("σ")
    a2.set_ylabel("crop(σ) (pixels)")
    a2.grid(alpha=0.3)
    a2.set_title("context needed for the full-context loss", fontsize=9)
    return fig


def locality_plot(contexts, sigmas, losses, crop) -> bytes:
    """PNG of :func:`locality_figure`."""
    return figure_png(locality_figure(contexts, sigmas, losses, crop))


def similarity_histogram_figure(
    groups: dict, threshold: float, title: str = "top-1 similarity to the training set", kinds=None
):
    """Histogram of each sample's top-1 cosine similarity to the training set, one series per group (the generated
    samples; held-out real images as the no-copy baseline), each in its kind's colour (``kinds``: group -> the name
    whose colour it takes), with the copy threshold as a dashed line; the legend gives each group's share above it."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.6), layout="constrained")
    vals = [np.asarray(v, dtype=float).reshape(-1) for v in groups.values()]
    everything = np.concatenate(vals) if vals else np.array([])
    lo = min(float(everything.min()) if everything.size else threshold, threshold)
    lo = max(-1.0, lo - 0.02 * max(1.0 - lo, 1e-3))
    bins = np.linspace(lo, 1.0, 41)
    for name, v in zip(groups, vals):
        if v.size:
            c = colour((kinds or {}).get(name, name))
            label = f"{name} (n={v.size}, median {np.median(v):.3f}, {np.mean(v > threshold):.1%} > {threshold:g})"
            ax.hist(v, bins=bins, alpha=0.55, color=c, edgecolor=c, linewidth=0.8, label=label)
    ax.axvline(threshold, color=THRESHOLD_COLOUR, linestyle="--", linewidth=1, label=f"threshold {threshold:g}")
    ax.set_xlim(lo, 1.0 + 0.01 * (1.0 - lo))
    ax.set_xlabel("top-1 cosine similarity to the training set")
    ax.set_ylabel("samples")
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend(fontsize=7, loc="upper left")
    ax.set_title(title, fontsize=10)
    return fig


def similarity_histogram(
    groups: dict, threshold: float, title: str = "top-1 similarity to the training set", kinds=None
) -> bytes:
    """PNG of :func:`similarity_histogram_figure`."""
    return figure_png(similarity_histogram_figure(groups, threshold, title, kinds))


def theory_figure(sigmas, bound_curves: dict, simulated: dict, marks: dict, title: str = ""):
    """The theory's picture: the bounds (dashed) and the simulated TVs (solid) against σ, log-log, with each
    crossover σ* a dotted vertical line (an infinite one is named in the legend as "none")."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.2, 4.2), layout="constrained")
    xs = np.asarray(sigmas, dtype=float)
    colours = ("tab:blue", "tab:orange")
    for (name, ys), c in zip(bound_curves.items(), colours):
        ax.plot(xs, np.asarray(ys, dtype=float), linestyle="--", color=c, label=name)
    for (name, ys), c in zip(simulated.items(), colours):
        ax.plot(xs, np.asarray(ys, dtype=float), marker=".", color=c, label=name)
    ax.axhline(1.0, color="grey", linewidth=0.8, label="TV = 1 (a bound above it is vacuous)")
    for (name, at), style in zip(marks.items(), (":", "-.")):
        if np.isfinite(at) and xs[0] <= at <= xs[-1]:
            ax.axvline(at, color="black", linestyle=style, linewidth=1.2, label=f"{name} = {at:.3g}")
        else:
            ax.plot(
                [],
                [],
                color="black",
                linestyle=style,
                label=f"{name}: " + ("none" if not np.isfinite(at) else f"{at:.3g} (off the plot)"),
            )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("σ")
    ax.set_ylabel("d_TV(p_σ, estimate)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    if title:
        ax.set_title(title, fontsize=9)
    return fig


def theory_plot(sigmas, bound_curves: dict, simulated: dict, marks: dict, title: str = "") -> bytes:
    """PNG of :func:`theory_figure`."""
    return figure_png(theory_figure(sigmas, bound_curves, simulated, marks, title))


def tv_curves_figure(found):
    """An annotated dataset's TV̂(σ) per corrupted set (points), its fitted contraction min(d₀, C/σ) (dashed), and
    the level 1 − 2τ where an optimal classifier is fooled to τ; ``found``: a theory.annotation.AnnotationTheory."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.8, 3.8), layout="constrained")
    grid = np.asarray(found.grid, dtype=float)
    for i, s in enumerate(found.sets):  # one colour per set (sets of one corruption family differ by strength)
        c = f"C{i % 10}"
        ax.plot(grid, s.tv, marker=".", color=c, label=f"{s.name} (n={s.rows})")
        fit = np.minimum(s.d0, s.contraction / grid)
        ax.plot(grid, fit, linestyle="--", color=c, label=f"min({s.d0:.2f}, {s.contraction:.3g}/σ)")
    level = 1.0 - 2.0 * found.tau
    ax.axhline(level, color=THRESHOLD_COLOUR, linestyle=":", linewidth=1, label=f"1 − 2τ = {level:g}")
    ax.set_xscale("log")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("σ")
    ax.set_ylabel("estimated d_TV(p_σ, q_σ)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    ax.set_title(f"classifier-estimated TV ({found.estimator}) and Theorem 4.2's shape", fontsize=9)
    return fig


def tv_curves_plot(found) -> bytes:
    """PNG of :func:`tv_curves_figure`."""
    return figure_png(tv_curves_figure(found))
