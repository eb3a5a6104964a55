#!/usr/bin/env bash
# The GPU check, prepared to run as ONE call of under 8 minutes on a lent GPU machine:
#   1. here:    python bench/prepare_gpu_assets.py          (model, corpus, CPU reference; ~47 MiB)
#   2. device:  run command "bash bench/gpu_check.sh", carry ["bench/gpu_assets"], timeout_s 540
# It checks cosine against the CPU fp32 reference (>= 0.999) and measures MiniLM and a BERT-base-sized
# model at batch 64, 128 and 256: docs/s, tokens/s, model FLOP utilization. Results: $OUT/gpu_check.md.
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device visible')"
timeout 450 python3 bench/gpu_check.py --assets bench/gpu_assets --out "${OUT:-/tmp}/gpu_check.md"
