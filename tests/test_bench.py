"""FLOPs are counted on the meta device, at the real CausVid size, in seconds."""
from nasa_video.bench import flops_report, video_flops
from nasa_video.loading import load_config


def test_causvid_nasa_costs_under_five_percent():
    report = flops_report("causvid", ("none", "nasa", "cfg"))["methods"]
    assert report["none"]["flops"] > 5e14  # 1.3B parameters, 7 blocks x 4 passes of 4680 tokens
    assert 1.0 < report["nasa"]["ratio"] < 1.05
    assert report["nasa"]["memory_bytes"] > report["none"]["memory_bytes"]
    assert report["cfg"]["ratio"] == 2.0  # two full passes per step
    assert report["cfg"]["memory_bytes"] > report["none"]["memory_bytes"] + 5 * 2**30  # a second 6 GB KV cache


def test_extra_negatives_add_cross_attention_only():
    cfg = load_config("tiny")
    one, two = video_flops(cfg, "nasa", 1), video_flops(cfg, "nasa", 2)
    none = video_flops(cfg, "none")
    assert two - one == one - none > 0  # each negative adds the same attention cost


def test_speed_report_on_the_causvid_code_path():
    """The GPU script's path (random full-architecture weights, Wan VAE, no downloads), shrunk to run here."""
    from nasa_video.bench import random_weight_generator, speed_report
    small = {"generator": {"num_layers": 1}, "video": {"height": 32, "width": 32, "latent_frames": 3},
             "cache": {"capacity_frames": 3}}
    gen = random_weight_generator("causvid", "cpu", "fp32", small)
    report = speed_report(gen, ["nasa", "cfg"], repeats=1, decode=True)
    assert set(report["methods"]) == {"none", "nasa", "cfg"} and report["frames"] == 9
    assert report["methods"]["none"]["ratio"] == 1.0
    assert all(r["median_s"] > 0 and r["first_block_s"] > 0 for r in report["methods"].values())
