#!/usr/bin/env bash
# Create .venv and install nasa-video into it (idempotent: skips the install when pyproject.toml is unchanged).
# TORCH_SPEC picks the torch build: the default pins the CPU wheel this project is tested with;
# on a GPU machine use e.g. TORCH_SPEC="torch>=2.4" (and pip install -e '.[gpu]' for flash-attn).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
# EXTRAS: the optional parts to install beside the test tools (test.sh adds cluster, for serve --ray's tests)
EXTRAS=${EXTRAS:-dev}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
stamp=".venv/.nasa-video-installed"
want="$(cat pyproject.toml) $TORCH_SPEC"
# Installed extras are kept (a test run's cluster extra is not undone by the next generate's set-up).
have=""
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    have=$(cat .venv/.nasa-video-extras 2>/dev/null || true)
fi
missing=""
for extra in ${EXTRAS//,/ }; do
    case ",$have," in *",$extra,"*) ;; *) missing="$missing,$extra" ;; esac
done
if [ -n "$missing" ] || [ -z "$have" ]; then
    EXTRAS=$(echo "$have$missing" | sed 's/^,//')
    echo "setup: installing nasa-video and its dependencies into .venv (first use only; pip's log: .venv/pip.log)"
    {
        .venv/bin/python -m pip install -q --upgrade pip
        .venv/bin/python -m pip install -q "$TORCH_SPEC"
        .venv/bin/python -m pip install -q -e ".[$EXTRAS]"
    } > .venv/pip.log 2>&1 || true
    check="import nasa_video, torch, diffusers, transformers, decord, imageio_ffmpeg"
    case ",$EXTRAS," in *",cluster,"*) check="$check, ray.serve" ;; esac
    .venv/bin/python -c "$check" 2>>.venv/pip.log \
        || { tail -n 40 .venv/pip.log >&2; echo "setup: the install failed (the end of .venv/pip.log is above)" >&2; exit 1; }
    printf '%s' "$want" > "$stamp"
    printf '%s' "$EXTRAS" > .venv/.nasa-video-extras
fi
