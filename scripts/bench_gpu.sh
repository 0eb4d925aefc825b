#!/usr/bin/env bash
# Speed figures on a lent GPU machine that has torch + CUDA but no internet, in under 8 minutes:
#   bash scripts/bench_gpu.sh [outdir]          (outdir: default $OUT, else bench-gpu)
# Uses the python that has torch (PYTHON, default python3): no venv, no downloads. What nasa-video needs beside
# torch (diffusers, omegaconf, transformers, ...) is installed only if missing, from the wheel folder WHEELS
# (default .whl, prepared on a machine with the registries by scripts/gpu_wheels.sh) into SITE (a temporary
# folder put on PYTHONPATH). Random weights at full size (480x832, 21 latent frames = 81 frames), bf16.
# Steps in order of importance, each under `timeout`; a step that would end past BUDGET seconds is skipped:
#   1. CausVid, 3 steps + cache pass, DiT only: none nasa nag vsf cfg (+ --profile: one block's kernels)
#   2. Self-Forcing, 4 steps, with the streaming decode (bf16 VAE, overlapped): none nasa nag vsf cfg
#   3. the FLOPs table;  4. bf16 vs fp32 VAE decode error at full size
#   5. Self-Forcing none with the old decode path (fp32 VAE, not overlapped), for the decode's share
#   6. compile on/off (CausVid none + nasa), only if `bench speed` has --compile
# DEVICE=cpu SMOKE=1 runs the same steps on the tiny config (a check of the script itself, not figures).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-bench-gpu}}
mkdir -p "$out"
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
SITE=${SITE:-/tmp/nasa-video-site}
BUDGET=${BUDGET:-470}
DEVICE=${DEVICE:-cuda}
start=$SECONDS
if [ -n "${SMOKE:-}" ]; then causvid=tiny; sf=tiny; rep=1; rep_sf=1; big=""
else causvid=causvid; sf=self-forcing; rep=3; rep_sf=2; big=1; fi

log() { echo "[bench_gpu $((SECONDS - start))s] $*" | tee -a "$out/steps.txt"; }
step() {  # step NAME TIMEOUT_S command...: run it under timeout, unless it would end past the budget
    local name=$1 limit=$2; shift 2
    if [ $((SECONDS - start + limit)) -gt "$BUDGET" ]; then log "$name: skipped (${limit}s would pass the ${BUDGET}s budget)"; return 0; fi
    log "$name: start (limit ${limit}s)"
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    local rc=$?
    tail -n 30 "$out/$name.log"
    log "$name: exit $rc$([ $rc = 124 ] && echo ' (timed out)')"
}

log "python $($PY -c 'import sys; print(sys.version.split()[0])'), out $out"
if ! timeout 120 $PY -c "
import torch
print('torch', torch.__version__, 'cuda', torch.version.cuda)
if '$DEVICE' == 'cuda':
    assert torch.cuda.is_available(), 'no CUDA device visible'
    print(torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).total_memory // 2**30, 'GiB')
" 2>&1 | tee "$out/env.txt"; then log "torch with CUDA is needed"; exit 1; fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >> "$out/env.txt" 2>/dev/null || true
if ! timeout 240 $PY scripts/gpu_deps.py --wheels "$WHEELS" --target "$SITE" 2>&1 | tee "$out/deps.txt"; then
    log "dependencies missing and not installable from $WHEELS (see $out/deps.txt)"; exit 1
fi
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
$PY -c "import nasa_video.attention as a; print('attention backend (auto):', a.set_backend('auto'))" | tee -a "$out/env.txt"
nv="$PY -m nasa_video.cli"
methods="none nasa nag vsf cfg"
common="--device $DEVICE --dtype bf16 --attention auto"

step causvid-dit 150 $nv bench speed --model $causvid $common --methods $methods --repeats $rep \
    --json "$out/speed-causvid-dit.json" --profile "$out/kernels-causvid.json"
step self-forcing-decode 170 $nv bench speed --model $sf $common --methods $methods --repeats $rep_sf --decode \
    --vae-dtype auto --json "$out/speed-self-forcing-decode.json"
step flops 60 $nv bench flops --model $causvid --json "$out/flops-causvid.json"
if [ -n "$big" ]; then
    step vae-precision 60 $PY scripts/vae_precision.py --device "$DEVICE" --full --latent-frames 21 --size 60 104 \
        --seeds 1 --json "$out/vae-precision.json"
else
    step vae-precision 60 $PY scripts/vae_precision.py --device "$DEVICE" --latent-frames 3 --size 4 4 --seeds 1 \
        --json "$out/vae-precision.json"
fi
step tiny-decoder 90 $PY scripts/tiny_decoder_bench.py --device "$DEVICE" --dtype bf16 --frames 21 --size 480 832 \
    --repeats 3 --json "$out/tiny-decoder.json"
step self-forcing-decode-fp32-sequential 70 $nv bench speed --model $sf $common --methods none --repeats 2 --decode \
    --vae-dtype fp32 --no-overlap-decode --json "$out/speed-self-forcing-decode-fp32-sequential.json"
if $nv bench speed --help 2>/dev/null | grep -q -- "--compile"; then
    off=$($nv bench speed --help | grep -q -- "--no-compile" && echo "--no-compile" || echo "")
    step compile-on 150 $nv bench speed --model $causvid $common --methods none nasa --repeats 2 --compile \
        --json "$out/speed-causvid-compile-on.json"
    step compile-off 60 $nv bench speed --model $causvid $common --methods none nasa --repeats 2 $off \
        --json "$out/speed-causvid-compile-off.json"
else
    log "compile: bench speed has no --compile here; skipped"
fi

$PY - "$out" <<'EOF' | tee "$out/summary.md"
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
print("| run | attention | compile | VAE | method | s / video | fps | fps DiT | first block s | TFLOP/s | of peak | ratio |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
for f in sorted(out.glob("speed-*.json")):
    r = json.loads(f.read_text())
    vae = f"{r.get('vae_dtype')} {'overlapped' if r.get('overlap_decode') else 'sequential'}" if r["decode"] else "-"
    for m, v in r["methods"].items():
        tf, share = v.get("achieved_tflops"), v.get("peak_share")
        print(f"| {f.stem[6:]} | {r.get('attention')} | {r.get('compile')} | {vae} | {m} | {v['median_s']:.3f} | "
              f"{v['fps']:.1f} | {v['fps_without_decode'] or 0:.1f} | {v['first_block_s']:.3f} | "
              f"{'-' if tf is None else f'{tf:.3g}'} | {'-' if share is None else f'{share:.0%}'} | {v['ratio']:.3f} |")
EOF
log "done in $((SECONDS - start))s; figures in $out"
