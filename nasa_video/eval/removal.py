"""Removal on real models: the paper's prompt pairs, generated as a resumable run (jobs.py) and judged frame by
frame with CLIP zero-shot (clip.py). A video succeeds when the negative is removed (at most 10% of its frames
show it) and the prompt's subject is still there (at most 10% of its frames lack it): a blank or off-prompt
video shows no cat either, and must not count as removing one.
The bundled model's removal benchmark, with ground truth instead of a judge, is nasa_video/toy/removal.py.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from ..errors import UserError
from .jobs import VideoJob, finished, video_stem

SHOWN_FRAMES_MAX = 0.1
MISSING_FRAMES_MAX = 0.1  # the same slack for the subject: a judge error or a cut on a few frames

# The paper's image pairs, and video pairs with a concrete contrast for the zero-shot judge.
REMOVAL_PAIRS = [
    # (positive prompt, negative concept, contrast concept, subject that must stay)
    ("A photo of a person", "male", "female", "a person"),
    ("A photo of a person", "female", "male", "a person"),
    ("A photo of a person", "young", "old", "a person"),
    ("A photo of a person", "old", "young", "a person"),
    ("A photo of a pet", "cat", "dog", "a pet"),
    ("A photo of a pet", "dog", "cat", "a pet"),
    ("A video of a pet running on the grass", "dog", "cat", "a pet"),
    ("A video of a person dancing in a studio", "man", "woman", "a person"),
    ("A video of a vehicle driving on a road", "car", "motorcycle", "a vehicle"),
    ("A video of a mountain landscape", "snow", "green grass", "mountains"),
]


def pair_subject(pair: tuple) -> str:
    """The pair's subject: its fourth item, else the positive prompt without "A photo of" / "A video of"."""
    if len(pair) > 3:
        return pair[3]
    return re.sub(r"^an? (photo|video) of ", "", pair[0].strip(), flags=re.IGNORECASE)


def negative_removed(probabilities: np.ndarray, threshold: float = 0.5) -> bool:
    """probabilities: per frame, the negative against its contrast."""
    return float((probabilities > threshold).mean()) <= SHOWN_FRAMES_MAX


def subject_present(probabilities: np.ndarray, threshold: float = 0.5) -> bool:
    """probabilities: per frame, the subject against an empty scene."""
    return float((probabilities <= threshold).mean()) <= MISSING_FRAMES_MAX


def plan_removal(pairs: list[tuple], methods: list[tuple[str, float]], samples: int,
                 base_seed: int = 0) -> list[VideoJob]:
    """(positive, negative concept, contrast[, subject]) pairs: the negative prompt is the concept itself."""
    return [VideoJob(m, float(s), pos, i, base_seed + 1000 * k + i, neg,
                     name=f"{video_stem(pos, 120)} -- minus {video_stem(neg, 40)}")
            for (m, s) in methods for k, (pos, neg, *_) in enumerate(pairs) for i in range(samples)]


def judge_video(scores: dict, threshold: float, subject_threshold: float) -> dict:
    """One video's verdicts from its per-frame probabilities (scorer.video_scores()): a success needs the
    negative removed and the subject present."""
    removed = negative_removed(scores["negative"], threshold)
    present = subject_present(scores["subject"], subject_threshold)
    return {"success": removed and present, "removed": removed, "subject_present": present,
            "negative_frames": float((scores["negative"] > threshold).mean()),
            "subject_frames": float((scores["subject"] > subject_threshold).mean()),
            "clip_plus": scores["clip_plus"], "clip_minus": scores["clip_minus"]}


def judge_removal(scorer, jobs: list[VideoJob], pairs, out: Path, threshold: float = 0.5,
                  progress: bool = True, subject_threshold: float = 0.5) -> dict:
    """Removal success (negative removed and subject present), each part alone, and CLIP+ / CLIP- of each
    video, per method and per pair, from the finished videos."""
    from tqdm import tqdm

    from ..video_io import read_video

    concepts = {(pair[0], pair[1]): (pair[2], pair_subject(pair)) for pair in pairs}
    rows: dict[str, dict] = {}
    for job in tqdm(jobs, desc="judge", unit="video", disable=not progress):
        if not finished(job, out):
            raise UserError(f"{job.path(out)} is missing: generate first (rerun the same command)")
        contrast, subject = concepts[(job.prompt, job.negative)]
        scores = scorer.video_scores(read_video(job.path(out)), job.prompt, job.negative, contrast, subject)
        row = rows.setdefault(job.label, {"method": job.method, "scale": job.scale, "videos": []})
        row["videos"].append({"prompt": job.prompt, "negative": job.negative, "subject": subject,
                              "sample": job.sample, **judge_video(scores, threshold, subject_threshold)})
    methods = {}
    for label, row in rows.items():
        videos = row["videos"]
        per_pair = {}
        for v in videos:
            per_pair.setdefault(f"{v['prompt']} / -{v['negative']}", []).append(v["success"])
        methods[label] = {"method": row["method"], "scale": row["scale"], "videos": len(videos),
                          **{k: float(np.mean([v[k] for v in videos]))
                             for k in ("success", "removed", "subject_present", "clip_plus", "clip_minus")},
                          "per_pair": {k: float(np.mean(v)) for k, v in per_pair.items()},
                          "per_video": videos}  # which videos failed, and on which part
    return {"judge": {"model": str(scorer.folder), "threshold": threshold, "subject_threshold": subject_threshold,
                      "rule": "success when at most 10% of frames show the negative and at most 10% lack the "
                              "subject"}, "methods": methods}


class RemovalJudge:
    """Removal success (and CLIP+ / CLIP-) per method and per pair, over the planned removal videos of a run."""

    name = "removal"

    def __init__(self, scorer, jobs: list[VideoJob], pairs=REMOVAL_PAIRS, threshold: float = 0.5,
                 progress: bool = True, subject_threshold: float = 0.5):
        self.scorer, self.jobs, self.pairs, self.threshold, self.progress = scorer, jobs, pairs, threshold, progress
        self.subject_threshold = subject_threshold

    def score(self, run: str | os.PathLike) -> dict:
        return judge_removal(self.scorer, self.jobs, self.pairs, Path(run), self.threshold, self.progress,
                             self.subject_threshold)


def removal_summary(result: dict) -> str:
    """judge_removal()'s result, one line per method."""
    return "\n".join(f"{label}: removal success {100 * r['success']:.1f}% (removed {100 * r['removed']:.1f}%, "
                     f"subject present {100 * r['subject_present']:.1f}%)  CLIP+ {r['clip_plus']:.2f}  "
                     f"CLIP- {r['clip_minus']:.2f}  ({r['videos']} videos)" for label, r in result["methods"].items())
