"""``python -m jobs.experiment --config FILE [--set key=value ...]``: the experiment stage as a Ray job."""

import sys

from ambient_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["experiment", *sys.argv[1:]]))
