"""Memorization as nearest-neighbour similarity (Ambient Diffusion's test): the cosine math against exact copies,
random features (the analytic top-1 law) and a planted set; the evaluate stage end to end in pixel features
(metrics.json, the files, MLflow; the training data found through the samples' records); bad keys refused."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import yaml

from ambient_ray import config as cfgmod
from ambient_ray.cli import main as cli
from ambient_ray.data.sources import read_array
from ambient_ray.evaluation.metrics import nearest_cosine, similarity_summary
from ambient_ray.stages.evaluate import EvaluateConfig
from ambient_ray.stages.evaluate import run as evaluate

# ------------------------------------------------------------------------------ the math


def test_an_exact_copy_has_similarity_one_and_counts_above_the_threshold():
    rng = np.random.default_rng(0)
    train = rng.normal(size=(50, 32))
    # two copies (one rescaled: cosine ignores length) among eight unrelated samples
    generated = np.concatenate([train[[3]], 2.5 * train[[7]], rng.normal(size=(8, 32))])
    sims, idx = nearest_cosine(generated, train, k=3)
    assert sims.shape == idx.shape == (10, 3)
    assert sims[:2, 0] == pytest.approx(1.0, abs=1e-12) and idx[:2, 0].tolist() == [3, 7]
    assert (np.diff(sims, axis=1) <= 0).all()  # most similar first
    assert sims[2:, 0].max() < 0.9  # 32-d random directions are far from every training row
    s = similarity_summary(sims[:, 0], 0.95)
    assert s["share_above"] == pytest.approx(2 / 10)


def test_the_blocks_give_the_brute_force_answer():
    rng = np.random.default_rng(1)
    train, generated = rng.normal(size=(40, 16)), rng.normal(size=(23, 16))
    t = train / np.linalg.norm(train, axis=1, keepdims=True)
    g = generated / np.linalg.norm(generated, axis=1, keepdims=True)
    full = g @ t.T
    want = np.argsort(-full, axis=1)[:, :4]
    for block in (1, 7 * 40, 10**9):  # one row a block, 7 rows, everything at once
        sims, idx = nearest_cosine(generated, train, k=4, block=block)
        assert (idx == want).all()
        assert np.allclose(sims, np.take_along_axis(full, want, axis=1), atol=1e-12)
    # k above the training set's size keeps all of it; a zero feature row is similar to nothing
    sims, idx = nearest_cosine(np.vstack([np.zeros(16), generated[:3]]), train[:5], k=10)
    assert sims.shape == (4, 5) and (sims[0] == 0).all()
    with pytest.raises(ValueError, match="feature sizes differ"):
        nearest_cosine(generated, train[:, :8])
    with pytest.raises(ValueError, match="NaN or inf"):
        nearest_cosine(np.full((3, 16), np.nan), train)


def test_random_features_follow_the_analytic_top1_law():
    """For isotropic Gaussian features in D dims, the cosine c of two independent rows has (1 + c) / 2 ~
    Beta((D-1)/2, (D-1)/2); the top-1 of M training rows has CDF F(c)^M, so E[top-1] = 1 - ∫₋₁¹ F(c)^M dc."""
    from scipy import integrate, stats

    d, m, n = 64, 400, 300
    rng = np.random.default_rng(2)
    sims, _ = nearest_cosine(rng.normal(size=(n, d)), rng.normal(size=(m, d)), k=1)
    law = stats.beta((d - 1) / 2, (d - 1) / 2)
    expected = 1.0 - integrate.quad(lambda c: law.cdf((1 + c) / 2) ** m, -1, 1, limit=200)[0]
    s = similarity_summary(sims[:, 0], 0.95)
    # sd of one top-1 is ~0.05, so the mean of 300 is within ~0.003 of the expectation
    assert s["top1_mean"] == pytest.approx(expected, abs=0.012)
    assert 0.3 < expected < 0.45  # about sqrt(2 ln M / D): far below any copy threshold
    median = 2 * law.ppf(0.5 ** (1 / m)) - 1  # F(c)^M = 1/2
    assert s["top1_median"] == pytest.approx(median, abs=0.02)
    assert s["share_above"] == 0.0


def test_share_above_counts_a_planted_set():
    top1 = np.array([0.99, 0.96, 0.95, 0.2, -0.5, 1.0])
    s = similarity_summary(top1, 0.95)
    assert s["share_above"] == pytest.approx(3 / 6)  # strictly above: 0.95 itself is no copy
    assert s["top1_mean"] == pytest.approx(top1.mean()) and s["top1_median"] == pytest.approx(0.955)
    assert similarity_summary(top1, -1.0)["share_above"] == 1.0 and similarity_summary(top1, 1.0)["share_above"] == 0
    with pytest.raises(ValueError, match=r"in \[-1, 1\]"):
        similarity_summary(top1, 1.5)
    with pytest.raises(ValueError, match="finite"):
        similarity_summary([0.5, np.nan])


# ------------------------------------------------------------------------------ the evaluate stage


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """60 training digits, 6 copies of them among 14 held-out digits (the samples), 20 more held out."""
    root = tmp_path_factory.mktemp("mem")
    imgs, _ = read_array("digits")
    train, held = imgs[:60], imgs[1000:1034]
    copied = [5, 17, 29, 30, 44, 58]
    samples = np.concatenate([train[copied], held[:14]])
    paths = {}
    for name, arr in (("train", train), ("samples", samples), ("holdout", held[14:])):
        np.save(root / f"{name}.npy", arr)
        paths[name] = str(root / f"{name}.npy")
    return {"root": root, "copied": copied, **paths}


def _npz(folder) -> dict:
    with np.load(io.BytesIO((folder / "memorization.npz").read_bytes())) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture
def logged(monkeypatch):
    """What the stage hands to MLflow (the tracking calls every stage makes; test_evaluate.py runs a real server)."""
    from ambient_ray.io import tracking

    got: dict = {"metrics": {}, "files": {}}
    monkeypatch.setattr(
        tracking, "start_run", lambda mcfg, out, params, tags=None: got.update(params=params) or ("r", "u")
    )
    monkeypatch.setattr(tracking, "log_metrics", lambda run_id, uri, values, step=0: got["metrics"].update(values))
    monkeypatch.setattr(
        tracking, "log_files", lambda run_id, uri, files, artifact_path=None: got["files"].update(files)
    )
    monkeypatch.setattr(tracking, "finish", lambda *a, **k: None)
    return got


def test_evaluate_reports_the_similarity_in_pixels(digits, logged, tmp_path):
    out = tmp_path / "eval"
    cfg = cfgmod.build(
        EvaluateConfig,
        flags=dict(
            samples=digits["samples"],
            reference=digits["holdout"],
            holdout=digits["holdout"],
            train=digits["train"],
            features="pixels",
            out=str(out),
        ),
        sets=["memorization.top_k=2", "memorization.pairs=4"],
    )
    got = evaluate(cfg, progress=False)
    m = got["metrics"]
    assert m["memorization_share_above"] >= 6 / 20 and 0 < m["memorization_top1_median"] <= 1
    assert m["memorization"] == pytest.approx(6 / 20, abs=0.051)  # the d1/d2 share still beside it
    z = _npz(out)
    assert z["similarity"].shape == z["index"].shape == (20, 2)
    assert z["similarity"][:6, 0] == pytest.approx(1.0, abs=1e-6) and z["index"][:6, 0].tolist() == digits["copied"]
    assert m["memorization_top1_mean"] == pytest.approx(float(z["similarity"][:, 0].mean()), abs=1e-6)
    report = json.loads((out / "metrics.json").read_text())
    sim = report["memorization_similarity"]
    assert report["metrics"] == m and sim["features"] == "pixels" and sim["train"] == 60 and sim["top_k"] == 2
    assert sim["train_data"] == digits["train"] and sim["threshold"] == 0.95
    assert [p["sample"] for p in sim["most_similar"]] == [0, 1, 2, 3]  # the copies come first, in order
    assert 0 < sim["holdout"]["top1_mean"] < 1 and "files" not in report
    for name in ("memorization.png", "memorization_pairs.png", "nearest.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    for key in ("memorization_top1_mean", "memorization_top1_median", "memorization_share_above"):
        assert logged["metrics"][key] == m[key]
    assert logged["params"]["memorization.threshold"] == 0.95 and logged["params"]["memorization.top_k"] == 2
    files = {"memorization.png", "memorization_pairs.png", "memorization.npz", "metrics.json", "nearest.png"}
    assert files <= set(logged["files"])


def test_evaluate_finds_the_training_data_the_samples_record(digits, tmp_path):
    """train_data=auto: the sample output's config.yaml names the checkpoint, the training run's config.yaml its
    data and rows (what the sample and train stages write); without train, only the similarity runs."""
    samples = tmp_path / "samples"
    samples.mkdir()
    np.save(samples / "samples.npy", np.load(digits["samples"]))
    (samples / "config.yaml").write_text(yaml.safe_dump({"checkpoint": str(tmp_path / "train" / "model")}))
    (tmp_path / "train" / "model").mkdir(parents=True)
    (tmp_path / "train" / "config.yaml").write_text(yaml.safe_dump({"data": digits["train"], "rows": None}))
    base = dict(samples=str(samples), reference=digits["holdout"], features="pixels", mlflow=dict(enabled=False))
    cfg = EvaluateConfig(out=str(tmp_path / "e1"), memorization=dict(train_data="auto"), **base)
    got = evaluate(cfg, progress=False)
    assert "memorization" not in got["metrics"] and got["metrics"]["memorization_share_above"] >= 6 / 20
    assert got["details"]["memorization_similarity"]["train_data"] == digits["train"]
    assert _npz(tmp_path / "e1")["index"][:6, 0].tolist() == digits["copied"]
    # no training data named: the similarity is off, and writes nothing
    off = evaluate(EvaluateConfig(out=str(tmp_path / "e2"), **base), progress=False)
    assert not any(k.startswith("memorization") for k in off["metrics"])
    assert not (tmp_path / "e2" / "memorization.png").exists()


def test_bad_memorization_keys_are_refused_clearly(digits, tmp_path, capsys):
    def build(*sets):
        flags = dict(samples=digits["samples"], reference=digits["train"], out=str(tmp_path / "o"))
        return cfgmod.build(EvaluateConfig, flags={**flags, "mlflow": dict(enabled=False)}, sets=list(sets))

    with pytest.raises(cfgmod.ConfigError, match="memorization.threshold"):
        build("memorization.threshold=1.5")
    with pytest.raises(cfgmod.ConfigError, match="memorization.threshold"):
        build("memorization.threshold=-2")
    with pytest.raises(cfgmod.ConfigError, match="memorization.features"):
        build("memorization.features=clip@x")
    with pytest.raises(cfgmod.ConfigError, match="memorization.top_k"):
        build("memorization.top_k=0")
    missing = str(tmp_path / "nowhere.npy")
    with pytest.raises(cfgmod.DataError, match=r"memorization.train_data: no images at .*nowhere"):
        evaluate(build(f"memorization.train_data={missing}"), progress=False)
    with pytest.raises(cfgmod.DataError, match="memorization.train_data=auto: .* records no checkpoint"):
        evaluate(build("memorization.train_data=auto"), progress=False)
    assert not (tmp_path / "o" / "metrics.json").exists()
    # on the command line: one line on stderr, exit 2
    args = ["evaluate", "--samples", digits["samples"], "--reference", digits["train"], "--out", str(tmp_path / "o")]
    for bad, says in (
        ("memorization.threshold=1.5", "memorization.threshold"),
        (f"memorization.train_data={missing}", "memorization.train_data: no images at"),
    ):
        assert cli([*args, "--set", "mlflow.enabled=false", "--set", bad, "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert says in err and len(err.strip().splitlines()) == 1, err
