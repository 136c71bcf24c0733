"""``python -m jobs.precompute --config FILE [--set key=value ...]``: the precompute stage as a Ray job."""

import sys

from ambient_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["precompute", *sys.argv[1:]]))
