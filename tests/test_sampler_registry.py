"""The sampler registry (no Ray): every entry is listed and selectable, an unknown name is refused naming the
allowed ones, and each entry draws what the sampler it wraps draws on a tiny network, bit for bit."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from pydantic import Field

from ambient_ray import cli
from ambient_ray.config import ConfigError, Strict, build
from ambient_ray.diffusion.samplers import Guided, heun_sample, to_uint8
from ambient_ray.models import registry, weights
from ambient_ray.sampling import SAMPLERS, Batch, SamplerConfig
from ambient_ray.sampling.draw import draw
from ambient_ray.stages.sample import SampleConfig

BUILTIN = ["autoguidance", "classifier-free", "heun"]
EDM_CHURN = dict(s_churn=40.0, s_min=0.05, s_max=50.0, s_noise=1.003)  # the section's defaults


def _meta(arch: str, **model) -> dict:
    a = registry.ARCHS.get(arch)
    tiny = next(p for p in a.presets if "tiny" in p)
    cfg = a.config(preset=tiny, img_resolution=8, in_channels=1, **model).model_dump(mode="json")
    return {"kind": "denoiser", "arch": arch, "model": cfg, "sigma_data": 0.5}


def _random_net(meta: dict, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = registry.build(meta)
    with torch.no_grad():  # random weights everywhere (some layers start at zero), so every input matters
        for p in net.parameters():
            p.copy_(0.1 * torch.randn_like(p))
    net.meta = meta
    return net.eval()


def _save(net: torch.nn.Module, meta: dict, folder) -> str:
    from safetensors.torch import save_file

    (folder / "model").mkdir(parents=True)
    state = {n: p.detach().contiguous() for n, p in net.named_parameters()}
    save_file(state, str(folder / "model" / "ema.safetensors"))
    save_file(state, str(folder / "model" / "model.safetensors"))
    (folder / "model" / "model.json").write_text(json.dumps(meta))
    return str(folder)


@pytest.fixture(scope="module")
def unet():
    """A tiny class-conditional DDPM++ (3 classes)."""
    return _random_net(_meta("ddpmpp", label_dim=3), 0)


@pytest.fixture(scope="module")
def dit():
    """A tiny DiT of captions (4 tokens of width 32)."""
    return _random_net(_meta("dit", caption_tokens=4), 0)


# ------------------------------------------------------------------------------ the registry and the config


def test_every_registered_sampler_is_listed_and_selectable():
    assert set(BUILTIN) <= set(SAMPLERS.names())
    for name in SAMPLERS.names():
        knobs = {"guide": "/g"} if name == "autoguidance" else {}
        assert SamplerConfig(name=name, **knobs).name == name
    assert SamplerConfig().name == "heun"


def test_an_unknown_sampler_is_refused_naming_the_allowed_ones():
    class Section(Strict):
        sampler: SamplerConfig = Field(default_factory=SamplerConfig)

    allowed = ", ".join(SAMPLERS.names())
    with pytest.raises(ConfigError, match=rf"config key 'sampler.name'.*unknown sampler.name 'nope'.*{allowed}"):
        build(Section, sets=["sampler.name=nope"])
    with pytest.raises(KeyError, match=f"unknown sampler.name 'nope'; registered: {allowed}"):
        SAMPLERS.get("nope")


def test_knobs_that_do_not_fit_the_sampler_are_refused():
    with pytest.raises(ConfigError, match="sampler 'heun' takes no guidance weight"):
        build(SamplerConfig, sets=["guidance=2"])
    with pytest.raises(ConfigError, match="sampler 'autoguidance' needs a guiding model"):
        build(SamplerConfig, sets=["name=autoguidance"])
    with pytest.raises(ConfigError, match="sampler 'classifier-free' takes no guiding model"):
        build(SamplerConfig, sets=["name=classifier-free", "guide=/g"])
    with pytest.raises(ConfigError, match="classifier-free guidance with a weight other than 1 needs prompts"):
        build(SampleConfig, sets=["checkpoint=/c", "out=/o", "sampler.name=classifier-free", "sampler.guidance=3"])


def test_the_sample_flags_pick_the_sampler_they_always_meant():
    def sampler(*argv):
        return cli.config(cli.parse_args(["sample", "--checkpoint", "/c", "--out", "/o", *argv])).sampler

    assert sampler("--steps", "4", "--stochastic").model_dump() == SamplerConfig(steps=4, stochastic=True).model_dump()
    assert sampler("--guide", "/g", "--guidance", "2").name == "autoguidance"
    assert sampler("--prompt", "a cat", "--guidance", "5").name == "classifier-free"
    assert sampler("--prompt", "a cat").name == "heun"  # weight 1: the conditional model alone
    assert sampler("--sampler", "classifier-free", "--prompt", "a cat").name == "classifier-free"  # a name wins


def test_the_sample_help_lists_the_samplers_and_an_unknown_one_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["sample", "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--sampler NAME" in text and all(f"{name}:" in text for name in SAMPLERS.names())
    for argv in (["--set", "sampler.name=nope"], ["--sampler", "nope"]):
        assert cli.main(["sample", "--checkpoint", "/c", "--out", "/o", *argv]) == 2
        err = capsys.readouterr().err
        assert "unknown sampler.name 'nope'" in err and ", ".join(SAMPLERS.names()) in err


# ------------------------------------------------------------------------------ each entry against the old path


@pytest.mark.parametrize("stochastic", [False, True])
def test_heun_is_edm_heun_sample_with_the_same_generator(unet, stochastic):
    """One entry call is heun_sample with the section's knobs; draw is latents-then-sampler per batch, from one
    CPU generator (the RNG order of the old draw), classes cycled."""
    cfg = SamplerConfig(steps=3, stochastic=stochastic)
    churn = EDM_CHURN if stochastic else {**EDM_CHURN, "s_churn": 0.0}

    g = torch.Generator().manual_seed(4)
    z = torch.randn(2, 1, 8, 8, generator=g)
    got = SAMPLERS.get("heun").sample(unet, Batch(z, torch.tensor([0, 2]), None, g), cfg)
    g = torch.Generator().manual_seed(4)
    z = torch.randn(2, 1, 8, 8, generator=g)
    want = heun_sample(unet, z, num_steps=3, class_labels=torch.tensor([0, 2]), generator=g, **churn)
    assert torch.equal(got, want)

    g, want = torch.Generator().manual_seed(7), []
    for start, n in ((0, 2), (2, 1)):  # batch_size 2 over 3 images
        z = torch.randn(n, 1, 8, 8, generator=g)
        labels = torch.arange(start, start + n) % 3
        want.append(to_uint8(heun_sample(unet, z, num_steps=3, class_labels=labels, generator=g, **churn)))
    assert (draw(unet, 3, cfg, seed=7, batch_size=2) == np.concatenate(want)).all()


def test_autoguidance_at_weight_1_is_no_guidance_and_otherwise_lerps_to_the_guide(unet, tmp_path):
    meta = unet.meta
    net = weights.load(_save(unet, meta, tmp_path / "main"), "denoiser")
    guide_uri = _save(_random_net(meta, 1), meta, tmp_path / "guide")
    plain = draw(net, 3, SamplerConfig(steps=3), seed=1)
    same = draw(net, 3, SamplerConfig(name="autoguidance", guide=guide_uri, steps=3), seed=1)
    assert (plain == same).all()
    two = draw(net, 3, SamplerConfig(name="autoguidance", guide=guide_uri, guidance=2.0, steps=3), seed=1)
    assert (two != plain).any()
    g = torch.Generator().manual_seed(1)
    z = torch.randn(3, 1, 8, 8, generator=g)
    den = Guided(net, weights.load(guide_uri, "denoiser"), 2.0)
    want = heun_sample(den, z, num_steps=3, class_labels=torch.arange(3) % 3, generator=g, s_churn=0.0)
    assert (two == to_uint8(want)).all()


def test_classifier_free_at_weight_1_is_the_conditional_net(dit):
    g = torch.Generator().manual_seed(0)
    captions = (torch.randn(2, 4, 32, generator=g), torch.tensor([[1.0, 1, 0, 0], [1, 1, 1, 0]]))
    cfg = SamplerConfig(name="classifier-free", steps=3)
    cfg_draw = draw(dit, 3, cfg, seed=2, captions=captions)
    assert (cfg_draw == draw(dit, 3, SamplerConfig(steps=3), seed=2, captions=captions)).all()
    g = torch.Generator().manual_seed(2)
    z = torch.randn(3, 1, 8, 8, generator=g)
    pick = torch.arange(3) % 2

    def conditional(x, sigma, _labels):
        return dit(x, sigma, captions[0][pick], captions[1][pick])

    assert (cfg_draw == to_uint8(heun_sample(conditional, z, num_steps=3, generator=g, s_churn=0.0))).all()
    # w = 3: lerp(D(∅), D(c), 3), the null caption being zeros with no valid token
    guided = draw(dit, 3, SamplerConfig(name="classifier-free", guidance=3.0, steps=3), seed=2, captions=captions)

    def cfg3(x, sigma, _labels):
        null = dit(x, sigma, torch.zeros(3, 4, 32), torch.zeros(3, 4))
        return null.lerp(conditional(x, sigma, None), 3.0)

    want = to_uint8(heun_sample(cfg3, z, num_steps=3, s_churn=0.0))
    assert (guided != cfg_draw).any()
    assert (abs(guided.astype(int) - want.astype(int)) <= 1).all()  # one batch of 2B against two of B: float noise


def test_guided_samplers_refuse_a_network_of_the_wrong_kind(unet, dit):
    with pytest.raises(ConfigError, match="classifier-free guidance is for a network of captions"):
        draw(unet, 1, SamplerConfig(name="classifier-free", steps=1))
    with pytest.raises(ConfigError, match="a text-to-image model is guided classifier-free"):
        draw(dit, 1, SamplerConfig(name="autoguidance", guide="/g", steps=1))
