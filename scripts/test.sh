#!/usr/bin/env bash
# Set up and run the test suite (tests needing ../shared/data skip with a reason when it is absent).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pytest -q tests "$@"
