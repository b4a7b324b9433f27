#!/usr/bin/env bash
# Self-training rounds on a trained run (see scripts/self_train.py or --help):
#   bash scripts/self_train.sh --images DIR --labels CSV --base RUN --out DIR [--rounds N] [-- RULE OPTIONS]
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
exec "${PY:-$here/.venv/bin/python}" "$here/scripts/self_train.py" "$@"
