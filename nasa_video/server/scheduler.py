"""Who runs on the device now and who waits: a FIFO queue of jobs past `max_streams`, with their places."""
from __future__ import annotations

import asyncio
from collections import deque

from .jobs import Job


class DeviceScheduler:
    """Who is on the device: up to `capacity` running jobs, the rest waiting in FIFO order. The server's device
    loop admits waiting jobs while there is room and runs rounds; wait() yields queue positions until a job is
    admitted."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.waiting: deque[Job] = deque()
        self.running: dict[str, Job] = {}
        self._changed = asyncio.Condition()

    def position(self, job: Job) -> int:
        """Jobs ahead of this one in the queue (1 = next in line)."""
        return list(self.waiting).index(job) + 1

    async def wait(self, job: Job, report, wake) -> bool:
        """Queue the job and block until the device loop admits it (True) or it is cancelled first (False).
        wake(): start the device loop if it is idle. Positions are sent outside the lock (a slow client must not
        hold up admissions)."""
        async with self._changed:
            self.waiting.append(job)
            wake()
        last = None
        try:
            while True:
                async with self._changed:
                    if job.cancelled or job.id in self.running:
                        break
                    position = self.position(job) if len(self.running) >= self.capacity else None
                    if position is None or position == last:
                        await self._changed.wait()
                        continue
                last = position
                await report(position)
            return job.id in self.running and not job.cancelled
        finally:
            async with self._changed:
                if job in self.waiting:
                    self.waiting.remove(job)
                    self._changed.notify_all()

    async def admit(self, can_take) -> list[Job]:
        """Move waiting jobs in FIFO order onto the device while there is room and can_take(job) says yes."""
        taken = []
        async with self._changed:
            while self.waiting and len(self.running) < self.capacity and can_take(self.waiting[0]):
                job = self.waiting.popleft()
                if job.cancelled:
                    continue
                self.running[job.id] = job
                taken.append(job)
            self._changed.notify_all()
        return taken

    async def release(self, job: Job) -> None:
        async with self._changed:
            self.running.pop(job.id, None)
            self._changed.notify_all()

    async def poke(self) -> None:
        """Wake the waiters (a cancellation happened)."""
        async with self._changed:
            self._changed.notify_all()
