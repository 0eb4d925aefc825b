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
