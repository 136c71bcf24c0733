"""``python -m jobs.corrupt --config FILE [--set key=value ...]``: the corrupt stage as a Ray job."""

import sys

from ambient_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["corrupt", *sys.argv[1:]]))
