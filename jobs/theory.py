"""``python -m jobs.theory [--n1 N --n2 N ... --curves DATASET --out OUT]``: the theory tool (no Ray; seconds)."""

import sys

from ambient_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["theory", *sys.argv[1:]]))
