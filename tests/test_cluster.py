"""`nasa-video serve --ray`: a local Ray cluster with two CPU replicas of the tiny model behind the ingress. Jobs
spread over both; each job's frames equal the single-process server's; a replica killed mid-stream gives its
viewer the error and the saved clip while the other viewer finishes, and the next job is served; a cross-origin
WebSocket is refused through the ingress; /api/info shows the replicas. Skips without the [cluster] extra."""
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("ray.serve")
pytest.importorskip("starlette")
from starlette.testclient import TestClient

from nasa_video.server import Limits, VideoServer, create_app

from .test_server import assert_frames_match, frames_of, start, until

pytestmark = pytest.mark.slow
LIMITS = dict(max_blocks=8, max_streams=2)
GENERATOR = dict(model="tiny", device="cpu", dtype="fp32", attention_backend="sdpa")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from nasa_video.server.cluster import ClusterServer, start_cluster, stop_cluster

    limits = Limits(**LIMITS)
    handle, facts, most = start_cluster(None, GENERATOR, limits, replicas=2, gpus_per_replica=0,
                                        cpus_per_replica=0.5, num_cpus=2)
    server = ClusterServer(handle, tmp_path_factory.mktemp("clips"), limits, facts, most)
    with TestClient(create_app(server)) as client:
        yield server, client
    stop_cluster()


def run_job(client, body, on_block=None):
    """A job through the WebSocket to its end: (started message, block messages, last message)."""
    job = start(client, **body)
    blocks = []
    with client.websocket_connect(f"/api/jobs/{job}/stream") as ws:
        started, _ = until(ws, "started")
        while True:
            message = ws.receive_json()
            if message["type"] == "block":
                blocks.append(message)
                if on_block is not None:
                    on_block(message)
            elif message["type"] in ("done", "error") and message.get("fatal", message["type"] == "done"):
                return job, started, blocks, message


def test_jobs_spread_over_both_replicas_and_equal_the_single_process_server(cluster, tiny_generator, tmp_path):
    server, client = cluster
    bodies = [dict(prompt="a red circle", negative=["noise"], scale=0.5, seed=3, blocks=2),
              dict(prompt="a blue square", negative=[], seed=4, blocks=2)]
    first, second = start(client, **bodies[0]), start(client, **bodies[1])
    with client.websocket_connect(f"/api/jobs/{first}/stream") as a, \
            client.websocket_connect(f"/api/jobs/{second}/stream") as b:
        started_a, _ = until(a, "started")
        started_b, _ = until(b, "started")
        info = client.get("/api/info").json()["cluster"]
        got = {}
        for name, ws in (("a", a), ("b", b)):
            frames = []
            while True:
                message = ws.receive_json()
                if message["type"] == "block":
                    frames.append(frames_of(message))
                if message["type"] == "done":
                    break
            got[name] = np.concatenate(frames)
    assert started_a["replica"] != started_b["replica"], "two jobs on one replica while the other was free"
    assert len(info["replicas"]) == 2 and sorted(r["streams"] for r in info["replicas"]) == [1, 1], info
    single = VideoServer(tiny_generator, tmp_path / "clips", Limits(**LIMITS))
    with TestClient(create_app(single)) as alone:
        for name, body in zip("ab", bodies):
            _, _, blocks, end = run_job(alone, body)
            assert end["type"] == "done"
            assert_frames_match(got[name], np.concatenate([frames_of(m) for m in blocks]))


def test_a_replica_killed_mid_stream_keeps_the_clip_and_the_rest_goes_on(cluster):
    import threading

    import ray

    from nasa_video.server.cluster import APP, DEPLOYMENT

    server, client = cluster
    victim = start(client, prompt="a red circle", negative=["noise"], scale=0.5, seed=3, blocks=8)
    other_result = {}

    def other():  # the other viewer, on the other replica, runs to its end meanwhile
        other_result["out"] = run_job(client, dict(prompt="a blue square", negative=[], seed=4, blocks=4))

    with client.websocket_connect(f"/api/jobs/{victim}/stream") as ws:
        started, _ = until(ws, "started")
        thread = threading.Thread(target=other)
        thread.start()
        block, _ = until(ws, "block")
        actor = ray.get_actor(f"SERVE_REPLICA::{APP}#{DEPLOYMENT}#{started['replica']}", namespace="serve")
        ray.kill(actor)
        kept = len(block["frames"])
        while True:
            message = ws.receive_json()
            if message["type"] == "block":
                kept += len(message["frames"])
            if message["type"] == "error":
                break
    assert message["fatal"] and "stopped" in message["message"] and f"{kept} frames" in message["message"], message
    assert message["kept_frames"] == kept
    saved = client.post(f"/api/jobs/{victim}/save")
    assert saved.status_code == 201, saved.text
    clip = client.get(saved.json()["url"])
    assert clip.status_code == 200 and len(clip.content) > 1000
    thread.join(timeout=300)
    _, started_other, blocks, end = other_result["out"]
    assert end["type"] == "done" and len(blocks) == 4 and started_other["replica"] != started["replica"]
    _, _, blocks, end = run_job(client, dict(prompt="a green triangle", negative=[], seed=5, blocks=1))
    assert end["type"] == "done" and len(blocks) == 1, "the next job is served"
    import time

    deadline = time.monotonic() + 120  # Ray Serve brings the killed replica back
    while len(client.get("/api/info").json()["cluster"]["replicas"]) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    replicas = client.get("/api/info").json()["cluster"]["replicas"]
    assert len(replicas) == 2 and started["replica"] not in [r["id"] for r in replicas], replicas


def test_a_cross_origin_websocket_is_refused_through_the_ingress(cluster):
    from starlette.websockets import WebSocketDisconnect

    _, client = cluster
    job = start(client, prompt="a red circle", negative=[], seed=1, blocks=1)
    with pytest.raises(WebSocketDisconnect):
        with client.websocket_connect(f"/api/jobs/{job}/stream", headers={"origin": "http://evil.example"}) as ws:
            ws.receive_json()


def test_an_address_that_does_not_answer_is_one_line():
    done = subprocess.run([sys.executable, "-m", "nasa_video.cli", "serve", "--ray", "127.0.0.1:9", "--model", "tiny",
                           "--device", "cpu"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "no Ray cluster answers there" in done.stderr, done.stderr[-500:]
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_past_the_total_capacity_a_job_queues_and_a_viewer_that_leaves_frees_its_slot(cluster):
    """2 replicas x 2 streams: four endless jobs fill the cluster, a fifth sees its place in the queue; one viewer
    closing its socket lets the fifth start."""
    import contextlib
    import time

    server, client = cluster
    ids = [start(client, prompt=f"a red circle {i}", negative=[], seed=i, blocks=0) for i in range(5)]
    # Each session is exited (not only closed): the test client's portal waits for every session's exit.
    with contextlib.ExitStack() as stack:
        sockets = []
        for job in ids[:4]:
            ws = stack.enter_context(client.websocket_connect(f"/api/jobs/{job}/stream"))
            sockets.append(ws)
            until(ws, "started")
        late = stack.enter_context(client.websocket_connect(f"/api/jobs/{ids[4]}/stream"))
        queued = late.receive_json()
        assert queued == {"type": "queued", "position": 1}, queued
        info = client.get("/api/info").json()["cluster"]
        assert [r["streams"] for r in info["replicas"]] == [2, 2] and info["queue"] == 1, info
        sockets[0].__exit__(None, None, None)  # the viewer leaves (its second exit, by the stack, does nothing)
        until(late, "started")
        deadline = time.monotonic() + 60
        while client.get("/api/info").json()["cluster"]["running"] != 4 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert client.get("/api/info").json()["cluster"]["running"] == 4
        for ws in sockets[1:] + [late]:
            ws.send_json({"type": "stop"})
