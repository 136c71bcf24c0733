"""DSD's samplers (seed paper 004): ``ambient-full`` and ``ambient-truncated`` on a teacher trained on noisy data,
``one-step`` on a distilled generator: what each calls the network with, their evaluation counts, the law they give
on Gaussian data, and the sample stage's ``--one-step``."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ambient_ray import cli
from ambient_ray.config import ConfigError, build
from ambient_ray.diffusion.samplers import edm_time_steps, heun_sample, to_uint8
from ambient_ray.models import registry
from ambient_ray.sampling import SAMPLERS, Batch, SamplerConfig, nfe
from ambient_ray.sampling.draw import draw
from ambient_ray.sampling.dsd import truncated_heun
from ambient_ray.stages import sample as sample_stage
from ambient_ray.stages.sample import SampleConfig

R = 8  # the tiny network's images: 1 x 8 x 8
SIGMA_N = 0.2


def _meta(**extra) -> dict:
    model = registry.ARCHS.get("ddpmpp").config(preset="tiny", img_resolution=R, in_channels=1, label_dim=3)
    return {"kind": "denoiser", "arch": "ddpmpp", "model": model.model_dump(mode="json"), "sigma_data": 0.5, **extra}


def _net(meta: dict, seed: int = 0) -> torch.nn.Module:
    """A tiny class-conditional DDPM++ (3 classes) with random weights everywhere, so every input matters."""
    torch.manual_seed(seed)
    net = registry.build(meta)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.1 * torch.randn_like(p))
    net.meta = meta
    return net.eval()


class Spy:
    """A network that records every call: the states, the σ's (all equal within a call) and the labels."""

    def __init__(self, net):
        self.net, self.config, self.meta = net, net.config, net.meta
        self.calls: list[tuple[torch.Tensor, float, torch.Tensor | None]] = []

    def __call__(self, x, sigma, class_labels=None):
        assert sigma.shape == (x.shape[0],) and bool((sigma == sigma[0]).all())
        self.calls.append((x.clone(), float(sigma[0]), class_labels))
        return self.net(x, sigma, class_labels)

    @property
    def sigmas(self) -> list[float]:
        return [s for _, s, _ in self.calls]


@pytest.fixture(scope="module")
def teacher():
    """A teacher of noisy data at σ_n = 0.2 (its model.json: meta.noisy)."""
    return _net(_meta(noisy={"sigma_n": SIGMA_N, "objective": "noisy"}))


@pytest.fixture(scope="module")
def generator():
    """A distilled generator (meta.one_step), σ_init 2.5."""
    return _net(_meta(one_step={"sigma_init": 2.5, "teacher": "/runs/teacher"}), seed=1)


def _batch(n: int = 3, seed: int = 4) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(torch.randn(n, 1, R, R, generator=g), torch.arange(n) % 3, None, g)


# ------------------------------------------------------------------------------ the registry, the knobs, NFE


def test_the_three_are_registered_with_their_evaluation_counts():
    assert {"ambient-full", "ambient-truncated", "one-step"} <= set(SAMPLERS.names())
    assert nfe(SamplerConfig()) == 35  # heun, 18 steps
    assert nfe(SamplerConfig(name="ambient-full")) == 35
    assert nfe(SamplerConfig(name="ambient-full", steps=4, stochastic=True)) == 7
    assert nfe(SamplerConfig(name="ambient-truncated")) == 35
    assert nfe(SamplerConfig(name="ambient-truncated", steps=5)) == 9
    assert nfe(SamplerConfig(name="one-step")) == 1
    # the others: guided at w != 1 evaluate two networks; reconstruction guidance k + 1 per step (k = 4: 86)
    assert nfe(SamplerConfig(name="autoguidance", guide="/g")) == 35
    assert nfe(SamplerConfig(name="autoguidance", guide="/g", guidance=2.0)) == 70
    assert nfe(SamplerConfig(name="fixed-mask")) == 35
    assert nfe(SamplerConfig(name="reconstruction-guidance")) == 86
    assert nfe(SamplerConfig(name="reconstruction-guidance", guidance_masks=2)) == 52
    assert nfe(SamplerConfig(name="reconstruction-guidance", guidance_weight=0.0)) == 35


def test_knobs_that_do_not_fit_are_refused():
    for sets, match in (
        (["name=ambient-truncated", "stochastic=true"], "deterministic"),
        (["name=ambient-truncated", "steps=1"], "steps >= 2"),
        (["name=ambient-truncated", "sigma_n=90"], "must be below sampler.sigma_max"),
        (["name=ambient-truncated", "sigma_n=0"], "key .sigma_n.*greater than 0"),
        (["name=one-step", "stochastic=true"], "calls the generator once"),
        (["name=one-step", "guidance=2"], "takes no guidance weight"),
        (["name=one-step", "sigma_init=-1"], "key .sigma_init.*greater than 0"),
        (["name=ambient-full", "guide=/g"], "takes no guiding model"),
    ):
        with pytest.raises(ConfigError, match=match):
            build(SamplerConfig, sets=sets)
    assert build(SamplerConfig, sets=["name=ambient-full", "stochastic=true"]).stochastic  # as heun


# ------------------------------------------------------------------------------ one-step


def test_one_step_is_one_network_call_per_batch_at_sigma_init(generator):
    spy = Spy(generator)
    b = _batch()
    got = SAMPLERS.get("one-step").sample(spy, b, SamplerConfig(name="one-step"))
    assert spy.sigmas == [2.5]
    want = generator(2.5 * b.latents, torch.full((3,), 2.5), b.class_labels)
    assert torch.equal(got, want) and got.dtype == b.latents.dtype
    assert torch.equal(spy.calls[0][2], b.class_labels)

    spy = Spy(generator)  # through draw: batches of 2 over 5 images, one call each; the latents from the seed
    imgs = draw(spy, 5, SamplerConfig(name="one-step"), seed=3, batch_size=2)
    assert spy.sigmas == [2.5, 2.5, 2.5]
    g, want = torch.Generator().manual_seed(3), []
    for start, n in ((0, 2), (2, 2), (4, 1)):
        z = torch.randn(n, 1, R, R, generator=g)
        want.append(to_uint8(generator(2.5 * z, torch.full((n,), 2.5), torch.arange(start, start + n) % 3)))
    assert (imgs == np.concatenate(want)).all()


def test_one_step_reads_sigma_init_from_the_model_or_the_knob_and_refuses_a_model_that_is_no_generator(teacher):
    gen = _net(_meta(one_step={"sigma_init": 1.7}), seed=2)
    spy = Spy(gen)
    SAMPLERS.get("one-step").sample(spy, _batch(), SamplerConfig(name="one-step"))
    SAMPLERS.get("one-step").sample(spy, _batch(), SamplerConfig(name="one-step", sigma_init=4.0))
    assert spy.sigmas == [pytest.approx(1.7), 4.0]
    entry = SAMPLERS.get("one-step")
    with pytest.raises(ConfigError, match="one-step generator.*meta.one_step.*sampler.sigma_init"):
        entry.prepare(teacher, SamplerConfig(name="one-step"))
    assert entry.prepare(teacher, SamplerConfig(name="one-step", sigma_init=2.5)) is teacher


# ------------------------------------------------------------------------------ ambient-full, ambient-truncated


@pytest.mark.parametrize("stochastic", [False, True])
def test_ambient_full_is_heun_on_the_same_latents(teacher, stochastic):
    cfg = SamplerConfig(steps=4, stochastic=stochastic)
    want = SAMPLERS.get("heun").sample(teacher, _batch(), cfg)
    got = SAMPLERS.get("ambient-full").sample(teacher, _batch(), cfg.model_copy(update={"name": "ambient-full"}))
    assert torch.equal(got, want)
    a = draw(teacher, 3, SamplerConfig(name="ambient-full", steps=3), seed=1)
    assert (a == draw(teacher, 3, SamplerConfig(steps=3), seed=1)).all()


@pytest.mark.parametrize("steps", [2, 5])
def test_ambient_truncated_stops_at_sigma_n_and_returns_the_denoiser_there(teacher, steps):
    """The σ's of the calls: the Karras levels from σ_max down to σ_n (each but the first twice: the corrector, then
    the next step), the last σ_n; 2·steps − 1 calls (the NFE documented); the result is D(x; σ_n) of the last state,
    exactly; and it is EDM's Heun sampler with σ_min = σ_n (whose last step, Euler to 0, lands on the same)."""
    spy = Spy(teacher)
    cfg = SamplerConfig(name="ambient-truncated", steps=steps)
    b = _batch()
    got = SAMPLERS.get("ambient-truncated").sample(spy, b, cfg)
    levels = edm_time_steps(steps, SIGMA_N, 80.0)[:-1].tolist()  # EDM's ρ-schedule with σ_min = σ_n
    assert levels[0] == 80.0 and levels[-1] == pytest.approx(SIGMA_N) and levels == sorted(levels, reverse=True)
    assert spy.sigmas == pytest.approx([levels[0]] + [t for t in levels[1:] for _ in (0, 1)])
    assert spy.sigmas[-1] == pytest.approx(SIGMA_N) and min(spy.sigmas) == pytest.approx(SIGMA_N)
    assert len(spy.calls) == nfe(cfg) == 2 * steps - 1
    x_last = spy.calls[-1][0]
    want = teacher(x_last, torch.full((3,), SIGMA_N, dtype=torch.float64), b.class_labels).to(b.latents.dtype)
    assert torch.equal(got, want)
    edm = heun_sample(teacher, b.latents, num_steps=steps, sigma_min=SIGMA_N, class_labels=b.class_labels)
    assert torch.allclose(got, edm, atol=1e-5, rtol=0)


def test_ambient_truncated_reads_sigma_n_from_the_model_or_the_knob(teacher):
    spy = Spy(teacher)
    SAMPLERS.get("ambient-truncated").sample(spy, _batch(), SamplerConfig(name="ambient-truncated", steps=3))
    assert spy.sigmas[-1] == pytest.approx(SIGMA_N)
    spy = Spy(teacher)  # the knob wins over the model's
    SAMPLERS.get("ambient-truncated").sample(
        spy, _batch(), SamplerConfig(name="ambient-truncated", steps=3, sigma_n=0.5)
    )
    assert spy.sigmas[-1] == pytest.approx(0.5)
    plain = _net(_meta())
    entry = SAMPLERS.get("ambient-truncated")
    with pytest.raises(ConfigError, match="sampler.sigma_n.*records none.*meta.noisy.sigma_n"):
        entry.prepare(plain, SamplerConfig(name="ambient-truncated"))
    with pytest.raises(ConfigError, match="sampler.sigma_n"):
        draw(plain, 1, SamplerConfig(name="ambient-truncated", steps=2))
    assert entry.prepare(plain, SamplerConfig(name="ambient-truncated", sigma_n=0.1)) is plain
    with pytest.raises(ConfigError, match="must lie in"):
        entry.prepare(teacher, SamplerConfig(name="ambient-truncated", sigma_max=0.1))


def test_the_teacher_samplers_refuse_a_generator(generator):
    for name in ("ambient-full", "ambient-truncated"):
        with pytest.raises(ConfigError, match="one-step generator.*--one-step"):
            SAMPLERS.get(name).prepare(generator, SamplerConfig(name=name, sigma_n=0.2))


# ------------------------------------------------------------------------------ on Gaussian data


S0, VAR_N = 0.25, 0.16  # clean data N(0, s0²) per pixel, s0² = 0.25; noise σ_n² = 0.16 (σ_n = 0.4)


class Gaussian:
    """The exact denoiser of N(0, v) per pixel, D(x; σ) = v/(v + σ²)·x, shaped as a network; it records its σ's."""

    def __init__(self, v: float, meta: dict):
        self.v, self.meta, self.sigmas = v, meta, []
        self.config = SimpleNamespace(arch="ddpmpp", in_channels=1, img_resolution=4, label_dim=0)

    def __call__(self, x, sigma, class_labels=None):
        self.sigmas.append(float(sigma[0]))
        return (self.v / (self.v + sigma.to(torch.float64) ** 2)).view(-1, 1, 1, 1) * x.to(torch.float64)


@pytest.mark.parametrize(
    "name, teacher_var, want",
    [
        # a teacher of the noisy data's score (the standard objective): heun to 0 gives the noisy data's law
        ("ambient-full", S0 + VAR_N, S0 + VAR_N),
        # the same teacher stopped at σ_n: x_{σ_n} ~ N(0, s² + σ_n²) with s² = s0² + σ_n², then D = s²/(s² + σ_n²)·x
        ("ambient-truncated", S0 + VAR_N, (S0 + VAR_N) ** 2 / (S0 + 2 * VAR_N)),
        # Ambient Tweedie's teacher (the clean score, at σ >= σ_n): x_{σ_n} has the noisy data's law N(0, s0² + σ_n²)
        # and D(x; σ_n) = E[x0 | y] has variance s0² − s0²σ_n²/(s0² + σ_n²) = s0⁴/(s0² + σ_n²) (the posterior mean)
        ("ambient-truncated", S0, S0**2 / (S0 + VAR_N)),
    ],
    ids=["full-noisy-score", "truncated-noisy-score", "truncated-tweedie"],
)
def test_the_law_on_gaussian_data(name, teacher_var, want):
    """4,096 images of 4 x 4 pixels, 64 steps (Heun's own error on the variance here < 1 %, measured: 0.3-0.7 %);
    the start x = σ_max·z misses the ODE's marginal at σ_max by the factor σ_max²/(v + σ_max²) on every variance,
    included. Tolerance: 4 standard errors of a variance of n normal values, sqrt(2/n)·var, plus 1 %."""
    net = Gaussian(teacher_var, {"noisy": {"sigma_n": math.sqrt(VAR_N)}})
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4096, 1, 4, 4, generator=g, dtype=torch.float64)
    x = SAMPLERS.get(name).sample(net, Batch(z, None, None, g), SamplerConfig(name=name, steps=64))
    want *= 80.0**2 / (teacher_var + 80.0**2)
    got = x.var().item()
    assert got == pytest.approx(want, rel=4 * math.sqrt(2 / x.numel()) + 0.01)
    if name == "ambient-truncated":
        assert min(net.sigmas) == pytest.approx(math.sqrt(VAR_N))  # the clean score is never asked below σ_n
        assert len(net.sigmas) == 2 * 64 - 1
    # and the three answers are far apart: the test tells them apart
    assert abs(S0 + VAR_N - S0**2 / (S0 + VAR_N)) > 0.2


def test_truncated_heun_refuses_a_single_level():
    with pytest.raises(ValueError, match="steps >= 2"):
        truncated_heun(Gaussian(1.0, {}), torch.zeros(1, 1, 4, 4), steps=1, sigma_n=0.2)


# ------------------------------------------------------------------------------ the sample stage


def _save(net: torch.nn.Module, folder) -> str:
    from safetensors.torch import save_file

    (folder / "model").mkdir(parents=True)
    state = {n: p.detach().contiguous() for n, p in net.named_parameters()}
    save_file(state, str(folder / "model" / "ema.safetensors"))
    save_file(state, str(folder / "model" / "model.safetensors"))
    (folder / "model" / "model.json").write_text(json.dumps(net.meta))
    return str(folder)


def test_one_step_flag_is_the_one_step_sampler_and_refuses_another():
    def built(*argv):
        return cli.config(cli.parse_args(["sample", "--checkpoint", "/c", "--out", "/o", *argv]))

    assert built("--one-step").sampler.name == "one-step"
    assert built("--one-step", "--sampler", "one-step").sampler.name == "one-step"
    assert built("--one-step", "--set", "sampler.sigma_init=1.5").sampler.sigma_init == 1.5
    with pytest.raises(ConfigError, match="--one-step is the sampler 'one-step'.*'heun'"):
        built("--one-step", "--sampler", "heun")
    with pytest.raises(ConfigError, match="sampler 'one-step' takes no guiding model"):
        built("--one-step", "--guide", "/g")
    with pytest.raises(ConfigError, match="calls the generator once"):
        built("--one-step", "--stochastic")
    assert build(SampleConfig, sets=["checkpoint=/c", "out=/o", "one_step=true"]).sampler.name == "one-step"


def test_the_sample_stage_samples_a_generator_folder_in_one_step(generator, teacher, tmp_path, capsys):
    folder = _save(generator, tmp_path / "gen")
    off = ["--set", "mlflow.enabled=false", "--no-progress"]
    g = torch.Generator().manual_seed(5)
    z = torch.randn(3, 1, R, R, generator=g)
    want = to_uint8(generator(2.5 * z, torch.full((3,), 2.5), torch.arange(3) % 3))
    for i, flags in enumerate((["--one-step"], [])):  # no sampler named: a generator's folder gets one-step
        out = tmp_path / f"s{i}"
        argv = ["sample", "--checkpoint", folder, "--out", str(out), "--num", "3", "--seed", "5", *flags, *off]
        assert cli.main(argv) == 0
        assert (np.load(out / "samples.npy") == want).all()
        assert "one-step: 1 network evaluations per image" in capsys.readouterr().out
        assert "name: one-step" in (out / "config.yaml").read_text()
    cfg = build(
        SampleConfig, sets=["checkpoint=" + folder, "out=" + str(tmp_path / "r"), "num=2", "mlflow.enabled=false"]
    )
    r = sample_stage.run(cfg, progress=False)
    assert (r["sampler"], r["nfe"]) == ("one-step", 1) and r["seconds_per_1000_images"] > 0
    # a multi-step sampler named for a generator is refused, naming the flag
    rc = cli.main(["sample", "--checkpoint", folder, "--out", str(tmp_path / "h"), "--sampler", "heun", *off])
    assert rc == 2 and "sample it with --one-step" in capsys.readouterr().err
    # a teacher folder: its sampler's count in the summary
    cfg = build(
        SampleConfig,
        sets=["checkpoint=" + _save(teacher, tmp_path / "t"), "out=" + str(tmp_path / "tr"), "num=2"]
        + ["sampler.name=ambient-truncated", "sampler.steps=3", "mlflow.enabled=false"],
    )
    assert sample_stage.run(cfg, progress=False)["nfe"] == 5
