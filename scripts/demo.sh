#!/usr/bin/env bash
# Set up (if needed) and generate a video with a negative prompt on the CPU with the default model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
mkdir -p outputs
exec .venv/bin/nasa-video generate --prompt "a red circle and a blue square" --negative "red circle" \
    --out outputs/demo.mp4 "$@"
