"""``make demo``: the ambient-ray pipeline on built-in data, on this machine, with no set-up.

Stages so far: corrupt (digits -> 10 % clean, the rest blurred or JPEG-compressed). Later stages
(annotate, train, sample, evaluate) join here as they are built.

    python -m jobs.demo [--out demo_out] [--config jobs/configs/demo.yaml]
"""

from __future__ import annotations

import argparse
import os
import sys

import yaml

from ambient_ray import config as cfgmod
from ambient_ray import corrupt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="demo_out", help="output folder or s3:// URI (default: demo_out)")
    ap.add_argument("--config", default=os.path.join(os.path.dirname(__file__), "configs", "demo.yaml"))
    args = ap.parse_args(argv)
    with open(args.config) as f:
        spec = yaml.safe_load(f)

    print("== ambient-ray demo: corrupt ==")
    sections = dict(spec["corrupt"], out=f"{args.out.rstrip('/')}/corrupt", overwrite=True)
    cfg = cfgmod.build(corrupt.CorruptConfig, flags={k: v for k, v in sections.items()})
    result = corrupt.run(cfg)
    print(result.summary())
    print(f"  Parquet shards:   {result.out}/data/")
    print(f"  resolved config:  {result.out}/config.yaml")
    print(f"  clean vs corrupted grid (PNG): {result.out}/preview.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
