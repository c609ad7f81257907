#!/usr/bin/env bash
# Create .venv (if missing) and install the project's dependencies into it. Safe to re-run.
# torch is installed first: installed after librosa & co., pip would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
  "$VPY" -m pip install --quiet --disable-pip-version-check torch==2.13.0
fi
"$VPY" -m pip install --quiet --disable-pip-version-check -r requirements.txt -r requirements-dev.txt
"$VPY" -c "import torch, librosa, sklearn, matplotlib; print(f'environment ready: torch {torch.__version__}, librosa {librosa.__version__} in .venv')"
