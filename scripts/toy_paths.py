"""Do the bundled model's shapes follow the paths their captions ask for? For the removal benchmark's positives
(no guidance), each named object's detected centroid is compared, frame by frame, with the centroid of the same
scene rendered exactly; the mean distance per object is grouped by the scene's motion.

    .venv/bin/python scripts/toy_paths.py [--pairs 48] [--seeds 2]

A model that cannot tell which way a scene moves draws the average of the paths: a shape that stalls mid-column
(mean distance about 2.7 px over an 11-frame clip), blurs at the clip's ends and jumps.
"""
from __future__ import annotations

import argparse
from collections import defaultdict

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=48)
    parser.add_argument("--seeds", type=int, default=2)
    args = parser.parse_args()

    from nasa_video.pipeline import StreamingGenerator
    from nasa_video.toy.detect import regions
    from nasa_video.toy.removal import benchmark_rows, object_tracks
    from nasa_video.toy.world import render, scene_from_caption

    gen = StreamingGenerator.from_config("toy", device="cpu")
    distances = defaultdict(list)  # motion -> mean distance of each drawn object, px
    missing = defaultdict(int)
    for positive in list(dict.fromkeys(r.positive for r in benchmark_rows()))[:args.pairs]:
        scene = scene_from_caption(positive)
        for seed in range(args.seeds):
            video = np.concatenate([c.frames for c in gen.stream(positive, None, 0, "none", seed=seed)])
            drawn = object_tracks(regions(video))
            truth = object_tracks(regions(render(scene, len(video))[0]))
            for thing in scene.things:
                steps = [np.hypot(d.x - t.x, d.y - t.y)
                         for d, t in zip(drawn[thing.name], truth[thing.name]) if d is not None]
                if len(steps) < len(video) / 2:
                    missing[thing.motion or "still"] += 1
                    continue
                distances[thing.motion or "still"].append(float(np.mean(steps)))
    print("| scene | objects | mean distance from the true path | objects within 1 px | not drawn |")
    print("|---|---|---|---|---|")
    for motion in ("still", "up", "down"):
        d = np.array(distances[motion])
        print(f"| {motion} | {len(d)} | {d.mean():.2f} px | {100 * (d <= 1).mean():.1f}% | {missing[motion]} |")


if __name__ == "__main__":
    main()
