"""The U-Net and its EDM denoiser: shapes, preconditioning, conditioning, learning, config validation."""

import pytest
import torch
from pydantic import ValidationError

from ambient_ray.config import ConfigError, Strict, build
from ambient_ray.models.ddpmpp import EDMDenoiser, UNet, UNetConfig, build_denoiser
from ambient_ray.models.precond import edm_precond


def _randomize_output(net: UNet) -> None:
    """Give the zero-initialised final conv random weights, so F (and its conditioning) shows."""
    with torch.no_grad():
        net.conv_out.weight.normal_(0, 0.1)
        net.conv_out.bias.normal_(0, 0.1)


CONFIGS = [
    dict(),  # the default: 16x16 grey, two levels
    dict(in_channels=3, img_resolution=8, channel_mult=[1, 1, 2]),
    dict(in_channels=3, attn_resolutions=[16, 8], num_blocks=2),
    dict(label_dim=10, attn_resolutions=[8]),
    dict(img_resolution=12, channel_mult=[1, 2], model_channels=16, groups=4, dropout=0.1),
    dict(model_channels=9, groups=3),  # odd channel counts
]


@pytest.mark.parametrize("kw", CONFIGS)
def test_output_shape_equals_input_shape(kw):
    torch.manual_seed(0)
    cfg = UNetConfig(**kw)
    net = build_denoiser(cfg)
    assert isinstance(net, EDMDenoiser) and net.config == cfg and net.sigma_data == 0.5
    _randomize_output(net.unet)
    x = torch.randn(3, cfg.in_channels, cfg.img_resolution, cfg.img_resolution)
    labels = torch.tensor([0, 3, 9]) % max(cfg.label_dim, 1) if cfg.label_dim else None
    f = net.unet(x, torch.randn(3), labels)
    assert f.shape == x.shape and torch.isfinite(f).all()
    d = net(x, torch.tensor([0.01, 1.0, 80.0]), labels)
    assert d.shape == x.shape and d.dtype == torch.float32 and torch.isfinite(d).all()


def test_attention_is_placed_at_the_configured_resolutions():
    from ambient_ray.models.ddpmpp import SelfAttention

    def n_attn(**kw):
        return sum(isinstance(m, SelfAttention) for m in UNet(UNetConfig(**kw)).modules())

    base = n_attn()  # the bottleneck always has one
    assert base == 1
    assert n_attn(attn_resolutions=[16]) == base + 1 + 2  # one encoder block, two decoder blocks
    assert n_attn(attn_resolutions=[16, 8], num_blocks=2) == base + 2 * (2 + 3)


def test_zero_initialised_network_gives_c_skip_x():
    torch.manual_seed(0)
    net = build_denoiser(UNetConfig(), sigma_data=0.5)
    x = torch.randn(4, 1, 16, 16)
    sigma = torch.tensor([0.002, 0.3, 2.0, 80.0])
    c_skip = edm_precond(sigma, 0.5)[0]
    torch.testing.assert_close(net(x, sigma), c_skip.view(-1, 1, 1, 1) * x)
    # and not by accident: with a non-zero final layer D differs from c_skip·x
    _randomize_output(net.unet)
    assert not torch.allclose(net(x, sigma), c_skip.view(-1, 1, 1, 1) * x, atol=1e-3)


def test_preconditioning_is_wired_as_in_edm_table_1():
    """A stub F records its inputs and returns ones: D = c_skip·x + c_out, F saw c_in·x and ln(σ)/4."""
    net = build_denoiser(UNetConfig(), sigma_data=0.7)
    seen = {}

    def stub(x_in, c_noise, class_labels=None):
        seen["x"], seen["c_noise"] = x_in, c_noise
        return torch.ones_like(x_in)

    net.unet.forward = stub
    x = torch.randn(3, 1, 16, 16)
    sigma = torch.tensor([0.05, 0.7, 20.0])
    c_skip, c_out, c_in, c_noise = edm_precond(sigma, 0.7)

    def b(v):
        return v.view(-1, 1, 1, 1)

    torch.testing.assert_close(net(x, sigma), b(c_skip) * x + b(c_out))
    torch.testing.assert_close(seen["x"], b(c_in) * x)
    torch.testing.assert_close(seen["c_noise"], sigma.log() / 4)
    # a scalar σ is broadcast over the batch
    c_skip7, c_out7 = edm_precond(torch.full((3,), 0.7), 0.7)[:2]
    torch.testing.assert_close(net(x, 0.7), b(c_skip7) * x + b(c_out7))


def test_conditioning_reaches_the_output():
    torch.manual_seed(0)
    net = UNet(UNetConfig(label_dim=4)).eval()
    _randomize_output(net)
    x = torch.randn(2, 1, 16, 16)
    lab = torch.tensor([1, 2])
    f = net(x, torch.tensor([0.1, 0.1]), lab)
    assert not torch.allclose(f, net(x, torch.tensor([0.9, 0.9]), lab), atol=1e-4)  # depends on c_noise
    assert not torch.allclose(f, net(x, torch.tensor([0.1, 0.1]), torch.tensor([3, 0])), atol=1e-4)  # on labels
    onehot = torch.nn.functional.one_hot(lab, 4).float()
    torch.testing.assert_close(f, net(x, torch.tensor([0.1, 0.1]), onehot))  # int64 and one-hot agree
    with pytest.raises(ValueError, match="class_labels"):
        net(x, torch.tensor([0.1, 0.1]))


def test_dtypes_float64_input_and_bf16_network():
    torch.manual_seed(0)
    net = build_denoiser(UNetConfig())
    _randomize_output(net.unet)
    x = torch.randn(2, 1, 16, 16, dtype=torch.float64)
    d64 = net(x, torch.tensor([0.5, 2.0], dtype=torch.float64))
    assert d64.dtype == torch.float64  # the sampler's float64 state goes through
    net_bf16 = net.to(torch.bfloat16)  # as DeepSpeed bf16 does
    d = net_bf16(x.to(torch.bfloat16), torch.tensor([0.5, 2.0], dtype=torch.bfloat16))
    assert d.dtype == torch.float32
    torch.testing.assert_close(d.double(), d64, atol=0.1, rtol=0.05)


def test_a_few_adam_steps_reduce_the_denoising_loss():
    torch.manual_seed(0)
    net = build_denoiser(UNetConfig(label_dim=3))
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(8, 1, 16, 16, generator=g) * 2 - 1
    sigma = torch.tensor([0.2, 0.5, 1.0, 2.0] * 2)
    x = x0 + sigma.view(-1, 1, 1, 1) * torch.randn(x0.shape, generator=g)
    labels = torch.arange(8) % 3
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    losses = []
    for _ in range(30):
        loss = ((net(x, sigma, labels) - x0) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses
    # every parameter takes part (DDP / DeepSpeed would trip on unused ones)
    unused = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not unused, unused


def test_resolution_not_divisible_is_refused_naming_the_key():
    with pytest.raises(ValidationError, match="img_resolution"):
        UNetConfig(img_resolution=18, channel_mult=[1, 2, 2])
    UNetConfig(img_resolution=20, channel_mult=[1, 2, 2])  # 20 / 4 = 5: fine

    class Section(Strict):
        model: UNetConfig = UNetConfig()

    with pytest.raises(ConfigError, match=r"config key 'model'.*img_resolution=18"):
        build(Section, sets=["model.img_resolution=18", "model.channel_mult=[1,2,2]"])


@pytest.mark.parametrize(
    "kw, key",
    [
        (dict(in_channels=5), "in_channels"),
        (dict(model_channels=4), "model_channels"),
        (dict(dropout=1.5), "dropout"),
        (dict(label_dim=-1), "label_dim"),
        (dict(attn_resolutions=[32]), "attn_resolutions"),
        (dict(groups=3), "groups"),
        (dict(channel_mult=[]), "channel_mult"),
        (dict(chanel_mult=[1]), "chanel_mult"),
    ],
)
def test_invalid_configs_are_refused(kw, key):
    with pytest.raises(ValidationError, match=key):
        UNetConfig(**kw)
