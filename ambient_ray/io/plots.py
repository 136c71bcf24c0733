"""Pictures people would rather look at than read: image grids and previews (matplotlib, Agg)."""

from __future__ import annotations

import io

import numpy as np
import pyarrow.parquet as pq

from ambient_ray.data.images import decode_png
from ambient_ray.data.sources import decode
from ambient_ray.io import storage


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


def corruption_preview(out: str, source, cfg, items, roles, specs, per_spec: int = 8) -> str:
    """Write ``OUT/preview.png``: for each corruption, originals above their corrupted versions."""
    wanted = {f"c{i}": [] for i in range(len(specs))}
    for f in storage.list_files(storage.join(out, "data"), (".parquet",)):
        fs, path = storage.filesystem(f)
        t = pq.read_table(path, filesystem=fs, columns=["id", "image", "quality", "corruption"]).to_pylist()
        for row in t:
            if row["quality"] != "corrupted":
                continue
            key = next((k for k, s in zip(wanted, specs) if s.spec == row["corruption"]), None)
            if key and len(wanted[key]) < per_spec:
                wanted[key].append(row)
        if all(len(v) >= per_spec for v in wanted.values()):
            break
    loc_of = dict(items)
    rows = []
    for spec, key in zip(specs, wanted):
        picked = wanted[key]
        if not picked:
            continue
        records = source.load([loc_of[r["id"]] for r in picked])
        originals = [decode(rec, cfg.source)[0] for rec in records]
        rows.append(("original", [o for o in originals if o is not None]))
        rows.append((spec.spec, [decode_png(r["image"]) for r in picked]))
    uri = storage.join(out, "preview.png")
    if rows:
        storage.write_bytes(uri, image_rows(rows, title=f"clean vs corrupted ({cfg.source.dataset})"))
    return uri


def image_grid_png(images: np.ndarray, ncols: int | None = None) -> bytes:
    """A PNG of uint8 (N, H, W, C) images tiled in a grid (no axes), upscaled for small images."""
    from PIL import Image

    from ambient_ray.diffusion.samplers import image_grid

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
