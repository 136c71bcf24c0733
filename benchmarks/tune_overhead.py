"""What a search costs against running its configurations by hand, measured in one run on the same work.

For N values of τ (and the same training config), on the same mixed data and the same trained noise classifier:

(a) ``ambient-ray tune``: the curves once (annotate phase 1 in OUT/prep), then N Tune trials, each
    re-annotating from those curves (phase 2 only) and training on its own nested Ray Train run;
(b) the plain way: N independent ``annotate`` runs (each computes its curves) and N ``train`` runs,
    one after another in this process, with the same per-run resources (one worker of 1 CPU).

Both skip sampling and FD. Printed: the wall time of each, their ratio (tune / plain; below 1 means
the search is cheaper than doing its trials by hand), and the split of (a) into prep and trials. The two
sides run in turns (:mod:`benchmarks.timing`): an untimed round (``--no-warmup`` skips it), then
``--repeats`` rounds; medians, their spread and the ratio of the medians are printed.

    python benchmarks/tune_overhead.py [--trials 3] [--steps 200]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time

import timing  # benchmarks/timing.py, beside this script


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1, help="timed rounds of both sides (interleaved)")
    ap.add_argument("--no-warmup", action="store_true", help="skip the untimed first round of both sides")
    args = ap.parse_args()

    import ray

    from ambient_ray import config as cfgmod
    from ambient_ray.data.sources import SourceConfig
    from ambient_ray.io import ray_runtime
    from ambient_ray.stages import annotate, train, train_classifier
    from ambient_ray.stages.corrupt import CorruptConfig
    from ambient_ray.stages.corrupt import run as corrupt_run
    from tuning import search

    ray_runtime.ray_init(None, address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
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

    prep: dict = {}

    def tune_side(r: int) -> float:
        t0 = time.perf_counter()
        s = search.run(
            search.load(
                flags=dict(
                    data=data,
                    out=f"{root}/search{r + 1}",
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
        seconds = time.perf_counter() - t0
        assert s["completed"] == args.trials, s
        prep[r] = json.loads(open(f"{root}/search{r + 1}/prep/annotated/annotation.json").read())["seconds_curves"]
        return seconds

    def plain_side(r: int) -> float:
        t0 = time.perf_counter()
        for i, tau in enumerate(taus):
            a = f"{root}/plain{r + 1}-{i}/annotated"
            annotate.run(
                cfgmod.build(
                    annotate.AnnotateConfig,
                    flags=dict(data=data, out=a, classifier=clf, tau=tau, mlflow=dict(enabled=False), **annot),
                ),
                progress=False,
            )
            train.run(
                cfgmod.build(
                    train.TrainConfig,
                    flags=dict(data=a, out=f"{root}/plain{r + 1}-{i}/train", mlflow=dict(enabled=False), **tsec),
                )
            )
        return time.perf_counter() - t0

    st = timing.interleave({"tune": tune_side, "plain": plain_side}, args.repeats, warmup=not args.no_warmup)
    tune_s, plain_s = st["tune"], st["plain"]
    curves = sorted(v for k, v in prep.items() if k >= 0)

    print(
        f"{args.trials} configurations (τ = {taus}), {args.steps} steps each, {args.cpus} CPUs; "
        f"medians of {args.repeats} interleaved rounds{'' if args.no_warmup else ' after a warm-up round'}"
    )
    print(f"  plain (annotate + train, one after another): {plain_s.show(1, 's')}")
    print(
        f"  ambient-ray tune:                             {tune_s.show(1, 's')}  "
        f"(of which the shared curves {curves[len(curves) // 2]:.1f} s)"
    )
    print(f"  tune / plain: {timing.ratio(tune_s, plain_s):.2f} (ratio of medians)")
    ray.shutdown()
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
