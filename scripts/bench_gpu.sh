#!/usr/bin/env bash
# Speed figures on a lent GPU machine that has torch + CUDA but no internet, in under 8 minutes:
#   bash scripts/bench_gpu.sh [outdir]          (outdir: default $OUT, else bench-gpu)
# Uses the python that has torch (PYTHON, default python3): no venv, no downloads. What nasa-video needs beside
# torch (diffusers, omegaconf, transformers, ...; torchao for FP8, easydict/ftfy for upstream) is installed only if
# missing, from the wheel folder WHEELS (default .whl, prepared on a machine with the registries by
# scripts/gpu_wheels.sh) into SITE (a temporary folder put on PYTHONPATH). Random weights at full size (480x832,
# 21 latent frames = 81 frames), bf16, eager blocks (--no-compile) unless a row says compile.
# Steps, most important first, each under `timeout`; a step that would end past BUDGET seconds is skipped:
#   1. Self-Forcing 4 steps + the tiny decoder (TAEHV, overlapped): none nasa cfg
#   2. the same with CUDA graphs;  3. with the Wan VAE in bf16 instead of the tiny decoder
#   4. upstream Self-Forcing's own loop beside nasa-video none / NASA (needs its checkout: NASA_VIDEO_SELF_FORCING,
#      default third_party/self_forcing; carry it), DiT only
#   5. FP8 (torchao) + tiny decoder;  6. torch.compile + CUDA graphs + tiny decoder
#   7. CausVid 3 steps DiT only with one block's kernel profile: none nasa nag vsf cfg
#   8. the FLOPs table;  9. tiny decoder vs Wan VAE decode alone
# It ends with one table (summary.md) naming the GPU, attention backend, decoder, compile, graphs and FP8 of every row.
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

if [ -n "${SMOKE:-}" ]; then tae=""; else tae="--vae tae"; fi  # the tiny config's latents are not Wan's
eager="--no-compile"
SF_REPO=${NASA_VIDEO_SELF_FORCING:-third_party/self_forcing}

step sf-tae 100 $nv bench speed --model $sf $common $eager --methods none nasa cfg --repeats $rep_sf --decode $tae \
    --vae-dtype auto --json "$out/speed-sf-tae.json"
step sf-tae-graphs 100 $nv bench speed --model $sf $common $eager --methods none nasa cfg --repeats $rep_sf --decode \
    $tae --vae-dtype auto --cuda-graphs --json "$out/speed-sf-tae-graphs.json"
step sf-wan-vae 100 $nv bench speed --model $sf $common $eager --methods none nasa cfg --repeats $rep_sf --decode \
    --vae-dtype auto --json "$out/speed-sf-wan-vae.json"
if [ -f "$SF_REPO/pipeline/causal_inference.py" ]; then
    step upstream 110 $PY scripts/upstream_bench.py --repo "$SF_REPO" --device "$DEVICE" --repeats $rep_sf \
        ${SMOKE:+--smoke} --json "$out/upstream.json"
else
    log "upstream: skipped (no Self-Forcing checkout at $SF_REPO; set NASA_VIDEO_SELF_FORCING or carry third_party/self_forcing)"
fi
step sf-tae-fp8 80 $nv bench speed --model $sf $common $eager --methods none nasa --repeats $rep_sf --decode $tae \
    --vae-dtype auto --fp8 --json "$out/speed-sf-tae-fp8.json"
step sf-tae-compile-graphs 150 $nv bench speed --model $sf $common --compile --methods none nasa --repeats $rep_sf \
    --decode $tae --vae-dtype auto --cuda-graphs --json "$out/speed-sf-tae-compile-graphs.json"
step causvid-dit 100 $nv bench speed --model $causvid $common $eager --methods $methods --repeats $rep \
    --json "$out/speed-causvid-dit.json" --profile "$out/kernels-causvid.json"
step flops 60 $nv bench flops --model $causvid --json "$out/flops-causvid.json"
step tiny-decoder 60 $PY scripts/tiny_decoder_bench.py --device "$DEVICE" --dtype bf16 --frames 21 \
    $([ -n "$big" ] && echo "--size 480 832" || echo "--size 32 32") --repeats 2 --json "$out/tiny-decoder.json"

$PY - "$out" <<'EOF' | tee "$out/summary.md"
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
print("| run | GPU | attention | decoder | compile | graphs | FP8 | method | s / video | fps | fps DiT | first block s "
      "| ratio to none | error vs eager |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for f in sorted(out.glob("speed-*.json")):
    r = json.loads(f.read_text())
    decoder = f"{r.get('decoder')} {r.get('vae_dtype')}{' overlapped' if r.get('overlap_decode') else ''}" \
        if r["decode"] else "- (DiT only)"
    errors = "; ".join(f"{k} {v['rel_rms']:.2g}{'' if v['ok'] else ' OVER'}" for k, v in r.get("errors", {}).items()) or "-"
    for m, v in r["methods"].items():
        print(f"| {f.stem[6:]} | {r['device_name']} | {r.get('attention')} | {decoder} | {'on' if r.get('compile') else 'off'} "
              f"| {'on' if r.get('cuda_graphs') else 'off'} | {'on' if r.get('fp8') else 'off'} | {m} | {v['median_s']:.3f} "
              f"| {v['fps']:.1f} | {v['fps_without_decode'] or 0:.1f} | {v['first_block_s']:.3f} | {v['ratio']:.3f} | {errors} |")
up = out / "upstream.json"
if up.exists():
    r = json.loads(up.read_text())
    for name, label in (("none", "nasa-video none"), ("nasa", "nasa-video NASA"), ("upstream", "upstream Self-Forcing")):
        print(f"| upstream side by side | {r['device_name']} | {r['attention']} | - (DiT only) | off | off | off | {label} "
              f"| {r['median_s'][name]:.3f} | {r['fps'][name]:.1f} | {r['fps'][name]:.1f} | - | - | - |")
    print(f"\nnasa-video none / upstream = {r['none_over_upstream']:.3f}, nasa-video NASA / upstream = "
          f"{r['nasa_over_upstream']:.3f} (same GPU, same run{', SMOKE sizes' if r['smoke'] else ''})")
EOF
log "done in $((SECONDS - start))s; figures in $out"
