"""The masked objective in the engine (issue 32): each kind of row gets its own loss (checked on a planted batch
against the formulas written out here), the network never sees a pixel outside Ã nor the loss one outside A, and
a dataset mixing masked, clean and blurred-annotated rows trains in one run with per-kind statistics."""

from __future__ import annotations

import json
import types

import numpy as np
import pyarrow as pa
import pytest
import torch
from mlflow.tracking import MlflowClient

from ambient_ray.config import ConfigError
from ambient_ray.data import schema
from ambient_ray.data.images import encode_png
from ambient_ray.diffusion import ambient
from ambient_ray.io import storage
from ambient_ray.models import registry
from ambient_ray.stages.train import TrainConfig, run
from ambient_ray.train.tasks import denoiser_data
from ambient_ray.train.tasks.masked import MaskedTask

NET = dict(img_resolution=8, in_channels=1, model_channels=16, channel_mult=[1, 2], mask_input=True)
META = {"kind": "denoiser", "arch": "ddpmpp", "model": NET, "sigma_data": 0.5}


def lam(s):
    return (s**2 + 0.25) / (0.5 * s) ** 2  # EDM's λ(σ) at σ_data = 0.5


def planted_task(delta=0.3):
    """A MaskedTask's worker state for four rows, set by hand (no Ray): rows 0-1 masked, row 2 blurred (σ_min 0.4),
    row 3 clean; Ã fixed per row so the expected losses can be computed here."""
    g = torch.Generator().manual_seed(3)
    a = torch.ones(4, 1, 8, 8, dtype=torch.bool)
    a[:2] = torch.rand(2, 1, 8, 8, generator=g) >= 0.5
    task = MaskedTask.__new__(MaskedTask)
    task.cfg = TrainConfig(data="-", out="-", masked=dict(delta=delta), model=NET)
    task.logvar = False
    task.observed, task.masked_row = a, torch.tensor([True, True, False, False])
    task.fixed = torch.rand(4, 1, 8, 8, generator=g) >= delta
    return task


def test_each_kind_of_row_gets_the_loss_its_kind_asks_for():
    """On a planted batch: a masked row is graded by Σ_A w·(D(Ã⊙x_σ, Ã) − x0)² / (C·H·W) (seed 003 Eq. 3.2, with
    Ã = B⊙A; w = λ(σ) on the pixels seen, 1/σ_data² on those not, predicted as σ_data·F), a blurred row by
    Ambient-o's loss (its x0 prediction mapped to x_{σ_min}, weight σ⁴/(σ²−σ_min²)²) seen whole, a clean row by
    EDM's λ(σ)·mean (D − x0)², seen whole."""
    task = planted_task()
    torch.manual_seed(0)
    net = registry.build(META)
    g = torch.Generator().manual_seed(1)
    y = torch.rand(4, 1, 8, 8, generator=g) * 2 - 1
    sigma = torch.tensor([0.7, 2.0, 1.5, 0.3])
    smin = torch.tensor([0.0, 0.0, 0.4, 0.0])
    b = ambient.noise_batch(sigma, y, smin, torch.zeros(4), torch.arange(4), g)
    w = types.SimpleNamespace(engine=net, device=torch.device("cpu"), generator=g)
    loss, per = task.objective(w, b, (None,), {})

    seen = task.observed.float() * task.fixed.float()
    seen[2:] = 1.0
    with torch.no_grad():
        d = net(b.x_sigma, sigma, None, mask=seen)
        want = torch.zeros(4)
        for i in (0, 1):  # masked: graded on A only (weight λ(σ) where seen, 1/σ_data² where not), over C·H·W = 64
            a = task.observed[i].float()
            weight = torch.where(seen[i].bool(), lam(sigma[i]), torch.tensor(4.0))
            want[i] = (weight * (d[i] - y[i]) ** 2 * a).sum() / 64
        s, sn = sigma[2], smin[2]
        alpha = (s**2 - sn**2) / s**2
        pred_n = alpha * d[2] + (1 - alpha) * b.x_sigma[2]
        want[2] = lam(s) * s**4 / (s**2 - sn**2) ** 2 * ((pred_n - b.x_sigma_n[2]) ** 2).mean()
        want[3] = lam(sigma[3]) * ((d[3] - y[3]) ** 2).mean()
    print("per-row losses", per.detach().numpy().round(4), "want", want.numpy().round(4))
    torch.testing.assert_close(per.detach(), want, rtol=1e-5, atol=1e-6)
    assert float(loss) == pytest.approx(float(want.mean()), rel=1e-5)
    # the masked rows' Ã really hid some of A's pixels: graded pixels the network did not see
    assert bool(((task.observed[:2].float() - seen[:2]) > 0).any())


def test_hidden_pixels_reach_neither_the_network_nor_the_loss():
    """Values planted at pixels outside Ã (NaN, inf, 1e6) leave the network's output unchanged; values outside A leave
    the loss unchanged and its gradient with respect to the prediction zero there; and with δ = 0 on an all-visible
    row nothing changes from the plain loss."""
    torch.manual_seed(0)
    net = registry.build(META)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 1, 8, 8, generator=g)
    seen = (torch.rand(3, 1, 8, 8, generator=g) >= 0.5).float()
    planted = x.clone()
    planted[:, :, :4][seen[:, :, :4] == 0] = float("nan")
    planted[:, :, 4:][seen[:, :, 4:] == 0] = float("inf")
    planted[0][seen[0] == 0] = 1e6
    d0, d1 = net(x, torch.ones(3), mask=seen), net(planted, torch.ones(3), mask=seen)
    assert torch.equal(d0, d1) and bool(torch.isfinite(d1).all())

    a = (torch.rand(3, 1, 8, 8, generator=g) >= 0.3).float()
    y = torch.randn(3, 1, 8, 8, generator=g)
    y_planted = torch.where(a.bool(), y, torch.full_like(y, float("nan")))
    sigma = torch.tensor([0.5, 1.0, 3.0])

    def loss_of(y_rows):
        b = ambient.noise_batch(sigma, y_rows, torch.zeros(3), torch.zeros(3), torch.arange(3), torch.Generator())
        pred = d0.detach().clone().requires_grad_(True)
        loss, _ = ambient.batch_loss(pred, b, 0.5, observed=a)
        loss.backward()
        return loss, pred.grad

    (l0, g0), (l1, g1) = loss_of(y), loss_of(y_planted)
    assert torch.isfinite(l1) and float(l0) == pytest.approx(float(l1))
    assert bool((g1[a.expand_as(g1) == 0] == 0).all()) and bool(torch.isfinite(g1).all())
    assert bool((g0[a.expand_as(g0) == 1] != 0).any())


# ------------------------------------------------------------------------------ one run of mixed rows


@pytest.fixture(scope="module")
def mixed_data(tmp_path_factory):
    """48 digit-like rows: 16 behind Bernoulli masks (p = 0.5, hidden pixels 0), 16 annotated σ_min 0.4, 16 clean."""
    rng = np.random.default_rng(0)
    rows, masks, smin = [], [], []
    for i in range(48):
        img = (rng.random((8, 8, 1)) * 255).astype(np.uint8)
        m = np.ones((1, 8, 8), np.uint8)
        if i < 16:
            m = (rng.random((1, 8, 8)) >= 0.5).astype(np.uint8)
            img = img * m[0][..., None]
        rows.append(dict(id=f"r{i:03d}", image=encode_png(img), height=8, width=8, channels=1))
        masks.append(m)
        smin.append(0.4 if 16 <= i < 32 else 0.0)
    table = pa.table(
        {
            "id": [r["id"] for r in rows],
            "image": [r["image"] for r in rows],
            "height": [8] * 48,
            "width": [8] * 48,
            "channels": [1] * 48,
            "sigma_min": smin,
        }
    )
    spec = schema.mask_spec(8, 8)
    table = table.append_column(schema.tensor_field(spec), schema.to_arrow(spec, np.stack(masks)))
    out = tmp_path_factory.mktemp("mixed") / "data"
    out.mkdir()
    storage.write_parquet(str(out / "part-000.parquet"), table)
    return str(out)


def mcfg(data, out, **kw):
    base = dict(
        data=data,
        out=out,
        objective="masked",
        steps=8,
        batch_size=16,
        num_workers=1,
        log_every=4,
        checkpoint_every=8,
        sample_grid=0,
        model=dict(img_resolution=8, in_channels=1, model_channels=16, channel_mult=[1, 2]),
        optim=dict(lr=2e-3, warmup_steps=2),
        masked=dict(delta=0.2),
        mlflow=dict(enabled=False),
    )
    return TrainConfig(**{**base, **kw})


def test_masked_run_is_prepared_with_row_kinds_and_refuses_what_it_cannot_train(mixed_data, tmp_path):
    cfg = mcfg(mixed_data, str(tmp_path / "o"))
    p = denoiser_data.prepare(cfg)
    assert p.rows.group == "kind" and p.rows.sources == ["clean", "annotated", "masked"]
    assert sorted(p.rows.source.values()).count(2) == 16 and "mask" in p.columns
    assert p.meta["model"]["mask_input"] is True
    assert p.meta["masked"]["observed_fraction"] == pytest.approx(0.5, abs=0.08)
    assert p.meta["masked"]["density"] == pytest.approx(0.8 * p.meta["masked"]["observed_fraction"])
    assert p.params["rows_masked"] == 16 and p.params["rows_clean"] == 16
    with pytest.raises(ConfigError, match="data-path memory"):
        denoiser_data.prepare(mcfg(mixed_data, str(tmp_path / "o"), stream=dict(mode="stream")))
    with pytest.raises(ConfigError, match="mask_input"):
        denoiser_data.prepare(
            mcfg(mixed_data, str(tmp_path / "o"), model={**cfg.model.model_dump(), "mask_input": False})
        )


def test_latent_data_is_refused_by_the_masked_objective(mixed_data, tmp_path):
    cfg = mcfg(mixed_data, str(tmp_path / "o"))
    with pytest.raises(ConfigError, match="pixel mask has no exact latent counterpart"):
        denoiser_data.mask_kinds(cfg, None, np.zeros(1), {"latent_shape": [8, 4, 4]})


def test_mixed_rows_train_in_one_run_with_per_kind_statistics(ray_cluster, mlflow_server, mixed_data, tmp_path):
    """Masked, clean and blurred rows in one run of 8 steps: finite losses, each kind's loss and draws in MLflow,
    each kind's σ donut, the mask's observed fraction and δ as params, and model.json says how it was masked."""
    out = str(tmp_path / "run")
    summary = run(mcfg(mixed_data, out, mlflow=dict(enabled=True, experiment="tests-masked")))
    r = MlflowClient().get_run(summary["mlflow_run_id"])
    for kind in ("clean", "annotated", "masked"):
        assert np.isfinite(r.data.metrics[f"loss_kind_{kind}"]), kind
        assert r.data.metrics[f"draws_kind_{kind}"] > 0, kind
    assert r.data.params["masked.delta"] == "0.2" and float(r.data.params["mask_observed_fraction"]) < 0.6
    cov = json.loads(storage.read_bytes(storage.join(out, "coverage.json")))
    assert cov["group"] == "kind" and set(cov["sources"]) == {"clean", "annotated", "masked"}
    meta = json.loads(storage.read_bytes(storage.join(out, "model", "model.json")))
    assert meta["model"]["mask_input"] is True and meta["masked"]["delta"] == 0.2


# ------------------------------------------------------------------------------ the documented flow


def documented(marker: str) -> list[str]:
    """The commands of the docs block marked ``<!-- tested: MARKER -->`` in docs/stages/train.md."""
    import pathlib

    text = (pathlib.Path(__file__).parents[1] / "docs" / "stages" / "train.md").read_text()
    block = text.split(f"<!-- tested: {marker} -->", 1)[1].split("```", 2)[1]
    return [line for line in block.splitlines() if line.startswith("ambient-ray ")]


FAST = {  # appended to each documented command: the same flow, cut to seconds
    "corrupt": ["--set", "source.limit=240", "--set", "preview=0"],
    "train": ["--steps", "8", "--set", "batch_size=16", "--set", "log_every=4", "--set", "checkpoint_every=8"]
    + ["--set", "model.model_channels=16", "--set", "model.channel_mult=[1,2]", "--set", "sample_grid=4"]
    + ["--set", "mlflow.enabled=false"],
    "sample": ["--num", "8", "--steps", "4", "--set", "mlflow.enabled=false"],
    "inpaint": ["--steps", "4", "--set", "limit=24", "--set", "mlflow.enabled=false"],
}


def test_the_documented_masked_flow_round_trips_the_mask(ray_cluster, tmp_path, monkeypatch):
    """docs/stages/train.md's masked flow, as written (plus FAST's overrides): corrupt writes each row's mask, train
    reads it (model.json: the masked rows' observed fraction ≈ 1 − p), sample draws behind masks, and inpaint gives
    back each row's own mask and keeps its observed pixels exactly."""
    import shlex

    import pyarrow.parquet as pq

    from ambient_ray import cli
    from ambient_ray.data.images import decode_png
    from ambient_ray.data.masks import masks_of

    monkeypatch.chdir(tmp_path)
    lines = documented("masked flow")
    assert [shlex.split(line)[1] for line in lines] == ["corrupt", "train", "sample", "inpaint"]
    for line in lines:
        argv = shlex.split(line)[1:]
        assert cli.main(argv + FAST[argv[0]]) == 0, line
    corrupted = pq.read_table(tmp_path / "runs" / "digits-masked" / "data")
    data = corrupted.to_pandas()
    masked = data[data["corruption"] == "mask:p=0.6"]
    assert len(masked) > 100 and (data["quality"] == "clean").any()
    meta = json.loads((tmp_path / "runs" / "masked" / "model" / "model.json").read_text())
    assert meta["masked"]["observed_fraction"] == pytest.approx(0.4, abs=0.03) and meta["masked"]["delta"] == 0.1
    assert (tmp_path / "runs" / "masked" / "samples.png").exists()
    assert (tmp_path / "runs" / "masked-samples").exists()
    out = pq.read_table(tmp_path / "runs" / "restored" / "data").to_pandas().set_index("id")
    stored = dict(zip(data["id"], masks_of(corrupted)))
    restored_table = pq.read_table(tmp_path / "runs" / "restored" / "data")
    restored = masks_of(restored_table)
    out = out.loc[restored_table.column("id").to_pylist()]
    hidden_somewhere = 0
    for (row_id, row), mask in zip(out.iterrows(), restored):
        assert np.array_equal(mask, stored[row_id]), row_id
        seen = mask[0] != 0
        observed = decode_png(data.set_index("id")["image"][row_id])[..., 0]
        sample = decode_png(row["sample"])[..., 0]
        assert np.array_equal(sample[seen], observed[seen]), row_id
        hidden_somewhere += int((~seen).sum())
    assert len(out) == 24 and hidden_somewhere > 0


def test_the_pipeline_runs_inpaint_after_sample_when_its_section_is_given(tmp_path):
    """An ``inpaint`` section adds the step after sample, restoring the training data with the trained model; without
    it the pipeline is as before."""
    from ambient_ray.workflows.pipeline import PipelineConfig, stage_configs, steps

    data = str(tmp_path / "masked-data")
    plain = PipelineConfig(out=str(tmp_path / "p"), data=data, train={"objective": "masked"})
    assert steps(plain) == ["train", "sample"]
    cfg = PipelineConfig(out=str(tmp_path / "p"), data=data, train={"objective": "masked"}, inpaint={"steps": 4})
    assert steps(cfg) == ["train", "sample", "inpaint"]
    built = stage_configs(cfg)
    inp = built["inpaint"]
    assert inp.data == built["train"].data and inp.model == built["train"].out and inp.steps == 4
    assert inp.out.endswith("inpainted")
    with pytest.raises(ConfigError, match="inpaint.model"):
        stage_configs(PipelineConfig(out=str(tmp_path / "p"), data=data, inpaint={"model": "/elsewhere"}))


def test_an_unseen_pixel_is_predicted_as_a_pixel_of_infinite_noise():
    """D = σ_data·F outside Ã at every σ (c_skip = 0, c_out = σ_data), so an unseen pixel's prediction does not
    vanish as σ → 0; inside Ã, D = c_skip·x + c_out·F as always."""
    torch.manual_seed(0)
    net = registry.build(META)
    x = torch.randn(2, 1, 8, 8)
    seen = (torch.rand(2, 1, 8, 8) >= 0.5).float()
    captured = {}
    net.network = lambda x_in, c_noise, *extra: captured.setdefault(float(c_noise[0]), torch.ones_like(x_in[:, :1]))
    for sigma in (0.002, 1.0, 80.0):
        d = net(x, torch.full((2,), sigma), mask=seen)
        assert torch.allclose(d[seen == 0], torch.full_like(d[seen == 0], 0.5))
        c_skip, c_out = 0.25 / (sigma**2 + 0.25), sigma * 0.5 / (sigma**2 + 0.25) ** 0.5
        assert torch.allclose(d[seen == 1], c_skip * x[seen == 1] + c_out, atol=1e-6)
