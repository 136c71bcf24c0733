"""Evaluation: the feature networks (Inception and DINOv2 from weight files made here, the in-project
net), the evaluate stage's metrics against planted cases, and a tiny controlled experiment end to end."""

import json

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from ambient_ray import config as cfgmod
from ambient_ray.cli import main as cli
from ambient_ray.corruptions import apply, parse
from ambient_ray.data.sources import read_array
from ambient_ray.io import storage
from ambient_ray.models import features
from ambient_ray.stages.evaluate import EvaluateConfig
from ambient_ray.stages.evaluate import run as evaluate

IMGS = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 1), dtype=np.uint8)


# ------------------------------------------------------------------------------ pretrained feature networks


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    """A state dict of pytorch-fid's FID Inception architecture (random weights), saved like the real file."""
    from pytorch_fid import inception as pfi

    torch.manual_seed(0)
    # torchvision's Inception-v3 with 1,008 classes and the FID blocks swapped in (no weights fetched)
    net = pfi._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    net.Mixed_5b, net.Mixed_5c, net.Mixed_5d = (
        pfi.FIDInceptionA(192, 32),
        pfi.FIDInceptionA(256, 64),
        pfi.FIDInceptionA(288, 64),
    )
    net.Mixed_6b, net.Mixed_6c = pfi.FIDInceptionC(768, 128), pfi.FIDInceptionC(768, 160)
    net.Mixed_6d, net.Mixed_6e = pfi.FIDInceptionC(768, 160), pfi.FIDInceptionC(768, 192)
    net.Mixed_7b, net.Mixed_7c = pfi.FIDInceptionE_1(1280), pfi.FIDInceptionE_2(2048)
    path = tmp_path_factory.mktemp("inception") / features.INCEPTION_FILE
    torch.save(net.state_dict(), path)
    return str(path)


def test_inception_features_from_a_weights_file(inception_file, s3_prefix):
    ex = features.load(f"inception@{inception_file}")
    f = ex(IMGS)
    assert f.shape == (5, 2048) and np.isfinite(f).all()
    assert np.allclose(ex(IMGS), f)  # deterministic (eval mode)
    assert not np.allclose(f[0], f[1])
    # the same file from S3 gives the same features
    uri = f"{s3_prefix}/{features.INCEPTION_FILE}"
    storage.write_bytes(uri, open(inception_file, "rb").read())
    assert np.allclose(features.load(f"inception@{uri}")(IMGS), f)


def test_inception_refuses_missing_and_mismatched_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="pytorch-fid/releases"):
        features.load(f"inception@{tmp_path}/nope.pth")
    with pytest.raises(ValueError, match="not downloaded at run time"):
        features.load("inception")
    wrong = tmp_path / "resnet.pth"
    torch.save(torch.nn.Conv2d(3, 8, 3).state_dict(), wrong)
    with pytest.raises(ValueError, match="does not fit the architecture"):
        features.load(f"inception@{wrong}")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="not a readable state dict"):
        features.load(f"inception@{junk}")


@pytest.fixture(scope="module")
def dinov2_file(tmp_path_factory):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    net = timm.create_model(features.DINOV2_ARCH, pretrained=False, num_classes=0)  # the hub file's layout (518 px)
    path = tmp_path_factory.mktemp("dinov2") / "model.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return str(path)


def test_dinov2_features_from_a_weights_file(dinov2_file):
    ex = features.load(f"dinov2@{dinov2_file}")
    f = ex(IMGS)
    assert f.shape == (5, 384) and np.isfinite(f).all()
    assert np.allclose(ex(IMGS), f, atol=1e-5)
    rgb = np.repeat(IMGS, 3, axis=3)  # grey images are fed as RGB
    assert np.allclose(ex(rgb), f, atol=1e-5)


def test_dinov2_refuses_missing_and_mismatched_files(tmp_path, inception_file):
    with pytest.raises(FileNotFoundError, match="vit_small_patch14_dinov2"):
        features.load(f"dinov2@{tmp_path}/none.safetensors")
    with pytest.raises(ValueError, match="does not fit the architecture"):
        features.load(f"dinov2@{inception_file}")
    with pytest.raises(ValueError, match="unknown timm architecture"):
        features.load(f"dinov2:no_such_net@{inception_file}")
    with pytest.raises(ValueError, match="unknown features"):
        features.load("clip@x")


# ------------------------------------------------------------------------------ the in-project network


@pytest.fixture(scope="module")
def digit_net(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("featnet") / "net")
    assert cli(["features", "--dataset", "digits", "--out", out, "--steps", "150", "--no-progress"]) == 0
    return out


def test_feature_net_learns_digits_and_sees_blur(digit_net):
    meta = json.loads(open(f"{digit_net}/features.json").read())
    assert meta["task"] == "labels" and meta["held_out_accuracy"] > 0.8  # chance is 0.1
    ex = features.load(f"net@{digit_net}")
    imgs, _ = read_array("digits")
    rng = np.random.default_rng(1)
    p = rng.permutation(len(imgs))
    a, b = imgs[p[:800]], imgs[p[800:1600]]
    blurred = np.stack(apply(parse("blur:sigma=1.5"), list(a), list(range(len(a)))))
    from ambient_ray.evaluation.metrics import frechet_distance

    fa, fb, fblur = ex(a), ex(b), ex(blurred)
    assert fa.shape == (800, 64)
    same, blur = frechet_distance(fa, fb), frechet_distance(fblur, fb)
    assert blur > 5 * same  # two halves of the data are close; blurred digits are far


def test_feature_net_refuses_other_images_and_folders(digit_net, tmp_path):
    ex = features.load(f"net@{digit_net}")
    with pytest.raises(ValueError, match="takes 8x8 images with 1 channels"):
        ex(np.zeros((2, 16, 16, 1), np.uint8))
    with pytest.raises(FileNotFoundError, match="ambient-ray features"):
        features.load(f"net@{tmp_path}")


def test_rotation_task_without_labels():
    imgs, _ = read_array("digits")
    net, meta, acc = features.train_feature_net(imgs[:400], None, steps=60, batch_size=64, width=8, dim=16)
    assert meta["task"] == "rotation" and meta["classes"] == 4
    assert 0.0 <= acc <= 1.0 and net.features(torch.zeros(2, 1, 8, 8)).shape == (2, 16)


# ------------------------------------------------------------------------------ the evaluate stage


def _npy(path, arr):
    np.save(path, arr)
    return str(path)


def test_evaluate_metrics_on_planted_samples(digit_net, mlflow_server, tmp_path):
    """Held-out digits score better than blurred ones; copies of the training set are flagged;
    proximal FD (both sides blurred) is small for real digits and large for noise."""
    imgs, _ = read_array("digits")
    train, held = imgs[:1200], imgs[1200:]
    train_uri = _npy(tmp_path / "train.npy", train)
    blur = parse("blur:sigma=1.5")
    blurred_train = _npy(tmp_path / "train_blur.npy", np.stack(apply(blur, list(train), list(range(len(train))))))
    noise = np.random.default_rng(0).integers(0, 256, held.shape, dtype=np.uint8)
    cases = {
        "held": held,
        "blurred": np.stack(apply(blur, list(held), list(range(len(held))))),
        "copies": train[:500],
        "noise": noise,
    }
    got = {}
    for name, arr in cases.items():
        cfg = EvaluateConfig(
            samples=_npy(tmp_path / f"{name}.npy", arr),
            reference=train_uri,
            features=f"net@{digit_net}",
            train=train_uri,
            proximal=blur.spec,
            proximal_reference=blurred_train,
            proximal_where=None,
            out=str(tmp_path / f"eval-{name}"),
            mlflow=dict(experiment="tests-evaluate", run_name=name),
        )
        got[name] = evaluate(cfg, progress=False)
    m = {k: v["metrics"] for k, v in got.items()}
    assert m["held"]["fd"] < 0.2 * min(m["blurred"]["fd"], m["noise"]["fd"])
    assert m["held"]["precision"] > 0.8 and m["noise"]["precision"] < m["held"]["precision"] - 0.3
    assert m["blurred"]["recall"] < m["held"]["recall"] - 0.3  # blur collapses the digits' variety
    assert m["copies"]["memorization"] == 1.0 and m["held"]["memorization"] < 0.1
    assert m["held"]["proximal_fd"] < 0.5 * m["noise"]["proximal_fd"]
    assert m["copies"]["vendi"] > 1.0
    # metrics.json, nearest.png and the MLflow run hold the same numbers
    report = json.loads(open(tmp_path / "eval-copies" / "metrics.json").read())
    assert report["metrics"] == m["copies"] and report["samples"] == 500 and report["features"].startswith("net:")
    assert (tmp_path / "eval-copies" / "nearest.png").stat().st_size > 0
    run = MlflowClient().get_run(got["copies"]["mlflow_run_id"])
    assert run.data.metrics["memorization"] == 1.0 and run.data.metrics["fd"] == pytest.approx(m["copies"]["fd"])
    assert {a.path for a in MlflowClient().list_artifacts(run.info.run_id)} >= {"metrics.json", "nearest.png"}


def test_evaluate_refuses_mismatched_inputs(tmp_path):
    small = _npy(tmp_path / "s.npy", IMGS)
    big = _npy(tmp_path / "b.npy", np.zeros((4, 16, 16, 1), np.uint8))
    base = dict(samples=small, features="pixels", out=str(tmp_path / "o"), mlflow=dict(enabled=False))
    with pytest.raises(ValueError, match="reference images are"):
        evaluate(EvaluateConfig(reference=big, **base), progress=False)
    with pytest.raises(ValueError, match="proximal FD needs"):
        evaluate(EvaluateConfig(reference=small, proximal="blur:sigma=1", **base), progress=False)
    with pytest.raises(FileNotFoundError, match="no images at"):
        evaluate(EvaluateConfig(reference=str(tmp_path / "missing"), **base), progress=False)
    assert (
        cli(
            [
                "evaluate",
                "--samples",
                small,
                "--reference",
                small,
                "--features",
                "inception",
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )


# ------------------------------------------------------------------------------ the experiment


def test_tiny_experiment_end_to_end(ray_cluster, mlflow_server, tmp_path):
    """only-clean and ambient-o, one seed, a few steps: the stages run, the table and the MLflow tree exist,
    only-clean trains on the clean rows alone, and a re-run skips the finished arms."""
    from ambient_ray.workflows import experiment

    out = str(tmp_path / "exp")
    model = dict(img_resolution=8, in_channels=1, model_channels=16, channel_mult=[1, 2])
    flags = dict(
        dataset="digits",
        corruption=["blur:sigma=2"],
        seeds=[0],
        arms=["only-clean", "ambient-o"],
        out=out,
        samples=200,
        features_stage=dict(steps=60),
        classifier=dict(steps=30, batch_size=32, checkpoint_every=30, log_every=10, model=model),
        annotate=dict(grid_points=8, draws=2),
        train=dict(steps=10, batch_size=32, checkpoint_every=10, log_every=5, sample_grid=0, model=model),
        sample=dict(sampler=dict(steps=4)),
        mlflow=dict(experiment="tests-experiment"),
    )
    cfg = cfgmod.build(experiment.ExperimentConfig, flags=flags)
    s = experiment.run(cfg, progress=False)
    table = json.loads(open(f"{out}/results.json").read())["table"]
    assert set(table) == {"only-clean", "ambient-o"}
    for arm in table.values():
        assert arm["fd"]["n"] == 1 and np.isfinite(arm["fd"]["mean"]) and arm["fd"]["se"] == 0.0
    assert table["ambient-o"]["mean_sigma_min"]["mean"] > 0 and "mean_sigma_min" not in table["only-clean"]
    md = open(f"{out}/results.md").read()
    assert "| only-clean |" in md and "| ambient-o |" in md and "FD (held-out)" in md
    diff = json.loads(open(f"{out}/results.json").read())["paired"]["ambient-o"]["fd"]
    assert diff["mean"] == pytest.approx(table["ambient-o"]["fd"]["mean"] - table["only-clean"]["fd"]["mean"])
    assert f"| ambient-o | {diff['mean']:+.2f} ± 0.00 |" in md
    # only-clean saw the clean rows alone; ambient-o all of them
    mixed = storage.join(out, "seed-0", "mixed")
    from ambient_ray.data.metadata import load_metadata

    meta = load_metadata(mixed)
    n_clean = int((meta["quality"] == "clean").sum())
    rows = {a: json.loads(open(f"{out}/runs/{a}/seed-0/train/summary.json").read())["rows"] for a in table}
    assert rows == {"only-clean": n_clean, "ambient-o": len(meta)}
    # MLflow: the parent, one child per (arm, seed) with its metrics, stage runs nested under the children
    client = MlflowClient()
    parent = client.get_run(s["mlflow_run_id"])
    assert parent.info.status == "FINISHED" and "fd.ambient-o" in parent.data.metrics
    exp_id = parent.info.experiment_id
    children = client.search_runs(
        [exp_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}' and tags.stage = 'experiment-arm'"
    )
    assert sorted(c.data.tags["arm"] for c in children) == ["ambient-o", "only-clean"]
    for c in children:
        assert {"fd", "fd_holdout", "precision", "recall", "memorization"} <= set(c.data.metrics)
        nested = client.search_runs([exp_id], f"tags.mlflow.parentRunId = '{c.info.run_id}'")
        assert sorted(r.data.tags["stage"] for r in nested) == ["evaluate", "sample", "train"]
    # a re-run skips every finished (arm, seed)
    again = experiment.run(cfg, progress=False)
    assert again["table"] == s["table"]
    assert (
        len(
            client.search_runs(
                [exp_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}' and tags.stage = 'experiment-arm'"
            )
        )
        == 2
    )
    changed = _changed_train_key_redoes_the_arms_only(
        experiment, flags, s, again, out, client, exp_id, parent.info.run_id
    )
    _another_corruption_reuses_only_clean_and_oracle(experiment, changed, out, tmp_path)


def _changed_train_key_redoes_the_arms_only(experiment, flags, first, again, out, client, exp_id, parent_id):
    """Resume (data/shards): the unchanged re-run did no step; one changed train key redoes each arm's
    train, sample and evaluate, and nothing before them (corrupt splits, features, classifier, annotations)."""
    import glob
    import os

    import yaml

    assert again["ran"] == [] and len(first["ran"]) > 6
    markers = sorted(glob.glob(f"{out}/**/_step.json", recursive=True))
    stamps = {m: os.stat(m).st_mtime_ns for m in markers}
    arms = [m for m in markers if "/runs/" in m]
    assert len(arms) == 2 * 4 and len(markers) > len(arms)  # (train, samples, eval, the arm) x 2 arms
    changed = {**flags, "train": {**flags["train"], "optim": {"lr": 2e-3}}}
    third = experiment.run(cfgmod.build(experiment.ExperimentConfig, flags=changed), progress=False)
    expected = {f"runs/{a}/seed-0/{step}" for a in ("only-clean", "ambient-o") for step in ("train", "samples", "eval")}
    assert set(third["ran"]) == expected and len(third["ran"]) == len(expected)
    assert all(os.stat(m).st_mtime_ns != stamps[m] for m in arms)
    assert all(os.stat(m).st_mtime_ns == stamps[m] for m in markers if m not in arms)
    cfg = yaml.safe_load(open(f"{out}/runs/ambient-o/seed-0/train/config.yaml"))
    assert cfg["optim"]["lr"] == 2e-3
    # a redone arm logs into its own child run again: still one child per (arm, seed)
    arm_runs = client.search_runs(
        [exp_id], f"tags.mlflow.parentRunId = '{parent_id}' and tags.stage = 'experiment-arm'"
    )
    assert len(arm_runs) == 2 and all(r.info.status == "FINISHED" for r in arm_runs)
    return changed


def _another_corruption_reuses_only_clean_and_oracle(experiment, flags, out, tmp_path):
    """only-clean, oracle, the clean splits and the feature net do not depend on the corruption: an experiment
    on another corruption takes them from an earlier one by fingerprint (``reuse``) and recomputes them when
    their config changes."""

    def run(name, **kw):
        cfg = cfgmod.build(experiment.ExperimentConfig, flags={**flags, "out": str(tmp_path / name), **kw})
        return experiment.run(cfg, progress=False)

    arms = ["only-clean", "oracle"]
    # blur σ=1 beside the first experiment's σ=2: only-clean and the prep are taken from it, oracle is new
    second = run("exp-b1", corruption=["blur:sigma=1"], arms=arms, reuse=[out])
    assert {"prep/clean-train", "prep/clean-holdout", "prep/features", "runs/only-clean/seed-0"} <= set(
        second["reused"]
    )
    assert not any(r.startswith(("prep/", "runs/only-clean")) for r in second["ran"])
    assert {"seed-0/mixed", "runs/oracle/seed-0/train"} <= set(second["ran"])
    first = json.loads(open(f"{out}/results.json").read())["table"]
    assert second["table"]["only-clean"]["fd"] == first["only-clean"]["fd"]
    md = open(tmp_path / "exp-b1" / "results.md").read()
    assert "Taken from the reuse folders" in md and "only-clean seed 0" in md
    assert md.count("Paired by seed, each arm minus only-clean") == 1
    # a third corruption reusing the second: both arms taken, only its own mixed set is made
    third = run("exp-b3", corruption=["blur:sigma=3"], arms=arms, reuse=[str(tmp_path / "exp-b1")])
    assert third["ran"] == ["seed-0/mixed"] and {"runs/only-clean/seed-0", "runs/oracle/seed-0"} <= set(third["reused"])
    assert third["table"] == second["table"]
    # a changed sample key: both arms sample and evaluate again; their training is still taken
    fourth = run(
        "exp-b3",
        corruption=["blur:sigma=3"],
        arms=arms,
        reuse=[out, str(tmp_path / "exp-b1")],
        sample={**flags["sample"], "sampler": {"steps": 3}},
    )
    assert set(fourth["ran"]) == {f"runs/{a}/seed-0/{s}" for a in arms for s in ("samples", "eval")}
    assert {"runs/only-clean/seed-0/train", "runs/oracle/seed-0/train"} <= set(fourth["reused"])


def test_experiment_refuses_bad_sections(tmp_path):
    from ambient_ray.workflows import experiment

    def build(**kw):
        return cfgmod.build(experiment.ExperimentConfig, flags={"out": str(tmp_path), **kw})

    with pytest.raises(cfgmod.ConfigError, match="(?s)section 'train'.*lernrate"):
        experiment.check(build(train={"lernrate": 1}))
    with pytest.raises(cfgmod.ConfigError, match="'train.data': set by the experiment"):
        experiment.check(build(train={"data": "x"}))
    with pytest.raises(cfgmod.ConfigError, match="arms"):
        build(arms=["only-clean", "magic"])
    with pytest.raises(cfgmod.ConfigError, match="ambient-fixed:per-spec"):  # the message names the arms there are
        build(arms=["ambient-fixed:per-set"])
    assert build(arms=["ambient-fixed", experiment.PER_SPEC]).arms == ["ambient-fixed", "ambient-fixed:per-spec"]
    with pytest.raises(Exception, match="unknown corruption"):
        experiment.check(build(corruption=["smudge:x=1"]))


def test_paired_differences_cancel_what_seeds_share():
    """Seed 1 is worse for every arm by the same amount: the per-arm SE is large, the paired one 0."""
    from ambient_ray.workflows import experiment

    shift = {0: 0.0, 1: 5.0, 2: 1.0}
    results = [
        {"arm": a, "seed": s, "metrics": {"fd": base + shift[s], "fd_holdout": 2 * base + shift[s]}}
        for a, base in (("only-clean", 3.0), ("ambient-o", 2.0))
        for s in shift
    ]
    results.append({"arm": "oracle", "seed": 0, "metrics": {"fd": 1.0, "fd_holdout": 1.5}})  # one seed only
    table = experiment.summarize(results, ["only-clean", "ambient-o", "oracle"])
    assert table["ambient-o"]["fd"]["se"] == pytest.approx(np.std([2, 7, 3], ddof=1) / np.sqrt(3))
    d = experiment.paired(results, ["only-clean", "ambient-o", "oracle"])
    assert set(d) == {"ambient-o", "oracle"}
    assert d["ambient-o"]["fd"] == {"mean": pytest.approx(-1.0), "se": pytest.approx(0.0), "n": 3, "values": [-1.0] * 3}
    assert d["ambient-o"]["fd_holdout"]["mean"] == pytest.approx(-2.0)
    assert d["oracle"]["fd"]["n"] == 1 and d["oracle"]["fd"]["mean"] == pytest.approx(-2.0)
    assert experiment.paired(results, ["ambient-o", "oracle"], base="all-data") == {}


def test_results_md_sets_the_annotated_arms_against_ambient_fixed():
    """The second paired table: the per-sample arms and the per-spec bound minus ambient-fixed, not the
    unannotated arms."""
    from ambient_ray.workflows import experiment

    fd = {"only-clean": 4.0, "ambient-fixed": 2.0, "ambient-o:shrunk": 2.5, experiment.PER_SPEC: 1.25, "oracle": 1.0}
    results = [
        {"arm": a, "seed": s, "metrics": {"fd": v + s, "fd_holdout": v + 2 * s}} for a, v in fd.items() for s in (0, 1)
    ]
    cfg = cfgmod.build(experiment.ExperimentConfig, flags={"out": "/tmp/x", "arms": list(fd), "seeds": [0, 1]})
    table = experiment.summarize(results, list(fd))
    md = experiment.markdown(table, cfg, 1.0, experiment.paired(results, list(fd)), results=results)
    versus = md.split("minus one σ_min for the set")[1]
    assert "| ambient-o:shrunk | +0.50 ± 0.00 | +0.50 ± 0.00 |" in versus
    assert "| ambient-fixed:per-spec | -0.75 ± 0.00 | -0.75 ± 0.00 |" in versus
    assert "| oracle |" not in versus and "| only-clean |" not in versus
