"""The stages' plots (issue 31): sample grids large and sharp, one colour per kind in every plot, the σ coverage
readable (no overlapping titles, bars clear of the frame, labelled axes, no empty legend entries)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from matplotlib.colors import to_hex
from PIL import Image

from ambient_ray.io import plots


def _png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


@pytest.mark.parametrize("n, size, channels", [(36, 8, 1), (4, 8, 3), (64, 28, 1)])
def test_a_grid_of_small_images_is_upscaled_with_nearest_neighbour(n, size, channels):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(n, size, size, channels), dtype=np.uint8)
    ncols = int(np.ceil(np.sqrt(n)))
    grid = _png(plots.image_grid_png(imgs, ncols=ncols))
    assert max(grid.shape[:2]) >= plots.GRID_MIN_PX
    nrows = -(-n // ncols)
    scale = -(-plots.GRID_MIN_PX // (max(nrows, ncols) * size))
    pad = 2
    assert grid.shape[:2] == (nrows * (size * scale + pad) + pad, ncols * (size * scale + pad) + pad)
    grid = grid.reshape(*grid.shape[:2], channels)
    for k in (0, n - 1):  # each source pixel is a constant scale x scale block of the same value
        r, c = divmod(k, ncols)
        top, left = pad + r * (size * scale + pad), pad + c * (size * scale + pad)
        tile = grid[top : top + size * scale, left : left + size * scale]
        blocks = tile.reshape(size, scale, size, scale, channels)
        assert (blocks == imgs[k][:, None, :, None, :]).all()


def test_a_large_grid_is_not_scaled():
    imgs = np.zeros((16, 160, 160, 3), np.uint8)
    grid = _png(plots.image_grid_png(imgs, ncols=4))
    assert grid.shape[:2] == (4 * 161 + 1, 4 * 161 + 1)


def _line_colours(fig) -> dict[str, str]:
    ax = fig.axes[0]
    return {ln.get_label(): to_hex(ln.get_color()) for ln in ax.get_lines()}


def test_each_kind_has_one_colour_in_every_plot():
    x = np.geomspace(0.01, 20, 6)
    flat = np.full(6, 0.5)
    # the annotate stage's curves (clean listed second) and the classifier's (good = the clean rows, listed first)
    annotate = plots.prob_curves_figure(x, {"blur:sigma=0.6": flat, "clean": flat, "jpeg:quality=18": flat}, tau=0.45)
    classifier = plots.prob_curves_figure(x, {"good (quality=clean)": flat, "bad (the rest)": flat})
    a, c = _line_colours(annotate), _line_colours(classifier)
    assert a["clean"] == c["good (quality=clean)"] == plots.PALETTE["clean"]
    assert c["bad (the rest)"] == plots.PALETTE["corrupted"] != a["clean"]
    # a corruption's colour follows its family, whatever the order or the parameters
    other = plots.prob_curves_figure(x, {"jpeg:quality=50": flat, "blur:sigma=1.5": flat})
    o = _line_colours(other)
    assert o["blur:sigma=1.5"] == a["blur:sigma=0.6"] == plots.PALETTE["blur"]
    assert o["jpeg:quality=50"] == a["jpeg:quality=18"] == plots.PALETTE["jpeg"]
    assert len({a["clean"], a["blur:sigma=0.6"], a["jpeg:quality=18"]}) == 3
    # the σ_min histogram: the same colour per corruption as in the curves
    hist = plots.sigma_histogram_figure({"jpeg:quality=18": [0.1, 0.5, 1.0], "blur:sigma=0.6": [1.0, 2.0]})
    faces = [to_hex(c.patches[0].get_facecolor()[:3]) for c in hist.axes[0].containers]
    assert faces == [plots.PALETTE["jpeg"], plots.PALETTE["blur"]]
    # an unknown kind gets the same colour every time, from its name only
    assert plots.colour("warp:k=3") == plots.colour("warp:k=9") == plots.colour("bad (corruption=warp:k=3)")


def test_curve_marks_are_legend_entries_not_overlapping_text():
    x = np.geomspace(0.01, 20, 6)
    flat = np.full(6, 0.5)
    marks = {
        "mean σ_min blur:sigma=0.6": (0.5, "blur:sigma=0.6"),
        "mean σ_min jpeg:quality=18": (0.52, "jpeg:quality=18"),
    }
    fig = plots.prob_curves_figure(x, {"blur:sigma=0.6": flat, "jpeg:quality=18": flat}, tau=0.45, marks=marks)
    ax = fig.axes[0]
    assert not ax.texts  # no rotated labels drawn over each other at near σ
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "mean σ_min blur:sigma=0.6 = 0.5" in legend and "mean σ_min jpeg:quality=18 = 0.52" in legend
    colours = _line_colours(fig)
    assert colours["mean σ_min blur:sigma=0.6 = 0.5"] == plots.PALETTE["blur"]


def _donut(crops: bool) -> list[dict]:
    edges = [0.002, 0.01, 0.1, 1.0, 10.0, 80.0]
    full = [180, 600, 900, 1797, 1797]
    return [
        {
            "sigma_lo": lo,
            "sigma_hi": hi,
            "eligible_full": f,
            "eligible_crops": (f // 3 if crops else 0),
            "full_draws": 100 + 10 * i,
            "crop_draws": (20 if crops else 0),
        }
        for i, (lo, hi, f) in enumerate(zip(edges, edges[1:], full))
    ]


def _overlap(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


@pytest.mark.parametrize("crops", [False, True])
def test_the_coverage_plot_is_readable(crops):
    fig = plots.coverage_figure(_donut(crops), title="σ coverage (λ_max=4.0)")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    suptitle = fig._suptitle.get_window_extent(renderer)
    for ax, key in zip(fig.axes, ("eligible", "draws")):
        assert not _overlap(suptitle, ax.title.get_window_extent(renderer))  # the overall title clear of the panels'
        assert ax.get_ylabel()  # labelled y axis
        entries = [t.get_text() for t in ax.get_legend().get_texts()]
        assert all(entries) and entries == (["whole samples", "crops"] if crops else ["whole samples"])
        tops = [p.get_y() + p.get_height() for c in ax.containers for p in c.patches]
        assert max(tops) < 0.95 * ax.get_ylim()[1]  # headroom: the tallest bar clear of the frame
    faces = [to_hex(c.patches[0].get_facecolor()[:3]) for c in fig.axes[0].containers]
    assert faces == ([plots.PALETTE["whole"], plots.PALETTE["crops"]] if crops else [plots.PALETTE["whole"]])
    assert plots.coverage_plot(_donut(crops))[:8] == b"\x89PNG\r\n\x1a\n"
