"""Removal on real models: the paper's prompt pairs, generated as a resumable run (jobs.py) and judged frame by
frame with CLIP zero-shot (clip.py): a video succeeds when at most 10% of its frames show the negative concept.
The bundled model's removal benchmark, with ground truth instead of a judge, is nasa_video/toy/removal.py.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import UserError
from .jobs import VideoJob, finished, video_stem

SHOWN_FRAMES_MAX = 0.1

# The paper's image pairs, and video pairs with a concrete contrast for the zero-shot judge.
REMOVAL_PAIRS = [
    # (positive prompt, negative concept, contrast concept)
    ("A photo of a person", "male", "female"),
    ("A photo of a person", "female", "male"),
    ("A photo of a person", "young", "old"),
    ("A photo of a person", "old", "young"),
    ("A photo of a pet", "cat", "dog"),
    ("A photo of a pet", "dog", "cat"),
    ("A video of a pet running on the grass", "dog", "cat"),
    ("A video of a person dancing in a studio", "man", "woman"),
    ("A video of a vehicle driving on a road", "car", "motorcycle"),
    ("A video of a mountain landscape", "snow", "green grass"),
]


def removal_success(probabilities: np.ndarray, threshold: float = 0.5) -> bool:
    return float((probabilities > threshold).mean()) <= SHOWN_FRAMES_MAX


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


class RemovalJudge:
    """Removal success (and CLIP+ / CLIP-) per method and per pair, over the planned removal videos of a run."""

    name = "removal"

    def __init__(self, scorer, jobs: list[VideoJob], pairs=REMOVAL_PAIRS, threshold: float = 0.5,
                 progress: bool = True):
        self.scorer, self.jobs, self.pairs, self.threshold, self.progress = scorer, jobs, pairs, threshold, progress

    def score(self, run: str | os.PathLike) -> dict:
        return judge_removal(self.scorer, self.jobs, self.pairs, Path(run), self.threshold, self.progress)


def removal_summary(result: dict) -> str:
    """judge_removal()'s result, one line per method."""
    return "\n".join(f"{label}: removal success {100 * r['success']:.1f}%  CLIP+ {r['clip_plus']:.2f}  "
                     f"CLIP- {r['clip_minus']:.2f}  ({r['videos']} videos)" for label, r in result["methods"].items())
