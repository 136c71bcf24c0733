"""``python -m jobs.experiment_masked --config jobs/configs/experiment_masked.yaml [--set key=value ...]``: the
masked experiment (Ambient Diffusion) as a Ray job; ``python -m jobs.experiment`` runs it too for a config with
``kind: masked``."""

import sys

from ambient_ray.cli import main


def run(args: list[str]) -> int:
    return main(["experiment-masked", *args])


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
