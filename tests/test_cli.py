"""The command line built from the configs: flags map to config keys, precedence, exit codes (no Ray)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from typing import Literal

import pytest
from pydantic import Field

from ambient_ray import cli
from ambient_ray import config as cfgmod
from ambient_ray.config import Strict, flag
from ambient_ray.stages import registry

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def built(argv: list[str]):
    """The config a command line gives, through the CLI's own path, without running the stage."""
    return cli.config(cli.parse_args(argv))


def key(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


# every flag of every stage, with the config key it sets (the names the docs and the tests use)
FLAGS = {
    "corrupt": (
        ["--dataset", "faces", "--corruption", "blur:sigma=2", "--corruption", "jpeg:quality=9"]
        + ["--clean-fraction", "0.25", "--seed", "3", "--out", "/o", "--image-size", "16", "--channels", "3"]
        + ["--shard-size", "64", "--plugin", "tests.slow_corruption", "--overwrite"],
        {
            "source.dataset": "faces",
            "corruptions": ["blur:sigma=2", "jpeg:quality=9"],
            "clean_fraction": 0.25,
            "seed": 3,
            "out": "/o",
            "source.image_size": 16,
            "source.channels": 3,
            "shard_size": 64,
            "plugins": ["tests.slow_corruption"],
            "overwrite": True,
        },
    ),
    "precompute": (
        ["--data", "/d", "--out", "/o", "--vae", "/v", "--vae-subfolder", "vae", "--text-encoder", "local-dir:/t"]
        + ["--resolution", "64"],
        {
            "data": "/d",
            "out": "/o",
            "vae": "/v",
            "vae_subfolder": "vae",
            "text_encoder": "local-dir:/t",
            "resolution": 64,
        },
    ),
    "train": (
        ["--data", "/d", "--out", "/o", "--steps", "7", "--num-workers", "2", "--zero-stage", "3", "--resume"]
        + ["--data-path", "stream", "--init-from", "/i", "--objective", "ambient"],
        {
            "objective": "ambient",
            "init_from": "/i",
            "data": "/d",
            "out": "/o",
            "steps": 7,
            "num_workers": 2,
            "zero_stage": 3,
            "resume": True,
            "stream.mode": "stream",
        },
    ),
    "train-classifier": (
        ["--data", "/d", "--kind", "crops", "--out", "/o", "--good", "source=a", "--bad", "source=b"]
        + ["--steps", "9", "--num-workers", "2", "--zero-stage", "1", "--resume", "--init-from", "/i"],
        {
            "init_from": "/i",
            "data": "/d",
            "kind": "crops",
            "out": "/o",
            "good": "source=a",
            "bad": "source=b",
            "steps": 9,  # redeclared in the classifier's config: the base's --steps still sets it
            "num_workers": 2,
            "zero_stage": 1,  # the engine's flag, new to train-classifier
            "resume": True,
        },
    ),
    "distill": (
        ["--teacher", "/t", "--data", "/d", "--out", "/o", "--way", "standard", "--sigma-n", "0.2", "--steps", "5"]
        + ["--num-workers", "2", "--zero-stage", "3", "--resume", "--init-from", "/i"],
        {"teacher": "/t", "data": "/d", "out": "/o", "distill.way": "standard", "distill.sigma_n": 0.2, "steps": 5}
        | {"num_workers": 2, "zero_stage": 3, "resume": True, "init_from": "/i"},
    ),
    "sample": (
        ["--checkpoint", "/c", "--num", "5", "--out", "/o", "--steps", "4", "--stochastic", "--seed", "2"]
        + ["--sampler", "autoguidance", "--guide", "/g", "--guidance", "1.5"]
        + ["--prompt", "a digit one", "--prompt", "a digit two"],
        {"checkpoint": "/c", "num": 5, "out": "/o", "sampler.steps": 4, "sampler.stochastic": True, "seed": 2}
        | {"sampler.name": "autoguidance", "sampler.guide": "/g", "sampler.guidance": 1.5}
        | {"prompts": ["a digit one", "a digit two"]},
    ),
    "inpaint": (
        ["--data", "/d", "--model", "/m", "--out", "/o", "--mode", "mean", "--sigma", "0.05", "--steps", "9"]
        + ["--seed", "4", "--batch-size", "8", "--class-label", "2", "--pngs"],
        {"data": "/d", "model": "/m", "out": "/o", "mode": "mean", "sigma": 0.05, "steps": 9, "seed": 4}
        | {"batch_size": 8, "class_label": 2, "pngs": True},
    ),
    "experiment-masked": (
        ["--dataset", "faces", "--p", "0.4,0.8", "--delta", "0.2", "--seeds", "0,1", "--arms", "ambient,naive"]
        + ["--samplers", "fixed-mask", "--out", "/o"],
        {"dataset": "faces", "p": [0.4, 0.8], "delta": 0.2, "seeds": [0, 1], "arms": ["ambient", "naive"]}
        | {"samplers": ["fixed-mask"], "out": "/o"},
    ),
    "experiment-dsd": (
        ["--dataset", "faces", "--sigmas", "0.1,0.4", "--seeds", "0,2", "--arms", "observations,oracle", "--out", "/o"],
        {"dataset": "faces", "sigmas": [0.1, 0.4], "seeds": [0, 2], "arms": ["observations", "oracle"], "out": "/o"},
    ),
    "phema": (
        ["--run", "/r", "--std", "0.075", "--at", "120", "--out", "/o", "--profiles", "0.05, 0.1"],
        {"run": "/r", "std": 0.075, "at": 120, "out": "/o", "profiles": [0.05, 0.1]},
    ),
    "locality": (
        ["--checkpoint", "/c", "--data", "/d", "--out", "/o", "--eps", "0.1"],
        {"checkpoint": "/c", "data": "/d", "out": "/o", "eps": 0.1},
    ),
    "annotate": (
        ["--data", "/d", "--classifier", "/k", "--crops-classifier", "/kc", "--locality", "/l", "--out", "/o"]
        + ["--tau", "0.4", "--mode", "per-dataset", "--fixed", "web=0.5", "--fixed", "synthetic=2"]
        + ["--scorer", "sharpness", "--top-percent", "20", "--overwrite", "--rule", "shrunk"],
        {
            "data": "/d",
            "classifier": "/k",
            "crops_classifier": "/kc",
            "locality": "/l",
            "out": "/o",
            "tau": 0.4,
            "mode": "per-dataset",
            "fixed": {"web": 0.5, "synthetic": 2.0},
            "scorer": "sharpness",
            "top_percent": 20.0,
            "overwrite": True,
            "rule": "shrunk",
        },
    ),
    "features": (
        ["--dataset", "faces", "--where", "quality=clean", "--out", "/o", "--steps", "11"],
        {"dataset": "faces", "where": "quality=clean", "out": "/o", "steps": 11},
    ),
    "evaluate": (
        ["--samples", "/s", "--reference", "digits", "--reference-where", "quality=clean", "--holdout", "/h"]
        + ["--features", "net@/f", "--train", "/t", "--proximal", "blur:sigma=1", "--proximal-reference", "/p"]
        + ["--out", "/o"],
        {
            "samples": "/s",
            "reference": "digits",
            "reference_where": "quality=clean",
            "holdout": "/h",
            "features": "net@/f",
            "train": "/t",
            "proximal": "blur:sigma=1",
            "proximal_reference": "/p",
            "out": "/o",
        },
    ),
    "experiment": (
        ["--dataset", "faces", "--corruption", "blur:sigma=2", "--clean-fraction", "0.2", "--seeds", "0, 4"]
        + ["--arms", "only-clean,ambient-o,ambient-o:shrunk", "--out", "/o", "--reuse", "/a", "--reuse", "/b"],
        {
            "dataset": "faces",
            "corruption": ["blur:sigma=2"],
            "clean_fraction": 0.2,
            "seeds": [0, 4],
            "arms": ["only-clean", "ambient-o", "ambient-o:shrunk"],
            "out": "/o",
            "reuse": ["/a", "/b"],
        },
    ),
    "tune": (
        ["--data", "/d", "--out", "/o", "--num-samples", "6", "--scheduler", "none", "--searcher", "grid"]
        + ["--classifier", "/k"],
        {"data": "/d", "out": "/o", "num_samples": 6, "scheduler": "none", "searcher": "grid", "classifier": "/k"},
    ),
    "pipeline": (["--out", "/o"], {"out": "/o"}),
    "plan": (
        ["--model", "edm2-xxl", "--gpus", "4", "--nodes", "2", "--gpu-mem", "40", "--batch", "16"]
        + ["--global-batch", "512", "--resolution", "32", "--channels", "3", "--label-dim", "0"]
        + ["--precision", "fp32", "--offload", "--ema", "power", "--mask-ratio", "0.5", "--offload-params"]
        + ["--reduce-bucket", "1000", "--live-params", "2000"],
        {"model": "edm2-xxl", "gpus": 4, "nodes": 2, "gpu_mem": 40.0, "batch": 16, "global_batch": 512}
        | {"resolution": 32, "channels": 3, "label_dim": 0, "precision": "fp32", "offload": True, "ema": "power"}
        | {"mask_ratio": 0.5, "offload_params": True, "reduce_bucket": 1000, "live_params": 2000},
    ),
    "theory": (
        ["--n1", "10", "--n2", "90", "--lambda1", "2", "--lambda2", "3", "--d-tv", "0.4", "--diameter", "2"]
        + ["--delta", "0.05", "--form", "rate", "--p0", "uniform:lo=0,hi=1", "--q0", "blurred:width=0.1"]
        + ["--sigma-lo", "0.1", "--sigma-hi", "5", "--points", "7", "--seeds", "3", "--seed", "4"]
        + ["--curves", "/a", "--out", "/o"],
        {"n1": 10, "n2": 90, "lambda1": 2.0, "lambda2": 3.0, "d_tv": 0.4, "diameter": 2.0, "delta": 0.05}
        | {"form": "rate", "p0": "uniform:lo=0,hi=1", "q0": "blurred:width=0.1", "sigma_lo": 0.1, "sigma_hi": 5.0}
        | {"points": 7, "seeds": 3, "seed": 4, "curves": "/a", "out": "/o"},
    ),
}


# flags that exclude some of their stage's others (--one-step is --sampler one-step): rows of their own, whose
# flags count as the table's
EXCLUSIVE = {
    "sample": [(["--checkpoint", "/c", "--out", "/o", "--one-step"], {"one_step": True, "sampler.name": "one-step"})],
    "plan": [(["--model", "edm2-xxl", "--distill"], {"model": "edm2-xxl", "distill": True})],  # no patch masking
}


def test_every_stage_with_a_config_is_covered():
    assert set(FLAGS) == {name for name, st in registry.STAGES.items() if st.config is not None}


@pytest.mark.parametrize("stage", sorted(FLAGS))
def test_each_flag_sets_its_config_key(stage):
    given = set()
    for argv, expected in [FLAGS[stage], *EXCLUSIVE.get(stage, [])]:
        cfg = built([stage, *argv])
        assert {k: key(cfg, k) for k in expected} == expected
        given |= {a for a in argv if a.startswith("--")}
    # and no other flag is declared than those the table (the docs' names) lists
    assert {fl.name for _, _, fl in cfgmod.declared_flags(registry.get(stage).model())} == given


def test_flags_left_out_keep_the_defaults():
    cfg = built(["corrupt", "--out", "/o"])
    assert cfg.source.dataset == "digits" and cfg.corruptions == ["blur:sigma=1.0"] and cfg.overwrite is False


def test_set_beats_a_flag_beats_the_yaml(tmp_path):
    yml = tmp_path / "c.yaml"
    yml.write_text("out: /yaml\nseed: 1\nsource:\n  image_size: 8\n  dataset: faces\n")
    base = ["corrupt", "--config", str(yml)]
    cfg = built(base)
    assert (cfg.out, cfg.seed, cfg.source.image_size, cfg.source.dataset) == ("/yaml", 1, 8, "faces")
    cfg = built([*base, "--seed", "2", "--image-size", "16"])
    assert (cfg.seed, cfg.source.image_size, cfg.source.dataset) == (2, 16, "faces")  # the YAML's other keys stay
    cfg = built([*base, "--seed", "2", "--image-size", "16", "--set", "seed=3", "--set", "source.image_size=32"])
    assert (cfg.seed, cfg.source.image_size) == (3, 32)


def test_a_config_error_exits_2_naming_the_key(capsys):
    rc = cli.main(["sample", "--checkpoint", "/c", "--out", "/o", "--set", "num=0"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("ambient-ray sample: error:") and "config key 'num'" in err
    assert "Traceback" not in err
    rc = cli.main(["corrupt", "--out", "/o", "--clean-fraction", "2"])
    assert rc == 2 and "config key 'clean_fraction'" in capsys.readouterr().err
    rc = cli.main(["corrupt", "--out", "/o", "--set", "source.image_sise=4"])
    err = capsys.readouterr().err
    assert rc == 2 and "source.image_sise" in err and "image_size" in err


def test_a_flag_conversion_error_exits_2_naming_the_key(capsys):
    assert cli.main(["experiment", "--out", "/o", "--seeds", "0,x"]) == 2
    err = capsys.readouterr().err
    assert "config key 'seeds'" in err and "--seeds '0,x'" in err
    assert cli.main(["experiment", "--out", "/o", "--arms", "only-clean,best"]) == 2
    assert "arms" in capsys.readouterr().err
    assert cli.main(["experiment", "--out", "/o", "--arms", "ambient-o:median"]) == 2
    assert "ambient-o:RULE with RULE one of first" in capsys.readouterr().err
    assert cli.main(["annotate", "--data", "/d", "--out", "/o", "--fixed", "digits"]) == 2
    assert "expected SOURCE=SIGMA" in capsys.readouterr().err


def test_a_bad_flag_value_is_argparse_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--data", "/d", "--out", "/o", "--zero-stage", "4"])
    assert e.value.code == 2 and "--zero-stage" in capsys.readouterr().err


def test_a_bad_feature_spec_is_a_config_error(capsys):
    rc = cli.main(["evaluate", "--samples", "/s", "--reference", "digits", "--features", "inception", "--out", "/o"])
    assert rc == 2 and "config key 'features'" in capsys.readouterr().err


@pytest.mark.parametrize("error", [RuntimeError("planted"), KeyError("planted"), ValueError("planted")])
def test_an_internal_error_exits_1_with_its_traceback(monkeypatch, capsys, error):
    """A bug inside a stage is no user error, even a ValueError: exit 1 and the traceback to find it."""
    from ambient_ray.stages import corrupt

    def broken(cfg, **kw):
        assert cfg.out == "/o"  # the config was built and handed over
        raise error

    monkeypatch.setattr(corrupt, "run", broken)
    rc = cli.main(["corrupt", "--out", "/o", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "Traceback (most recent call last)" in err and "in broken" in err
    assert f"ambient-ray corrupt: failed: {type(error).__name__}: " in err and "planted" in err


def test_non_config_flags(capsys, tmp_path):
    assert cli.main(["corrupt", "--list-corruptions"]) == 0
    assert "blur" in capsys.readouterr().out
    assert cli.main(["corrupt", "--list-corruptions", "--plugin", "tests.slow_corruption"]) == 0
    assert "slow" in capsys.readouterr().out
    assert cli.main(["tune", "--resume", str(tmp_path), "--data", "/d"]) == 2
    err = capsys.readouterr().err
    assert "--resume takes the search's own config" in err and "--data" in err
    assert cli.main(["tune", "--space", "tuning/ambient_o.yaml", "--config", "x.yaml", "--data", "/d"]) == 2
    assert "--space or --config" in capsys.readouterr().err
    assert cli.main(["jobs", "logs"]) == 2
    assert "needs a job id" in capsys.readouterr().err


def test_declarations_are_checked_when_the_parser_is_built():
    import argparse

    class Twice(Strict):
        a: int = Field(0, json_schema_extra=flag("--n"))
        b: int = Field(0, json_schema_extra=flag("--n"))

    with pytest.raises(TypeError, match="--n declared for both 'a' and 'b'"):
        cli.add_flags(argparse.ArgumentParser(), Twice)

    class Untyped(Strict):
        m: dict[str, int] = Field(default_factory=dict, json_schema_extra=flag("--m"))

    with pytest.raises(TypeError, match="give parse="):
        cli.add_flags(argparse.ArgumentParser(), Untyped)

    class Typed(Strict):
        level: Literal[1, 2] | None = Field(None, description="a level", json_schema_extra=flag("--level"))
        on: bool = Field(True, json_schema_extra=flag("--on"))

    p = argparse.ArgumentParser()
    cli.add_flags(p, Typed)
    assert cli.flag_values(p.parse_args(["--level", "2", "--no-on"]), Typed) == {"level": 2, "on": False}
    assert cli.flag_values(p.parse_args([]), Typed) == {}
    with pytest.raises(SystemExit):
        p.parse_args(["--level", "3"])


def test_jobs_modules_call_the_cli_with_their_stage():
    folder = os.path.join(REPO, "jobs")
    seen = set()
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".py") or name in ("__init__.py", "demo.py"):
            continue
        calls = [
            n
            for n in ast.walk(ast.parse(open(os.path.join(folder, name)).read()))
            if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "main"
        ]
        assert len(calls) == 1, name
        stage = calls[0].args[0].elts[0].value
        assert stage == name[:-3].replace("_", "-") and stage in registry.STAGES, name
        seen.add(stage)
    assert seen == set(registry.STAGES.names()) - {"jobs", "ls", "get"}  # client-side commands: no job of their own


def test_one_stage_imports_only_its_own_modules():
    code = (
        "import sys; from ambient_ray import cli; cli.parse_args(['corrupt', '--out', 'x']); "
        "print(sorted(m for m in sys.modules if m.startswith(('ambient_ray.stages.', 'ambient_ray.workflows.'))))"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    loaded = r.stdout
    assert "ambient_ray.stages.corrupt" in loaded
    assert "ambient_ray.stages.train'" not in loaded and "ambient_ray.workflows.pipeline" not in loaded


def test_ls_and_get_show_a_runs_outputs(tmp_path, capsys):
    run = tmp_path / "run1"
    (run / "samples").mkdir(parents=True)
    (run / "samples" / "grid.png").write_bytes(b"p" * 2500)
    (run / "samples" / "samples.npy").write_bytes(b"n" * 10)
    (run / "pipeline.json").write_text("{}")
    (run / "samples" / ".grid.png.swp").write_bytes(b"h")  # hidden and temporary names are not outputs
    (run / "_scratch").mkdir()
    (run / "_scratch" / "x.bin").write_bytes(b"s")
    (run / "samples" / "grid.png.tmp-1a2b3c4d").write_bytes(b"t")
    assert cli.main(["ls", str(run)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["pipeline.json", "2", "B"]
    assert lines[1].split() == ["samples/", "2", "files", "2.5", "kB"]
    assert lines[-1] == f"3 files, 2.5 kB in {run}"
    assert cli.main(["ls", "-r", str(run)]) == 0
    assert [line.split()[-1] for line in capsys.readouterr().out.splitlines()[:3]] == [
        "pipeline.json",
        "samples/grid.png",
        "samples/samples.npy",
    ]
    dest = tmp_path / "here"
    assert cli.main(["get", str(run / "samples" / "grid.png"), f"{dest}/"]) == 0
    assert (dest / "grid.png").read_bytes() == b"p" * 2500
    assert cli.main(["get", str(run / "samples"), str(dest)]) == 0
    assert (dest / "samples" / "samples.npy").read_bytes() == b"n" * 10
    assert sorted(p.name for p in (dest / "samples").iterdir()) == ["grid.png", "samples.npy"]
    capsys.readouterr()
    assert cli.main(["ls", str(tmp_path / "missing")]) == 2
    assert "no such file or folder" in capsys.readouterr().err


def test_get_of_a_bucket_root_copies_it_into_a_folder_named_after_the_bucket(s3, tmp_path, capsys):
    from ambient_ray.io import storage

    bucket = f"root-{os.urandom(4).hex()}"
    storage.ensure_bucket(bucket)
    storage.write_bytes(f"s3://{bucket}/run1/pipeline.json", b"{}")
    storage.write_bytes(f"s3://{bucket}/run1/.hidden", b"h")
    assert cli.main(["get", f"s3://{bucket}/", str(tmp_path)]) == 0
    assert (tmp_path / bucket / "run1" / "pipeline.json").read_bytes() == b"{}"
    assert not (tmp_path / bucket / "run1" / ".hidden").exists()
    assert capsys.readouterr().out.split() == [str(tmp_path / bucket / "run1" / "pipeline.json")]
