"""The live page's server: HTTP validation, the WebSocket stream, mid-stream changes, queueing, cancellation."""
import base64
import io

import numpy as np
import pytest

pytest.importorskip("starlette")
pytest.importorskip("httpx")
from starlette.testclient import TestClient

from nasa_video.server import Limits, VideoServer, create_app


@pytest.fixture
def server(tiny_generator, tmp_path):
    return VideoServer(tiny_generator, tmp_path / "clips", Limits(max_blocks=6))


@pytest.fixture
def client(server):
    with TestClient(create_app(server)) as c:
        yield c


def frames_of(message) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB"))
                     for src in message["frames"]])


def start(client, **body):
    body = {"prompt": "a red circle", "negative": ["noise"], "scale": 0.5, "seed": 3, "blocks": 2, **body}
    if not body["negative"]:
        body.pop("scale")  # a scale without a negative is refused, as the CLI refuses it (it would do nothing)
    response = client.post("/api/jobs", json=body)
    assert response.status_code == 201, response.text
    return response.json()["id"]


def assert_frames_match(got, expected):
    """A job's frames against its stream run alone through the library: the server makes NASA / none jobs in a
    StreamBatch, equal to the stream alone within fp32 rounding, so a pixel may land one level off."""
    assert got.shape == expected.shape
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1


def until(ws, kind):
    seen = []
    while True:
        message = ws.receive_json()
        seen.append(message)
        if message["type"] == kind:
            return message, seen
        assert not (message["type"] == "error" and message.get("fatal")), message


def test_page_and_info(client):
    page = client.get("/")
    assert page.status_code == 200 and "<canvas" in page.text and "/api/jobs" in page.text
    info = client.get("/api/info").json()
    assert info["methods"]["nasa"] == {"min": 0.0, "max": 3.0, "max_negatives": None, "default": 0.5}
    assert info["methods"]["nag"]["default"] == 5.0  # each method its own default; the config's is NASA's
    assert info["frames_per_block"] == 3 and info["limits"]["max_blocks"] == 6


def test_stream_delivers_the_blocks_and_equals_the_library(client, tiny_generator):
    job = start(client, blocks=2)
    with client.websocket_connect(f"/api/jobs/{job}/stream") as ws:
        started, _ = until(ws, "started")
        blocks = []
        done, seen = until(ws, "done")
        blocks = [m for m in seen if m["type"] == "block"]
    assert started["blocks"] == 2 and [b["block"] for b in blocks] == [0, 1]
    assert done == {**done, "blocks": 2, "frames": sum(len(b["frames"]) for b in blocks), "stopped": False}
    assert all(b["negative"] == ["noise"] and b["scale"] == 0.5 and not b["changed"] for b in blocks)
    expected = [c.frames for c in tiny_generator.stream("a red circle", ["noise"], 0.5, "nasa", None, 3, False)]
    for block, frames in zip(blocks, expected, strict=True):
        assert_frames_match(frames_of(block), frames)


def test_mid_stream_change_applies_from_the_next_block(client, tiny_generator):
    job = start(client, blocks=4)
    with client.websocket_connect(f"/api/jobs/{job}/stream") as ws:
        first, _ = until(ws, "block")
        ws.send_json({"type": "negative", "negative": ["blur"], "scale": 1.5})
        _, seen = until(ws, "done")
    blocks = [first] + [m for m in seen if m["type"] == "block"]
    assert len(blocks) == 4 and blocks[0]["negative"] == ["noise"]
    switch = next(i for i, b in enumerate(blocks) if b["negative"] == ["blur"])
    # Taken at a block boundary: every block from the switch on has the new prompt and scale, and only the
    # switch is marked as a change.
    assert switch >= 1 and all(b["negative"] == ["blur"] and b["scale"] == 1.5 for b in blocks[switch:])
    assert [b["changed"] for b in blocks] == [i == switch for i in range(4)]
    # The same change through the library API, before the same block, gives the same frames.
    stream = tiny_generator.stream("a red circle", ["noise"], 0.5, "nasa", None, 3, rolling=True)
    expected = []
    for i, chunk in enumerate(stream):
        expected.append(chunk.frames)
        if i + 1 == switch:
            stream.set_negative(["blur"], 1.5)
        if i == 3:
            break
    for block, frames in zip(blocks, expected, strict=True):
        assert_frames_match(frames_of(block), frames)


@pytest.mark.parametrize("recache", [False, True])
def test_prompt_switch_applies_from_the_next_block(client, tiny_generator, recache):
    """The live page's prompt switch: a "prompt" message takes effect at the next block boundary, each block reports
    the prompt it was made with (re-cache time with it), and the frames equal Stream.set_prompt before that block."""
    job = start(client, blocks=4)
    with client.websocket_connect(f"/api/jobs/{job}/stream") as ws:
        first, _ = until(ws, "block")
        ws.send_json({"type": "prompt", "prompt": "a blue square", "recache": recache})
        _, seen = until(ws, "done")
    blocks = [first] + [m for m in seen if m["type"] == "block"]
    assert blocks[0]["prompt"] == "a red circle"
    switch = next(i for i, b in enumerate(blocks) if b["prompt"] == "a blue square")
    assert switch >= 1 and all(b["prompt"] == "a blue square" for b in blocks[switch:])
    assert [b["changed"] for b in blocks] == [i == switch for i in range(4)]
    assert (blocks[switch]["recache_seconds"] > 0) == recache
    stream = tiny_generator.stream("a red circle", ["noise"], 0.5, "nasa", None, 3, rolling=True)
    expected = []
    for i, chunk in enumerate(stream):
        expected.append(chunk.frames)
        if i + 1 == switch:
            stream.set_prompt("a blue square", recache=recache)
        if i == 3:
            break
    for block, frames in zip(blocks, expected, strict=True):
        assert_frames_match(frames_of(block), frames)
    assert not np.array_equal(frames_of(blocks[-1]), tiny_generator_frames(tiny_generator, 3))


def tiny_generator_frames(gen, block):
    """The unswitched stream's frames at a block, to show the switch changed something."""
    for i, chunk in enumerate(gen.stream("a red circle", ["noise"], 0.5, "nasa", None, 3, rolling=True)):
        if i == block:
            return chunk.frames


@pytest.mark.parametrize("message, reason", [({"type": "prompt", "prompt": ""}, "prompt is empty"),
                                             ({"type": "prompt", "prompt": 5}, "prompt must be a string"),
                                             ({"type": "prompt", "prompt": "a blue square", "recache": "yes"},
                                              "recache must be true or false"),
                                             ({"type": "scale", "scale": 10 ** 400}, "scale must be between")])
def test_bad_prompt_switch_is_refused_and_the_stream_goes_on(client, message, reason):
    job = start(client, blocks=3)
    with client.websocket_connect(f"/api/jobs/{job}/stream") as ws:
        until(ws, "block")
        ws.send_json(message)
        done, seen = until(ws, "done")
    assert done["blocks"] == 3
    errors = [m["message"] for m in seen if m["type"] == "error"]
    assert any(reason in e for e in errors) and all(b["prompt"] == "a red circle" for b in seen if b["type"] == "block")


def test_bad_change_is_refused_and_the_stream_goes_on(client):
    job = start(client, blocks=3)
    with client.websocket_connect(f"/api/jobs/{job}/stream") as ws:
        until(ws, "block")
        ws.send_json({"type": "scale", "scale": 99})
        error, _ = until(ws, "error")
        done, seen = until(ws, "done")
    assert "change refused" in error["message"] and "nasa" in error["message"] and not error["fatal"]
    assert done["blocks"] == 3 and all(m["scale"] == 0.5 for m in seen if m["type"] == "block")


@pytest.mark.parametrize("body,needle", [
    ({"prompt": ""}, "prompt is empty"),
    ({"prompt": "x" * 401}, "at most 400"),
    ({"scale": 7.0}, "nasa"),
    ({"method": "magic"}, "unknown method"),
    ({"method": "nag", "scale": 2.0, "negative": ["a", "b"]}, "at most 1 negative"),
    ({"negative": ["a", "b", "c", "d", "e"]}, "at most 4"),
    ({"blocks": 7}, "blocks must be between 0 and 6"),
    ({"seed": -1}, "seed"),
    ({"seed": 1.5}, "whole number"),
    ({"scale": "big"}, "scale must be a number"),
    ({"path": "/etc/passwd"}, "unknown field"),
    ({"prompt": "word " * 80}, "tokens"),
    ({"scale": 10 ** 400}, "scale must be between"),
    ({"scale": 0.5}, "no effect without a negative prompt"),  # a 401-digit integer: 400, not an overflow
    ({"seed": 10 ** 400}, "seed must be between"),
    ({"blocks": 10 ** 400}, "blocks must be between"),
    ({"method": ["nasa"]}, "unknown method"),
])
def test_bad_requests_get_400_with_a_message(client, body, needle):
    response = client.post("/api/jobs", json={"prompt": "a red circle", **body})
    assert response.status_code == 400 and needle in response.json()["error"], response.text
    assert "--" not in response.json()["error"], "the message names a CLI flag, not the API's field"


def test_a_body_over_the_limit_is_refused_unread(client, server):
    limit = server.limits.max_body_bytes
    response = client.post("/api/jobs", json={"prompt": "a red circle", "pad": "x" * limit})
    assert response.status_code == 413 and f"at most {limit}" in response.json()["error"]

    def chunks():  # no Content-Length: the server stops reading at the limit
        yield b'{"prompt": "'
        for _ in range(limit // 1000 + 2):
            yield b"x" * 1000
        yield b'"}'
    response = client.post("/api/jobs", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413 and "over" in response.json()["error"]


def test_a_negative_the_encoder_cannot_read_is_refused_at_post(tmp_path):
    from nasa_video.pipeline import StreamingGenerator

    gen = StreamingGenerator.from_config("toy", device="cpu")
    with TestClient(create_app(VideoServer(gen, tmp_path / "clips", Limits()))) as client:
        response = client.post("/api/jobs", json={"prompt": "a red circle", "negative": ["\U0001F534"]})
    assert response.status_code == 400 and "encode to nothing" in response.json()["error"], response.text


@pytest.mark.parametrize("raw", [b'{"prompt": "a red circle", "scale": NaN}', b'{"prompt": "a", "seed": Infinity}'])
def test_non_finite_numbers_get_400(client, raw):
    response = client.post("/api/jobs", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 400 and "finite" in response.json()["error"], response.text


def test_not_json_unknown_job_and_clip_names(client):
    assert client.post("/api/jobs", content=b"{oops").status_code == 400
    assert client.post("/api/jobs/nope/save").status_code == 404
    assert client.get("/clips/..%2F..%2Fetc%2Fpasswd").status_code == 404
    assert client.get("/clips/clip-20260101-000000-deadbeef.mp4").status_code == 404
    with client.websocket_connect("/api/jobs/nope/stream") as ws:
        message = ws.receive_json()
    assert message["type"] == "error" and "no such job" in message["message"]


def test_save_writes_a_clip_the_page_can_fetch(client, server):
    from nasa_video.video_io import read_video

    job = start(client, blocks=2)
    with client.websocket_connect(f"/api/jobs/{job}/stream") as ws:
        done, _ = until(ws, "done")
    response = client.post(f"/api/jobs/{job}/save")
    assert response.status_code == 201
    url = response.json()["url"]
    clip = client.get(url)
    assert clip.status_code == 200 and clip.headers["content-type"] == "video/mp4"
    files = list(server.clips_dir.iterdir())
    assert len(files) == 1 and url.endswith(files[0].name)
    assert len(read_video(files[0])) == done["frames"]


@pytest.mark.slow
def test_viewers_share_the_device_and_only_those_past_the_limit_queue(tiny_generator, tmp_path):
    """max_streams 2: two endless jobs stream at once (one batched forward per step: every forward has both rows);
    the third and fourth queue at positions 1 and 2; the fourth leaves the queue; stopping the first lets the third
    join the running batch, and each job's frames equal its stream alone."""
    server = VideoServer(tiny_generator, tmp_path / "clips", Limits(max_blocks=6, max_streams=2))
    rows = []
    model = tiny_generator.model
    forward = model.forward

    def counting(x, *args, **kwargs):
        rows.append(x.shape[0])
        return forward(x, *args, **kwargs)

    model.forward = counting
    try:
        with TestClient(create_app(server)) as client:
            first = start(client, blocks=0, seed=1)
            second = start(client, blocks=0, seed=2, prompt="a blue square", negative=[])
            third = start(client, blocks=2, seed=3)
            fourth = start(client, blocks=1)
            with client.websocket_connect(f"/api/jobs/{first}/stream") as a, \
                    client.websocket_connect(f"/api/jobs/{second}/stream") as b:
                a_blocks = [until(a, "block")[0]]
                b_blocks = [until(b, "block")[0]]
                with client.websocket_connect(f"/api/jobs/{third}/stream") as c:
                    assert c.receive_json() == {"type": "queued", "position": 1}
                    with client.websocket_connect(f"/api/jobs/{fourth}/stream") as d:
                        assert d.receive_json() == {"type": "queued", "position": 2}
                    a_blocks.append(until(a, "block")[0])
                    b_blocks.append(until(b, "block")[0])
                    both = list(rows)  # a and b are both running from here
                    a.send_json({"type": "stop"})
                    done, seen = until(a, "done")
                    assert done["stopped"]
                    c_done, c_seen = until(c, "done")
                    b.send_json({"type": "stop"})
                    until(b, "done")
    finally:
        model.forward = forward
    assert c_done["blocks"] == 2 and not c_done["stopped"]
    steps = len(tiny_generator.steps) + 1  # denoising steps and the cache pass
    assert 2 in both and both.count(1) <= steps  # at most b's first block ran alone (a had not joined yet)
    assert not server.queue.running and not server.queue.waiting
    for job_blocks, spec in ((a_blocks, ("a red circle", ["noise"], 0.5, "nasa", None, 1, True)),
                             (b_blocks, ("a blue square", None, 0.5, "nasa", None, 2, True))):
        for block, chunk in zip(job_blocks, tiny_generator.stream(*spec)):
            assert_frames_match(frames_of(block), chunk.frames)
    c_blocks = [m for m in c_seen if m["type"] == "block"]
    for block, chunk in zip(c_blocks, tiny_generator.stream("a red circle", ["noise"], 0.5, "nasa", None, 3, False),
                            strict=True):
        assert_frames_match(frames_of(block), chunk.frames)


def test_a_client_that_disconnects_frees_the_device(client, server):
    endless = start(client, blocks=0)
    with client.websocket_connect(f"/api/jobs/{endless}/stream") as a:
        until(a, "block")
    # a is gone mid-stream: the device is released after the current block, and the next job runs.
    nxt = start(client, blocks=1)
    with client.websocket_connect(f"/api/jobs/{nxt}/stream") as b:
        done, _ = until(b, "done")
    assert done["blocks"] == 1 and not server.queue.running


def test_generation_failure_ends_with_a_message(client, server, monkeypatch):
    job = start(client, blocks=2)

    def broken(*args):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(server, "_round", broken)
    with client.websocket_connect(f"/api/jobs/{job}/stream") as ws:
        until(ws, "started")
        message = ws.receive_json()
    assert message["type"] == "error" and message["fatal"] and "out of memory" in message["message"]
    assert not server.queue.running


def test_a_job_that_cannot_start_ends_with_a_message_and_the_next_one_runs(client, server, monkeypatch):
    start_job = server._start

    def broken(job):
        if job.request.seed == 3:
            raise RuntimeError("out of memory (simulated)")
        return start_job(job)

    monkeypatch.setattr(server, "_start", broken)
    job = start(client, blocks=1)
    with client.websocket_connect(f"/api/jobs/{job}/stream") as ws:
        message = ws.receive_json()
    assert message["type"] == "error" and message["fatal"] and "out of memory" in message["message"]
    nxt = start(client, blocks=1, seed=4)
    with client.websocket_connect(f"/api/jobs/{nxt}/stream") as ws:
        done, _ = until(ws, "done")
    assert done["blocks"] == 1 and not server.queue.running and job in server.finished


def test_serve_cli_rejects_bad_arguments(capsys):
    from nasa_video.cli import main

    assert main(["serve", "--model", "tiny", "--port", "0"]) == 2
    assert "--port 0" in capsys.readouterr().err


BUNDLED = __import__("pathlib").Path(__file__).parents[1] / "nasa_video" / "toy" / "weights" / "generator.safetensors"


@pytest.mark.skipif(not BUNDLED.exists(), reason="needs the bundled toy weights (issue 3)")
def test_the_live_page_streams_the_bundled_model_with_and_without_the_negative(tmp_path):
    """With the bundled model the detector reads the streamed frames: asked for "a red circle and a blue square",
    the red object is drawn; with "red circle" as the negative from the start it is not, and the blue one stays.
    (A negative sent mid-stream does not take an object already drawn out of the bundled model's later blocks: the
    cached frames hold it and the student learned NASA-T only from a clip's start, see the model card. That the
    server applies such a change from the next block, exactly as the library does, is tested on the tiny model.)"""
    from nasa_video.pipeline import StreamingGenerator
    from nasa_video.toy.detect import color_masks

    gen = StreamingGenerator.from_config("toy", device="cpu")

    def pixels_per_frame(blocks, color):
        frames = np.concatenate([frames_of(b) for b in blocks])
        return color_masks(frames)[color].sum() / len(frames)

    with TestClient(create_app(VideoServer(gen, tmp_path / "clips", Limits()))) as client:
        streamed = {}
        for negative in ([], ["red circle"]):
            job = start(client, prompt="a red circle and a blue square", negative=negative, seed=2, blocks=3,
                        scale=float(gen.cfg.guidance.scale))
            with client.websocket_connect(f"/api/jobs/{job}/stream") as ws:
                _, seen = until(ws, "done")
            streamed[bool(negative)] = [m for m in seen if m["type"] == "block"]
    assert pixels_per_frame(streamed[False], "red") >= 30 and pixels_per_frame(streamed[False], "blue") >= 30
    assert pixels_per_frame(streamed[True], "red") <= 5 and pixels_per_frame(streamed[True], "blue") >= 30


@pytest.mark.parametrize("bad", ["not json", "{\"type\": ", "[1, 2]", "null"])
def test_malformed_control_messages_are_answered_and_the_stream_goes_on(client, bad):
    job = start(client, blocks=2)
    with client.websocket_connect(f"/api/jobs/{job}/stream") as ws:
        until(ws, "started")
        ws.send_text(bad)
        error, _ = until(ws, "error")
        assert "JSON" in error["message"] or "unknown control message" in error["message"]
        done, seen = until(ws, "done")
    assert done["blocks"] == 2 and not done["stopped"]


# ---- same origin only, bounded memory (issue 16, item 5) ------------------------------------------------------
EVIL = "http://evil.example"


def test_cross_origin_requests_and_handshakes_are_refused(client):
    from starlette.testclient import WebSocketDenialResponse

    # the simple request any page can send without a preflight
    response = client.post("/api/jobs", content=b'{"prompt": "a red circle"}',
                           headers={"content-type": "text/plain", "origin": EVIL})
    assert response.status_code == 403 and "cross-origin" in response.json()["error"]
    assert client.post("/api/jobs", json={"prompt": "a red circle"}, headers={"origin": EVIL}).status_code == 403
    assert client.post("/api/jobs", json={"prompt": "a red circle"}, headers={"origin": "null"}).status_code == 403
    # same host, another port or scheme is another origin
    for other in ("http://testserver:8080", "https://testserver"):
        assert client.post("/api/jobs", json={"prompt": "x"}, headers={"origin": other}).status_code == 403
    # a browser that withheld Origin but says the request is cross-site
    assert client.post("/api/jobs", json={"prompt": "x"}, headers={"sec-fetch-site": "cross-site"}).status_code == 403
    job = start(client, blocks=1)
    with pytest.raises(WebSocketDenialResponse) as denied:
        with client.websocket_connect(f"/api/jobs/{job}/stream", headers={"origin": EVIL}):
            pass
    assert denied.value.status_code == 403
    assert client.post(f"/api/jobs/{job}/save", headers={"origin": EVIL}).status_code == 403


def test_same_origin_and_non_browser_requests_work(client):
    own = {"origin": "http://testserver"}
    response = client.post("/api/jobs", json={"prompt": "a red circle", "blocks": 1}, headers=own)
    assert response.status_code == 201
    with client.websocket_connect(f"/api/jobs/{response.json()['id']}/stream", headers=own) as ws:
        done, _ = until(ws, "done")
    assert done["blocks"] == 1
    assert client.get("/api/info", headers={**own, "sec-fetch-site": "same-origin"}).status_code == 200
    # no Origin (curl, scripts): served, as every other test here shows
    assert client.post("/api/jobs", json={"prompt": "a red circle"}).status_code == 201


def test_a_loopback_server_refuses_foreign_host_names(server):
    from nasa_video.server import LOOPBACK_HOSTS

    server.allowed_hosts = LOOPBACK_HOSTS
    with TestClient(create_app(server), base_url="http://127.0.0.1:7860") as local:
        assert local.get("/api/info").status_code == 200
        assert local.get("/api/info", headers={"host": "rebound.evil.example:7860"}).status_code == 403
    with TestClient(create_app(server), base_url="http://localhost:7860") as local:
        assert local.post("/api/jobs", json={"prompt": "a"}, headers={"origin": "http://localhost:7860"}).status_code == 201


@pytest.mark.slow
def test_save_mid_stream_and_after_holds_every_frame(client, server, monkeypatch):
    import time

    from nasa_video import stream as batch
    from nasa_video.video_io import read_video

    # Each block takes at least half a second, so the save (applied between blocks) lands before the last block
    # on any machine; unthrottled, the tiny model could finish all three blocks before the save arrived.
    step = batch.StreamBatch.step

    def slow_step(self, *args, **kwargs):
        time.sleep(0.5)
        return step(self, *args, **kwargs)

    monkeypatch.setattr(batch.StreamBatch, "step", slow_step)
    job = start(client, blocks=5)  # the save lands blocks before the end, even on a loaded CPU
    with client.websocket_connect(f"/api/jobs/{job}/stream") as ws:
        first, _ = until(ws, "block")
        middle = client.post(f"/api/jobs/{job}/save")  # runs between blocks on the device thread
        done, _ = until(ws, "done")
    end = client.post(f"/api/jobs/{job}/save")
    assert middle.status_code == end.status_code == 201
    mid_frames = len(read_video(server.clips_dir / middle.json()["name"]))
    assert len(first["frames"]) <= mid_frames < done["frames"]
    assert len(read_video(server.clips_dir / end.json()["name"])) == done["frames"]  # segments joined
    assert all(p.name.startswith("clip-") for p in server.clips_dir.iterdir())


def test_a_long_stream_holds_bounded_memory(tiny_generator, tmp_path):
    """An endless job of 12 blocks: the job keeps no frames (they are on disk), and the Python heap (numpy arrays
    included: tracemalloc sees them) grows by less than 512 KiB between block 2 and block 12, where holding the
    frames would take 10 x 12 frames x 12 KiB = 1.4 MiB."""
    import time
    import tracemalloc

    server = VideoServer(tiny_generator, tmp_path / "clips", Limits(max_endless_blocks=12))
    with TestClient(create_app(server)) as client:
        job = start(client, blocks=0)
        with client.websocket_connect(f"/api/jobs/{job}/stream") as ws:
            for _ in range(2):
                until(ws, "block")
            tracemalloc.start()
            try:
                before = tracemalloc.get_traced_memory()[0]
                while (done := ws.receive_json())["type"] != "done":  # read and drop: the test holds nothing
                    assert done["type"] == "block", done
                after = tracemalloc.get_traced_memory()[0]
            finally:
                tracemalloc.stop()
            for _ in range(100):  # the job is filed as finished once its spool is sealed
                if job in server.finished:
                    break
                time.sleep(0.1)
        held = server.finished[job]
    assert done["blocks"] == 12 and not done["stopped"]
    assert not hasattr(held, "frames") and held.clip.frames == done["frames"]
    assert after - before < 512 * 1024, f"heap grew {(after - before) / 1024:.0f} KiB over 10 blocks"
    print(f"\nserver heap over blocks 2-12: {(after - before) / 1024:+.0f} KiB")


def test_a_viewer_that_falls_behind_loses_its_oldest_block_messages_only(server):
    import asyncio

    from nasa_video.request import VideoRequest
    from nasa_video.server import Job

    job = Job("j", VideoRequest(prompt="a red circle", scale=0.5, seed=0), 0)
    job.ready = asyncio.Event()
    server._post(job, ("started", None))
    for block in range(server.limits.backlog_blocks + 3):
        server._post(job, ("block", block))
    server._post(job, ("done", None))
    kinds = [kind for kind, _ in job.outbox]
    assert kinds == ["started"] + ["block"] * server.limits.backlog_blocks + ["done"]
    assert [item for kind, item in job.outbox if kind == "block"][0] == 3 and job.dropped == 3
