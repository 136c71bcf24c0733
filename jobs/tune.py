"""``python -m jobs.tune --space tuning/ambient_o.yaml --data URI --out URI [--resume URI]``:
the search as a Ray job."""

import sys

from ambient_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
