"""The bad-input corpus, through the command line: every case ends with exit code 2, exactly one line on stderr
starting `nasa-video: error:`, no traceback, and no output file. Argument errors come before torch loads."""
import os
import subprocess
import sys
import time

import pytest

from nasa_video.cli import main

PROMPT = "a red circle and a blue square"


def run(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.err


def generate(*extra, model="tiny", out):
    return ["generate", "--model", model, "--prompt", PROMPT, "--quiet", "--device", "cpu", "--out", str(out), *extra]


def corrupt_checkpoints(folder):
    folder.mkdir()
    (folder / "empty.safetensors").write_bytes(b"")
    (folder / "garbage.safetensors").write_bytes(b"\x00not a safetensors header" * 8)
    shards = folder / "shards"
    shards.mkdir()
    (shards / "model-00001.safetensors").write_bytes(b"\xff" * 32)
    import pickle
    with open(folder / "evil.pt", "wb") as f:  # a pickle that would run code: weights_only refuses it
        pickle.dump(os.system, f)
    return folder


CASES = [
    # (arguments after generate's own, model, message part)
    (["--negative", "red circle", "--negative-weight", "nan"], "tiny", "not a usable weight"),
    (["--negative", "red circle", "--negative-weight", "inf"], "tiny", "not a usable weight"),
    (["--negative", "red circle", "--negative-weight", "-5"], "tiny", "not a usable weight"),
    (["--negative", "red circle", "--negative-weight", "1e9"], "tiny", "out of range for nasa"),
    (["--negative", "red circle", "--negative-weight", "1", "--negative-weight", "2"], "tiny", "--negative-weight"),
    # (--frames 599 --rolling is no longer an error: a rolling stream re-bases its positions, tests/test_endless.py)
    (["--frames", "599"], "toy", "use --rolling"),
    (["--frames", "20"], "tiny", "not a whole number of blocks"),
    (["--frames", "0"], "tiny", "must be at least 1"),
    (["--device", "tpu"], "tiny", "not a device"),
    (["--seed", "99999999999999999999"], "tiny", "out of range"),
    (["--seed", "-1"], "tiny", "out of range"),
    (["--seed", "1.5"], "tiny", "not a whole number"),
    (["--scale", "nan"], "tiny", "not a finite number"),
    (["--scale", "9", "--negative", "red"], "tiny", "out of range for nasa"),
    (["--scale", "2"], "tiny", "no effect without a negative prompt"),
    (["--guidance", "magic"], "tiny", "invalid choice"),
    (["--guidance", "nag", "--guidance-setting", "bogus=1", "--negative", "red"], "tiny", "has no setting bogus"),
    (["--guidance-setting", "tau"], "tiny", "KEY=VALUE"),
    (["--dtype", "fp8"], "tiny", "unknown --dtype"),
    (["--attention", "flash9"], "tiny", "use auto, sdpa"),
    (["--attention", "flash2"], "tiny", "flash-attn"),
    (["--negative", "🔴"], "toy", "encode to nothing"),
    (["--negative", "   "], "tiny", "is empty"),
    (["--prompt", ""], "tiny", "is empty"),
    (["--prompt", " \t "], "tiny", "is empty"),
    (["--prompt", "x" * 80], "tiny", "prompt is 81 tokens"),
    (["--model", "nope"], "tiny", "unknown model"),
    (["--model", "missing.yaml"], "tiny", "model config not found: missing.yaml"),
    (["--model", "causvid", "--checkpoint", "/nonexistent/model.pt"], "tiny", "not found"),
]


@pytest.mark.parametrize("extra,model,message", CASES, ids=[" ".join(c[0])[:40] for c in CASES])
def test_generate_corpus(tmp_path, capsys, extra, model, message):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    argv = generate(model=model, out=out_dir / "x.mp4")
    if "--prompt" in extra:  # replace the prompt
        i = argv.index("--prompt")
        del argv[i:i + 2]
    if "--model" in extra:
        i = argv.index("--model")
        del argv[i:i + 2]
    code, err = run(argv + extra, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("nasa-video: error:"), err
    assert message in lines[0] and "Traceback" not in err, err
    assert not list(out_dir.iterdir())  # nothing written, not even a partial file


@pytest.mark.parametrize("name", ["empty.safetensors", "garbage.safetensors", "shards", "evil.pt"])
def test_bad_checkpoints(tmp_path, capsys, name):
    folder = corrupt_checkpoints(tmp_path / "ckpt")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code, err = run(generate("--checkpoint", str(folder / name), out=out_dir / "x.mp4"), capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("nasa-video: error: cannot read"), err
    assert not list(out_dir.iterdir())


@pytest.mark.parametrize("argv,message", [
    (["bench", "flops", "--model", "tiny", "--json", "{missing}/f.json"], "does not exist"),
    (["bench", "flops", "--model", "tiny", "--json", "{tmp}/f.txt"], "must end in .json"),
    (["eval", "removal", "--model", "toy", "--json", "{tmp}/r.json", "--pairs", "0"], "must be at least 1"),
    (["eval", "removal", "--model", "toy", "--json", "{tmp}/r.json", "--seeds", "0"], "must be at least 1"),
    (["serve", "--port", "70000"], "not a port"),
    (["serve", "--device", "tpu"], "not a device"),
    (["generate"], "required: --prompt"),
    (["nope"], "invalid choice"),
])
def test_other_commands_corpus(tmp_path, capsys, argv, message):
    argv = [a.format(missing=tmp_path / "missing", tmp=tmp_path) for a in argv]
    started = time.perf_counter()
    code, err = run(argv, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("nasa-video: error:"), err
    assert message in lines[0], err
    assert not list(tmp_path.glob("*.json"))
    assert time.perf_counter() - started < 5  # refused before any work


def test_unknown_words_are_one_warning_line(tmp_path, capsys):
    out = tmp_path / "x.mp4"
    code, err = run(generate("--negative", "red carré", "--negative", "x" * 10_000 + " square", model="toy", out=out), capsys)
    assert code == 0 and out.exists()
    warnings = [line for line in err.splitlines() if line.startswith("nasa-video: warning:")]
    assert warnings and all(len(w) < 400 for w in warnings) and any("'carré'" in w for w in warnings), err
    assert "UserWarning" not in err and ".py:" not in err


def test_help_lists_every_flag_with_its_default_once(capsys):
    assert main(["generate", "--help"]) == 0
    text = capsys.readouterr().out
    assert "(default: outputs/nasa-video.mp4)" in text and "(default: [])" not in text
    assert "(default: None)" not in text and text.count("(default: 0)") == 1  # --seed
    for flag in ("--prompt", "--seed", "--out", "--device"):
        block = text.split(flag, 1)[1].split("\n  -", 1)[0]
        assert len(block.split()) > 2, f"{flag} has no help text"
    assert main(["--version"]) == 0 and "nasa-video 0.1.0" in capsys.readouterr().out


def test_argument_errors_are_fast():
    """A bad flag is refused before torch loads (under 1 s on an idle CPU; bounded loosely here, since the test
    machine may be busy). The measured time is printed."""
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "nasa_video.cli", "generate", "--prompt", "x", "--seed", "-1"],
                            capture_output=True, text=True)
    seconds = time.perf_counter() - started
    print(f"argument error in {seconds:.2f} s")
    assert result.returncode == 2 and result.stderr.startswith("nasa-video: error: argument --seed")
    assert seconds < 10
