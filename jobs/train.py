"""``python -m jobs.train --config FILE [--set key=value ...]``: the train stage as a Ray job."""

import sys

from ambient_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
