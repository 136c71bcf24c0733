#!/usr/bin/env bash
# A local ambient-ray cluster on 127.0.0.1: Ray head (token auth), SeaweedFS S3, MLflow server.
#   cluster/local.sh up [--num-cpus N] [--bucket NAME] [--state DIR]   start; prints the exports
#   cluster/local.sh env | status | down                               exports again / what runs / stop
# Typical use:  eval "$(cluster/local.sh up)"; ray job submit ...; cluster/local.sh down
# (the exports end with PATH=<repo>/.venv/bin:$PATH, so ray and ambient-ray need no activated venv)
# The logic is cluster/local.py; it runs on the project's virtual environment (make setup).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${AMBIENT_PYTHON:-$repo/.venv/bin/python}"
if [ ! -x "$py" ]; then
  echo "cluster/local.sh: $py not found: run 'make setup' first (or set AMBIENT_PYTHON)" >&2
  exit 2
fi
exec "$py" "$repo/cluster/local.py" "$@"
