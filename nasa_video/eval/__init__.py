"""Evaluation: sharded, resumable video runs (jobs.py) and the metrics that score a run folder, all behind
metric.Metric (a name and score(run) -> dict): clip.py CLIP+ / CLIP- (and the zero-shot judge it uses),
removal.py the CLIP-judged removal pairs, vbench.py VBench-Long in its own environment."""
