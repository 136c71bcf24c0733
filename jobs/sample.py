"""``python -m jobs.sample --config FILE [--set key=value ...]``: the sample stage as a Ray job."""

import sys

from ambient_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["sample", *sys.argv[1:]]))
