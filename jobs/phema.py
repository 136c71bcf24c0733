"""``python -m jobs.phema --config FILE [--set key=value ...]``: the post-hoc EMA stage as a Ray job."""

import sys

from ambient_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["phema", *sys.argv[1:]]))
