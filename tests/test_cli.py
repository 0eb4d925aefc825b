"""The CLI end to end on the tiny config, and its one-line errors."""
import os

import numpy as np
import pytest

from nasa_video.cli import main
from nasa_video.video_io import read_video

ARGS = ["generate", "--model", "tiny", "--prompt", "a red circle and a blue square", "--negative", "red circle", "--quiet",
        "--device", "cpu"]


def decoded_frames(gen, seed=0, frames=21):
    """The frames the API streams for the CLI's ARGS (default method and scale)."""
    chunks = gen.stream("a red circle and a blue square", [("red circle", 1.0)], frames=frames, seed=seed)
    return np.concatenate([c.frames for c in chunks])


def mean_error(a, b):
    """Mean absolute difference of the frames' 8x8-pixel means: H.264 at crf 18 blurs the tiny model's pixel
    noise (about 12 levels per pixel) but keeps the picture (about 1.3 levels here; another seed: about 15)."""
    def means(x):
        t, h, w, c = x.shape
        return x.astype(np.float64).reshape(t, h // 8, 8, w // 8, 8, c).mean((2, 4))
    return float(np.abs(means(a) - means(b)).mean())


def test_writes_mp4_with_requested_frame_count(tmp_path, capsys, tiny_generator):
    out = tmp_path / "x.mp4"
    assert main(ARGS + ["--out", str(out), "--frames", "21"]) == 0
    frames = read_video(out)
    assert frames.shape == (21, 64, 64, 3)
    assert "wrote" in capsys.readouterr().out
    assert not list(tmp_path.glob(".*partial*"))  # the temp file was renamed away
    # the file holds the video the API generates for the same seed, in order (H.264 is lossy: close, not equal),
    # and it is closer to it than to another seed's video or to its own frames shifted by one
    same, other = decoded_frames(tiny_generator, 0), decoded_frames(tiny_generator, 1)
    assert max(mean_error(frames[i:i + 1], same[i:i + 1]) for i in range(21)) < 3
    error = mean_error(frames, same)
    assert error < 0.25 * mean_error(frames, other)
    assert error < 0.25 * mean_error(frames[1:], same[:-1])


@pytest.mark.parametrize("extra,message", [
    (["--prompt", "x" * 80], "prompt is 81 tokens"),
    (["--scale", "9"], "out of range for nasa"),
    (["--frames", "20"], "not a whole number of blocks"),
    (["--model", "nope"], "unknown model"),
    (["--attention", "flash2"], "flash-attn"),
    (["--model", "causvid", "--checkpoint", "/nonexistent/model.pt"], "not found"),
    (["--negative-weight", "1", "--negative-weight", "2"], "--negative-weight"),
    (["--dtype", "fp8"], "unknown --dtype"),
])
def test_bad_input_is_one_line(tmp_path, capsys, extra, message):
    assert main(ARGS + ["--out", str(tmp_path / "x.mp4")] + extra) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("nasa-video: error:")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err, err


def test_unwritable_output(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    os.chmod(locked, 0o500)
    try:
        for out in [str(tmp_path / "missing" / "x.mp4"), str(tmp_path / "x.avi")] + \
                   ([str(locked / "x.mp4")] if os.geteuid() != 0 else []):
            assert main(ARGS + ["--out", out]) == 2
            assert "nasa-video: error:" in capsys.readouterr().err
    finally:
        os.chmod(locked, 0o700)


def test_wan_folder_missing_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "model.pt").write_bytes(b"")
    assert main(ARGS + ["--out", str(tmp_path / "x.mp4"), "--model", "causvid", "--wan", str(tmp_path),
                        "--checkpoint", str(tmp_path / "model.pt")]) == 2
    assert "vae/" in capsys.readouterr().err


def test_ctrl_c_keeps_finished_blocks(tmp_path, tiny_generator, monkeypatch):
    real_stream = tiny_generator.stream

    def interrupted(*args, **kwargs):
        for i, chunk in enumerate(real_stream(*args, **kwargs)):
            if i == 1:
                raise KeyboardInterrupt
            yield chunk
    monkeypatch.setattr(tiny_generator, "stream", interrupted)
    out = tmp_path / "x.mp4"
    result = tiny_generator.generate("a red circle", out, progress=False)
    assert result.interrupted and result.blocks == 1
    kept = read_video(out)
    assert kept.shape == (9, 64, 64, 3)  # the first block's frames, playable
    first_block = next(iter(real_stream("a red circle")))
    assert first_block.frames.shape == kept.shape
    assert mean_error(kept, first_block.frames) < 3  # those frames, in order, not a blank or garbled file
    assert mean_error(kept, first_block.frames) < 0.25 * mean_error(kept, first_block.frames[::-1])



def test_method_choices_come_from_the_guidance_registry(monkeypatch, capsys):
    """A method added to guidance.METHODS is offered by every command at once; upstream's hook takes only
    those acting inside cross-attention."""
    from nasa_video import guidance
    from nasa_video.cli import build_parser

    class Mine(guidance.NASA):
        name = "mine"

    class MineOutside(guidance.CFG):
        name = "mine-outside"

    monkeypatch.setitem(guidance.METHODS, "mine", Mine)
    monkeypatch.setitem(guidance.METHODS, "mine-outside", MineOutside)
    parser = build_parser()
    assert parser.parse_args(["generate", "--prompt", "x", "--guidance", "mine-outside"]).guidance == "mine-outside"
    assert parser.parse_args(["upstream", "causvid", "--guidance", "mine"]).guidance == "mine"
    videos = parser.parse_args(["eval", "videos", "--prompts", "p", "--out", "o", "--methods", "mine"])
    assert videos.methods == ["mine"]
    for bad in (["upstream", "causvid", "--guidance", "mine-outside"], ["bench", "flops", "--methods", "nope"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)
    assert "invalid choice" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["generate", "--help"])
    assert "--guidance {cfg,mine,mine-outside,nag,nasa,none,vsf}" in capsys.readouterr().out


def test_building_the_parser_imports_no_torch():
    """Argument errors must not wait for torch: the command modules import it only inside their handlers."""
    import subprocess
    import sys

    code = ("import sys; from nasa_video.cli import build_parser; build_parser(); "
            "heavy = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)
