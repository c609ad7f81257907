#!/usr/bin/env bash
# Install the project's dependencies into the current Python environment.
# torch comes first: installing it after librosa & co. lets pip pick a multi-GB CUDA build.
set -euo pipefail
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install --quiet torch==2.13.0
fi
"$PY" -m pip install --quiet -r requirements.txt -r requirements-dev.txt
