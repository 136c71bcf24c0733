"""``python -m jobs.train_classifier --config FILE [--set key=value ...]``: the train-classifier stage as a Ray job."""

import sys

from ambient_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train-classifier", *sys.argv[1:]]))
