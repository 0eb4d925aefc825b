"""FLOPs are counted on the meta device, at the real CausVid size, in seconds."""
import pytest

import nasa_video.bench as bench
from nasa_video.bench import flops_report, memory_bytes, video_flops
from nasa_video.loading import load_config

CAUSVID_LAYERS = 30


def causvid_with(layers: int):
    return load_config("causvid", {"generator": {"num_layers": layers}})


def test_causvid_nasa_costs_under_five_percent():
    """The 30-layer count, exactly, from 1, 2 and 3 layers: every Wan block (layer) has the same shapes at every
    step, so the FLOPs are affine in the layer count (checked here on 1, 2, 3), at the real width, resolution,
    7 blocks x 4 passes and growing KV cache."""
    assert int(load_config("causvid").generator.num_layers) == CAUSVID_LAYERS
    counts = {m: [video_flops(causvid_with(n), m) for n in (1, 2, 3)] for m in ("none", "nasa")}
    full = {}
    for method, (one, two, three) in counts.items():
        per_layer = two - one
        assert three - two == per_layer > 0  # affine in the layer count: the extrapolation is exact
        full[method] = one + (CAUSVID_LAYERS - 1) * per_layer
    assert full["none"] > 5e14  # 1.3B parameters, 7 blocks x 4 passes of 4680 tokens
    assert 1.0 < full["nasa"] / full["none"] < 1.05
    cfg = load_config("causvid")
    assert memory_bytes(cfg, "nasa") > memory_bytes(cfg, "none")
    assert memory_bytes(cfg, "cfg") > memory_bytes(cfg, "none") + 5 * 2**30  # a second 6 GB KV cache


def test_flops_report_ratios(monkeypatch):
    """The report's ratios are each method's count over none's: CFG exactly two full passes, NASA a few percent
    (the CausVid config with one layer, so the report's own path runs in seconds)."""
    real = bench.load_config
    monkeypatch.setattr(bench, "load_config", lambda model, overrides=None: real(model, {"generator": {"num_layers": 1}}))
    report = flops_report("causvid", ("none", "nasa", "cfg"))["methods"]
    one_layer = causvid_with(1)
    assert report["none"]["flops"] == video_flops(one_layer, "none")
    assert report["nasa"]["flops"] == video_flops(one_layer, "nasa")
    assert report["cfg"]["ratio"] == 2.0  # two full passes per step
    assert report["nasa"]["ratio"] == report["nasa"]["flops"] / report["none"]["flops"]
    assert 1.0 < report["nasa"]["ratio"] < 1.05
    assert report["cfg"]["memory_bytes"] > report["none"]["memory_bytes"]


def test_extra_negatives_add_cross_attention_only():
    cfg = load_config("tiny")
    one, two = video_flops(cfg, "nasa", 1), video_flops(cfg, "nasa", 2)
    none = video_flops(cfg, "none")
    assert two - one == one - none > 0  # each negative adds the same attention cost


def test_speed_report_statistics(monkeypatch):
    """Warm-up runs are dropped, the method order rotates each round, medians and ratios to none's median."""
    times = {"none": iter([100.0, 1.0, 3.0, 2.0]), "cfg": iter([100.0, 2.0, 6.0, 4.0])}
    calls = []

    def fake_time_video(gen, method, decode):
        calls.append(method)
        return next(times[method]), 0.5

    class Gen:
        cfg = load_config("tiny")
        temporal_stride = 4
        device, dtype = "cpu", "fp32"

    monkeypatch.setattr(bench, "time_video", fake_time_video)
    report = bench.speed_report(Gen(), ["cfg"], repeats=3)
    assert calls == ["none", "cfg", "none", "cfg", "cfg", "none", "none", "cfg"]  # warm-up, then rotated rounds
    none, cfg = report["methods"]["none"], report["methods"]["cfg"]
    assert (none["median_s"], none["min_s"], none["max_s"]) == (2.0, 1.0, 3.0)
    assert (cfg["median_s"], cfg["ratio"], none["ratio"]) == (4.0, 2.0, 1.0)
    assert cfg["fps"] == report["frames"] / 4.0 and cfg["first_block_s"] == 0.5


def test_speed_report_on_the_causvid_code_path():
    """The GPU script's path (random full-architecture weights, Wan VAE, no downloads), shrunk to run here."""
    from nasa_video.bench import random_weight_generator, speed_report
    small = {"generator": {"num_layers": 1}, "video": {"height": 32, "width": 32, "latent_frames": 3},
             "cache": {"capacity_frames": 3}}
    gen = random_weight_generator("causvid", "cpu", "fp32", small)
    report = speed_report(gen, ["nasa", "cfg"], repeats=1, decode=True)
    assert set(report["methods"]) == {"none", "nasa", "cfg"} and report["frames"] == 9
    methods = report["methods"]
    for r in methods.values():
        assert r["median_s"] > 0 and r["first_block_s"] > 0
        assert r["ratio"] == pytest.approx(r["median_s"] / methods["none"]["median_s"])
        assert r["fps"] == pytest.approx(9 / r["median_s"])
