#!/usr/bin/env bash
# Prepare, on a machine that can reach PyPI, the folder of wheels scripts/bench_gpu.sh installs from on an offline
# GPU machine (which already has torch + CUDA): nasa-video's runtime dependencies but torch, for that machine's
# Python and platform, binary wheels only, with their own dependencies resolved.
#
#   bash scripts/gpu_wheels.sh [folder]          (default .whl; PYVER=3.12, PLATFORMS: the manylinux tags to accept)
#   EXTRA="imageio-ffmpeg decord" bash scripts/gpu_wheels.sh     (also what video writing / eval need)
#
# diffusers is pinned to the version the tests pass with; the rest resolve beside it (torchao: --fp8, a build that
# must suit the GPU machine's torch; easydict, ftfy: upstream Self-Forcing's modules, for the side-by-side step). The folder is ~30 MB; bring it to the GPU machine beside the
# checkout (scp, or the device tool's carry: [".whl"]). pip refuses source-only packages here (--only-binary):
# such a package needs `pip wheel --no-deps NAME -w FOLDER` run on a machine with that Python.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-.whl}
PYVER=${PYVER:-3.12}
PLATFORMS=${PLATFORMS:-"manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64"}
PINS=${PINS:-"diffusers==0.42.1 transformers omegaconf safetensors huggingface_hub tqdm torchao easydict ftfy"}
mkdir -p "$dest"
# numpy and torch's own dependencies come with torch on the GPU machine; gpu_deps.py never replaces them.
python3 -m pip download --only-binary=:all: --python-version "$PYVER" $(printf -- "--platform %s " $PLATFORMS) \
    --dest "$dest" $PINS ${EXTRA:-}
rm -f "$dest"/numpy-*.whl
ls "$dest"
du -sh "$dest"
