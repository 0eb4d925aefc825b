#!/usr/bin/env bash
# Set up (if needed) and run the whole offline CPU test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest tests "$@"
