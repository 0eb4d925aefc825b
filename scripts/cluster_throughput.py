"""Throughput of `nasa-video serve --ray`: viewers served per second and block latency, 1 vs 2 replicas, with 2, 4
and 8 viewers at once (a measurement, not a test).

Each setting starts a local Ray cluster with N replicas of the model behind the ingress, served by uvicorn on a
loopback port, then starts its viewers together: each posts a job of --blocks blocks and reads its WebSocket to the
end, as the page does. Printed per setting: viewers per second (viewers / wall time until the last one is done),
the mean time from a viewer's start to its first block (queueing + cache set-up + the first block) and the mean
time between its blocks after that (what a viewer sees as the stream's pace), and the jobs per replica.

    .venv/bin/python scripts/cluster_throughput.py                     # tiny model on this CPU
    .venv/bin/python scripts/cluster_throughput.py --device cuda --gpus-per-replica 1 --model self-forcing ...

On a CPU, replicas share the machine's cores, so two replicas gain only what one replica's batched forward left
idle; on GPUs each replica has its own device.
"""
from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def viewer(base: str, body: dict, out: dict) -> None:
    """One viewer: post the job, read its stream to the end; block arrival times and the replica."""
    from websockets.sync.client import connect

    began = time.perf_counter()
    request = urllib.request.Request(f"http://{base}/api/jobs", data=json.dumps(body).encode(),
                                     headers={"content-type": "application/json"})
    with urllib.request.urlopen(request) as response:
        job = json.loads(response.read())["id"]
    arrivals, replica = [], None
    with connect(f"ws://{base}/api/jobs/{job}/stream", max_size=None, open_timeout=60) as ws:
        while True:
            message = json.loads(ws.recv())
            if message["type"] == "started":
                replica = message.get("replica")
            elif message["type"] == "block":
                arrivals.append(time.perf_counter())
            elif message["type"] == "done" or (message["type"] == "error" and message.get("fatal")):
                break
    out.update(began=began, arrivals=arrivals, replica=replica, ended=time.perf_counter(), last=message)


def idle(base: str, timeout: float = 60) -> None:
    """Until the last setting's jobs are off every replica (a viewer has its "done" a moment before)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"http://{base}/api/info") as response:
            cluster = json.loads(response.read())["cluster"]
        if cluster["running"] == 0 and not any(r["streams"] for r in cluster["replicas"]):
            return
        time.sleep(0.05)
    raise SystemExit(f"the cluster did not go idle in {timeout:g} s: {cluster}")


def measure(base: str, args, viewers: int) -> dict:
    """All viewers at once on the running ingress: their rates and latencies."""
    results = [{} for _ in range(viewers)]
    threads = [threading.Thread(target=viewer, args=(base, dict(
        prompt=args.prompt, negative=[args.negative], scale=args.scale, seed=i, blocks=args.blocks), results[i]))
        for i in range(viewers)]
    began = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - began
    failed = [r["last"] for r in results if r["last"]["type"] != "done"]
    if failed:
        raise SystemExit(f"{len(failed)} viewer(s) failed: {failed[0]}")
    first = [r["arrivals"][0] - r["began"] for r in results]
    gaps = [b - a for r in results for a, b in zip(r["arrivals"], r["arrivals"][1:])]
    per_replica: dict[str, int] = {}
    for r in results:
        per_replica[r["replica"]] = per_replica.get(r["replica"], 0) + 1
    return dict(viewers=viewers, wall_s=wall, viewers_per_s=viewers / wall, first_block_s=statistics.mean(first),
                block_gap_s=statistics.mean(gaps) if gaps else float("nan"),
                jobs_per_replica=sorted(per_replica.values(), reverse=True))


def run_cluster(args, replicas: int):
    """A local cluster of this many replicas behind an ingress on a loopback port; one row per viewer count."""
    import uvicorn

    from nasa_video.server import Limits, create_app
    from nasa_video.server.cluster import ClusterServer, start_cluster, stop_cluster

    limits = Limits(max_blocks=max(args.blocks, 8), max_streams=args.streams)
    generator = dict(model=args.model, checkpoint=args.checkpoint, device=args.device, dtype=args.dtype)
    handle, facts, most = start_cluster(None, generator, limits, replicas=replicas,
                                        gpus_per_replica=args.gpus_per_replica,
                                        cpus_per_replica=args.cpus_per_replica, num_cpus=args.num_cpus)
    port = free_port()
    server = ClusterServer(handle, tempfile.mkdtemp(prefix="nasa-video-throughput-"), limits, facts, most)
    web = uvicorn.Server(uvicorn.Config(create_app(server), host="127.0.0.1", port=port, log_level="warning",
                                        ws="websockets-sansio"))
    thread = threading.Thread(target=web.run, daemon=True)
    thread.start()
    while not web.started:
        time.sleep(0.05)
    base = f"127.0.0.1:{port}"
    try:
        warm = [threading.Thread(target=viewer, args=(base, dict(prompt="a red circle", negative=[], seed=0,
                                                                 blocks=1), {})) for _ in range(replicas)]
        for t in warm:  # one job on each replica at once: every replica's code paths run before the timing
            t.start()
        for t in warm:
            t.join()
        for viewers in args.viewers:
            idle(base)
            yield dict(replicas=replicas, **measure(base, args, viewers))
    finally:
        web.should_exit = True
        thread.join(timeout=30)
        stop_cluster()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    p.add_argument("--viewers", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--blocks", type=int, default=4, help="blocks per viewer's job")
    p.add_argument("--streams", type=int, default=4, help="streams per replica (serve --max-streams)")
    p.add_argument("--gpus-per-replica", type=float, default=0.0)
    p.add_argument("--cpus-per-replica", type=float, default=1.0)
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local cluster (default: this machine's)")
    p.add_argument("--prompt", default="a red circle and a blue square")
    p.add_argument("--negative", default="blue square")
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = p.parse_args(argv)
    rows = []
    print(f"{'replicas':>8} {'viewers':>7} {'wall s':>7} {'viewers/s':>9} {'1st block s':>11} {'block gap s':>11}"
          f"  jobs per replica", flush=True)
    for replicas in args.replicas:
        for row in run_cluster(args, replicas):
            rows.append(row)
            print(f"{row['replicas']:>8} {row['viewers']:>7} {row['wall_s']:>7.2f} {row['viewers_per_s']:>9.3f} "
                  f"{row['first_block_s']:>11.3f} {row['block_gap_s']:>11.3f}  {row['jobs_per_replica']}", flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
