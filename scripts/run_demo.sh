#!/usr/bin/env bash
# Quick start: set up, train the lab baseline (x-vector + GAP + Softmax, 30 epochs) and evaluate it.
# On the first run the demo corpus is generated (data/demo_corpus); edit config.yaml to use AISHELL-1.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python train.py --batchsize 64 --overwrite "$@"
.venv/bin/python EER.py --cp_num 30
