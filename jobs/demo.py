"""``make demo``: the ambient-ray pipeline on built-in data, on this machine, with no set-up.

Stages so far: corrupt (digits -> 10 % clean, the rest blurred or JPEG-compressed), train (Ambient-o
on Ray Train + DeepSpeed ZeRO-2, one CPU worker, a fixed σ_min for the corrupted rows until the
annotate stage exists), sample (EDM Heun sampler). Everything is tracked in an MLflow store inside
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
from ambient_ray import corrupt, sample, storage, train


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="demo_out", help="output folder or s3:// URI (default: demo_out)")
    ap.add_argument("--config", default=os.path.join(os.path.dirname(__file__), "configs", "demo.yaml"))
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="STAGE.KEY=VALUE",
                    help="override a key of one stage's section, e.g. train.steps=300")  # fmt: skip
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

    print("== ambient-ray demo: 1/3 corrupt ==")
    ccfg = cfgmod.build(corrupt.CorruptConfig, flags=dict(spec["corrupt"], out=f"{out}/corrupt", overwrite=True))
    result = corrupt.run(ccfg)
    print(result.summary())
    print(f"  Parquet shards: {result.out}/data/   clean vs corrupted (PNG): {result.out}/preview.png")

    print("== ambient-ray demo: 2/3 train (Ray Train + DeepSpeed ZeRO-2, CPU) ==")
    tspec = dict(spec["train"], data=result.out, out=f"{out}/train", mlflow=mlflow)
    tspec["cpus_per_worker"] = min(float(tspec.get("cpus_per_worker", 1)), os.cpu_count() or 1)
    tcfg = cfgmod.build(train.TrainConfig, flags=tspec)
    s = train.run(tcfg)
    print(f"  done in {s['seconds']:.0f}s, final loss {s['metrics'].get('loss', float('nan')):.4f}")
    print(f"  σ coverage (PNG): {s['out']}/coverage.png   samples during training: {s['out']}/samples.png")
    print(f"  inference weights (safetensors): {s['out']}/model/")

    print("== ambient-ray demo: 3/3 sample (EDM Heun) ==")
    scfg = cfgmod.build(sample.SampleConfig, flags=dict(spec["sample"], checkpoint=s["out"], out=f"{out}/samples", mlflow=mlflow))
    r = sample.run(scfg)
    print(f"  {scfg.num} images: {r['samples']}   grid (PNG): {r['grid']}")
    print(f"MLflow: training run {s['mlflow_run_id']}, sampling run {r['mlflow_run_id']} in {tracking}")
    if tracking.startswith("sqlite:"):
        print(f"  browse with: .venv/bin/mlflow ui --backend-store-uri {tracking}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
