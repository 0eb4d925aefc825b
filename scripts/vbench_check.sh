#!/usr/bin/env bash
# The VBench-Long flow with the real vbench engine, outside CI (the vbench environment is several GB):
# builds (or reuses) the vbench env, writes random stand-in weights into a temporary VBENCH_CACHE_DIR, and runs
# the vbench test of tests/test_evaluate.py (generate with the bundled model -> vbench scores -> table).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export NASA_VIDEO_VBENCH_ENV=${NASA_VIDEO_VBENCH_ENV:-$HOME/.cache/nasa-video/vbench-env}
.venv/bin/python -c "from nasa_video.eval.vbench import ensure_env; print(ensure_env())"
exec .venv/bin/python -m pytest tests/test_evaluate.py -k real_vbench -v "$@"
