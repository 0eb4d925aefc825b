"""The one interface every metric meets: a name, and score(run folder) -> dict.

A run folder is what eval/jobs.py writes (manifest.json, videos/<method label>/<stem>-<i>.mp4 each with its
sidecar .json). The metrics here: ClipMetric (CLIP+ / CLIP-, clip.py), RemovalJudge (CLIP zero-shot removal
success, removal.py), VBenchLong (vbench.py). A new metric is any object with these two members.
"""
from __future__ import annotations

import os
from typing import Protocol, runtime_checkable


@runtime_checkable
class Metric(Protocol):
    name: str

    def score(self, run: str | os.PathLike) -> dict:
        """Scores of the finished videos under run/videos, per method label (and whatever else the metric
        reports); a JSON-ready dict."""
        ...
