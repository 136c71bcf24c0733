"""``python -m jobs.experiment_dsd --config jobs/configs/experiment_dsd.yaml [--set key=value ...]``: the DSD
experiment (Denoising Score Distillation, seed paper 004) as a Ray job."""

import sys

from ambient_ray.cli import main


def run(args: list[str]) -> int:
    return main(["experiment-dsd", *args])


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
