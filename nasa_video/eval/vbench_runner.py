"""Score one folder of videos with VBench-Long. Runs INSIDE the vbench environment (see vbench.py):
it imports vbench only, never nasa_video.

    python vbench_runner.py --videos DIR --out RESULT.json --dimensions aesthetic_quality imaging_quality

vbench 0.1.5 facts this relies on: VBenchLong(device, full_info_dir, output_path).evaluate(...) in mode
long_custom_input splits each video into 2 s clips (vbench2_beta_long/utils.py), scores the clips and writes
{output_path}/{name}_eval_results.json as {dimension: [score, per_clip, per_video]}; the score is a fraction.
The wheel ships no configs/ folder, so the clip-length config is written here and passed by absolute path.
Videos are linked into a fresh folder first: vbench reuses any split_clip/ it finds and reads every file.
"""
import argparse
import json
import os
import tempfile

LONG_CLIPS = {"human_action": 10.0, "temporal_style": 10.0, "overall_consistency": 10.0}
DIMENSIONS = ["subject_consistency", "background_consistency", "temporal_flickering", "motion_smoothness",
              "dynamic_degree", "aesthetic_quality", "imaging_quality", "object_class", "multiple_objects",
              "human_action", "color", "spatial_relationship", "scene", "temporal_style", "appearance_style",
              "overall_consistency"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--videos", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--dimensions", nargs="+", default=["aesthetic_quality", "imaging_quality"])
    p.add_argument("--device", default="cuda")
    args = p.parse_args()

    import torch
    import vbench
    from vbench2_beta_long import VBenchLong

    full_info = os.path.join(os.path.dirname(vbench.__file__), "VBench_full_info.json")
    name = os.path.basename(os.path.normpath(args.videos)).replace("@", "_at_")
    with tempfile.TemporaryDirectory() as work:
        videos = os.path.join(work, "videos")
        os.makedirs(videos)
        for f in sorted(os.listdir(args.videos)):
            if f.endswith(".mp4"):
                os.symlink(os.path.abspath(os.path.join(args.videos, f)), os.path.join(videos, f))
        config = os.path.join(work, "clip_length.yaml")
        with open(config, "w") as fh:
            for d in DIMENSIONS:
                fh.write(f"{d}: {LONG_CLIPS.get(d, 2.0)}\n")
        results_dir = os.path.join(work, "results")
        bench = VBenchLong(torch.device(args.device), full_info, results_dir)
        bench.evaluate(videos_path=videos, name=name, dimension_list=args.dimensions, local=True, read_frame=False,
                       mode="long_custom_input", use_semantic_splitting=False, clip_length_config=config)
        with open(os.path.join(results_dir, f"{name}_eval_results.json")) as fh:
            raw = json.load(fh)
    scores = {d: float(raw[d][0]) for d in args.dimensions}
    tmp = args.out + ".partial"
    with open(tmp, "w") as fh:
        json.dump({"scores": scores, "videos": args.videos, "clips_per_dimension": {d: len(raw[d][1]) for d in raw}},
                  fh, indent=2)
    os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
