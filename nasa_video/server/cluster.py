"""`nasa-video serve --ray`: the live page over many GPUs and machines, on Ray Serve.

    viewer --HTTP/WS--> ingress (this process: the same Starlette app, page and API; ClusterServer)
                          |  DeploymentHandle, routed by SlotRouter
                          v
                        GeneratorReplica x N (Ray Serve replicas, one generator each on its GPU, each running the
                        single-process server's batched device loop for up to max_streams jobs)

- Placement: a new job goes to the replica with the most free slots (SlotRouter, from the ingress's own count of
  the jobs it placed); its controls (prompt, negative, scale, stop) go to the replica that runs it, for the job's
  life. Only jobs past the total capacity (replicas x max_streams; the maximum replicas when autoscaling) queue,
  at the ingress, and see their place. Ray Serve starts, restarts and (with --min/--max-replicas) scales the
  replicas.
- Frames: a replica streams each job's blocks (raw frames) to the ingress, which spools them to the job's clip on
  its own disk and sends them to the viewer; so "save" works mid-stream, and a clip outlives its replica.
- Faults: a replica that dies mid-stream ends its jobs with a message naming the frames kept (saved with POST
  /api/jobs/ID/save as usual); the other replicas' viewers go on, new jobs go to live replicas, and Serve brings
  the dead one back. A viewer that leaves frees its slot (the replica takes the job off after its block).
- The same guarantees as one process: the ingress is the same app (same-origin rule, loopback Host check, bounded
  bodies and fields), and a replica runs the same device loop on the same generator (a job's frames equal the
  single-process server's).
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import tempfile
import time

from ray.serve.request_router import RequestRouter

from ..errors import UserError
from . import placement
from .address import check_address
from .jobs import BadRequest, Job, Limits, parse_job
from .service import VideoServer
from .spool import ClipSpool

log = logging.getLogger("nasa_video.server")
APP, DEPLOYMENT = "nasa-video", "generator"
ENDS = ("error", "failed", "done")

def _placement():
    """The shared placement module (see placement.py for why it is imported at each use)."""
    import importlib

    return importlib.import_module("nasa_video.server.placement")


class SlotRouter(RequestRouter):
    """Ray Serve request router: a call naming `replica` goes to that replica only (a job's controls); a new job
    (`job_id`) to the replica with the most free slots, which it then holds; anything else to the least loaded."""

    def initialize_state(self, capacity: int = 4, **kwargs):
        self.capacity = int(capacity)
        _placement().ROUTERS.append(self)

    def free(self, replica) -> int:
        return self.capacity - len(_placement().ASSIGNED.get(replica.replica_id.unique_id, ()))

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        kwargs = pending_request.kwargs if pending_request is not None else {}
        wanted = kwargs.get("replica")
        if wanted is not None:
            return [[r for r in candidate_replicas if r.replica_id.unique_id == wanted]]
        ranked = sorted(candidate_replicas, key=lambda r: -self.free(r))
        job = kwargs.get("job_id")
        if job is None:
            return [ranked]
        assigned = _placement().ASSIGNED
        room = [r for r in ranked if self.free(r) > 0 or job in assigned.get(r.replica_id.unique_id, ())]
        if not room:  # every live replica is full (one died, or autoscaling has yet to add one): Serve backs off
            return [[]]  # and asks again, and the waiting job counts as load for the autoscaler
        # Held from now: a second job placed before this one is routed must see the slot taken. Only the best
        # replica is offered: one slow to answer Serve's queue probe (a busy CPU) is asked again after a backoff,
        # not passed over for a fuller one.
        _placement().place(job, room[0].replica_id.unique_id)
        return [room[:1]]

    def on_request_routed(self, pending_request, replica_id, result) -> None:
        job = pending_request.kwargs.get("job_id")
        if job is not None:  # where it went, whatever was chosen for it
            _placement().place(job, replica_id.unique_id)

    def on_replica_actor_died(self, replica_id):
        placement = _placement()
        placement.ASSIGNED.pop(replica_id.unique_id, None)
        placement.DEAD.add(replica_id.unique_id)
        super().on_replica_actor_died(replica_id)


class GeneratorReplica:
    """One Serve replica: a generator on its device and the single-process server's device loop (spooling off:
    the ingress keeps the frames). Deployed by start_cluster with the replica's resources."""

    def __init__(self, generator: dict, limits: dict):
        from ray import serve

        from ..pipeline import StreamingGenerator

        self.gen = StreamingGenerator.from_config(**generator)
        self.limits = Limits(**limits)
        self.server = VideoServer(self.gen, tempfile.mkdtemp(prefix="nasa-video-replica-"), self.limits, spool=False)
        self.id = serve.get_replica_context().replica_id.unique_id
        self.jobs: dict[str, Job] = {}

    def facts(self) -> dict:
        return {**self.server.facts, "replica": self.id, "device": str(self.gen.device)}

    async def check_texts(self, texts: list[str]) -> dict:
        try:
            return {"notes": await self.server._check_texts(texts)}
        except BadRequest as error:
            return {"error": str(error)}

    async def run_job(self, body: dict, job_id: str):
        """The job's life on this replica: first ("replica", id), then its outbox, (kind, item) in order."""
        server = self.server
        job = parse_job(body, self.limits, server.default_method, server.default_scale)
        job.id, job.ready = job_id, asyncio.Event()
        self.jobs[job_id] = job
        try:
            yield "replica", self.id
            if await server._admit(job, _no_report):
                async for kind, item in server.outbox(job):
                    yield kind, item
        finally:  # the end, the ingress's stop, or its cancel: off the device after its block
            job.cancelled = True
            await server.queue.poke()
            await server._finish(job)
            self.jobs.pop(job_id, None)

    async def control(self, job_id: str, message: dict, replica: str | None = None) -> bool:
        """A viewer's change (from the job's next block) or stop; False if no such job runs here."""
        job = self.jobs.get(job_id)
        if job is None:
            return False
        if message.get("type") == "stop":
            job.cancelled = True
            await self.server.queue.poke()
        else:
            job.controls.append(message)
        return True

    def record_routing_stats(self) -> dict:
        return {"jobs": len(self.jobs)}


async def _no_report(position) -> None:
    """A replica never queues a job in sight of a viewer: the ingress admits only what fits."""


class ClusterServer(VideoServer):
    """The ingress: the single-process server's HTTP and WebSocket side, with the device loop replaced by jobs
    placed on replicas (see the module docstring)."""

    def __init__(self, handle, clips_dir, limits: Limits, facts: dict, max_replicas: int):
        self.handle = handle
        self.per_replica = limits.max_streams
        total = dataclasses.replace(limits, max_streams=limits.max_streams * max_replicas)
        self._setup(clips_dir, total, facts, spool=True)
        self.replica_of: dict[str, str] = {}
        self.pumps: dict[str, asyncio.Task] = {}

    def info(self) -> dict:
        out = super().info()
        replicas = placement.live_replicas()
        out["cluster"] = {"replicas": [{"id": r, "streams": len(placement.ASSIGNED.get(r, ()))} for r in replicas],
                          "streams_per_replica": self.per_replica, "running": len(self.queue.running),
                          "queue": len(self.queue.waiting)}
        return out

    async def _check_texts(self, texts: list[str]) -> list[str]:
        answer = await self.handle.check_texts.remote(texts)
        if "error" in answer:
            raise BadRequest(answer["error"])
        return answer["notes"]

    # ---- placement ------------------------------------------------------------------------------------------
    def _wake(self) -> None:
        # every wake admits (admit() holds the queue's lock): a job queued while another admission ran is not missed
        asyncio.get_running_loop().create_task(self._admissions())

    async def _admissions(self) -> None:
        """Jobs the ingress's queue admits (total capacity) start streaming from a replica."""
        for job in await self.queue.admit(lambda job: True):
            job.clip = ClipSpool(self.spool_dir / job.id, self.fps, self.display_scale)
            self.active[job.id] = job
            self.pumps[job.id] = asyncio.create_task(self._pump(job))

    async def _pump(self, job: Job) -> None:
        """The replica's stream of this job into its outbox (and its frames into its clip), until its end."""
        replica, how, stream = None, "done", None
        try:
            stream = self.handle.options(stream=True).run_job.remote(body=job.body, job_id=job.id)
            async for kind, item in stream:
                if kind == "replica":
                    replica = self._placed(job, item)
                    continue
                if kind == "started":
                    job.began = time.perf_counter()
                    item = replica
                elif kind == "block":
                    job.made += 1
                    job.frames_done += len(item.frames)
                    await self.on_device(job.clip.write, item.frames)
                self._post(job, (kind, item))
                if kind in ENDS:
                    how = "stopped" if job.cancelled else kind
                    break
            else:
                how = "stopped"
        except Exception as error:  # the replica died (ActorDiedError and the like), or could not be reached
            how = f"lost ({type(error).__name__})"
            log.warning("job %s: replica %s stopped mid-stream: %s", job.id, replica, error)
            self._post(job, ("lost", f"the replica running this video stopped ({type(error).__name__}); the "
                                     f"{job.frames_done} frames made so far are kept: save them with "
                                     f"POST /api/jobs/{job.id}/save"))
        finally:
            if stream is not None:
                stream.cancel()  # a no-op once it ended; else the replica takes the job off
            job.ended = True
            placement.release(job.id)  # its slot is free for the next job now, not after the clip is sealed
            await self.on_device(job.clip.seal)
            log.info("job %s ended on replica %s: %s, %d blocks", job.id, replica, how, job.made)
            self.pumps.pop(job.id, None)
            await self.queue.release(job)
            self._wake()  # a waiting job may take the slot

    def _placed(self, job: Job, replica: str) -> str:
        placement.place(job.id, replica)
        self.replica_of[job.id] = replica
        log.info("job %s started on replica %s", job.id, replica)
        self._controlled(job)  # changes sent before it was placed
        return replica

    # ---- the viewer's changes -------------------------------------------------------------------------------
    def _controlled(self, job: Job) -> None:
        if job.id in self.replica_of:
            asyncio.get_running_loop().create_task(self._forward(job))

    async def _forward(self, job: Job) -> None:
        """The job's queued changes, then its stop if it was cancelled, to its replica (and only to it)."""
        replica = self.replica_of.get(job.id)
        if replica is None or job.ended:
            return
        messages, job.controls = job.controls, []
        if job.cancelled:
            messages.append({"type": "stop"})
        for message in messages:
            try:
                await asyncio.wait_for(self.handle.control.remote(job_id=job.id, message=message, replica=replica),
                                       timeout=10)
            except Exception as error:  # its replica is gone: the pump says so
                log.warning("job %s: change not delivered to replica %s: %s", job.id, replica, error)
                return

    async def _finish(self, job: Job) -> None:
        if job.id not in self.active:
            return
        if not job.ended:
            job.cancelled = True
            await self._forward(job)
            pump = self.pumps.get(job.id)
            if pump is not None:
                await asyncio.wait({pump}, timeout=30)
                if not pump.done():
                    pump.cancel()  # a replica that does not answer: the stream is cancelled
        self.replica_of.pop(job.id, None)
        self._file_finished(job)


# ---- starting the cluster -----------------------------------------------------------------------------------
def start_cluster(address: str | None, generator: dict, limits: Limits, replicas: int = 1,
                  min_replicas: int | None = None, max_replicas: int | None = None, gpus_per_replica: float = 1.0,
                  cpus_per_replica: float = 1.0, num_cpus: int | None = None):
    """Connect to (or start) a Ray cluster and deploy the generator replicas. Returns (handle, facts, most
    replicas). address: None starts a local cluster; "auto" joins the one this machine belongs to; HOST:PORT."""
    import ray
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    if address is not None:
        check_address(address)
    autoscale = min_replicas is not None or max_replicas is not None
    lo = min_replicas if min_replicas is not None else 1
    hi = max_replicas if max_replicas is not None else max(lo, replicas)
    if autoscale and not 0 <= lo <= hi or hi < 1:
        raise UserError(f"--min-replicas {lo} / --max-replicas {hi}: need 0 <= min <= max and max >= 1")
    try:
        if not ray.is_initialized():
            ray.init(address=None if address in (None, "local") else address, include_dashboard=False,
                     num_cpus=num_cpus if address in (None, "local") else None, log_to_driver=False,
                     logging_level=logging.WARNING)
    except Exception as error:
        what = "start a local Ray cluster" if address in (None, "local") else f"join the Ray cluster at {address}"
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(f"could not {what}: {reason}") from None
    gpus = ray.cluster_resources().get("GPU", 0)
    need = gpus_per_replica * (lo if autoscale else replicas)
    if need > gpus:
        raise UserError(f"{need:g} GPUs needed ({gpus_per_replica:g} per replica) but the cluster has {gpus:g}; "
                        f"add GPU machines, use fewer replicas, or --gpus-per-replica 0 to run on CPUs")
    options = dict(ray_actor_options={"num_gpus": gpus_per_replica, "num_cpus": cpus_per_replica},
                   # its jobs' streams plus room for their controls, so a stop always gets through
                   max_ongoing_requests=limits.max_streams + 16,
                   request_router_config=RequestRouterConfig(
                       request_router_class=f"{__name__}:SlotRouter",
                       request_router_kwargs={"capacity": limits.max_streams}),
                   health_check_period_s=2, health_check_timeout_s=30)
    if autoscale:  # one ongoing request per job: scale up when the replicas are full
        options["autoscaling_config"] = {"min_replicas": lo, "max_replicas": hi,
                                         "target_ongoing_requests": limits.max_streams,
                                         "upscale_delay_s": 2, "downscale_delay_s": 60}
    else:
        options["num_replicas"] = replicas
    serve.start(proxy_location="Disabled")  # the ingress below serves HTTP
    deployment = serve.deployment(GeneratorReplica, name=DEPLOYMENT, **options)
    handle = serve.run(deployment.bind(generator, dataclasses.asdict(limits)), name=APP, route_prefix=None)
    facts = handle.facts.remote().result()
    log.info("ray cluster: %s replica(s) of %s on %s", f"{lo}-{hi}" if autoscale else replicas, facts["model"],
             facts["device"])
    return handle, facts, hi if autoscale else replicas


def stop_cluster() -> None:
    """Remove the app (its replicas) and leave the cluster."""
    import ray
    from ray import serve

    try:
        serve.delete(APP)
    except Exception:  # noqa: BLE001 (already gone)
        pass
    placement.reset()
    if ray.is_initialized():
        ray.shutdown()
