#!/usr/bin/env bash
# Create .venv and install nasa-video into it (idempotent: skips the install when pyproject.toml is unchanged).
# TORCH_SPEC picks the torch build: the default pins the CPU wheel this project is tested with;
# on a GPU machine use e.g. TORCH_SPEC="torch>=2.4" (and pip install -e '.[gpu]' for flash-attn).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
stamp=".venv/.nasa-video-installed"
want="$(cat pyproject.toml) $TORCH_SPEC"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    .venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
    .venv/bin/python -m pip install -q "$TORCH_SPEC" 2>&1 | grep -v "^WARNING: Location" || true
    .venv/bin/python -m pip install -q -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" || true
    .venv/bin/python -c "import nasa_video, torch, diffusers, transformers, decord, imageio_ffmpeg" \
        || { echo "setup: the install failed (see pip's output above)" >&2; exit 1; }
    printf '%s' "$want" > "$stamp"
fi
