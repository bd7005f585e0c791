#!/usr/bin/env bash
# ldmcore against diffusers on a GPU, one command: the reference configuration of
# bench/vs_diffusers.py in bf16, flash attention forced (SDPA), torch.compile variants included.
# Prints the same tables as the CPU run, writes bench/results/vs_diffusers_gpu.json and its section
# of docs/performance.md. A few minutes, most of it compilation. Extra arguments pass through
# (e.g. --batch 256, --skip memory, --quick).
# On a bare GPU machine of this workplace's device tool: bench/gpu_wheels.sh first (docs/performance.md,
# "On a GPU lent through this workplace's device tool", has the one command).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the source tree, installed or not
exec "${PYTHON:-python3}" bench/vs_diffusers.py --device cuda --dtype bf16 --sdpa flash --compile --rounds 20 \
    --json bench/results/vs_diffusers_gpu.json "$@"
