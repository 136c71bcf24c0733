"""``python -m jobs.features --config FILE [--set key=value ...]``: the features stage as a Ray job."""

import sys

from ambient_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["features", *sys.argv[1:]]))
