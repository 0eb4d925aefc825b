#!/usr/bin/env bash
# Set up (if needed) and run the whole offline CPU test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=${EXTRAS:-dev,cluster} bash scripts/setup.sh
# The live page's browser test needs Debian's chromium + chromedriver; install them when we can (root, apt),
# otherwise that one test skips and says why. NASA_VIDEO_NO_BROWSER=1 skips the install.
if [ -z "${NASA_VIDEO_NO_BROWSER:-}" ] && ! command -v chromedriver >/dev/null && command -v apt-get >/dev/null \
        && [ "$(id -u)" = 0 ]; then
    echo "test.sh: installing chromium + chromium-driver for the browser test (apt-get)"
    { timeout 600 apt-get update -qq && DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -qq \
        --no-install-recommends chromium chromium-driver; } >/tmp/nasa-video-apt.log 2>&1 \
        || echo "test.sh: could not install chromium (see /tmp/nasa-video-apt.log); the browser test will skip"
fi
exec .venv/bin/python -m pytest tests "$@"
