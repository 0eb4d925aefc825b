"""Make nasa-video importable on a machine that has torch (+ CUDA) but no internet, from a folder of wheels
prepared beforehand with scripts/gpu_wheels.sh. Only what is missing is installed, into a target folder that
goes on PYTHONPATH; the installed torch (and numpy, and anything torch brought) is never replaced.

    python scripts/gpu_deps.py --wheels .whl --target /tmp/nasa-video-site     (prints what it did)

Pass 1 installs the wheels whose distribution is not installed at all. If `import diffusers, omegaconf,
transformers` (and diffusers' AutoencoderKLWan) still fails, pass 2 also installs the wheels whose version
differs from an installed one (too old a huggingface_hub, say), except the never-replaced ones.
Uses `pip install --no-index --no-deps --target` when pip is there, else unpacks the wheels (a wheel is a zip).
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

NEVER = re.compile(r"^(torch|triton|numpy|nvidia-.*|pytorch-triton.*|setuptools|pip|wheel)$")
CHECK = "import diffusers, omegaconf, transformers, safetensors; from diffusers import AutoencoderKLWan"


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_dist(path: Path) -> tuple[str, str]:
    name, version = path.name.split("-")[:2]
    return normalise(name), version


def installed_version(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def imports_ok(target: Path) -> tuple[bool, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(target)] + os.environ.get("PYTHONPATH", "").split(os.pathsep)))
    run = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True)
    return run.returncode == 0, run.stderr.strip().splitlines()[-1] if run.stderr.strip() else ""


def install(wheels: list[Path], target: Path) -> None:
    if not wheels:
        return
    target.mkdir(parents=True, exist_ok=True)
    has_pip = subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True).returncode == 0
    if has_pip:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--upgrade",
                        "--target", str(target)] + [str(w) for w in wheels], check=True)
        return
    for wheel in wheels:  # no pip: a wheel's files are its zip's, with *.data/{purelib,platlib} folded in
        with zipfile.ZipFile(wheel) as z:
            for member in z.namelist():
                parts = member.split("/")
                if parts[0].endswith(".data") and len(parts) > 2 and parts[1] in ("purelib", "platlib"):
                    out = target.joinpath(*parts[2:])
                elif parts[0].endswith(".data"):
                    continue
                else:
                    out = target / member
                if member.endswith("/"):
                    continue
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(z.read(member))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--wheels", default=".whl")
    p.add_argument("--target", default="/tmp/nasa-video-site")
    args = p.parse_args()
    target = Path(args.target)
    ok, error = imports_ok(target)
    if ok:
        print("gpu_deps: everything imports; nothing installed")
        return 0
    wheels = sorted(Path(args.wheels).glob("*.whl"))
    if not wheels:
        print(f"gpu_deps: imports fail ({error}) and {args.wheels} holds no wheels: prepare it with "
              f"scripts/gpu_wheels.sh on a machine with the registries", file=sys.stderr)
        return 1
    dists = [(w, *wheel_dist(w)) for w in wheels if not NEVER.match(wheel_dist(w)[0])]
    missing = [w for w, name, _ in dists if installed_version(name) is None]
    install(missing, target)
    print(f"gpu_deps: installed {len(missing)} missing: {', '.join(n for w, n, _ in dists if w in missing) or '-'}")
    ok, error = imports_ok(target)
    if not ok:
        differing = [w for w, name, version in dists if w not in missing and installed_version(name) != version]
        install(differing, target)
        print(f"gpu_deps: imports failed ({error}); installed {len(differing)} differing versions: "
              f"{', '.join(wheel_dist(w)[0] + '==' + wheel_dist(w)[1] for w in differing) or '-'}")
        ok, error = imports_ok(target)
    if not ok:
        print(f"gpu_deps: still failing: {error}", file=sys.stderr)
        return 1
    print(f"gpu_deps: ok; put {target} on PYTHONPATH")
    return 0


if __name__ == "__main__":
    sys.exit(main())
