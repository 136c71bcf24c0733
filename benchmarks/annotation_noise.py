"""How much of a per-sample σ_min is the sample, and how much is the noise draws? Each estimator, measured.

Ambient-o annotates each corrupted row from its classifier curve: the mean probability of "clean" over
``draws`` noise draws on a σ grid (Eq. 3.2 per sample). That mean is noisy, and the rules of
:mod:`ambient_ray.diffusion.thresholds` read σ_min off it in different ways. This script computes the
curves of the same rows twice, with independent noise, and prints per rule:

- mean σ_min, the per-dataset σ_min (one for the set, from the pooled curve) and the share of rows below it;
- test-retest agreement of the per-sample σ_min (Spearman between the two annotations);
- where the data mixes corruption strengths (several ``corruption`` specs): the mean σ_min per spec and
  the AUC of σ_min for telling the stronger spec's rows from the weaker's (0.5: no per-sample signal);
- the classifier evaluations per image and the seconds the curves took.

Every rule runs on two grids: ``--grid`` log-spaced points (the annotate default) and the authors' kind,
``--dense`` sorted draws of the training log-normal; ``smoothed`` (the authors' rule) takes span ``--span``
on the dense grid and the same span in σ (scaled by the number of points) on the other.
Pure torch, no Ray: it runs beside other work without joining its cluster.

    python benchmarks/annotation_noise.py --data OUT_OF_CORRUPT --classifier CLASSIFIER_OUT [--tau 0.45]
        [--draws 4] [--grid 24] [--dense 512] [--span 8] [--rows 600] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
import torch

from ambient_ray.data.images import decode_png
from ambient_ray.data.metadata import load_metadata
from ambient_ray.diffusion.thresholds import RULES, estimate_sigma_min, sigma_min
from ambient_ray.models.classifier import noise_curves
from ambient_ray.models.weights import load


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = (pd.Series(v).rank().to_numpy() for v in (a, b))
    return float(np.corrcoef(ra, rb)[0, 1]) if ra.std() > 0 and rb.std() > 0 else float("nan")


def auc(strong: np.ndarray, weak: np.ndarray) -> float:
    """P(σ_min of a strong-corruption row > a weak one's), ties half: the Mann-Whitney AUC."""
    ranks = pd.Series(np.concatenate([strong, weak])).rank().to_numpy()[: len(strong)]
    return float((ranks.sum() - len(strong) * (len(strong) + 1) / 2) / (len(strong) * len(weak)))


def corrupted_rows(data: str, limit: int) -> tuple[torch.Tensor, np.ndarray]:
    """The corrupted rows' images in [-1, 1] (N, C, H, W) and their corruption specs, at most ``limit``."""
    import pyarrow.parquet as pq

    from ambient_ray.data.metadata import data_dir
    from ambient_ray.io import storage

    meta = load_metadata(data)
    keep = set(meta["id"][meta["quality"] == "corrupted"])
    imgs, specs = [], []
    for f in sorted(storage.list_files(data_dir(data), (".parquet",))):
        fs, path = storage.filesystem(f)
        t = pq.read_table(path, filesystem=fs, columns=["id", "image", "corruption"]).to_pydict()
        for rid, img, spec in zip(t["id"], t["image"], t["corruption"]):
            if rid in keep:
                imgs.append(decode_png(img))
                specs.append(spec)
    order = np.random.default_rng(0).permutation(len(imgs))[:limit]
    y = torch.from_numpy(np.stack([imgs[i] for i in order])).permute(0, 3, 1, 2).float() / 127.5 - 1
    return y, np.array([specs[i] for i in order])


def strength(spec: str) -> float:
    """The number in a spec such as blur:sigma=1.5 (for ordering the specs)."""
    return float(spec.rsplit("=", 1)[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="a corrupt-stage output (its corrupted rows are annotated)")
    ap.add_argument("--classifier", required=True, help="a train-classifier output (noise classifier)")
    ap.add_argument("--tau", type=float, default=0.45)
    ap.add_argument("--draws", type=int, default=4, help="the annotate stage's draws")
    ap.add_argument("--grid", type=int, default=24, help="log-spaced grid points over the classifier's σ range")
    ap.add_argument("--dense", type=int, default=512, help="grid points of the authors' log-normal grid")
    ap.add_argument("--span", type=float, default=8.0, help="the authors' smoothing span (grid points)")
    ap.add_argument("--rows", type=int, default=600, help="corrupted rows to annotate (a random subset)")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    y, specs = corrupted_rows(a.data, a.rows)
    net = load(a.classifier, "noise", img_resolution=y.shape[-1], channels=y.shape[1]).eval()
    from ambient_ray.models.weights import model_dir

    lo, hi = model_dir(a.classifier)[1]["sigma_range"]
    grids = {"log": torch.from_numpy(np.geomspace(lo, hi, a.grid))}
    from ambient_ray.stages.annotate import AnnotateConfig, make_grid

    dense = AnnotateConfig(data=a.data, out="-", grid="lognormal", grid_points=a.dense)
    grids["lognormal"] = torch.tensor(make_grid(dense, lo, hi), dtype=torch.float64)
    print(f"{len(y)} corrupted rows of {a.data} ({', '.join(sorted(set(specs)))}); tau {a.tau}; draws {a.draws}")

    curves, cost = {}, {}
    for kind, grid in grids.items():
        t0 = time.perf_counter()
        with torch.no_grad():
            curves[kind] = [
                noise_curves(net, y, grid.float(), a.draws, torch.Generator().manual_seed(rep), with_std=True)
                for rep in (1, 2)
            ]
        cost[kind] = (len(grid) * a.draws, (time.perf_counter() - t0) / 2)
        print(f"grid {kind}: {len(grid)} points, {len(grid) * a.draws} evaluations per image, {cost[kind][1]:.1f} s")

    specs_sorted = sorted(set(specs), key=strength)
    heads = "| rule | grid | evaluations / image | mean σ_min | per-set σ_min | rows below it | retest Spearman |"
    if len(specs_sorted) > 1:
        heads += " " + " | ".join(f"mean σ_min {s}" for s in specs_sorted) + " | AUC strong vs weak |"
    print("\n" + heads)
    print("|" + "---|" * heads.count(" | ") + "---|")
    for kind, grid in grids.items():
        grid = grid.double()
        # the span in grid points is the same smoothing in σ when scaled with the number of points
        span = max(1.0, a.span * len(grid) / len(grids["lognormal"]))
        per_set = sigma_min(curves[kind][0][0].double(), grid, a.tau, "per-dataset")[0][0].item()
        for rule in RULES:
            runs = []
            for mean, std in curves[kind]:
                s, _ = estimate_sigma_min(rule, mean.double(), grid, a.tau, std=std.double(), draws=a.draws, span=span)
                runs.append(s.numpy())
            s1, s2 = runs
            name = f"{rule} (span {span:g})" if rule == "smoothed" else rule
            row = (
                f"| {name} | {kind} {len(grid)} | {cost[kind][0]} | {s1.mean():.2f} | {per_set:.2f} | "
                f"{(s1 < per_set - 1e-6).mean():.0%} | {spearman(s1, s2):.2f} |"
            )
            if len(specs_sorted) > 1:
                row += " " + " | ".join(f"{s1[specs == sp].mean():.2f}" for sp in specs_sorted)
                row += f" | {auc(s1[specs == specs_sorted[-1]], s1[specs == specs_sorted[0]]):.2f} |"
            print(row)


if __name__ == "__main__":
    main()
