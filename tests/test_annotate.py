"""Annotation: the noise and crops classifiers on the training engine, σ_min / σ_max through Ray Data
actors, resume, row conservation, refusals, fixed and score-based annotation, and MLflow."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from mlflow.tracking import MlflowClient

from ambient_ray.config import ConfigError
from ambient_ray.data.sources import SourceConfig
from ambient_ray.io import storage
from ambient_ray.stages import annotate
from ambient_ray.stages.annotate import AnnotateConfig
from ambient_ray.stages.corrupt import CorruptConfig, StageFailed
from ambient_ray.stages.corrupt import run as corrupt_run
from ambient_ray.stages.train_classifier import ClassifierTrainConfig
from ambient_ray.stages.train_classifier import run as train_classifier

BLURS = (0.3, 0.8, 2.5)
MODEL = dict(img_resolution=8, in_channels=1, model_channels=16, channel_mult=[1, 2])


@pytest.fixture(scope="module")
def blurred(ray_cluster, tmp_path_factory):
    """Digits: 30 % clean, the rest split between three blur strengths; 4 shards."""
    out = str(tmp_path_factory.mktemp("blurred") / "corrupt")
    specs = [f"blur:sigma={b}" for b in BLURS]
    corrupt_run(
        CorruptConfig(
            out=out,
            source=SourceConfig(dataset="digits"),
            corruptions=specs,
            clean_fraction=0.3,
            shard_size=512,
            preview=0,
        ),
        progress=False,
    )
    return out


@pytest.fixture(scope="module")
def noise_clf(blurred, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("noise") / "clf")
    cfg = ClassifierTrainConfig(
        data=blurred,
        out=out,
        kind="noise",
        steps=200,
        batch_size=64,
        log_every=50,
        checkpoint_every=200,
        cpus_per_worker=2,
        model=MODEL,
        optim=dict(lr=2e-3, warmup_steps=20),
        mlflow=dict(enabled=False),
    )
    return out, train_classifier(cfg)


FAST = dict(grid_points=16, draws=2)  # a coarser grid and fewer draws than the defaults keep the suite short


def acfg(data, out, **kw):
    return AnnotateConfig(data=data, out=out, mlflow=dict(enabled=False), **{**FAST, **kw})


@pytest.fixture(scope="module")
def annotated(blurred, noise_clf, mlflow_server, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("annot") / "a")
    cfg = AnnotateConfig(
        data=blurred, out=out, classifier=noise_clf[0], mlflow=dict(experiment="tests-annotate"), **FAST
    )
    return out, annotate.run(cfg, progress=False)


def rows_of(out, sub="data"):
    t = [pq.read_table(f) for f in storage.list_files(storage.join(out, sub), (".parquet",))]
    return pa.concat_tables(t).to_pandas() if t else None


def test_classifier_learns_and_saves_its_kind(noise_clf):
    out, s = noise_clf
    meta = json.loads(storage.read_bytes(f"{out}/model/model.json"))
    assert meta["kind"] == "noise" and meta["img_resolution"] == 8 and meta["good"] == "quality=clean"
    assert s["metrics"]["accuracy"] > 0.6  # balanced batches: 0.5 is chance
    assert s["good_rows"] == 539 and s["bad_rows"] == 1797 - 539
    assert storage.exists(f"{out}/curves.png")


def test_sigma_min_rises_with_blur(annotated, blurred):
    """The trend of Ambient-o Table 2a's σ̄_min column: stronger blur needs more noise to pass as clean."""
    out, s = annotated
    df = rows_of(out)
    assert len(df) == 1797 and s["rows_quarantined"] == 0
    assert (df.loc[df.quality == "clean", "sigma_min"] == 0).all()
    assert set(df.loc[df.quality == "clean", "annotation"]) == {"clean"}
    means = [df.loc[df.corruption == f"blur:sigma={b}", "sigma_min"].mean() for b in BLURS]
    assert means[0] < means[1] < means[2], means
    assert means[2] > 0.3
    corrupted = df[df.quality == "corrupted"]
    assert set(corrupted.annotation) <= {"classifier", "classifier:never-crossed"}
    grid = np.array(s["provenance"]["grid"])
    assert np.isin(corrupted.sigma_min.to_numpy(), grid.astype(np.float32)).all()  # σ_min is a grid point (Eq. 3.2)
    prov = json.loads(
        pq.read_schema(storage.list_files(f"{out}/data", (".parquet",))[0]).metadata[b"ambient_ray.annotation"]
    )
    assert prov["tau"] == 0.45 and prov["mode"] == "per-sample" and prov["classifier"].endswith("/model")
    assert prov["rule"] == "shrunk"  # the default estimator (docs/stages/annotate.md, "Per-sample σ_min estimators")
    # the images and the other columns came through untouched
    src = rows_of(blurred).set_index("id")
    assert (df.set_index("id").loc[src.index, "image"] == src["image"]).all()


def test_mlflow_gets_histogram_and_curves(annotated):
    out, s = annotated
    run = MlflowClient().get_run(s["mlflow_run_id"])
    assert run.data.metrics["rows_out"] == 1797
    assert run.data.metrics["mean_sigma_min.blur_sigma_2.5"] == pytest.approx(
        s["mean_sigma_min_by_group"]["blur:sigma=2.5"]
    )
    names = {a.path for a in MlflowClient().list_artifacts(s["mlflow_run_id"])}
    assert {"sigma_min.png", "curves.png", "annotation.json"} <= names


def test_theory_reads_the_classifier_curves(annotated, tmp_path, capsys):
    """``ambient-ray theory --curves``: d_TV(p_σ, q_σ) per blur from the stored curves (mean P(clean) of the clean
    rows − that of the set's rows), larger for stronger blur and contracted by noise; annotation's σ_min beside."""
    from ambient_ray import cli
    from ambient_ray.theory import annotation

    out, s = annotated
    found = annotation.read(out)
    assert found.estimator == "clean rows" and found.clean_rows == 539 and found.tau == 0.45
    by = {t.name: t for t in found.sets}
    assert set(by) == {f"blur:sigma={b}" for b in BLURS} and sum(t.rows for t in by.values()) == 1797 - 539
    df = rows_of(out).set_index("id")
    curves = rows_of(s["provenance"]["curves"], "curves").set_index("id").loc[df.index, "noise_curve"]
    c = np.stack(curves.to_numpy())
    strong = (df.corruption == "blur:sigma=2.5").to_numpy()
    by_hand = c[(df.quality == "clean").to_numpy()].mean(axis=0) - c[strong].mean(axis=0)
    np.testing.assert_allclose(by["blur:sigma=2.5"].tv, np.clip(by_hand, 0, 1), atol=1e-6)
    tv = np.array(by["blur:sigma=2.5"].tv)
    assert tv[-1] < tv.max() / 2  # noise contracts the distance
    assert by["blur:sigma=0.3"].contraction < by["blur:sigma=2.5"].contraction
    for name, t in by.items():
        assert t.sigma_min_mean == pytest.approx(s["mean_sigma_min_by_group"][name], rel=1e-5)
    code = cli.main(
        ["theory", "--curves", out, "--out", str(tmp_path), "--seeds", "5", "--set", "mlflow.enabled=false"]
    )
    assert code == 0
    text = capsys.readouterr().out
    assert "blur:sigma=2.5" in text and "σ where TV̂ = 1 − 2τ" in text
    assert (tmp_path / "theory-curves.png").read_bytes()[:4] == b"\x89PNG"
    summary = json.loads((tmp_path / "theory.json").read_text())
    assert summary["curves"]["sets"][0]["tv"] == found.to_dict()["sets"][0]["tv"]


def test_new_tau_and_per_dataset_mode_reuse_the_curves(annotated, blurred, noise_clf, tmp_path):
    out, first = annotated
    again = annotate.run(acfg(blurred, out, classifier=noise_clf[0], mode="per-dataset", tau=0.4), progress=False)
    assert again["shards_run"] == 0 and again["shards_skipped"] == 4  # curves kept: only thresholds recomputed
    df = rows_of(out)
    corrupted = df[df.quality == "corrupted"]
    assert (corrupted.groupby("corruption").sigma_min.nunique() == 1).all()  # one σ_min per corrupted set
    per_spec = corrupted.groupby("corruption").sigma_min.first()
    assert per_spec.is_monotonic_increasing  # blur 0.3 < 0.8 < 2.5
    # sets=all: one σ_min for every corrupted row, from the pooled curve, so between the per-spec ones
    annotate.run(acfg(blurred, out, classifier=noise_clf[0], mode="per-dataset", tau=0.4, sets="all"), progress=False)
    pooled = rows_of(out)
    pooled = pooled[pooled.quality == "corrupted"].sigma_min
    assert pooled.nunique() == 1 and per_spec.min() <= pooled.iloc[0] <= per_spec.max()
    # put the per-sample annotation back for the other tests
    annotate.run(acfg(blurred, out, classifier=noise_clf[0]), progress=False)


def test_every_rule_reads_the_same_curves(annotated, blurred, noise_clf):
    """Each per-sample estimator re-annotates from the stored curves (mean and std over the draws) without
    recomputing one, and gives what thresholds.estimate_sigma_min gives on them, per corruption set."""
    from ambient_ray.diffusion import thresholds

    out, first = annotated
    curves = rows_of(out, "curves").set_index("id")
    assert {"noise_curve", "noise_std"} <= set(curves.columns)
    grid = torch.tensor(first["provenance"]["grid"], dtype=torch.float64)
    seen = {}
    for rule in thresholds.RULES:
        s = annotate.run(acfg(blurred, out, classifier=noise_clf[0], rule=rule, span=2), progress=False)
        assert s["shards_run"] == 0 and s["provenance"]["rule"] == rule
        df = rows_of(out)
        df = df[df.quality == "corrupted"]
        spec = df.corruption.iloc[0]
        part = df[df.corruption == spec]
        mean = torch.tensor(np.stack(curves.loc[part.id, "noise_curve"].to_numpy()), dtype=torch.float64)
        std = torch.tensor(np.stack(curves.loc[part.id, "noise_std"].to_numpy()), dtype=torch.float64)
        want, _ = thresholds.estimate_sigma_min(rule, mean, grid, 0.45, std=std, draws=FAST["draws"], span=2)
        assert part.sigma_min.to_numpy() == pytest.approx(want.numpy(), rel=1e-6), rule
        seen[rule] = df.sigma_min.mean()
    assert seen["last"] >= seen["first"] and seen["confident"] >= seen["first"]  # later crossings by design
    assert len(set(np.round(list(seen.values()), 6))) >= 4  # the rules differ on real curves
    annotate.run(acfg(blurred, out, classifier=noise_clf[0]), progress=False)


def test_lognormal_grid_is_the_training_distribution(blurred, noise_clf, tmp_path):
    """grid=lognormal: sorted draws of the training log-normal inside the classifier's range, densest near
    exp(P_mean); a range it hardly reaches is refused."""
    from ambient_ray.stages.annotate import make_grid

    cfg = acfg(blurred, str(tmp_path / "g"), classifier=noise_clf[0], grid="lognormal", grid_points=64)
    g = np.array(make_grid(cfg, 0.01, 20.0))
    assert len(g) == 64 and (np.diff(g) > 0).all() and g[0] >= 0.01 and g[-1] <= 20.0
    # half the points below the log-normal's median exp(-1.2) = 0.30, far more than a log grid puts there
    assert abs(np.median(g) - np.exp(-1.2)) < 0.1
    assert (g < 1).mean() > 0.75 and (np.geomspace(0.01, 20, 64) < 1).mean() < 0.65
    with pytest.raises(ConfigError, match="too few"):
        make_grid(cfg, 50.0, 80.0)


def test_rules_that_weigh_the_draws_refuse_a_single_draw():
    """shrunk (the default) and confident read each curve's noise off the spread of its draws: one draw has
    none, so the config is refused, naming the rule; first, or one σ_min per set, is allowed."""
    for rule in ("shrunk", "confident"):
        with pytest.raises(ValueError, match=f"rule {rule} .* needs draws >= 2 \\(got 1\\)"):
            AnnotateConfig(data="d", out="o", classifier="c", rule=rule, draws=1)
    assert AnnotateConfig(data="d", out="o", classifier="c", rule="first", draws=1).draws == 1
    assert AnnotateConfig(data="d", out="o", classifier="c", mode="per-dataset", draws=1).rule == "shrunk"


def test_resume_after_interruption(annotated, blurred, noise_clf, tmp_path):
    out = str(tmp_path / "resumed")
    with pytest.raises(StageFailed, match=r"3 of 4 shards(.|\n)*shard-00002: RuntimeError: debug_fail_shard"):
        annotate.run(acfg(blurred, out, classifier=noise_clf[0], debug_fail_shard="shard-00002"), progress=False)
    assert not storage.exists(f"{out}/data")  # nothing annotated from a partial set of curves
    s = annotate.run(acfg(blurred, out, classifier=noise_clf[0]), progress=False)
    assert s["shards_run"] == 1 and s["shards_skipped"] == 3 and s["rows_out"] == 1797
    ref = rows_of(annotated[0]).set_index("id").sort_index()
    got = rows_of(out).set_index("id").sort_index()
    np.testing.assert_array_equal(got.sigma_min.to_numpy(), ref.sigma_min.to_numpy())  # seeded per row


def test_other_curves_into_the_same_out_are_refused(annotated, blurred, noise_clf):
    with pytest.raises(ConfigError, match="already holds curves"):
        annotate.run(acfg(blurred, annotated[0], classifier=noise_clf[0], draws=3), progress=False)


def _write_classifier(d, kind, size):
    from safetensors.torch import save_file

    from ambient_ray.models.classifier import ClassifierConfig, build_classifier

    cfg = ClassifierConfig(**{**MODEL, "img_resolution": size})
    net = build_classifier(cfg, kind)
    state = {n: p.detach().contiguous() for n, p in net.named_parameters()}
    storage.write_bytes(
        f"{d}/model/model.json",
        json.dumps(
            {
                "kind": kind,
                "model": cfg.model_dump(mode="json"),
                "img_resolution": size,
                "in_channels": 1,
                "sigma_range": [0.01, 20.0],
            }
        ).encode(),
    )
    save_file(state, f"{d}/model/ema.safetensors")
    return str(d)


def test_wrong_classifier_is_refused(blurred, tmp_path):
    crops = _write_classifier(tmp_path / "crops", "crops", 8)
    with pytest.raises(ValueError, match="holds a crops classifier, not a noise classifier"):
        annotate.run(acfg(blurred, str(tmp_path / "o1"), classifier=crops), progress=False)
    big = _write_classifier(tmp_path / "big", "noise", 16)
    with pytest.raises(ValueError, match="trained on 16x16 images; the data is 8x8"):
        annotate.run(acfg(blurred, str(tmp_path / "o2"), classifier=big), progress=False)
    denoiser = tmp_path / "den"
    storage.write_bytes(f"{denoiser}/model/model.json", json.dumps({"model": {}}).encode())
    with pytest.raises(ValueError, match="holds a diffusion model"):
        annotate.run(acfg(blurred, str(tmp_path / "o3"), classifier=str(denoiser)), progress=False)
    from ambient_ray.models.weights import load

    with pytest.raises(ValueError, match="holds a noise classifier, not a diffusion model"):
        load(big, "denoiser")


def test_bad_rows_are_quarantined_and_counted(blurred, noise_clf, tmp_path):
    data = tmp_path / "bad"
    files = storage.list_files(f"{blurred}/data", (".parquet",))
    for f in files:
        t = pq.read_table(f)
        if f.endswith("shard-00000.parquet"):
            img = t.column("image").to_pylist()
            from ambient_ray.data.images import encode_png

            img[0] = b"not a png"
            img[1] = encode_png(np.zeros((16, 16, 1), np.uint8))
            t = t.set_column(t.column_names.index("image"), "image", pa.array(img, pa.binary()))
        storage.write_bytes(f"{data}/data/{f.rsplit('/', 1)[1]}", _pq_bytes(t))
    storage.write_bytes(f"{data}/data/shard-09999.parquet", _pq_bytes(t.slice(0, 0)))  # an empty shard
    s = annotate.run(acfg(str(data), str(tmp_path / "o"), classifier=noise_clf[0]), progress=False)
    assert s["rows_in"] == 1797 and s["rows_out"] == 1795 and s["rows_quarantined"] == 2
    q = rows_of(str(tmp_path / "o"), "quarantine")
    reasons = " | ".join(q.reason)
    assert "cannot decode image" in reasons and "16x16x1, the classifier takes 8x8x1" in reasons
    assert len(rows_of(str(tmp_path / "o"))) + len(q) == 1797


def _pq_bytes(t):
    sink = pa.BufferOutputStream()
    pq.write_table(t, sink)
    return sink.getvalue().to_pybytes()


def test_fixed_per_source_and_nothing_to_annotate(blurred, tmp_path):
    s = annotate.run(acfg(blurred, str(tmp_path / "f"), fixed={"digits": 2.0}), progress=False)
    df = rows_of(str(tmp_path / "f"))
    assert (df.sigma_min == 2.0).all() and set(df.annotation) == {"fixed:digits"} and s["rows_out"] == 1797
    assert s["mean_sigma_min"] == 2.0
    with pytest.raises(ConfigError, match="overlaps the input shards"):
        annotate.run(acfg(blurred, f"{blurred}/data/annotated", fixed={"digits": 2.0}), progress=False)
    with pytest.raises(ConfigError, match="rows are not clean and nothing annotates them"):
        annotate.run(acfg(blurred, str(tmp_path / "g"), fixed={"faces": 1.0}), progress=False)


def test_quality_score_splits_good_and_bad(blurred, tmp_path):
    """The built-in sharpness score ranks the unblurred rows high and the strongly blurred ones low
    (blur 0.3 on 8x8 digits is barely visible, so those rows mix with the clean ones)."""
    out = str(tmp_path / "q")
    annotate.run(acfg(blurred, out, scorer="sharpness", top_percent=30, fixed_sigma_min=1.5), progress=False)
    df = rows_of(out).set_index("id")
    src = rows_of(blurred).set_index("id").loc[df.index]
    picked = df.quality == "clean"
    assert picked.sum() == round(0.3 * 1797)
    assert (src.quality[picked] == "clean").mean() > 0.5  # chance: 0.3
    assert (src.corruption[picked] == "blur:sigma=2.5").mean() < 0.02
    assert (df.sigma_min[picked] == 0).all() and (df.sigma_min[~picked] == 1.5).all()
    assert df.quality_score.notna().all()


def test_scorer_from_files(tmp_path):
    from ambient_ray.models.scorers import load_scorer, sharpness

    scripted = torch.jit.script(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 1)))
    torch.jit.save(scripted, str(tmp_path / "s.pt"))
    x = torch.rand(3, 1, 8, 8)
    assert load_scorer(str(tmp_path / "s.pt"))(x).shape == (3,)
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a TorchScript file"):
        load_scorer(str(tmp_path / "junk.pt"))
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_scorer(str(tmp_path / "missing.pt"))
    import timm
    from safetensors.torch import save_file

    net = timm.create_model("test_efficientnet", pretrained=False, num_classes=1)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "w.safetensors"))
    assert load_scorer(f"timm:test_efficientnet@{tmp_path}/w.safetensors")(torch.rand(2, 3, 32, 32)).shape == (2,)
    with pytest.raises(ValueError, match="do not fit"):
        load_scorer(f"timm:test_convnext@{tmp_path}/w.safetensors")
    # the built-in score: a sharp checkerboard beats its blurred self
    board = (torch.arange(8).view(1, 8) + torch.arange(8).view(8, 1)) % 2
    sharp = board.float().view(1, 1, 8, 8)
    blurred = torch.nn.functional.avg_pool2d(sharp, 3, 1, 1)
    assert sharpness(sharp) > 10 * sharpness(blurred)


def test_cli_annotate_with_fixed(blurred, tmp_path, capsys):
    from ambient_ray.cli import main

    rc = main(
        [
            "annotate",
            "--data",
            blurred,
            "--out",
            str(tmp_path / "c"),
            "--fixed",
            "digits=0.5",
            "--no-progress",
            "--set",
            "mlflow.enabled=false",
        ]
    )
    assert rc == 0 and "1797 rows in, 1797 out, 0 quarantined" in capsys.readouterr().out
    assert main(["annotate", "--data", blurred, "--out", str(tmp_path / "d"), "--fixed", "digits"]) == 2
    assert "expected SOURCE=SIGMA" in capsys.readouterr().err


def test_crops_classifier_gives_sigma_max_and_train_uses_the_crop_table(blurred, noise_clf, tmp_path):
    """Digits 0-4 are the target, 5-9 the other data; crop(σ) from the locality map of a (fresh)
    denoiser; σ_max lands on the grid, only for rows that are not clean, and training then draws crops."""
    from ambient_ray.data.metadata import load_metadata
    from ambient_ray.diffusion import ambient
    from ambient_ray.stages.locality import LocalityConfig
    from ambient_ray.stages.locality import run as locality_run
    from ambient_ray.train.tasks.denoiser_config import TrainConfig
    from ambient_ray.train.tasks.denoiser_data import load_crop_table, resolve_sigmas
    from tests.test_locality import write_denoiser

    crops = str(tmp_path / "crops")
    s = train_classifier(
        ClassifierTrainConfig(
            data=blurred,
            out=crops,
            kind="crops",
            good="label=0,1,2,3,4",
            steps=40,
            batch_size=64,
            log_every=20,
            checkpoint_every=40,
            model=MODEL,
            optim=dict(lr=2e-3, warmup_steps=5),
            mlflow=dict(enabled=False),
        )
    )
    meta = json.loads(storage.read_bytes(f"{crops}/model/model.json"))
    assert meta["kind"] == "crops" and meta["crop_sizes"] == [2, 4, 6, 8] and s["good_rows"] + s["bad_rows"] == 1797
    loc = str(tmp_path / "loc")
    locality_run(
        LocalityConfig(
            checkpoint=write_denoiser(tmp_path / "den"),
            data=blurred,
            out=loc,
            rows=64,
            sigma_points=6,
            mlflow=dict(enabled=False),
        )
    )
    with pytest.raises(ConfigError, match="needs the crop"):
        annotate.run(
            acfg(blurred, str(tmp_path / "x"), classifier=noise_clf[0], crops_classifier=crops), progress=False
        )
    with pytest.raises(ValueError, match="holds a noise classifier, not a crops classifier"):
        annotate.run(
            acfg(blurred, str(tmp_path / "x"), classifier=noise_clf[0], crops_classifier=noise_clf[0], locality=loc),
            progress=False,
        )
    out = str(tmp_path / "a")
    r = annotate.run(acfg(blurred, out, classifier=noise_clf[0], crops_classifier=crops, locality=loc), progress=False)
    df = rows_of(out)
    assert r["rows_with_sigma_max"] > 0 and (df.loc[df.quality == "clean", "sigma_max"] == 0).all()
    grid = np.array(r["provenance"]["grid"], np.float32)
    assert np.isin(df.sigma_max[df.sigma_max > 0].to_numpy(), grid).all()
    assert storage.exists(f"{out}/locality.json") and storage.exists(f"{out}/crop_curves.png")
    # train picks the crop table up from beside the data, and its σ sampler then has crop-eligible rows
    tcfg = TrainConfig(data=out, out=str(tmp_path / "t"), model={**MODEL}, mlflow=dict(enabled=False))
    load_crop_table(tcfg)
    table = json.loads(storage.read_bytes(f"{out}/locality.json"))
    assert tcfg.ambient.crop_sigmas == table["sigmas"] and tcfg.ambient.crop_sizes == table["crop"]
    smin, smax, _ = resolve_sigmas(load_metadata(out), tcfg)
    assert (smax > 0).sum() == r["rows_with_sigma_max"]
    crop = ambient.CropTable(tcfg.ambient.crop_sigmas, tcfg.ambient.crop_sizes)
    sampler = ambient.SigmaSampler(torch.from_numpy(smin), torch.from_numpy(smax), lambda_max=4.0, crop=crop)
    assert int(sampler.crop_count(torch.tensor([float(smax[smax > 0].min())]))) == r["rows_with_sigma_max"]
    _, _, crop_size = sampler.sample(4096, torch.Generator().manual_seed(0))
    assert (crop_size > 0).any()
    # the crop-size threshold: locality_eps re-derives crop(σ) from the table's losses (what `tune` searches)
    from ambient_ray.diffusion.locality import crop_sizes

    with pytest.raises(ConfigError, match="locality_eps"):
        annotate.run(acfg(blurred, str(tmp_path / "x"), classifier=noise_clf[0], locality_eps=0.5), progress=False)
    loose = str(tmp_path / "loose")
    annotate.run(
        acfg(
            blurred,
            loose,
            classifier=noise_clf[0],
            crops_classifier=crops,
            locality=loc,
            locality_eps=50.0,
            curves_from=out,
        ),
        progress=False,
    )
    t2 = json.loads(storage.read_bytes(f"{loose}/locality.json"))
    assert t2["eps"] == 50.0 and t2["crop"] == crop_sizes(
        torch.tensor(table["losses"], dtype=torch.float64), table["contexts"], 50.0
    )
    assert all(a <= b for a, b in zip(t2["crop"], table["crop"]))
    # other crop sizes at the grid mean other crop curves: the curves of `out` are reused only for the same sizes
    same = (
        ambient.CropTable(t2["sigmas"], t2["crop"])(torch.tensor(grid, dtype=torch.float64)).tolist()
        == ambient.CropTable(table["sigmas"], table["crop"])(torch.tensor(grid, dtype=torch.float64)).tolist()
    )
    assert json.loads(storage.read_bytes(f"{loose}/annotation.json"))["provenance"]["curves"] == (
        out if same else loose
    )
