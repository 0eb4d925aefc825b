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
    echo "setup: installing nasa-video and its dependencies into .venv (first use only; pip's log: .venv/pip.log)"
    {
        .venv/bin/python -m pip install -q --upgrade pip
        .venv/bin/python -m pip install -q "$TORCH_SPEC"
        .venv/bin/python -m pip install -q -e ".[dev]"
    } > .venv/pip.log 2>&1 || true
    .venv/bin/python -c "import nasa_video, torch, diffusers, transformers, decord, imageio_ffmpeg" 2>>.venv/pip.log \
        || { tail -n 40 .venv/pip.log >&2; echo "setup: the install failed (the end of .venv/pip.log is above)" >&2; exit 1; }
    printf '%s' "$want" > "$stamp"
fi
