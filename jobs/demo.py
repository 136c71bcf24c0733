"""``make demo``: the ambient-ray pipeline on built-in data, on this machine, with no set-up.

Stages: corrupt (digits -> 10 % clean, the rest blurred or JPEG-compressed), train-classifier (the
noise classifier of Ambient-o Eq. 3.1 on Ray Train + DeepSpeed), annotate (σ_min per corrupted row
from the classifier, Eq. 3.2, through a Ray Data actor pool), train (Ambient-o on Ray Train +
DeepSpeed ZeRO-2, one CPU worker), sample (EDM Heun sampler). Everything is tracked in an MLflow store inside
the output folder unless ``MLFLOW_TRACKING_URI`` names a server. Re-running starts afresh.

    python -m jobs.demo [--out demo_out] [--config jobs/configs/demo.yaml] [--set train.steps=300 ...]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

import yaml

from ambient_ray import config as cfgmod
from ambient_ray.io import ray_runtime, storage
from ambient_ray.stages import annotate, corrupt, sample, train, train_classifier


def machine_cpus(value: float | str) -> float | str:
    """A worker's CPUs no more than the machine has (a number above them could never be scheduled); auto as it
    is (the driver resolves it to what fits, one CPU to spare)."""
    return value if value == "auto" else min(float(value), os.cpu_count() or 1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="demo_out", help="output folder or s3:// URI (default: demo_out)")
    ap.add_argument("--config", default=os.path.join(os.path.dirname(__file__), "configs", "demo.yaml"))
    ap.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="STAGE.KEY=VALUE",
        help="override a key of one stage's section, e.g. train.steps=300",
    )
    args = ap.parse_args(argv)
    with open(args.config) as f:
        spec = yaml.safe_load(f)
    for item in args.sets:
        keys, value = cfgmod.parse_set(item)
        cfgmod.set_path(spec, keys, value)
    out = storage.normalize(args.out)
    if "://" not in out and os.path.isdir(out):
        shutil.rmtree(out)  # the demo always starts afresh
    tracking = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{os.path.abspath(args.out)}/mlflow.db"
    mlflow = {"tracking_uri": tracking, "experiment": "ambient-ray-demo"}
    if "://" not in out:
        os.makedirs(out, exist_ok=True)
        mlflow["artifact_location"] = os.path.join(out, "mlflow-artifacts")

    ray_runtime.ray_init(out)  # one log file for the whole demo: OUT/ray.log
    print("== ambient-ray demo: 1/5 corrupt ==")
    ccfg = cfgmod.build(corrupt.CorruptConfig, flags=dict(spec["corrupt"], out=f"{out}/corrupt", overwrite=True))
    result = corrupt.run(ccfg)
    print(result.summary())
    print(f"  Parquet shards: {result.out}/data/   clean vs corrupted (PNG): {result.out}/preview.png")

    print("== ambient-ray demo: 2/5 train-classifier (noise classifier, Ray Train + DeepSpeed, CPU) ==")
    kspec = dict(spec["classifier"], data=result.out, out=f"{out}/classifier", mlflow=mlflow)
    kspec["cpus_per_worker"] = machine_cpus(kspec.get("cpus_per_worker", "auto"))
    k = train_classifier.run(cfgmod.build(train_classifier.ClassifierTrainConfig, flags=kspec))
    print(
        f"  done in {k['seconds']:.0f}s, accuracy {k['metrics'].get('accuracy', float('nan')):.3f}; "
        f"P(clean) vs σ (PNG): {k['out']}/curves.png"
    )

    print("== ambient-ray demo: 3/5 annotate (σ_min per sample, Ray Data actors) ==")
    aspec = dict(spec["annotate"], data=result.out, classifier=k["out"], out=f"{out}/annotated", mlflow=mlflow)
    a = annotate.run(cfgmod.build(annotate.AnnotateConfig, flags=aspec))
    print(
        f"  {a['rows_out']} rows annotated, {a['rows_quarantined']} quarantined; mean σ_min of the corrupted rows "
        f"{a['mean_sigma_min']:.2f} ("
        + ", ".join(f"{g}: {v:.2f}" for g, v in a["mean_sigma_min_by_group"].items())
        + ")"
    )
    print(f"  histogram and curves (PNG): {a['out']}/sigma_min.png, {a['out']}/curves.png")

    print("== ambient-ray demo: 4/5 train (Ray Train + DeepSpeed ZeRO-2, CPU) ==")
    tspec = dict(spec["train"], data=a["out"], out=f"{out}/train", mlflow=mlflow)
    tspec["cpus_per_worker"] = machine_cpus(tspec.get("cpus_per_worker", "auto"))
    tcfg = cfgmod.build(train.TrainConfig, flags=tspec)
    s = train.run(tcfg)
    print(f"  done in {s['seconds']:.0f}s, final loss {s['metrics'].get('loss', float('nan')):.4f}")
    print(f"  σ coverage (PNG): {s['out']}/coverage.png   samples during training: {s['out']}/samples.png")
    print(f"  inference weights (safetensors): {s['out']}/model/")

    print("== ambient-ray demo: 5/5 sample (EDM Heun) ==")
    scfg = cfgmod.build(
        sample.SampleConfig, flags=dict(spec["sample"], checkpoint=s["out"], out=f"{out}/samples", mlflow=mlflow)
    )
    r = sample.run(scfg)
    print(f"  {scfg.num} images: {r['samples']}   grid (PNG): {r['grid']}")
    print(
        f"MLflow: classifier run {k['mlflow_run_id']}, annotation run {a.get('mlflow_run_id')}, training run "
        f"{s['mlflow_run_id']}, sampling run {r['mlflow_run_id']} in {tracking}"
    )
    if tracking.startswith("sqlite:"):
        print(f"  browse with: .venv/bin/mlflow ui --backend-store-uri {tracking}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
