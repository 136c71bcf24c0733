"""``python -m jobs.plan --model PRESET [--gpus N --gpu-mem GIB ...]``: the memory planner (no Ray; seconds)."""

import sys

from ambient_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["plan", *sys.argv[1:]]))
