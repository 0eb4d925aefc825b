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
    # method settings inside their declared ranges (each of these used to write a broken video)
    (["--guidance", "nag", "--guidance-setting", "tau=0", "--negative", "red"], "tiny", "tau=0 is out of range"),
    (["--guidance", "nag", "--guidance-setting", "blend=100", "--negative", "red"], "tiny", "blend=100 is out"),
    (["--guidance", "nag", "--guidance-setting", "sigma_end=-1", "--negative", "red"], "tiny", "sigma_end=-1 is"),
    (["--guidance", "vsf", "--guidance-setting", "bias=1e30", "--negative", "red"], "tiny", "bias=1e+30 is out"),
    (["--guidance", "vsf", "--guidance-setting", "bias=1e39", "--negative", "red"], "tiny", "bias=1e+39 is out"),
    # the sum of weighted negatives is bounded, not only each term
    (["--scale", "3"] + ["--negative", "red circle"] * 4, "toy", "subtract 12 in all"),
    # silently ignored input says so
    (["--guidance", "none", "--negative", "red"], "tiny", "no effect with --guidance none"),
    (["--guidance", "none", "--scale", "1"], "tiny", "no effect with --guidance none"),
    (["--wan", "/models/Wan2.1-T2V-1.3B-Diffusers"], "toy", "--wan has no effect with --model toy"),
    (["--rolling", "--frames", "1000000001"], "toy", "use --rolling without --frames"),
    # outputs that cannot be written, and a scheduled prompt the encoder cannot take, before the first block
    (["--prompt-at", "1:" + "x" * 80], "tiny", "prompt is 81 tokens"),
    (["--vae", "tae"], "tiny", "give --tae PATH"),
    (["--tae", "x.pth"], "tiny", "add --vae tae"),
    (["--vae", "tae", "--tae", "/nonexistent/taew2_1.pth"], "tiny", "download taew2_1 from github.com/madebyollin"),
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


def test_an_unwritable_folder_is_one_line(tmp_path, capsys):
    code, err = run(generate(out="/proc/x.mp4"), capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "cannot write /proc/x.mp4" in lines[0], err


def test_a_method_without_a_scale_runs_at_its_own_default(tmp_path, capsys):
    """The config's scale (NASA's 1.0 for the toy) belongs to NASA: --guidance nag without --scale runs NAG at its
    own default, where it guides (nag_scale 1 would do nothing), and the closing line says which."""
    out = tmp_path / "x.mp4"
    code = main(generate("--guidance", "nag", "--negative", "red circle", model="toy", out=out))
    printed = capsys.readouterr().out
    assert code == 0 and "with nag scale=5" in printed, printed


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
    (["eval", "removal", "--model", "toy", "--json", "{tmp}/r.json", "--rows", "0"], "must be at least 1"),
    (["eval", "removal", "--model", "toy", "--json", "{tmp}/r.json", "--seeds", "0"], "must be at least 1"),
    (["serve", "--port", "70000"], "not a port"),
    (["serve", "--device", "tpu"], "not a device"),
    (["serve", "--replicas", "2"], "--replicas needs --ray"),
    (["serve", "--ray", "--replicas", "2", "--min-replicas", "1"], "not both"),
    (["serve", "--ray", "--min-replicas", "3", "--max-replicas", "2"], "is above --max-replicas 2"),
    (["serve", "--ray", "--gpus-per-replica", "-1"], "expected 0 to 64 GPUs"),
    (["serve", "--ray", "nohost"], "give HOST:PORT"),
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


def _tiny_yaml(**changes):
    """The tiny config's text with some `key: value` lines replaced (or removed, for None)."""
    from nasa_video.loading import CONFIG_DIR

    lines = []
    for line in (CONFIG_DIR / "tiny.yaml").read_text().splitlines():
        key = line.split(":", 1)[0]
        if key.strip() in changes and line.startswith("  " if key.startswith("  ") else key):
            value = changes[key.strip()]
            if value is None:
                continue
            line = f"{key}: {value}"
        lines.append(line)
    return "\n".join(lines) + "\n"


BAD_YAMLS = [
    ("num_layers: four", lambda: _tiny_yaml(num_layers="four"), "generator.num_layers must be a whole number"),
    ("no num_layers", lambda: _tiny_yaml(num_layers=None), "generator.num_layers must be a whole number"),
    ("height: -32", lambda: _tiny_yaml(height="-32"), "video.height must be at least 1"),
    ("height: 60", lambda: _tiny_yaml(height="60"), "multiples of the codec's stride"),
    ("steps: [2000]", lambda: _tiny_yaml(steps="[2000]"), "sampling.steps must be timesteps"),
    ("no cache section", lambda: _tiny_yaml().replace("cache:\n", "cache_old:\n"), "has no cache: section"),
    ("a YAML list", lambda: "- 1\n- 2\n", "mapping of sections"),
    ("a syntax error", lambda: "video: [1, 2\nname: x\n", "cannot read model config"),
    ("an empty file", lambda: "", "has no generator: section"),
    ("base: itself", lambda: "base: {self}\nname: loop\n", "makes a cycle"),
]


@pytest.mark.parametrize("make,message", [c[1:] for c in BAD_YAMLS], ids=[c[0] for c in BAD_YAMLS])
def test_bad_model_yamls_are_one_line_before_torch(tmp_path, capsys, make, message):
    path = tmp_path / "model.yaml"
    path.write_text(make().replace("{self}", str(path)))
    out = tmp_path / "x.mp4"
    code, err = run(generate(model=str(path), out=out), capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("nasa-video: error:"), err
    assert message in lines[0] and str(path) in lines[0] and "Traceback" not in err, err
    assert not out.exists()


@pytest.mark.parametrize("argv", [["--scale", "9", "--negative", "red"],
                                  ["--guidance", "nag", "--guidance-setting", "tau=0", "--negative", "red"]])
def test_method_errors_come_before_the_generator_loads(argv, tmp_path):
    """Scale, setting and weight checks run before the generator (and diffusers) load: about 2.4 s here, against
    6.7 s when they waited for the model (the measured time is printed; bounded loosely for a busy machine)."""
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "nasa_video.cli", "generate", "--model", "toy", "--prompt", "x",
                             "--out", str(tmp_path / "x.mp4"), *argv], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    print(f"method error in {seconds:.2f} s")
    assert result.returncode == 2 and "out of range" in result.stderr, result.stderr
    assert "diffusers" not in result.stderr and seconds < 20 and not list(tmp_path.iterdir())


@pytest.mark.slow
def test_sigterm_keeps_the_finished_blocks_like_ctrl_c(tmp_path):
    """A terminated run (SIGTERM, as schedulers and `kill` send) ends like Ctrl-C: exit 130, the finished blocks in
    the MP4, no hidden partial file left."""
    import signal

    from nasa_video.video_io import read_video

    out = tmp_path / "long.mp4"
    process = subprocess.Popen([sys.executable, "-m", "nasa_video.cli", "generate", "--model", "toy", "--prompt", PROMPT,
                                "--rolling", "--frames", "4799", "--quiet", "--device", "cpu", "--out", str(out)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    partial = tmp_path / ".long.partial.mp4"
    deadline = time.time() + 120
    while not (partial.exists() and partial.stat().st_size > 0) and time.time() < deadline and process.poll() is None:
        time.sleep(0.1)
    time.sleep(0.5)  # a few more blocks
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, (stdout, stderr)
    assert "interrupted: kept the" in stdout and "Traceback" not in stderr, stderr
    assert out.exists() and not partial.exists() and len(read_video(out)) > 0


def test_a_prompt_that_names_no_object_says_so(tmp_path, capsys):
    out = tmp_path / "x.mp4"
    code, err = run(["generate", "--model", "toy", "--prompt", "a red moving up", "--quiet", "--device", "cpu",
                     "--out", str(out)], capsys)
    warnings = [line for line in err.splitlines() if line.startswith("nasa-video: warning:")]
    assert code == 0 and any("names no shape" in w for w in warnings), err


def test_help_and_argument_errors_need_no_torch():
    """`generate --help`, a bad flag and a method check that fails (a scale out of its range, a setting out of its
    range, a scale without a negative) import neither torch nor diffusers: the method names come from the CLI's
    list of built-ins, held equal to the registry here, and the registry's checks need no torch."""
    from nasa_video.cli.common import BUILTIN_METHODS
    from nasa_video.guidance import CFG, NAG, NASA, VSF, NoGuidance

    assert BUILTIN_METHODS == {c.name: c.in_attention for c in (NoGuidance, NASA, NAG, VSF, CFG)}
    probe = ("import sys\nfrom nasa_video.cli import main\ncode = main(sys.argv[1:])\n"
             "print('loaded:', sorted(m for m in ('torch', 'diffusers') if m in sys.modules))")
    base = ["generate", "--prompt", "a red circle", "--out", "x.mp4"]
    for argv in (["generate", "--help"], ["generate", "--prompt", "x", "--guidance", "magic"],
                 base + ["--negative", "blue", "--guidance", "nag", "--scale", "100"],
                 base + ["--negative", "blue", "--guidance", "nag", "--guidance-setting", "tau=0"],
                 base + ["--scale", "0.5"]):
        result = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, timeout=60)
        assert "loaded: []" in result.stdout, (argv, result.stdout, result.stderr)
        assert argv[1] == "--help" or "nasa-video: error:" in result.stderr, (argv, result.stderr)
