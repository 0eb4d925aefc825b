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
    response = client.post("/api/jobs", json=body)
    assert response.status_code == 201, response.text
    return response.json()["id"]


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
    assert info["methods"]["nasa"] == {"min": 0.0, "max": 3.0, "max_negatives": None}
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
    for block, frames in zip(blocks, expected):
        np.testing.assert_array_equal(frames_of(block), frames)


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
    for block, frames in zip(blocks, expected):
        np.testing.assert_array_equal(frames_of(block), frames)


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
    for block, frames in zip(blocks, expected):
        np.testing.assert_array_equal(frames_of(block), frames)
    assert not np.array_equal(frames_of(blocks[-1]), tiny_generator_frames(tiny_generator, 3))


def tiny_generator_frames(gen, block):
    """The unswitched stream's frames at a block, to show the switch changed something."""
    for i, chunk in enumerate(gen.stream("a red circle", ["noise"], 0.5, "nasa", None, 3, rolling=True)):
        if i == block:
            return chunk.frames


@pytest.mark.parametrize("message, reason", [({"type": "prompt", "prompt": ""}, "prompt is empty"),
                                             ({"type": "prompt", "prompt": 5}, "prompt must be a string")])
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
])
def test_bad_requests_get_400_with_a_message(client, body, needle):
    response = client.post("/api/jobs", json={"prompt": "a red circle", **body})
    assert response.status_code == 400 and needle in response.json()["error"], response.text


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


def test_one_job_at_a_time_queue_positions_and_cancellation(client, server):
    endless = start(client, blocks=0)
    second = start(client, blocks=1)
    third = start(client, blocks=1)
    with client.websocket_connect(f"/api/jobs/{endless}/stream") as a:
        until(a, "block")  # the endless stream holds the device
        with client.websocket_connect(f"/api/jobs/{second}/stream") as b:
            assert b.receive_json() == {"type": "queued", "position": 1}
            with client.websocket_connect(f"/api/jobs/{third}/stream") as c:
                assert c.receive_json() == {"type": "queued", "position": 2}
            # c disconnected while queued: it leaves the queue. Stopping a hands the device on to b.
            a.send_json({"type": "stop"})
            done, _ = until(a, "done")
            assert done["stopped"] and done["blocks"] >= 1
            _, seen = until(b, "done")
            assert [m["type"] for m in seen if m["type"] in ("started", "block")] == ["started", "block"]
    assert server.queue.running is None and not server.queue.waiting


def test_a_client_that_disconnects_frees_the_device(client, server):
    endless = start(client, blocks=0)
    with client.websocket_connect(f"/api/jobs/{endless}/stream") as a:
        until(a, "block")
    # a is gone mid-stream: the device is released after the current block, and the next job runs.
    nxt = start(client, blocks=1)
    with client.websocket_connect(f"/api/jobs/{nxt}/stream") as b:
        done, _ = until(b, "done")
    assert done["blocks"] == 1 and server.queue.running is None


def test_generation_failure_ends_with_a_message(client, server, monkeypatch):
    job = start(client, blocks=2)

    def broken(*args):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(server, "_next_block", broken)
    with client.websocket_connect(f"/api/jobs/{job}/stream") as ws:
        until(ws, "started")
        message = ws.receive_json()
    assert message["type"] == "error" and message["fatal"] and "out of memory" in message["message"]
    assert server.queue.running is None


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


def test_save_mid_stream_and_after_holds_every_frame(client, server, monkeypatch):
    import time

    from nasa_video import pipeline
    from nasa_video.video_io import read_video

    # Each block takes at least half a second, so the save (applied between blocks) lands before the last block
    # on any machine; unthrottled, the tiny model could finish all three blocks before the save arrived.
    denoise = pipeline.Stream._denoise_block

    def slow_denoise(self, *args, **kwargs):
        time.sleep(0.5)
        return denoise(self, *args, **kwargs)

    monkeypatch.setattr(pipeline.Stream, "_denoise_block", slow_denoise)
    job = start(client, blocks=3)
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
