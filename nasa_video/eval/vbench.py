"""VBench-Long scoring in its own Python environment.

vbench 0.1.5 pins transformers 4.33.2 and numpy<2, which cannot live beside this project's diffusers, so
the VBenchLong metric (`nasa-video eval vbench-long`) creates (once) and reuses a virtual environment for it
and runs nasa_video/eval/vbench_runner.py there, a standalone script that imports only vbench. Weights come from
$VBENCH_CACHE_DIR (default ~/.cache/vbench) with local=True, so scoring runs offline once they are in place.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from ..errors import UserError

DEFAULT_ENV = Path.home() / ".cache" / "nasa-video" / "vbench-env"
RUNNER = Path(__file__).with_name("vbench_runner.py")
# what the vbench environment needs beyond vbench itself; torch/torchvision by the machine (CUDA builds from
# PyPI on a GPU machine; NASA_VIDEO_VBENCH_TORCH overrides, e.g. "torch==2.14.1 torchvision==0.29.1")
VBENCH_SPEC = "vbench==0.1.5"
# vbench declares neither torch nor what its long-video code imports: torchvision must still have
# io.write_video (< 0.26) with PyAV < 14; vbench2_beta_long imports scenedetect and moviepy.editor (moviepy < 2);
# pyiqa must be a release that accepts transformers 4.33 (0.1.10).
VBENCH_EXTRAS = ["av<14", "scenedetect", "moviepy<2", "pyiqa==0.1.10", "openai-clip"]
DEFAULT_TORCH = "torch==2.5.1 torchvision==0.20.1"
PUBLISHED = {  # the paper's CausVid rows (VBench-Long; alpha, prompts, samples and seeds not stated)
    "CausVid (paper)": {"aesthetic_quality": 61.98, "imaging_quality": 67.12},
    "CausVid + NASA (paper)": {"aesthetic_quality": 63.33, "imaging_quality": 67.36},
}


def env_python(env: Path) -> Path:
    return env / "bin" / "python"


def ensure_env(env: Path | None = None, python: str = sys.executable, quiet: bool = True) -> Path:
    """Create the vbench environment if it is missing (minutes, several GB with torch); reuse it after."""
    env = Path(env or os.environ.get("NASA_VIDEO_VBENCH_ENV") or DEFAULT_ENV)
    stamp = env / ".nasa-video-vbench"
    if stamp.exists() and env_python(env).exists():
        return env
    torch_spec = os.environ.get("NASA_VIDEO_VBENCH_TORCH", DEFAULT_TORCH).split()
    steps = [[python, "-m", "venv", str(env)],
             [str(env_python(env)), "-m", "pip", "install", *(["-q"] if quiet else []), *torch_spec],
             [str(env_python(env)), "-m", "pip", "install", *(["-q"] if quiet else []), VBENCH_SPEC,
              *VBENCH_EXTRAS, *torch_spec]]
    for step in steps:
        done = subprocess.run(step, capture_output=quiet, text=True)
        if done.returncode != 0:
            tail = (done.stderr or "").strip().splitlines()[-3:] if quiet else []
            raise UserError(f"could not build the vbench environment at {env} ({' '.join(step[:4])} ...): "
                            f"{' | '.join(tail)}; fix the install or point NASA_VIDEO_VBENCH_ENV at a working one")
    check = subprocess.run([str(env_python(env)), "-c", "import vbench, vbench2_beta_long"], capture_output=True,
                           text=True)
    if check.returncode != 0:
        raise UserError(f"the vbench environment at {env} cannot import vbench: "
                        f"{check.stderr.strip().splitlines()[-1:]}")
    stamp.write_text(VBENCH_SPEC)
    return env


def score_methods(env: Path, videos: Path, dimensions: list[str], out: Path, device: str = "cuda") -> dict:
    """Run the runner in the vbench environment on each method folder; returns {method: {dimension: score}}."""
    results = {}
    out.mkdir(parents=True, exist_ok=True)
    for folder in sorted(p for p in videos.iterdir() if p.is_dir()):
        target = out / f"{folder.name}.json"
        if not target.exists():  # a scored method is never scored again
            cmd = [str(env_python(env)), str(RUNNER), "--videos", str(folder), "--out", str(target),
                   "--device", device, "--dimensions", *dimensions]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise UserError(f"vbench failed on {folder.name}: "
                                f"{(done.stderr or done.stdout).strip().splitlines()[-1:]}")
        results[folder.name] = json.loads(target.read_text())["scores"]
    return results


def table(results: dict, dimensions: list[str], published: bool = True) -> str:
    """Methods as rows, dimensions as columns in percent, the paper's CausVid rows beside for reference."""
    names = {"aesthetic_quality": "Aesthetic Quality", "imaging_quality": "Imaging Quality"}
    lines = ["| method | " + " | ".join(names.get(d, d) for d in dimensions) + " |",
             "|---|" + "---|" * len(dimensions)]
    for method, scores in results.items():
        lines.append(f"| {method} | " + " | ".join(f"{100 * scores[d]:.2f}" if d in scores else "-"
                                                  for d in dimensions) + " |")
    if published:
        for method, scores in PUBLISHED.items():
            lines.append(f"| {method} | " + " | ".join(f"{scores[d]:.2f}" if d in scores else "-"
                                                      for d in dimensions) + " |")
    return "\n".join(lines)


def vbench_prompts(env: Path, dimensions: list[str]) -> list[str]:
    """VBench's own prompts for these dimensions, from VBench_full_info.json in the vbench environment."""
    done = subprocess.run([str(env_python(env)), "-c", "import vbench, os; print(os.path.dirname(vbench.__file__))"],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise UserError(f"cannot import vbench in {env}: {done.stderr.strip().splitlines()[-1:]}")
    info = json.loads((Path(done.stdout.strip()) / "VBench_full_info.json").read_text())
    return list(dict.fromkeys(e["prompt_en"] for e in info if set(e.get("dimension", [])) & set(dimensions)))


class VBenchLong:
    """The VBench-Long metric: each method folder of a run scored by vbench in its own environment (built on
    first use; env None: $NASA_VIDEO_VBENCH_ENV or ~/.cache/nasa-video/vbench-env)."""

    name = "vbench-long"

    def __init__(self, dimensions: list[str], env: str | os.PathLike | None = None, device: str = "cuda"):
        self.dimensions, self.device = list(dimensions), device
        self._env_arg, self._env = env, None

    @property
    def env(self) -> Path:
        if self._env is None:
            self._env = ensure_env(self._env_arg)
        return self._env

    def prompts(self) -> list[str]:
        """VBench's own prompts for these dimensions."""
        return vbench_prompts(self.env, self.dimensions)

    def score(self, run: str | os.PathLike) -> dict:
        run = Path(run)
        results = score_methods(self.env, run / "videos", self.dimensions, run / "vbench", self.device)
        return {"dimensions": self.dimensions, "methods": results, "published": PUBLISHED}


def write_report(run: str | os.PathLike, result: dict) -> str:
    """VBenchLong's result as run/vbench_long.json and the table as run/vbench_long.md; returns the table."""
    from ..video_io import write_json

    run = Path(run)
    text = table(result["methods"], result["dimensions"])
    write_json(run / "vbench_long.json", result)
    (run / "vbench_long.md").write_text(text + "\n")
    return text
