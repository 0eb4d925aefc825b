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

import numpy as np

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


def plan_removal(pairs: list[tuple[str, str, str]], methods: list[tuple[str, float]], samples: int,
                 base_seed: int = 0) -> list[VideoJob]:
    """(positive, negative concept, contrast) pairs: the negative prompt is the concept itself."""
    return [VideoJob(m, float(s), pos, i, base_seed + 1000 * k + i, neg,
                     name=f"{video_stem(pos, 120)} -- minus {video_stem(neg, 40)}")
            for (m, s) in methods for k, (pos, neg, _) in enumerate(pairs) for i in range(samples)]


def judge_removal(scorer, jobs: list[VideoJob], pairs, out: Path, threshold: float = 0.5,
                  progress: bool = True) -> dict:
    """Removal success per method and per pair, with CLIP+ / CLIP- of each video, from the finished videos."""
    from tqdm import tqdm

    from .clip import removal_success
    from ..video_io import read_video

    contrast = {(pos, neg): c for pos, neg, c in pairs}
    rows: dict[str, dict] = {}
    for job in tqdm(jobs, desc="judge", unit="video", disable=not progress):
        if not finished(job, out):
            raise UserError(f"{job.path(out)} is missing: generate first (rerun the same command)")
        frames = read_video(job.path(out))
        p = scorer.negative_probability(frames, job.negative, contrast[(job.prompt, job.negative)])
        clip = scorer.clip_plus_minus(frames, job.prompt, job.negative)
        row = rows.setdefault(job.label, {"method": job.method, "scale": job.scale, "videos": []})
        row["videos"].append({"prompt": job.prompt, "negative": job.negative, "sample": job.sample,
                              "success": removal_success(p, threshold), "negative_frames": float((p > threshold).mean()),
                              **clip})
    methods = {}
    for label, row in rows.items():
        videos = row["videos"]
        per_pair = {}
        for v in videos:
            per_pair.setdefault(f"{v['prompt']} / -{v['negative']}", []).append(v["success"])
        methods[label] = {"method": row["method"], "scale": row["scale"], "videos": len(videos),
                          "success": float(np.mean([v["success"] for v in videos])),
                          "clip_plus": float(np.mean([v["clip_plus"] for v in videos])),
                          "clip_minus": float(np.mean([v["clip_minus"] for v in videos])),
                          "per_pair": {k: float(np.mean(v)) for k, v in per_pair.items()}}
    return {"judge": {"model": str(scorer.folder), "threshold": threshold,
                      "rule": "success when at most 10% of frames show the negative"}, "methods": methods}


def methods_from_args(methods: list[str], scales: list[float], scales_for: list[str]) -> list[tuple[str, float]]:
    """--methods with --scales, or per-method --scales-for METHOD=S1,S2; every scale checked against its method."""
    from ..guidance import make_guidance

    per_method = {}
    for item in scales_for:
        name, _, values = item.partition("=")
        try:
            per_method[name] = [float(v) for v in values.split(",") if v]
        except ValueError:
            raise UserError(f"--scales-for {item!r}: use METHOD=S1,S2 with numbers") from None
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


def generate_for_evaluation(args, jobs: list[VideoJob], out: Path, extra: dict | None = None) -> dict:
    """Build the generator, write the manifest, make this rank's share of the missing videos."""
    from ..pipeline import StreamingGenerator

    rank, world = rank_and_world()
    if rank == 0 or not (out / "manifest.json").exists():
        write_manifest(out, jobs, {"model": args.model, "checkpoint": args.checkpoint, "wan": args.wan,
                                   "world_size": world, **(extra or {})})
    mine = shard(jobs, rank, world)
    if all(finished(j, out) for j in mine):
        return {"planned": len(mine), "skipped": len(mine), "made": 0, "rank": rank, "world": world}
    gen = StreamingGenerator.from_config(args.model, args.checkpoint, args.wan, args.device or generation_device(),
                                         args.dtype)
    for text in sorted({t for j in mine for t in (j.prompt, j.negative) if t}):
        gen.text.encode(text)  # a prompt over the token limit fails now, not after hours of videos
    if rank == 0:
        manifest = json.loads((out / "manifest.json").read_text())
        if "config" not in manifest:
            from omegaconf import OmegaConf
            manifest["config"] = OmegaConf.to_container(gen.cfg, resolve=True)
            write_json(out / "manifest.json", manifest)
    return {**run_jobs(gen, mine, out, progress=rank == 0), "rank": rank, "world": world}
