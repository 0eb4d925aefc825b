"""CUDA graphs for the steady state of a stream: each cached forward (a denoising step or the cache pass) is
captured once per key and replayed with static input buffers.

What a replay may read is fixed at capture: the static inputs (x, t, RoPE cos/sin; copied in before each replay),
the self-attention cache's buffers with the block's slots (written in place), and each layer's guidance plan (its
text K/V and alphas). The key is everything else the forward depends on: the input shapes, the cache slots, and
each layer's plan key (text object, method object, alphas). A plan is a pure function of its key, so a replay
under a plan rebuilt for the same key reads the captured plan's tensors, which hold the same values; an entry
keeps those objects alive, so no id in a live key is reused. The cache's buffers are the binding: a batch that
gains or loses rows makes new buffers, and every graph bound to the old ones is dropped (nothing keeps old
caches alive).

Forwards a graph cannot serve run eagerly: a masked forward (rows that joined a batch late), training (grad),
prompts handed to the forward, an uncached forward.

On a CPU (capture=False) the same entries run the captured closure eagerly on their static buffers: the key,
the binding and the static-buffer wiring are exercised, and a replay reads the buffers and cache slots of its
capture, not the current call's, as a graph would; so a key that missed a change of shape or slots shows as a
wrong output in the CPU tests. (The plans a CPU replay reads are the layers' current ones, equal to the captured
ones by the key.)
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass
class _Entry:
    inputs: tuple[torch.Tensor, ...]  # static input buffers
    run: Callable[..., torch.Tensor]  # the closure captured (what a replay runs)
    keep: tuple  # objects whose ids are in the key (texts, methods, plans), alive while the entry is
    graph: "torch.cuda.CUDAGraph | None" = None
    output: torch.Tensor | None = None  # the graph's static output
    runs: int = field(default=0)


class StepGraphs:
    """Captured forwards, least recently used dropped past `capacity`. Counts what it did: captures, and runs (every forward
    it served, the first of each capture included)."""

    def __init__(self, device, capture: bool | None = None, capacity: int = 32, warmup: int = 2):
        self.device = torch.device(device)
        self.capture = self.device.type == "cuda" if capture is None else bool(capture)
        if self.capture and self.device.type != "cuda":
            raise ValueError("CUDA graphs capture only on a CUDA device")
        self.capacity, self.warmup = int(capacity), int(warmup)
        self.entries: OrderedDict[tuple, _Entry] = OrderedDict()
        self.binding: tuple | None = None
        self.captures = self.runs = self.dropped = 0
        self.pool = torch.cuda.graph_pool_handle() if self.capture else None

    def clear(self) -> None:
        self.dropped += len(self.entries)
        self.entries.clear()

    def bind(self, binding: tuple) -> None:
        """The cache buffers the next forwards write: graphs bound to others are dropped."""
        if binding != self.binding:
            self.clear()
            self.binding = binding

    def __call__(self, key: tuple, keep: tuple, inputs: tuple[torch.Tensor, ...],
                 run: Callable[..., torch.Tensor]) -> torch.Tensor:
        """run(*inputs) -> output, from the graph of `key` (captured now if new). The output is a fresh tensor."""
        entry = self.entries.get(key)
        if entry is None:
            entry = self._record(inputs, run, keep)
            self.entries[key] = entry
            while len(self.entries) > self.capacity:
                self.entries.popitem(last=False)
                self.dropped += 1
        else:
            self.entries.move_to_end(key)
            for static, value in zip(entry.inputs, inputs):
                static.copy_(value)
        self.runs += 1
        entry.runs += 1
        if entry.graph is not None:
            entry.graph.replay()
            return entry.output.clone()
        return entry.run(*entry.inputs)

    def _record(self, inputs, run, keep) -> _Entry:
        self.captures += 1
        static = tuple(x.clone() for x in inputs)
        entry = _Entry(static, run, keep)
        if not self.capture:
            return entry
        # Warm up on a side stream (kernel selection, workspaces), then capture. Each warm-up writes the cache
        # slots the replay writes, with the same values: the inputs are the real ones.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                run(*static)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # One pool for every graph: they never run at once, and each output is copied out before the next replay.
        # thread_local: the overlapped decode's worker thread keeps working on its own stream during a capture.
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            entry.output = run(*static)
        entry.graph = graph
        return entry


def resolve_cuda_graphs(enable: bool | None, device) -> bool:
    """The --cuda-graphs switch. None (the default) is off on every device until a GPU bench shows graphs win
    (scripts/bench_gpu.sh measures on and off); True on a CPU runs the static-buffer path eagerly (for tests)."""
    return False if enable is None else bool(enable)
