"""Config loading, --set overrides and validation messages that name the key."""

import pytest
import yaml

from ambient_ray import cli
from ambient_ray import config as C
from ambient_ray.stages.corrupt import CorruptConfig


def build(**kw):
    return C.build(CorruptConfig, **kw)


def test_yaml_then_flags_then_set(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(
        yaml.safe_dump({"out": "/tmp/a", "seed": 3, "source": {"dataset": "faces"}, "corruptions": ["jpeg:quality=10"]})
    )
    cfg = build(
        path=str(f),
        flags={"seed": 5, "clean_fraction": None},
        sets=["source.image_size=16", "corruptions=[blur:sigma=1, mask:p=0.2]"],
    )
    assert cfg.seed == 5 and cfg.out == "/tmp/a" and cfg.source.dataset == "faces"
    assert cfg.source.image_size == 16 and cfg.corruptions == ["blur:sigma=1", "mask:p=0.2"]
    assert cfg.clean_fraction == 0.1  # default kept when the flag is not given
    assert build(path=str(f), flags={"seed": 5}, sets=["seed=7"]).seed == 7


@pytest.mark.parametrize(
    "sets, words",
    [
        (["out=/x", "sede=1"], ["config key 'sede'", "unknown key", "did you mean 'seed'?"]),
        (["out=/x", "source.datset=digits"], ["config key 'source.datset'", "unknown key", "did you mean 'dataset'?"]),
        (["out=/x", "nope=1"], ["config key 'nope'", "unknown key", "allowed keys here:", "clean_fraction", "seed"]),
        (["out=/x", "seed=abc"], ["config key 'seed'", "integer", "'abc'"]),
        (["out=/x", "clean_fraction=1.5"], ["config key 'clean_fraction'", "less than or equal to 1"]),
        (["out=/x", "source.channels=2"], ["config key 'source.channels'", "1", "3"]),
        (["out=/x", "source.format=zip"], ["config key 'source.format'", "'folder'", "'parquet'"]),
        (["out=/x", "shard_size=0"], ["config key 'shard_size'", "greater than or equal to 1"]),
        ([], ["config key 'out'", "required"]),
        (["out=/x", "seed=1", "seed.x=1"], ["'seed' is not a section"]),
        (["out=/x", "seed.x=1"], ["config key 'seed'", "integer"]),
        (["noequals"], ["expected key=value"]),
    ],
)
def test_errors_name_the_key(sets, words):
    with pytest.raises(C.ConfigError) as e:
        build(sets=sets)
    for w in words:
        assert w in str(e.value), str(e.value)


def test_bad_files(tmp_path):
    with pytest.raises(C.ConfigError, match="not found"):
        build(path=str(tmp_path / "missing.yaml"))
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(C.ConfigError, match="mapping"):
        build(path=str(tmp_path / "list.yaml"))
    (tmp_path / "bad.yaml").write_text("a: [unclosed\n")
    with pytest.raises(C.ConfigError, match="not valid YAML"):
        build(path=str(tmp_path / "bad.yaml"))


def test_resolved_config_round_trips(tmp_path):
    cfg = build(sets=["out=/x", "source.image_size=32", "corruptions=[jpeg:quality=18]"])
    uri = C.save_resolved(cfg, str(tmp_path))
    again = C.build(CorruptConfig, path=uri)
    assert again == cfg
    assert C.flatten(cfg)["source.image_size"] == 32


def test_config_from_s3(s3_prefix):
    from ambient_ray.io import storage

    storage.write_bytes(f"{s3_prefix}/c.yaml", b"out: /tmp/y\nseed: 9\n")
    assert build(path=f"{s3_prefix}/c.yaml").seed == 9


def test_cli_reports_the_key_and_exits_2(capsys):
    code = cli.main(["corrupt", "--dataset", "digits", "--out", "/tmp/never", "--set", "clean_fractoin=0.2"])
    assert code == 2
    err = capsys.readouterr().err
    assert "clean_fractoin" in err and "unknown key" in err


def test_demo_config_sections_validate():
    """Every stage section of jobs/configs/demo.yaml builds its stage's config (as jobs/demo.py does)."""
    import os

    import yaml

    from ambient_ray.stages import annotate, corrupt, sample, train, train_classifier

    with open(os.path.join(os.path.dirname(__file__), "..", "jobs", "configs", "demo.yaml")) as f:
        spec = yaml.safe_load(f)
    assert list(spec) == ["corrupt", "classifier", "annotate", "train", "sample"]
    build = C.build
    build(corrupt.CorruptConfig, flags=dict(spec["corrupt"], out="/tmp/x"))
    k = build(train_classifier.ClassifierTrainConfig, flags=dict(spec["classifier"], data="/tmp/x", out="/tmp/y"))
    t = build(train.TrainConfig, flags=dict(spec["train"], data="/tmp/x", out="/tmp/y"))
    assert k.model.img_resolution == t.model.img_resolution and k.kind == "noise"
    a = build(annotate.AnnotateConfig, flags=dict(spec["annotate"], data="/tmp/x", out="/tmp/z", classifier="/tmp/y"))
    assert a.tau == 0.45 and t.ambient.corrupted_sigma_min is None  # σ_min comes from the annotation
    build(sample.SampleConfig, flags=dict(spec["sample"], checkpoint="/tmp/y", out="/tmp/w"))


def test_the_edm2_imagenet_example_config_validates():
    """jobs/configs/edm2_imagenet.yaml is a whole train config (with --data/--out from the command line): EDM2-XXL
    at the paper's global batch, the power EMA and the quality-score split."""
    import os

    import yaml

    from ambient_ray.stages import train

    with open(os.path.join(os.path.dirname(__file__), "..", "jobs", "configs", "edm2_imagenet.yaml")) as f:
        spec = yaml.safe_load(f)
    t = C.build(train.TrainConfig, flags=dict(spec, data="s3://b/latents", out="s3://b/run"))
    assert t.model.arch == "edm2" and t.model.model_channels == 448 and t.num_workers * t.batch_size == 2048
    assert t.ema == "power" and t.ambient.quality_score and t.ambient.corrupted_sigma_min == 0.2
    assert t.grad_guard and not train.TrainConfig.model_fields["grad_guard"].default  # opt-in, on for EDM2


def test_the_text_to_image_example_job_validates_and_agrees_with_the_planner():
    """jobs/configs/t2i_microdit.yaml is a whole pipeline (precompute -> four phases -> sample), every phase a
    valid train config; its first phase is the planner's choice for microdit-xl-2 on one node of 8 x 80 GB at
    75% masking, and each phase keeps MicroDiT's global batch 2048."""
    import os

    import yaml

    from ambient_ray.train.planner import PlanConfig, plan
    from ambient_ray.workflows import pipeline

    with open(os.path.join(os.path.dirname(__file__), "..", "jobs", "configs", "t2i_microdit.yaml")) as f:
        spec = yaml.safe_load(f)
    stages = pipeline.stage_configs(pipeline.PipelineConfig.model_validate(spec))
    names = ["precompute", "train/p1-256-masked", "train/p2-256", "train/p3-512-masked", "train/p4-512", "sample"]
    assert list(stages) == names
    trains = [stages[n] for n in names[1:5]]
    assert [t.text.mask_ratio for t in trains] == [0.75, 0.0, 0.75, 0.0]
    assert all(t.model.arch == "dit" and t.ambient.source_sigma_min == {"diffusiondb": 2.0} for t in trains)
    assert all(t.num_workers * t.batch_size * t.optim.grad_accum == 2048 for t in trains)
    assert trains[1].init_from == trains[0].out and stages["sample"].checkpoint == trains[3].out
    assert stages["sample"].prompts and stages["sample"].sampler.guidance == 5.0
    first = trains[0]
    p = plan(
        PlanConfig(
            model="microdit-xl-2",
            gpus=8,
            gpu_mem=80,
            batch=first.batch_size,
            global_batch=2048,
            mask_ratio=first.text.mask_ratio,
            resolution=32,
        )
    )
    assert p.choice is not None and p.choice.nodes * 8 == first.num_workers
    assert (p.choice.stage, p.choice.checkpoint) == (first.zero_stage, first.model.checkpoint_blocks)
