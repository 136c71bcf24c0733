"""How much of a per-sample σ_min is the sample, and how much is the noise draws?

Ambient-o annotates each corrupted row at the first grid σ where the classifier's mean probability
of "clean" over ``draws`` noise draws exceeds τ (Eq. 3.2 applied per sample). With few draws that
mean is itself noisy, and taking the *first* crossing of a noisy curve moves σ_min down. This script
annotates the same rows with the same classifier several times, with independent noise, and prints:

- test-retest agreement of per-sample σ_min at ``--draws`` (same grid point; Spearman correlation);
- the same at ``--many`` draws (what is left is the per-sample signal);
- mean σ_min and the share of rows below the per-dataset σ_min, at each number of draws.

Pure torch, no Ray: it runs beside other work without joining its cluster.

    python benchmarks/annotation_noise.py --data OUT_OF_CORRUPT --classifier CLASSIFIER_OUT [--tau 0.45]
        [--draws 4] [--many 16] [--grid 24] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from ambient_ray.data.sources import read_array
from ambient_ray.diffusion.thresholds import sigma_min
from ambient_ray.io.weights import load
from ambient_ray.models.classifier import noise_curves


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = (np.argsort(np.argsort(v, kind="stable"), kind="stable").astype(float) for v in (a, b))
    return float(np.corrcoef(ra, rb)[0, 1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="a corrupt-stage output (its corrupted rows are annotated)")
    ap.add_argument("--classifier", required=True, help="a train-classifier output (noise classifier)")
    ap.add_argument("--tau", type=float, default=0.45)
    ap.add_argument("--draws", type=int, default=4, help="the annotate stage's draws")
    ap.add_argument("--many", type=int, default=16, help="a larger number of draws for comparison")
    ap.add_argument("--grid", type=int, default=24, help="grid points, log-spaced over [0.01, 20]")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    imgs, _ = read_array(a.data, "quality=corrupted")
    y = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1
    net = load(a.classifier, "noise", img_resolution=y.shape[-1], channels=y.shape[1]).eval()
    grid = torch.from_numpy(np.geomspace(0.01, 20.0, a.grid)).float()
    print(f"{len(y)} corrupted rows of {a.data}; tau {a.tau}; grid {a.grid} points")

    t0 = time.perf_counter()
    res = {}
    for k in (a.draws, a.many):
        runs = []
        for rep in range(2):
            with torch.no_grad():
                c = noise_curves(net, y, grid, k, torch.Generator().manual_seed(1000 * k + rep))
            runs.append((sigma_min(c, grid, a.tau)[0].numpy(), sigma_min(c, grid, a.tau, "per-dataset")[0][0].item()))
        res[k] = runs
    print(f"({time.perf_counter() - t0:.0f} s)\n")
    print("| draws | mean σ_min | per-dataset σ_min | rows below it | retest: same grid point | retest: Spearman |")
    print("|---|---|---|---|---|---|")
    for k, ((s1, d1), (s2, _)) in res.items():
        print(
            f"| {k} | {s1.mean():.2f} | {d1:.2f} | {(s1 < d1 - 1e-6).mean():.0%} | "
            f"{(s1 == s2).mean():.0%} | {spearman(s1, s2):.2f} |"
        )
    few, many = res[a.draws][0][0], res[a.many][0][0]
    print(
        f"\nSpearman between {a.draws}-draw and {a.many}-draw annotations of the same rows: {spearman(few, many):.2f}"
    )


if __name__ == "__main__":
    main()
