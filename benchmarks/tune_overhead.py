"""What a search costs against running its configurations by hand, measured in one run on the same work.

For N values of τ (and the same training config), on the same mixed data and the same trained noise classifier:

(a) ``ambient-ray tune``: the curves once (annotate phase 1 in OUT/prep), then N Tune trials, each
    re-annotating from those curves (phase 2 only) and training on its own nested Ray Train run;
(b) the plain way: N independent ``annotate`` runs (each computes its curves) and N ``train`` runs,
    one after another in this process, with the same per-run resources (one worker of 1 CPU).

Both skip sampling and FD. Printed: the wall time of each, their ratio (tune / plain; below 1 means
the search is cheaper than doing its trials by hand), and the split of (a) into prep and trials.

    python benchmarks/tune_overhead.py [--trials 3] [--steps 200]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--cpus", type=int, default=2)
    args = ap.parse_args()

    import ray

    from ambient_ray import config as cfgmod
    from ambient_ray.data.sources import SourceConfig
    from ambient_ray.stages import annotate, train, train_classifier
    from ambient_ray.stages.corrupt import CorruptConfig
    from ambient_ray.stages.corrupt import run as corrupt_run
    from tuning import search

    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    root = tempfile.mkdtemp(prefix="tune-bench-")
    model = dict(img_resolution=8, in_channels=1, model_channels=16, channel_mult=[1, 2], label_dim=0)
    data = f"{root}/mixed"
    corrupt_run(
        CorruptConfig(
            out=data,
            source=SourceConfig(dataset="digits"),
            corruptions=["blur:sigma=1"],
            clean_fraction=0.2,
            shard_size=1024,
            preview=0,
        ),
        progress=False,
    )
    clf = f"{root}/clf"
    train_classifier.run(
        cfgmod.build(
            train_classifier.ClassifierTrainConfig,
            flags=dict(
                data=data,
                out=clf,
                kind="noise",
                steps=150,
                batch_size=64,
                log_every=50,
                checkpoint_every=150,
                cpus_per_worker=args.cpus,
                model=model,
                optim=dict(lr=2e-3, warmup_steps=20),
                mlflow=dict(enabled=False),
            ),
        )
    )
    taus = [round(0.3 + 0.19 * i / max(1, args.trials - 1), 3) for i in range(args.trials)]
    tsec = dict(
        steps=args.steps,
        batch_size=64,
        checkpoint_every=args.steps,
        log_every=50,
        sample_grid=0,
        model=model,
        optim=dict(lr=2e-3, warmup_steps=20),
        num_workers=1,
        cpus_per_worker=1,
    )
    annot = dict(grid_points=24, draws=4)

    t0 = time.perf_counter()
    s = search.run(
        search.load(
            flags=dict(
                data=data,
                out=f"{root}/search",
                classifier=clf,
                space={"annotate.tau": {"grid": taus}},
                num_samples=1,
                scheduler="none",
                samples=0,
                report_every=50,
                annotate=annot,
                train=tsec,
                mlflow=dict(enabled=False),
            )
        )
    )
    tune_s = time.perf_counter() - t0
    assert s["completed"] == args.trials, s
    prep = json.loads(open(f"{root}/search/prep/annotated/annotation.json").read())

    t0 = time.perf_counter()
    for i, tau in enumerate(taus):
        a = f"{root}/plain-{i}/annotated"
        annotate.run(
            cfgmod.build(
                annotate.AnnotateConfig,
                flags=dict(data=data, out=a, classifier=clf, tau=tau, mlflow=dict(enabled=False), **annot),
            ),
            progress=False,
        )
        train.run(
            cfgmod.build(
                train.TrainConfig, flags=dict(data=a, out=f"{root}/plain-{i}/train", mlflow=dict(enabled=False), **tsec)
            )
        )
    plain_s = time.perf_counter() - t0

    print(f"{args.trials} configurations (τ = {taus}), {args.steps} steps each, {args.cpus} CPUs")
    print(f"  plain (annotate + train, one after another): {plain_s:7.1f} s")
    print(
        f"  ambient-ray tune:                             {tune_s:7.1f} s  (of which the shared curves {prep['seconds_curves']:.1f} s)"
    )
    print(f"  tune / plain: {tune_s / plain_s:.2f}")
    ray.shutdown()
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
