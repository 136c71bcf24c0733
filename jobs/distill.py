"""``python -m jobs.distill --config FILE [--set key=value ...]``: the distill stage as a Ray job."""

import sys

from ambient_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["distill", *sys.argv[1:]]))
