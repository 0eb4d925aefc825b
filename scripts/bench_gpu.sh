#!/usr/bin/env bash
# One command for a lent GPU machine (no downloads, random weights at full size): frames per second,
# first-block latency and peak GPU memory for none, NASA, NAG and CFG, without and with the VAE decode,
# for CausVid's and Self-Forcing's step lists at 480x832, 21 latent frames, bf16, flash-attn when installed.
# Also the FLOPs table. Run from the repository root:  bash scripts/bench_gpu.sh [outdir]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-bench-gpu}}
mkdir -p "$out"
if [ ! -x .venv/bin/nasa-video ]; then TORCH_SPEC="torch>=2.4" bash scripts/setup.sh; fi
nv=.venv/bin/nasa-video
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
for model in causvid self-forcing; do
    $nv bench speed --model "$model" --device cuda --dtype bf16 --methods none nasa nag cfg --repeats 3 \
        --json "$out/speed-$model.json"
    $nv bench speed --model "$model" --device cuda --dtype bf16 --methods none nasa nag cfg --repeats 3 \
        --decode --json "$out/speed-$model-decode.json"
done
$nv bench flops --model causvid --json "$out/flops-causvid.json"
