"""``python -m jobs.inpaint --config FILE [--set key=value ...]``: the inpaint stage as a Ray job."""

import sys

from ambient_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["inpaint", *sys.argv[1:]]))
