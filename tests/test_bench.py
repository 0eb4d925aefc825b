"""FLOPs are counted on the meta device, at the real CausVid size, in seconds; the speed report's figures."""
import pytest
import torch

import nasa_video.bench as bench
from nasa_video.bench import flops_report, memory_bytes, video_flops
from nasa_video.config import model_spec
from nasa_video.loading import load_config

CAUSVID_LAYERS = 30


def causvid_with(layers: int):
    return load_config("causvid", {"generator": {"num_layers": layers}})


@pytest.mark.slow
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
        return bench.VideoTiming(next(times[method]), 0.5)

    class Gen:
        cfg = load_config("tiny")
        spec = model_spec(cfg)
        temporal_stride = 4
        device, dtype = "cpu", "fp32"
        compiled = False

    monkeypatch.setattr(bench, "time_video", fake_time_video)
    report = bench.speed_report(Gen(), ["cfg"], repeats=3)
    assert calls == ["none", "cfg", "none", "cfg", "cfg", "none", "none", "cfg"]  # warm-up, then rotated rounds
    none, cfg = report["methods"]["none"], report["methods"]["cfg"]
    assert (none["median_s"], none["min_s"], none["max_s"]) == (2.0, 1.0, 3.0)
    assert (cfg["median_s"], cfg["ratio"], none["ratio"]) == (4.0, 2.0, 1.0)
    assert cfg["fps"] == report["frames"] / 4.0 and cfg["first_block_s"] == 0.5


@pytest.mark.slow
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
        assert r["denoise_s"] > 0 and r["decode_s"] > 0 and r["fps_without_decode"] == pytest.approx(9 / r["denoise_s"])
        assert r["achieved_tflops"] == pytest.approx(r["flops"] / r["denoise_s"] / 1e12) and r["flops"] > 0
        assert r["peak_share"] is None and r["peak_memory_bytes"] is None  # a CPU: no known peak, no CUDA memory
        assert r["denoise_s"] + r["decode_wait_s"] <= r["median_s"] * 1.01
    assert methods["cfg"]["flops"] == 2 * methods["none"]["flops"]
    assert (report["attention"], report["compile"], report["peak_tflops"]) == ("sdpa", False, None)
    assert report["vae_dtype"] == "float32" and report["overlap_decode"] is False


def test_speed_report_throughput_on_scripted_timings(monkeypatch):
    """Known FLOPs and timings: TFLOP/s = FLOPs / denoising time; the split denoise + waited decode + other is
    the video's time, overlap = decode - waited; no peak on a CPU."""
    runs = {"none": bench.VideoTiming(9.0, 1.0, 6.0, 4.0, 1.0), "cfg": bench.VideoTiming(15.0, 2.0, 12.0, 4.0, 1.5)}

    class Gen:
        cfg = load_config("tiny")
        spec = model_spec(cfg)
        temporal_stride = 4
        device, dtype = "cpu", "fp32"
        compiled = False
        vae_dtype, overlap_decode = torch.float32, True

    monkeypatch.setattr(bench, "time_video", lambda gen, method, decode: runs[method])
    report = bench.speed_report(Gen(), ["cfg"], repeats=1, decode=True, flops={"none": 3e12, "cfg": 6e12})
    none, cfg = report["methods"]["none"], report["methods"]["cfg"]
    assert none["achieved_tflops"] == pytest.approx(0.5) and cfg["achieved_tflops"] == pytest.approx(0.5)
    assert none["peak_share"] is None and report["peak_tflops"] is None and report["device_name"] == "cpu"
    assert (none["denoise_s"], none["decode_s"], none["decode_wait_s"], none["overlap_s"]) == (6.0, 4.0, 1.0, 3.0)
    assert none["denoise_s"] + none["decode_wait_s"] + none["other_s"] == none["median_s"] == 9.0
    assert cfg["overlap_s"] == 2.5 and cfg["ratio"] == pytest.approx(15 / 9)
    assert none["fps"] == report["frames"] / 9.0 and none["fps_without_decode"] == report["frames"] / 6.0
    assert report["overlap_decode"] is True and report["vae_dtype"] == "float32" and report["compile"] is False
    assert "TFLOP/s" in bench.format_speed_report(report)


def test_peak_share_with_a_known_chip():
    r = bench.throughput(81, [bench.VideoTiming(2.5, 0.3, 2.0, 0.0, 0.0, 10 * 2**30)], int(792e12), 989.0)
    assert r["achieved_tflops"] == pytest.approx(396.0) and r["peak_share"] == pytest.approx(396.0 / 989.0)
    assert r["peak_memory_bytes"] == 10 * 2**30


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0),
                                        ("NVIDIA H200", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0),
                                        ("NVIDIA L40S", 362.0), ("NVIDIA GeForce RTX 4090", 165.0),
                                        ("NVIDIA H100 NVL", None), ("Tesla T4", None), ("cpu", None), (None, None)])
def test_peak_table(name, peak):
    assert bench.peak_tflops(name) == peak


def test_layer_extrapolated_flops_equal_the_full_count(monkeypatch):
    cfg = load_config("tiny", {"generator": {"num_layers": 3}})
    full = {method: video_flops(cfg, method) for method in ("none", "nasa", "cfg")}
    counted = []
    real = bench.video_flops
    monkeypatch.setattr(bench, "video_flops", lambda c, *a: counted.append(int(c.generator.num_layers)) or real(c, *a))
    for method, flops in full.items():
        assert bench.layer_extrapolated_flops(cfg, method) == flops
    assert set(counted) == {1, 2}  # counted on the small copies only


def test_kernel_groups():
    rows = [("cudnn_generated_fort_native_sdpa_sm90_flash_fprop", 3.0, 30), ("nvjet_tst_192x192_64x3", 2.0, 90),
            ("sm90_xmma_gemm_bf16bf16_bf16f32", 1.0, 10), ("fmha_cutlassF_bf16_aligned", 1.0, 2),
            ("void at::native::vectorized_elementwise_kernel<4, CUDAFunctor_add<float>>", 1.5, 300),
            ("aten::_scaled_dot_product_flash_attention_for_cpu", 0.5, 4), ("aten::addmm", 0.5, 8),
            ("aten::native_layer_norm", 0.5, 8)]
    out = bench.group_kernels(rows, top=3)
    assert out["groups"] == {"attention": 4.5, "matrix products": 3.5, "element-wise": 2.0}
    assert out["shares"]["attention"] == pytest.approx(0.45)
    assert [k["name"][:10] for k in out["top"]] == ["cudnn_gene", "nvjet_tst_", "void at::n"]


def test_bench_speed_profile_writes_the_grouped_table(tmp_path, capsys):
    """`bench speed --profile`: one block's aten ops per method, grouped, as JSON and markdown; the --json report
    has today's fields and the new ones."""
    import json

    from nasa_video.cli import main

    prof, out = tmp_path / "kernels.json", tmp_path / "speed.json"
    assert main(["bench", "speed", "--model", "tiny", "--methods", "nasa", "--repeats", "1", "--device", "cpu",
                 "--profile", str(prof), "--json", str(out)]) == 0
    profiles = json.loads(prof.read_text())
    assert set(profiles) == {"none", "nasa"}
    for p in profiles.values():
        assert p["block"] == 1 and set(p["groups"]) == {"attention", "matrix products", "element-wise"}
        assert p["groups"]["attention"] > 0 and p["groups"]["matrix products"] > 0 and len(p["top"]) == 15
        assert sum(p["shares"].values()) == pytest.approx(1.0)
    assert "| attention |" in (tmp_path / "kernels.md").read_text()
    report = json.loads(out.read_text())
    assert {"model", "device", "dtype", "repeats", "decode", "frames", "methods", "attention", "compile"} <= set(report)
    for r in report["methods"].values():
        assert {"median_s", "min_s", "max_s", "ratio", "fps", "first_block_s", "achieved_tflops", "peak_share",
                "denoise_s", "decode_s"} <= set(r)
        assert r["peak_share"] is None and r["decode_s"] == 0.0
    assert "matrix products" in capsys.readouterr().out
