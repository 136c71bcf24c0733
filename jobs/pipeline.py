"""``python -m jobs.pipeline --config FILE [--set key=value ...]``: corrupt -> train-classifier -> annotate ->
train -> sample -> evaluate as one Ray job; a re-submitted pipeline skips the stages it finished."""

import sys

from ambient_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["pipeline", *sys.argv[1:]]))
