"""The state behind the app: the generator, the jobs, the device loop (one batch, one block of every job per
round) and the WebSocket side of each job."""
from __future__ import annotations

import asyncio
import json
import logging
import math
import tempfile
import time
import warnings
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..errors import UserError
from ..guidance import METHODS
from .jobs import BadRequest, Job, Limits, _number, _text, api_words, parse_job, parse_negative_list
from .scheduler import DeviceScheduler
from .spool import ClipSpool, clip_name, png_data_url


class VideoServer:
    """The state behind the app: the generator, jobs waiting to be claimed, the device queue, kept frames."""

    def __init__(self, generator, clips_dir: str | Path, limits: Limits | None = None, model_name: str = "",
                 spool: bool = True):
        """spool: write each job's frames to its clip on disk (False: a cluster replica, whose ingress keeps them)."""
        self.gen = generator
        spec = generator.spec
        # An endless job runs on a rolling cache, which re-bases its positions when the generator can
        # (shift_positions); otherwise it would stop at the RoPE table, so the advertised limit says that.
        limits = limits or Limits()
        max_endless = limits.max_endless_blocks
        if not hasattr(generator.model, "shift_positions"):
            max_endless = min(max_endless, int(generator.model.max_frame_positions) // spec.video.frames_per_block)
        facts = dict(model=model_name or spec.name, fps=spec.video.fps, frames_per_block=spec.video.frames_per_block,
                     display_scale=spec.video.display_scale, default_method=spec.guidance.method,
                     default_scale=spec.guidance.scale, max_endless_blocks=max_endless)
        self._setup(clips_dir, limits, facts, spool)

    def _setup(self, clips_dir, limits: Limits, facts: dict, spool: bool) -> None:
        """What the HTTP side needs: the limits, the model's facts (info()), the queue, the jobs, the spool."""
        self.limits = limits
        self.clips_dir = Path(clips_dir)
        self.facts = dict(facts)
        self.model_name = facts["model"]
        self.fps, self.frames_per_block = facts["fps"], facts["frames_per_block"]
        self.display_scale = facts["display_scale"]
        self.default_method, self.default_scale = facts["default_method"], facts["default_scale"]
        self.max_endless_blocks = facts["max_endless_blocks"]
        self.spool = spool
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nasa-video-device")
        self.queue = DeviceScheduler(self.limits.max_streams)
        self.batch = None  # the running jobs' StreamBatch (made on the device thread)
        self._loop: asyncio.Task | None = None
        self.unclaimed: dict[str, Job] = {}
        self.finished: OrderedDict[str, Job] = OrderedDict()
        self.active: dict[str, Job] = {}
        # Jobs' spools (removed with this object or at exit), outside the clips folder, which holds saved clips only.
        self._spool = tempfile.TemporaryDirectory(prefix="nasa-video-spool-")
        self.spool_dir = Path(self._spool.name)
        self.allowed_hosts: frozenset[str] | None = None  # Host names served; None: any (see serve())

    async def on_device(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    # ---- HTTP -------------------------------------------------------------------------------------------
    def info(self) -> dict:
        methods = {}
        for name, cls in METHODS.items():
            lo, hi = cls.scale_range
            methods[name] = {"min": lo if math.isfinite(lo) else None, "max": hi if math.isfinite(hi) else None,
                             "max_negatives": cls.max_negatives,
                             "default": self.default_scale if name == self.default_method else cls.bench_scale}
        return {"model": self.model_name, "fps": self.fps, "frames_per_block": self.frames_per_block,
                "display_scale": self.display_scale, "default_method": self.default_method,
                "default_scale": self.default_scale, "methods": methods,
                "limits": {"max_prompt_chars": self.limits.max_prompt_chars,
                           "max_negatives": self.limits.max_negatives, "max_blocks": self.limits.max_blocks,
                           "max_streams": self.limits.max_streams,
                           "max_endless_blocks": self.max_endless_blocks}}

    def _encode_checks(self, texts: list[str]) -> list[str]:
        """Token limits (UserError) and unknown-word warnings, on the device thread."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for text in texts:
                self.gen.text.check_readable(text)  # a text the encoder reads as nothing: refused at POST
                self.gen.text.encode(text)
        return sorted({str(w.message) for w in caught})

    async def create_job(self, body) -> tuple[Job, list[str]]:
        self._drop_unclaimed()
        if len(self.unclaimed) + len(self.queue.waiting) >= self.limits.max_queue:
            raise BadRequest("the queue is full; try again later")
        job = parse_job(body, self.limits, self.default_method, self.default_scale)
        notes = await self._check_texts([job.request.prompt, *(job.request.negative or [])])
        self.unclaimed[job.id] = job
        return job, notes

    async def _check_texts(self, texts: list[str]) -> list[str]:
        """The texts' token limits (BadRequest) and unknown-word notes, by the text encoder."""
        try:
            return await self.on_device(self._encode_checks, texts)
        except UserError as error:
            raise BadRequest(api_words(str(error))) from None

    def _drop_unclaimed(self) -> None:
        now = time.monotonic()
        for key in [k for k, j in self.unclaimed.items() if now - j.created > self.limits.unclaimed_job_seconds]:
            del self.unclaimed[key]

    def save(self, job_id: str) -> str:
        job = self.active.get(job_id) or self.finished.get(job_id)
        if job is None:
            raise KeyError(job_id)
        if job.clip is None or not job.clip.frames:
            raise BadRequest("no frames yet; nothing to save")
        self.clips_dir.mkdir(parents=True, exist_ok=True)
        name = clip_name(job.id)
        job.clip.export(self.clips_dir / name)
        return name

    # ---- the stream -------------------------------------------------------------------------------------
    def _frames_for(self, job: Job):
        if job.blocks == 0:
            return None
        from ..config import pixel_frames

        return pixel_frames(job.blocks * self.frames_per_block, self.gen.temporal_stride)

    def _can_join(self, job: Job) -> bool:
        """A job can start now unless the running batch cannot take a stream mid-run (a cache with sink frames);
        then it waits for the batch to empty."""
        return self.batch is None or len(self.batch) == 0 or self.batch.accepts_joins

    def _start(self, job: Job) -> None:
        """On the device thread: put the job into the batch."""
        job.request.frames = self._frames_for(job)
        # One rolling cache for all: a short job never fills it, so it makes what a fixed cache would.
        if self.batch is None or len(self.batch) == 0:
            self.batch = self.gen.stream_batch([dict(vars(job.request), name=job.id)], rolling=True)
        else:
            self.batch.add(job.request, job.id)

    def _apply_controls(self, stream, controls: list[dict]) -> list[str]:
        """The client's changes, from the next block; returns the refusals (the stream goes on with what it had)."""
        refused = []
        for message in controls:
            try:
                scale = None if message.get("scale") is None else _number(message, "scale", None, float, -1e6, 1e6)
                if message["type"] == "prompt":
                    prompt = _text(message.get("prompt", ""), "prompt", self.limits.max_prompt_chars)
                    if not prompt:
                        raise BadRequest("prompt is empty")
                    recache = message.get("recache", False)
                    if not isinstance(recache, bool):
                        raise BadRequest(f"recache must be true or false, got {str(recache)[:40]}")
                    stream.set_prompt(prompt, recache=recache)
                elif message["type"] == "negative":
                    stream.set_negative(parse_negative_list(message.get("negative"), self.limits) or None, scale)
                elif scale is not None:
                    stream.set_scale(scale)
            except (BadRequest, UserError) as error:
                refused.append(str(error))
        return refused

    def _round(self, jobs: list[Job]) -> dict[str, tuple]:
        """On the device thread: one block of every running job, the batch in one step. Returns {job id: (chunk or
        None when the job's stream ended, refusals, error or None)}; a job's frames go to its spool here."""
        out: dict[str, tuple] = {}
        batched = []
        for job in jobs:
            controls, job.controls = job.controls, []
            if job.cancelled:  # off the batch before its step, not after
                self._leave(job)
                out[job.id] = (None, [], None)
                continue
            refused = self._apply_controls(self.batch[job.id], controls) if controls else []
            batched.append(job)
            out[job.id] = (None, refused, None)
        if batched:
            try:
                chunks = self.batch.step()
            except Exception as error:  # every job ends with the message
                logging.getLogger(__name__).exception("generation failed")
                self.batch = None
                for job in batched:
                    out[job.id] = (None, out[job.id][1], error)
                chunks = {}
            failed = self.batch.failed if self.batch is not None else {}
            for job in batched:
                if job.id in chunks:
                    out[job.id] = (chunks[job.id], out[job.id][1], None)
                elif job.id in failed:  # its own inputs failed: it ends with the message, the others go on
                    out[job.id] = (None, out[job.id][1], failed.pop(job.id))
        for job in jobs:
            chunk = out[job.id][0]
            if chunk is not None and job.clip is not None:
                job.clip.write(chunk.frames)  # to disk: the job holds no frames
        return out

    def _leave(self, job: Job) -> None:
        """On the device thread: take a finished or cancelled job off the device."""
        if self.batch is not None and job.id in self.batch:
            self.batch.remove(job.id)
        if job.clip is not None:
            job.clip.seal()

    def _wake(self) -> None:
        if self._loop is None or self._loop.done():
            self._loop = asyncio.get_running_loop().create_task(self._device_loop())

    def _post(self, job: Job, message) -> None:
        """Hand a message to the job's WebSocket; a viewer that fell backlog_blocks behind loses its oldest block
        message (the clip on disk has every frame)."""
        if message[0] == "block" and sum(m[0] == "block" for m in job.outbox) >= self.limits.backlog_blocks:
            oldest = next(i for i, m in enumerate(job.outbox) if m[0] == "block")
            del job.outbox[oldest]
            job.dropped += 1
        job.outbox.append(message)
        job.ready.set()

    async def _end(self, job: Job, message) -> None:
        try:
            await self.on_device(self._leave, job)
        except Exception:  # the job ends all the same; the others go on
            logging.getLogger(__name__).exception("could not take a job off the device")
        job.ended = True
        self._post(job, message)
        await self.queue.release(job)

    async def _device_loop(self) -> None:
        """Run rounds until no job is left. Should it fail itself, every job on the device ends with the message
        (no viewer waits for a block that will not come)."""
        try:
            await self._rounds()
        except BaseException as error:
            logging.getLogger(__name__).exception("the device loop failed")
            self.batch = None
            for job in list(self.queue.running.values()):
                if not job.ended:
                    job.ended = True
                    self._post(job, ("failed", str(error) or type(error).__name__))
                    await self.queue.release(job)
            raise

    async def _rounds(self) -> None:
        """Admit waiting jobs while there is room, then run a round; until no job is left."""
        while True:
            for job in await self.queue.admit(self._can_join):
                if self.spool:
                    job.clip = ClipSpool(self.spool_dir / job.id, self.fps, self.display_scale)
                self.active[job.id] = job
                try:
                    await self.on_device(self._start, job)
                except UserError as error:
                    await self._end(job, ("error", str(error)))
                    continue
                except Exception as error:  # out of memory and the like: this job ends with the message
                    logging.getLogger(__name__).exception("could not start a job")
                    await self._end(job, ("failed", str(error)))
                    continue
                job.began = time.perf_counter()
                self._post(job, ("started", None))
            jobs = [j for j in self.queue.running.values() if not j.ended]
            if not jobs:
                if not self.queue.waiting:
                    return
                await asyncio.sleep(0.01)  # a waiting job that cannot start yet (it waits for the batch to empty)
                continue
            try:
                results = await self.on_device(self._round, jobs)
            except Exception as error:  # the page shows why the stream ended instead of hanging
                logging.getLogger(__name__).exception("generation failed")
                results = {job.id: (None, [], error) for job in jobs}
            for job in jobs:
                chunk, refused, error = results[job.id]
                for reason in refused:
                    self._post(job, ("refused", reason))
                if error is not None:
                    await self._end(job, ("failed", str(error)))
                    continue
                if chunk is not None:
                    job.made += 1
                    job.frames_done += len(chunk.frames)
                    self._post(job, ("block", chunk))
                limit = job.blocks or self.max_endless_blocks
                if chunk is None or job.cancelled or job.made >= limit:
                    await self._end(job, ("done", None))

    async def run(self, ws, job: Job) -> None:
        """One WebSocket's job: wait for the device, stream the blocks, stop when asked or disconnected."""
        from starlette.websockets import WebSocketDisconnect

        job.ready = asyncio.Event()
        listener = asyncio.create_task(self._listen(ws, job))
        try:
            async def report(position):
                await ws.send_json({"type": "queued", "position": position})

            if await self._admit(job, report):
                await self._send(ws, job)
        except (WebSocketDisconnect, RuntimeError):
            job.cancelled = True
        finally:
            listener.cancel()
            await self._finish(job)

    async def _listen(self, ws, job: Job) -> None:
        """The viewer's control messages: queued on the job (applied from its next block), stop, or malformed."""
        from starlette.websockets import WebSocketDisconnect

        try:
            while True:
                try:
                    message = json.loads(await ws.receive_text())
                except (ValueError, KeyError):  # malformed or binary: say so and keep the stream
                    await ws.send_json({"type": "error", "message": "control message is not valid JSON: "
                                        "send {\"type\": \"prompt\" | \"negative\" | \"scale\" | \"stop\", ...}"})
                    continue
                if not isinstance(message, dict) or message.get("type") not in ("prompt", "negative", "scale",
                                                                                 "stop"):
                    await ws.send_json({"type": "error", "message": "unknown control message"})
                elif message["type"] == "stop":
                    job.cancelled = True
                    await self.queue.poke()  # a queued job leaves the queue now
                    self._controlled(job)
                else:
                    job.controls.append(message)
                    self._controlled(job)
        except (WebSocketDisconnect, RuntimeError, ValueError):
            job.cancelled = True
            await self.queue.poke()
            self._controlled(job)

    def _controlled(self, job: Job) -> None:
        """A control message was queued on the job, or it was cancelled (here the device loop reads both at its
        next round; a cluster ingress forwards them to the job's replica)."""

    async def _admit(self, job: Job, report) -> bool:
        """Wait for the device: True once the job runs, False if it was cancelled first."""
        return await self.queue.wait(job, report, self._wake)

    async def _finish(self, job: Job) -> None:
        if job.id in self.active:  # it reached the device: wait until it is off, then file it as finished
            while not job.ended and self._loop is not None and not self._loop.done():
                job.cancelled = True  # the viewer left: the device loop takes the job off after its block
                await asyncio.sleep(0.01)
            self._file_finished(job)

    def _file_finished(self, job: Job) -> None:
        self.active.pop(job.id, None)
        self.finished[job.id] = job
        while len(self.finished) > self.limits.kept_videos:
            _, old = self.finished.popitem(last=False)
            if old.clip is not None:
                self.executor.submit(old.clip.discard)

    async def outbox(self, job: Job):
        """What the device loop made for this job, (kind, item) in order, until its end (error, failed, done)."""
        while True:
            while not job.outbox:
                job.ready.clear()
                await job.ready.wait()
            kind, item = job.outbox.popleft()
            yield kind, item
            if kind in ("error", "failed", "lost", "done"):
                return

    async def _send(self, ws, job: Job) -> None:
        """Send what the device loop made for this job, in order, until its end."""
        previous = None
        async for kind, item in self.outbox(job):
            if kind == "started":  # item: the replica running it (a cluster), else None
                await ws.send_json({"type": "started", "id": job.id, "blocks": job.blocks, "fps": self.fps,
                                    "display_scale": self.display_scale, **({"replica": item} if item else {})})
            elif kind == "refused":
                await ws.send_json({"type": "error", "message": f"change refused: {item}", "fatal": False})
            elif kind == "error":
                await ws.send_json({"type": "error", "message": item})
            elif kind == "failed":
                await ws.send_json({"type": "error", "message": f"generation failed: {item}", "fatal": True})
            elif kind == "lost":  # a cluster replica died mid-stream (cluster.py): what was kept, and where
                await ws.send_json({"type": "error", "message": item, "fatal": True, "kept_frames": job.frames_done})
            elif kind == "block":
                chunk = item
                state = {"prompt": chunk.prompt, "negative": [t for t, _ in chunk.negative], "scale": chunk.scale}
                await ws.send_json({
                    "type": "block", "block": chunk.block, "first_frame": chunk.first_frame,
                    "frames": [png_data_url(f) for f in chunk.frames], **state,
                    "changed": previous is not None and state != previous,
                    "recache_seconds": chunk.recache_seconds, "dropped": job.dropped,
                    "fps": job.frames_done / max(time.perf_counter() - job.began, 1e-9),
                    "seconds": chunk.denoise_seconds + chunk.decode_seconds})
                previous = state
            else:  # done
                await ws.send_json({"type": "done", "blocks": job.made, "frames": job.frames_done,
                                    "stopped": job.cancelled, "seconds": time.perf_counter() - job.began})
