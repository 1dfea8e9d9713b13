#!/usr/bin/env bash
# GPU host with two GPUs (nvidia-h100-x2), from the repository root with the carried
# .gpu/ (benches/gpu/prepare_torch_tests.sh): the 2-GPU rows of the issue's table plus the
# memory API rows, in the three modes: cross-device copies with record_stream in one
# process (cross_device), DDP over 2 GPUs with rank 0's final weights compared with
# native's (ddp). Writes $OUT/torch_tests.log and .json; success is "0 failed" with no
# SKIPPED rows.
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
N=$(nvidia-smi --query-gpu=name --format=csv,noheader | wc -l)
if [ "$N" -lt 2 ]; then echo "needs 2 GPUs, found $N"; exit 1; fi
TESTS=${TESTS:-cross_device,ddp,memory_stats,memory_api} exec bash "$ROOT/benches/gpu/torch_tests.sh"
