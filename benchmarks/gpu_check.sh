#!/usr/bin/env bash
# The GPU checks, as one script for a lent GPU machine (no network there: its image's python3 has
# torch, einops, safetensors, torchvision and pytest, which is all these need):
#   benchmarks/generator.py bf16 MFU and tokens/s (eager and compiled), packed / padded, VAE peak memory, attention backends
#   tests/test_gpu.py       attention backends agree, DiT and VAE train under bf16 autocast, seeded sampling
# Logs go to $OUT (or ./gpu_out). About 3-5 minutes on an H100.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
py=${PYTHON:-python3}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $py -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } 2>&1 | tee "$out/env.txt"
# the benchmark first (its first lines are the bf16 MFU, eager and compiled), then the tests
timeout 330 $py benchmarks/generator.py 2>&1 | tee "$out/generator_bench.txt"
bench=$?
# -c /dev/null: not the project's pytest settings (its plugins need not be there); -m gpu only
timeout 190 $py -m pytest -q -c /dev/null --rootdir . -p no:cacheprovider -p no:warnings tests/test_gpu.py 2>&1 | tee "$out/test_gpu.txt"
tests=$?
echo "gpu_check: tests rc=$tests bench rc=$bench" | tee -a "$out/env.txt"
exit $(( tests || bench ))
