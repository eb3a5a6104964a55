#!/usr/bin/env bash
# The GPU check, one command of under 8 minutes on a machine with a CUDA GPU:
#   1. on any machine:  python bench/prepare_gpu_assets.py   (model, corpus, CPU reference; ~47 MiB)
#   2. on the GPU host, with bench/gpu_assets copied there:  bash bench/gpu_check.sh
# It checks cosine against the CPU fp32 reference (>= 0.999) and measures MiniLM and a BERT-base-sized
# model at batch 64, 128 and 256: docs/s, tokens/s, model FLOP utilization. Results: $OUT/gpu_check.md.
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device visible')"
timeout 450 python3 bench/gpu_check.py --assets bench/gpu_assets --out "${OUT:-/tmp}/gpu_check.md"
