"""The locality map crop(σ): hand-made loss tables, an analytic local denoiser, and the stage."""

import json

import numpy as np
import pytest
import torch

from ambient_ray.diffusion.locality import crop_sizes, locality_losses, valid_contexts
from ambient_ray.io import storage
from ambient_ray.stages.locality import LocalityConfig, run


def test_crop_is_the_smallest_context_within_eps_and_grows_with_sigma():
    contexts = [2, 4, 6, 8]
    losses = torch.tensor(
        [
            [1.00, 1.00, 1.00, 1.00],  # σ small: the smallest context already has the full loss
            [2.00, 1.04, 1.01, 1.00],  # within 5 % at 4
            [9.00, 3.00, 1.20, 1.00],  # only the full image
            [5.00, 1.00, 1.00, 1.00],  # would be 4, but crop(σ) may not shrink as σ grows
        ],
        dtype=torch.float64,
    )
    assert crop_sizes(losses, contexts, eps=0.05) == [2, 4, 8, 8]
    assert crop_sizes(losses, contexts, eps=0.0) == [2, 8, 8, 8]
    assert crop_sizes(losses, contexts, eps=10.0) == [2, 2, 2, 2]
    with pytest.raises(ValueError, match="eps"):
        crop_sizes(losses, contexts, eps=-1)


def test_valid_contexts_follow_the_patch_and_the_network():
    assert valid_contexts(8, 2, 2) == [2, 4, 6, 8]
    assert valid_contexts(16, 2, 4) == [4, 8, 12, 16]
    assert valid_contexts(9, 1, 1) == [1, 3, 5, 7, 9]


def test_a_local_denoiser_needs_no_context():
    """Pixels i.i.d. N(0, v): the optimal denoiser v/(v+σ²)·x is pointwise, so every context gives the
    analytic loss vσ²/(v+σ²) and crop(σ) is the patch itself."""
    v = 0.25

    def net(x, sigma):
        s2 = sigma.view(-1, 1, 1, 1) ** 2
        return v / (v + s2) * x

    y = torch.randn(4000, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * v**0.5
    sigmas = [0.1, 0.5, 2.0]
    losses = locality_losses(net, y, sigmas, [2, 4, 8], patch=2, generator=torch.Generator().manual_seed(1))
    expected = torch.tensor([v * s**2 / (v + s**2) for s in sigmas], dtype=torch.float64)
    torch.testing.assert_close(losses[:, -1], expected, rtol=0.05, atol=0)
    torch.testing.assert_close(losses[:, 0], losses[:, -1])  # same noise, pointwise net: identical
    assert crop_sizes(losses, [2, 4, 8], eps=0.01) == [2, 2, 2]


def write_denoiser(d, seed=0):
    """A (fresh) denoiser saved like a training output's model/ folder."""
    from safetensors.torch import save_file

    from ambient_ray.models.ddpmpp import UNetConfig, build_denoiser

    cfg = UNetConfig(img_resolution=8, in_channels=1, model_channels=16, channel_mult=[1, 2])
    torch.manual_seed(seed)
    net = build_denoiser(cfg)
    storage.write_bytes(
        f"{d}/model/model.json", json.dumps({"kind": "denoiser", "model": cfg.model_dump(mode="json")}).encode()
    )
    save_file({n: p.detach().contiguous() for n, p in net.named_parameters()}, f"{d}/model/ema.safetensors")
    return str(d)


def test_locality_stage_writes_table_and_plot(ray_cluster, tmp_path):
    from ambient_ray.data.sources import SourceConfig
    from ambient_ray.stages.corrupt import CorruptConfig
    from ambient_ray.stages.corrupt import run as corrupt_run

    data = str(tmp_path / "digits")
    corrupt_run(
        CorruptConfig(
            out=data,
            source=SourceConfig(dataset="digits", limit=200),
            corruptions=["blur:sigma=1"],
            clean_fraction=0.5,
            preview=0,
        ),
        progress=False,
    )
    den = write_denoiser(tmp_path / "den")
    out = str(tmp_path / "loc")
    s = run(LocalityConfig(checkpoint=den, data=data, out=out, rows=64, sigma_points=5, mlflow=dict(enabled=False)))
    t = json.loads(storage.read_bytes(f"{out}/locality.json"))
    assert t == s["table"] and t["contexts"] == [2, 4, 6, 8] and t["image_size"] == 8 and t["rows"] == 64
    assert len(t["crop"]) == 5 and np.all(np.diff(t["crop"]) >= 0) and set(t["crop"]) <= {2, 4, 6, 8}
    assert storage.exists(f"{out}/locality.png")
    with pytest.raises(ValueError, match="each must be in"):
        run(LocalityConfig(checkpoint=den, data=data, out=out, contexts=[3, 8], mlflow=dict(enabled=False)))
