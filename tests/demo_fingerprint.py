"""The demo's key outputs as a few hashes and numbers, to check that a refactor changes no result.

``python -m tests.demo_fingerprint OUT`` prints the fingerprint of a ``jobs.demo`` output folder as JSON:
the corrupt shards (every row's id, image bytes, quality and corruption), the classifier probability curves of
annotate, σ_min per row, the final training loss and the sample array. ``tests/test_demo_reference.py`` runs a
short demo and compares it with ``tests/demo_reference.json``, recorded before the second-wave move.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def _table(folder: str) -> pa.Table:
    files = sorted(glob.glob(os.path.join(folder, "*.parquet")))
    if not files:
        raise FileNotFoundError(f"no Parquet shards in {folder}")
    return pa.concat_tables([pq.read_table(f) for f in files], promote_options="default")


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else repr(p).encode())
    return h.hexdigest()[:24]


def fingerprint(out: str) -> dict:
    rows = _table(os.path.join(out, "corrupt", "data")).to_pylist()
    rows.sort(key=lambda r: r["id"])
    corrupt = _digest(*[(r["id"], r["image"], r["quality"], r["corruption"]) for r in rows])
    curves = _table(os.path.join(out, "annotated", "curves")).to_pylist()
    curves.sort(key=lambda r: r["id"])
    numeric = ("noise_curve", "crop_curve", "score")

    def curve_row(r):
        return (
            r["id"],
            r["error"],
            *[np.asarray(r[k] if r[k] is not None else [], np.float32).tobytes() for k in numeric],
        )

    curves_digest = _digest(*[curve_row(r) for r in curves])
    # the mean curve over the rows, for a check with a tolerance: the classifier's float32 arithmetic
    # differs in its last bits between CPU models (seen: AMD EPYC against the machine that recorded it)
    curve_mean = np.mean([np.asarray(r["noise_curve"], np.float64) for r in curves], axis=0)
    ann = _table(os.path.join(out, "annotated", "data")).select(["id", "sigma_min"]).to_pylist()
    ann.sort(key=lambda r: r["id"])
    sigma_min = _digest(*[(r["id"], np.float64(r["sigma_min"]).tobytes()) for r in ann])
    with open(os.path.join(out, "train", "summary.json")) as f:
        loss = float(json.load(f)["metrics"]["loss"])
    samples = np.load(os.path.join(out, "samples", "samples.npy"))
    return {
        "corrupt_rows": len(rows),
        "corrupt": corrupt,
        "curves": curves_digest,
        "curve_mean": [round(float(v), 8) for v in curve_mean],
        "sigma_min": sigma_min,
        "mean_sigma_min": float(np.mean([r["sigma_min"] for r in ann])),
        "final_loss": loss,
        "samples": _digest(samples.shape, samples.tobytes()),
        "samples_mean": float(samples.mean()),
    }


if __name__ == "__main__":
    print(json.dumps(fingerprint(sys.argv[1]), indent=1))
