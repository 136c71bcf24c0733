"""``python -m jobs.evaluate --config FILE [--set key=value ...]``: the evaluate stage as a Ray job."""

import sys

from ambient_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
