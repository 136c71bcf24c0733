"""``python -m jobs.locality --config FILE [--set key=value ...]``: the locality stage as a Ray job."""

import sys

from ambient_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["locality", *sys.argv[1:]]))
