"""``python -m jobs.annotate --config FILE [--set key=value ...]``: the annotate stage as a Ray job."""

import sys

from ambient_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["annotate", *sys.argv[1:]]))
