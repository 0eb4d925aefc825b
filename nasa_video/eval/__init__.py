"""Evaluation: sharded, resumable video runs (jobs.py) and the metrics that score a run folder (clip.py:
CLIP+ / CLIP- and the zero-shot judge; vbench.py: VBench-Long in its own environment)."""
