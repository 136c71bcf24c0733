"""The MoE diffusion transformer (models/dit.py), pure torch: sizes, expert-choice dispatch against a dense
reference, per-image independence, patch masking."""

import pytest
import torch

from ambient_ray.models import dit


def test_microdit_xl_2_has_1_16_billion_parameters_on_the_meta_device():
    cfg = dit.DiTConfig(preset="microdit-xl-2", **dit.PAPER_INTERFACE)
    with torch.device("meta"):
        net = dit.build_denoiser(cfg)
    n = sum(p.numel() for p in net.parameters())
    print(f"microdit-xl-2: {n:,} parameters")
    assert abs(n / 1.16e9 - 1) < 0.02
    blocks = net.net.blocks
    moe = [i for i, b in enumerate(blocks) if isinstance(b.ffn, dit.ExpertChoiceMoE)]
    assert moe == list(range(1, 27, 2)) and len(net.net.mixer) == 6  # 1, 3, ..., 25; never the last


def test_dit_tiny_counts_equal_the_built_model():
    cfg = dit.DiTConfig(preset="dit-tiny", img_resolution=8, in_channels=4)
    with torch.device("meta"):
        meta = sum(p.numel() for p in dit.build_denoiser(cfg).parameters())
    assert meta == sum(p.numel() for p in dit.build_denoiser(cfg).parameters()) < 2_000_000


def dense_expert_choice(moe: dit.ExpertChoiceMoE, x: torch.Tensor) -> torch.Tensor:
    """The definition, token by token: out[t] = Σ_e [t among expert e's top-k of its image] · p_te · expert_e(x_t)."""
    b, t, d = x.shape
    k = max(1, int(moe.capacity * t / moe.experts))
    probs = moe.gate(x).softmax(-1)
    out = torch.zeros_like(x)
    for n in range(b):
        for e in range(moe.experts):
            chosen = set(probs[n, :, e].topk(k).indices.tolist())
            for i in range(t):
                if i in chosen:
                    y = torch.nn.functional.gelu(x[n, i] @ moe.w1[e]) @ moe.w2[e]
                    out[n, i] += probs[n, i, e] * y
    return out


def test_expert_choice_dispatch_equals_a_dense_reference():
    torch.manual_seed(0)
    moe = dit.ExpertChoiceMoE(dim=12, hidden=20, experts=4, capacity=2.0, multiple_of=4)
    x = torch.randn(3, 10, 12)
    torch.testing.assert_close(moe(x), dense_expert_choice(moe, x))
    k = int(2.0 * 10 / 4)
    assert k == 5  # every expert runs on exactly 5 tokens of each image: a static shape


def caption_batch(n: int, g: torch.Generator):
    return torch.randn(n, 5, 32, generator=g), (torch.arange(5) < torch.randint(1, 6, (n, 1), generator=g)).long()


def test_an_images_output_does_not_depend_on_the_other_images_in_its_batch():
    torch.manual_seed(0)
    net = dit.build_denoiser(dit.DiTConfig(preset="dit-tiny", img_resolution=8, in_channels=4)).eval()
    with torch.no_grad():  # give the zero-initialised modulation and output layers weights
        for p in net.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.05)
    g = torch.Generator().manual_seed(1)
    x, (cap, mask), s = torch.randn(4, 4, 8, 8, generator=g), caption_batch(4, g), torch.rand(4, generator=g) + 0.1
    full = net(x, s, cap, mask)
    for other in range(1, 4):
        pair = net(x[[0, other]], s[[0, other]], cap[[0, other]], mask[[0, other]])
        torch.testing.assert_close(pair[0], full[0], rtol=1e-5, atol=1e-6)
    keep = dit.patch_keep(4, 16, 0.75, torch.Generator().manual_seed(2))
    masked = net(x, s, cap, mask, keep)
    pair = net(x[:2], s[:2], cap[:2], mask[:2], keep[:2])
    torch.testing.assert_close(pair[0], masked[0], rtol=1e-5, atol=1e-6)
    # padding tokens of a caption do not matter
    cap2 = cap.clone()
    cap2[mask == 0] = 100.0
    torch.testing.assert_close(net(x, s, cap2, mask), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ratio", [0.5, 0.75])
def test_patch_masking_keeps_a_fixed_share_and_marks_the_loss_pixels(ratio):
    torch.manual_seed(0)
    cfg = dit.DiTConfig(preset="dit-tiny", img_resolution=8, in_channels=4)
    net = dit.build_denoiser(cfg).eval()
    with torch.no_grad():
        net.net.final.weight.normal_(0, 0.1)
        net.net.final.bias.normal_(0, 0.1)
    keep = dit.patch_keep(3, cfg.tokens(), ratio, torch.Generator().manual_seed(0))
    assert keep.shape == (3, int(cfg.tokens() * (1 - ratio))) and (keep.diff(dim=1) > 0).all()
    m = dit.patch_mask(keep, cfg.tokens(), cfg.patch, cfg.img_resolution)
    assert m.shape == (3, 1, 8, 8) and (m.sum((1, 2, 3)) == keep.shape[1] * cfg.patch**2).all()
    g = torch.Generator().manual_seed(3)
    x, (cap, mask) = torch.randn(3, 4, 8, 8, generator=g), caption_batch(3, g)
    f = net.net(x, torch.zeros(3), cap, mask, keep)  # the raw network: 0 on every dropped patch
    assert (f.abs().sum(1, keepdim=True)[m == 0] == 0).all() and (f.abs().sum(1, keepdim=True)[m == 1] > 0).all()


def test_masked_patches_do_not_enter_the_ambient_loss():
    """The train task multiplies the batch's loss mask by the kept patches: any prediction on a dropped patch
    leaves the loss as it is; on a kept patch it moves it."""
    from ambient_ray.diffusion import ambient

    g = torch.Generator().manual_seed(0)
    keep = dit.patch_keep(4, 16, 0.75, g)
    m = dit.patch_mask(keep, 16, 2, 8)
    y = torch.randn(4, 4, 8, 8, generator=g)
    b = ambient.noise_batch(
        torch.full((4,), 1.0), y, torch.full((4,), 0.3), torch.zeros(4, dtype=torch.long), torch.arange(4), g
    )
    b.mask = b.mask * m
    pred = torch.randn(4, 4, 8, 8, generator=g)
    loss, per = ambient.batch_loss(pred, b)
    dropped = pred + 100.0 * (1 - m)
    assert torch.equal(ambient.batch_loss(dropped, b)[1], per)
    assert not torch.allclose(ambient.batch_loss(pred + m, b)[1], per)


def test_the_planner_covers_the_dit(capsys):
    from ambient_ray import cli

    assert cli.main(["plan", "--model", "microdit-xl-2", "--gpus", "8", "--gpu-mem", "80", "--batch", "32"]) == 0
    out = capsys.readouterr().out
    assert "1,165,442,320 parameters" in out and "recommended" in out
