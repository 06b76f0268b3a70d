#!/usr/bin/env bash
# Builds the ONNX model zoo that fam's engine is tested against: creates (or reuses) the pinned
# Python environment of scripts/zoo-env.sh, then runs scripts/make-zoo.py with the arguments
# given. Idempotent: models already exported by the same script version are kept.
#
#   scripts/make-zoo.sh --subset ci     the test suite's subset (models/zoo/ci, 64 px; ~1 min)
#   scripts/make-zoo.sh                 the full zoo (models/zoo, 224 px; ~3 min, 4 GiB)
set -euo pipefail
cd "$(dirname "$0")/.."
py=$(scripts/zoo-env.sh | tail -n1)
exec "$py" scripts/make-zoo.py "$@"
