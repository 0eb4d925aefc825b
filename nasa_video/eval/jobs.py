"""Evaluation runs that never lose finished work: a plan of (method, scale, prompt, seed) videos, split over
ranks (torchrun sets RANK / WORLD_SIZE; no process group is needed: shards are independent), each video
written atomically, finished ones skipped on a rerun, and a manifest saying what was run with which config.

Layout of an output folder (what vbench2_beta_long.VBenchLong reads, one folder per method):
    OUT/manifest.json                       the plan: model, config, methods, prompts, seeds, negative
    OUT/videos/<method label>/<prompt>-<i>.mp4
    OUT/videos/<method label>/<prompt>-<i>.json   the job, seed and timings of that video
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import UserError
from ..video_io import write_json


@dataclass(frozen=True)
class VideoJob:
    method: str
    scale: float
    prompt: str
    sample: int  # index among the samples of this prompt (the -<i> in the file name)
    seed: int
    negative: str
    name: str | None = None  # file stem when the prompt alone is not unique (removal pairs)

    @property
    def label(self) -> str:
        return self.method if self.method == "none" else f"{self.method}@{self.scale:g}"

    def path(self, out: Path) -> Path:
        return Path(out) / "videos" / self.label / f"{self.name or video_stem(self.prompt)}-{self.sample}.mp4"


def video_stem(prompt: str, limit: int = 180) -> str:
    """The prompt as VBench names its videos; characters a file system refuses are replaced, and an over-long
    prompt is cut and given a hash so two long prompts never share a name."""
    stem = re.sub(r'[\\/:*?"<>|\n\r\t]', "_", prompt.strip())
    if len(stem.encode()) > limit:
        digest = hashlib.sha1(prompt.encode()).hexdigest()[:8]
        stem = stem.encode()[:limit - 9].decode(errors="ignore") + "~" + digest
    return stem


def plan(prompts: list[str], methods: list[tuple[str, float]], samples: int, negative: str,
         base_seed: int = 0) -> list[VideoJob]:
    """Every (method, scale) x prompt x sample; the seed depends on prompt and sample only, so all methods
    start from the same noise for the same video."""
    return [VideoJob(m, float(s), p, i, base_seed + 1000 * k + i, negative)
            for (m, s) in methods for k, p in enumerate(prompts) for i in range(samples)]


def shard(jobs: list[VideoJob], rank: int, world: int) -> list[VideoJob]:
    if not 0 <= rank < world:
        raise UserError(f"rank {rank} is outside a world of {world}")
    return jobs[rank::world]


def rank_and_world() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def read_prompts(path: str | os.PathLike) -> list[str]:
    """One prompt per line (blank lines and # comments skipped), or a JSON list of strings / of objects with
    "prompt_en" (VBench's info files)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"prompt file not found: {path}")
    text = path.read_text()
    if path.suffix == ".json":
        items = json.loads(text)
        prompts = [item if isinstance(item, str) else item.get("prompt_en") or item.get("prompt") for item in items]
    else:
        prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    prompts = [p for p in dict.fromkeys(prompts) if p]  # unique, order kept
    if not prompts:
        raise UserError(f"no prompts in {path}")
    return prompts


def write_manifest(out: Path, jobs: list[VideoJob], info: dict) -> Path:
    """The plan; a rerun with a different plan in the same folder is refused (its videos would be mixed)."""
    out.mkdir(parents=True, exist_ok=True)
    manifest = {**info, "videos": len(jobs),
                "methods": sorted({j.label for j in jobs}),
                "jobs_sha1": hashlib.sha1(json.dumps([asdict(j) for j in jobs]).encode()).hexdigest()}
    path = out / "manifest.json"
    if path.exists():
        old = json.loads(path.read_text())
        if old.get("jobs_sha1") != manifest["jobs_sha1"] or old.get("model") != manifest.get("model"):
            raise UserError(f"{out} holds a different evaluation (see {path}); use another --out or delete it")
        return path
    return write_json(path, manifest)


def finished(job: VideoJob, out: Path) -> bool:
    """The MP4 and, written after it, its sidecar JSON: a run killed between the two redoes the video."""
    path = job.path(out)
    return path.exists() and path.with_suffix(".json").exists()


def run_jobs(gen, jobs: list[VideoJob], out: Path, progress: bool = True, on_done=None) -> dict:
    """Generate what is missing, in order; an interrupted run keeps every finished video and no partial one."""
    from tqdm import tqdm

    todo = [j for j in jobs if not finished(j, out)]
    done = len(jobs) - len(todo)
    bar = tqdm(total=len(jobs), initial=done, desc="videos", unit="video", disable=not progress)
    made = 0
    for job in todo:
        path = job.path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        began = time.perf_counter()
        result = gen.generate(job.prompt, path, job.negative or None, job.scale, job.method, seed=job.seed,
                              progress=False)
        if result.interrupted:  # generate() keeps partial videos for users; an evaluation must not
            path.unlink(missing_ok=True)
            raise KeyboardInterrupt
        write_json(path.with_suffix(".json"), {**asdict(job), "frames": result.frames,
                                               "seconds": round(time.perf_counter() - began, 2)})
        made += 1
        bar.update(1)
        if on_done is not None:
            on_done(job)
    bar.close()
    return {"planned": len(jobs), "skipped": done, "made": made}


def method_scales(methods: list[str], scales: list[float],
                  per_method: dict[str, list[float]] | None = None) -> list[tuple[str, float]]:
    """(method, scale) pairs: each method at `scales`, or at its own per_method[method] list ("none" once at 0);
    every scale checked against its method's range."""
    from ..guidance import make_guidance

    per_method = per_method or {}
    out = [(m, 0.0) if m == "none" else (m, s) for m in methods
           for s in ([0.0] if m == "none" else per_method.get(m, scales))]
    for method, scale in out:
        if method != "none":
            make_guidance(method).check_scale(scale)
    return out


def generation_device() -> str:
    """torchrun: one GPU per rank (LOCAL_RANK); else the first GPU, else the CPU."""
    import torch

    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"


@dataclass(frozen=True)
class ModelSpec:
    """Which generator makes the videos: a model config name or YAML, its weights, and where it runs
    (device None: cuda:LOCAL_RANK under torchrun, else the first GPU, else the CPU)."""
    model: str
    checkpoint: str | None = None
    wan: str | None = None
    device: str | None = None
    dtype: str = "auto"


def all_finished(jobs: list[VideoJob], out: Path) -> bool:
    return all(finished(j, out) for j in jobs)


def generate_for_evaluation(jobs: list[VideoJob], out: Path, spec: ModelSpec, extra: dict | None = None) -> dict:
    """Build the generator, write the manifest, make this rank's share of the missing videos."""
    from ..pipeline import StreamingGenerator

    rank, world = rank_and_world()
    if rank == 0 or not (out / "manifest.json").exists():
        write_manifest(out, jobs, {"model": spec.model, "checkpoint": spec.checkpoint, "wan": spec.wan,
                                   "world_size": world, **(extra or {})})
    mine = shard(jobs, rank, world)
    if all_finished(mine, out):
        return {"planned": len(mine), "skipped": len(mine), "made": 0, "rank": rank, "world": world}
    gen = StreamingGenerator.from_config(spec.model, spec.checkpoint, spec.wan, spec.device or generation_device(),
                                         spec.dtype)
    for text in sorted({t for j in mine for t in (j.prompt, j.negative) if t}):
        gen.text.encode(text)  # a prompt over the token limit fails now, not after hours of videos
    if rank == 0:
        manifest = json.loads((out / "manifest.json").read_text())
        if "config" not in manifest:
            from omegaconf import OmegaConf
            manifest["config"] = OmegaConf.to_container(gen.cfg, resolve=True)
            write_json(out / "manifest.json", manifest)
    return {**run_jobs(gen, mine, out, progress=rank == 0), "rank": rank, "world": world}
