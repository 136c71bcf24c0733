"""Each corruption against an analytic or known property, plus determinism and spec parsing."""

import math

import numpy as np
import pytest

from ambient_ray import corruptions as C
from ambient_ray.data.sources import _builtin_arrays


def impulse(size=41, channels=1):
    x = np.zeros((1, size, size, channels), np.float32)
    x[0, size // 2, size // 2, :] = 1.0
    return x


@pytest.mark.parametrize("sigma", [0.6, 1.0, 2.5])
def test_blur_of_impulse_is_the_gaussian_kernel(sigma):
    out = C.parse(f"blur:sigma={sigma}")(impulse(), [np.random.default_rng(0)])[0, :, :, 0]
    radius = int(4.0 * sigma + 0.5)
    t = np.arange(-radius, radius + 1)
    g1 = np.exp(-(t**2) / (2 * sigma**2))
    g1 /= g1.sum()
    expected = np.zeros_like(out)
    c = out.shape[0] // 2
    expected[c - radius : c + radius + 1, c - radius : c + radius + 1] = np.outer(g1, g1)
    np.testing.assert_allclose(out, expected, atol=1e-6)
    # and its second moment is sigma^2 (close for a sampled kernel)
    yy, xx = np.mgrid[: out.shape[0], : out.shape[1]] - c
    assert out.sum() == pytest.approx(1.0, abs=1e-5)
    assert (out * xx**2).sum() == pytest.approx(sigma**2, rel=0.1 if sigma < 1 else 0.02)


def test_motion_blur_of_impulse_is_a_line():
    out = C.parse("motion_blur:length=9,angle=0")(impulse(), [np.random.default_rng(0)])[0, :, :, 0]
    c = out.shape[0] // 2
    assert out.sum() == pytest.approx(1.0, abs=1e-5)
    assert out[c].sum() == pytest.approx(1.0, abs=1e-5)  # all mass on the centre row
    assert np.count_nonzero(out[c] > 1e-4) == 9
    vert = C.parse("motion_blur:length=9,angle=90")(impulse(), [np.random.default_rng(0)])[0, :, :, 0]
    np.testing.assert_allclose(vert, out.T, atol=1e-6)


def psnr(a, b):
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * math.log10(255.0**2 / mse)


def test_jpeg_psnr_rises_with_quality():
    faces, _ = _builtin_arrays("faces", 1, 4)
    imgs = list(faces[:20])
    seeds = list(range(20))
    scores = [
        np.mean([psnr(a, b) for a, b in zip(imgs, C.apply(C.parse(f"jpeg:quality={q}"), imgs, seeds))])
        for q in (5, 20, 50, 90)
    ]
    assert all(lo < hi for lo, hi in zip(scores, scores[1:])), scores
    assert scores[-1] > 35


def test_mask_hides_the_requested_fraction():
    x = np.ones((20, 64, 64, 3), np.float32)
    rngs = [np.random.default_rng(i) for i in range(20)]
    out = C.parse("mask:p=0.3")(x, rngs)
    hidden = (out == 0).all(axis=-1)
    assert hidden.mean() == pytest.approx(0.3, abs=0.01)
    assert ((out == 0).any(axis=-1) == hidden).all()  # a pixel is hidden in all channels or none


def test_block_mask_hides_one_square():
    out = C.parse("block_mask:size=5")(
        np.ones((4, 16, 16, 1), np.float32), [np.random.default_rng(i) for i in range(4)]
    )
    for img in out[..., 0]:
        rows, cols = np.nonzero(img == 0)
        assert len(rows) == 25 and np.ptp(rows) == 4 and np.ptp(cols) == 4


def test_noise_std_is_sigma_in_the_minus_one_one_scale():
    x = np.full((8, 64, 64, 1), 0.5, np.float32)
    out = C.parse("noise:sigma=0.2")(x, [np.random.default_rng(i) for i in range(8)])
    assert (out - 0.5).std() * 2 == pytest.approx(0.2, rel=0.02)
    assert abs((out - 0.5).mean()) < 0.002


def test_contrast_scales_deviation_and_keeps_mean():
    rng = np.random.default_rng(0)
    x = rng.uniform(0.3, 0.7, (2, 16, 16, 1)).astype(np.float32)
    out = C.parse("contrast:factor=0.5")(x, [rng, rng])
    np.testing.assert_allclose(out.mean(axis=(1, 2, 3)), x.mean(axis=(1, 2, 3)), atol=1e-6)
    np.testing.assert_allclose(out.std(axis=(1, 2, 3)), 0.5 * x.std(axis=(1, 2, 3)), rtol=1e-4)


def test_color_shift_offsets_channels():
    x = np.full((1, 4, 4, 3), 0.5, np.float32)
    out = C.parse("color_shift:r=0.1,g=0,b=-0.2")(x, [np.random.default_rng(0)])
    np.testing.assert_allclose(out[0, 0, 0], [0.6, 0.5, 0.3], atol=1e-6)
    grey = C.parse("color_shift:r=0.3,g=0,b=0")(np.full((1, 4, 4, 1), 0.5, np.float32), [np.random.default_rng(0)])
    np.testing.assert_allclose(grey, 0.6, atol=1e-6)


@pytest.mark.parametrize(
    "spec",
    [
        "blur:sigma=1",
        "motion_blur:length=5,angle=30",
        "jpeg:quality=20",
        "mask:p=0.5",
        "block_mask:size=3",
        "noise:sigma=0.3",
        "contrast:factor=0.3",
        "color_shift:max=0.2",
    ],
)
def test_same_seed_same_bytes_and_batching_does_not_matter(spec):
    digits, _ = _builtin_arrays("digits", 1, 4)
    imgs = list(digits[:6])
    c = C.parse(spec)
    a = C.apply(c, imgs, [1, 2, 3, 4, 5, 6])
    b = C.apply(c, imgs, [1, 2, 3, 4, 5, 6])
    one_by_one = [C.apply(c, [im], [s])[0] for im, s in zip(imgs, [1, 2, 3, 4, 5, 6])]
    assert all(x.tobytes() == y.tobytes() for x, y in zip(a, b))
    assert all(x.tobytes() == y.tobytes() for x, y in zip(a, one_by_one))
    assert all(x.dtype == np.uint8 and x.shape == im.shape for x, im in zip(a, imgs))


@pytest.mark.parametrize("spec", ["mask:p=0.5", "block_mask:size=3", "noise:sigma=0.3", "color_shift:max=0.2"])
def test_different_seeds_differ(spec):
    digits, _ = _builtin_arrays("digits", 1, 4)
    c = C.parse(spec)
    a = C.apply(c, [digits[10]], [1])[0]
    b = C.apply(c, [digits[10]], [2])[0]
    assert a.tobytes() != b.tobytes()


@pytest.mark.parametrize(
    "spec, words",
    [
        ("sharpen:amount=1", ["unknown corruption 'sharpen'", "blur", "jpeg"]),
        ("blur:radius=2", ["no parameter 'radius'", "sigma"]),
        ("blur:sigma=-1", ["'sigma'", "out of range", "(0, inf]"]),
        ("blur:sigma=abc", ["'sigma'", "not a float"]),
        ("jpeg:quality=200", ["'quality'", "[1, 95]"]),
        ("jpeg:quality=2.5", ["not a int"]),
        ("blur", ["needs parameter 'sigma'"]),
        ("blur:sigma=nan", ["finite"]),
        ("", ["empty"]),
    ],
)
def test_bad_specs_are_refused_clearly(spec, words):
    with pytest.raises(C.CorruptionError) as e:
        C.parse(spec)
    for w in words:
        assert w in str(e.value)


def test_user_registered_corruption_and_canonical_spec():
    @C.register("invert_test", gain=C.Param(float, 1.0, lo=0.0))
    def _inv(x, rngs, gain):
        return 1.0 - gain * x

    c = C.parse("invert_test")
    assert c.spec == "invert_test:gain=1"
    out = C.apply(c, [np.zeros((2, 2, 1), np.uint8)], [0])[0]
    assert (out == 255).all()
    assert C.parse("motion_blur:angle=10, length=3").spec == "motion_blur:angle=10,length=3"
