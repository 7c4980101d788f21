#!/usr/bin/env bash
# The GPU checks of the ten-minute race, one stage per call, each sized to end within 10
# minutes on one H100 or H200. Run from the repository root on a machine with CUDA:
#
#   bash benchmarks/gpu_checks.sh tests           # the CUDA tests (CUDA graphs, compiled graphs,
#                                                 # training with train.compile_mode=reduce-overhead)
#   bash benchmarks/gpu_checks.sh train           # the 150-second MNIST run, eager (FDD of 10,000)
#   bash benchmarks/gpu_checks.sh train-graphs    # the same with the network compiled and its calls
#                                                 # replayed from CUDA graphs, at batch 256
#   bash benchmarks/gpu_checks.sh speed           # difflab against diffusers, eager and compiled
#
# MNIST_DIR: the four MNIST *-ubyte.gz files (default ../shared/data/mnist); OUT: where the logs
# and tables go (default runs/gpu-checks). `speed` needs diffusers installed. Each stage appends
# its table to $OUT/BENCHMARKS-gpu.md, to be copied into BENCHMARKS.md with the device named.
set -euo pipefail
stage=${1:?usage: gpu_checks.sh tests|train|train-graphs|speed}
case "$stage" in
  tests|train|train-graphs|speed) ;;
  *) echo "gpu_checks.sh: unknown stage '$stage' (tests, train, train-graphs or speed)" >&2
     exit 2 ;;
esac
py=${PYTHON:-python3}
mnist=${MNIST_DIR:-../shared/data/mnist}
out=${OUT:-runs/gpu-checks}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
table="$out/BENCHMARKS-gpu.md"
$py -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device')"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"

case "$stage" in
  tests)
    $py -m pytest -q -rs tests/test_speed.py -k cuda 2>&1 | tee "$out/tests.log" ;;
  train)
    $py benchmarks/mnist_quality.py --device cuda --data-dir "$mnist" --minutes 2.5 \
      --run-dir "$out/mnist-gpu" --n 10000 --sampler dpm++2m-sde --steps 10 \
      --cache-dir "$out/cache" --append "$table" 2>&1 | tee "$out/train.log" ;;
  train-graphs)
    $py benchmarks/mnist_quality.py --device cuda --data-dir "$mnist" --minutes 2.5 \
      --run-dir "$out/mnist-gpu-graphs" --n 10000 --sampler dpm++2m-sde --steps 10 \
      --set train.compile=true --set train.compile_mode=reduce-overhead \
      --set train.batch_size=256 --cache-dir "$out/cache" --append "$table" 2>&1 \
      | tee "$out/train-graphs.log" ;;
  speed)
    $py benchmarks/speed_vs_diffusers.py --device cuda --batch-size 128 --sample-batch 256 \
      --nfe 50 --steps 20 --bf16 --append "$table" 2>&1 | tee "$out/speed.log" ;;
esac
