"""CUDA graphs for the steady state of a stream: each cached forward (a denoising step or the cache pass) is
captured once per key and replayed with static inputs.

What a replay reads is fixed at capture:
- the static inputs x, t and the RoPE cos/sin, copied in before each replay;
- the self-attention cache's buffers with the block's slots, written in place;
- each layer's guidance plan: the graph reads a private copy of the plan it was captured with, and the current
  plan's tensors are copied into it before each replay.

The key is everything else the forward depends on: the input shapes, the cache slots, and each layer's plan
structure (its types, tensor shapes and dtypes, and every Python value it holds). A new prompt, negative or NASA /
NAG / VSF scale changes only the plans' tensor values, so it replays the same graphs (a scale is folded into the
negative V or held as a tensor); a new negative count or a method whose plan bakes a float in (ReferencePlan)
captures anew. The cache's buffers are the binding, part of the key: a finished stream's buffers serve the next
cache of the same shape (keep_buffers / take_buffers), so the next video replays its graphs; a batch that gains
or loses rows makes new buffers, and the graphs bound to buffers that cannot come back are dropped.

Forwards a graph cannot serve run eagerly: a masked forward (rows that joined a batch late), training (grad),
prompts handed to the forward, an uncached forward.

On a CPU (capture=False) the same entries run the captured closure eagerly, on their static buffers and with the
private plans installed: the key, the binding, the static inputs and the plans' copy-in are all exercised, and a
replay reads only what a graph would (the buffers, slots and plans of its capture), so a key that missed a
dependency, or a copy-in that missed a tensor, shows as a wrong output in the CPU tests.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch


def _static_copy(t: torch.Tensor) -> torch.Tensor:
    """A tensor of t's shape, strides (where no element repeats) and values, in memory of its own."""
    overlapping = any(stride == 0 and size > 1 for size, stride in zip(t.shape, t.stride()))
    if overlapping:
        return t.clone()
    out = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
    return out.copy_(t)


def plan_structure(plan) -> tuple[tuple, list[torch.Tensor]]:
    """(structure, tensors) of a guidance plan: its tensors in a fixed order, and all else it holds (types, tensor
    shapes and dtypes, Python values) as a hashable structure. Two plans of one structure compute the same
    function of their tensors' values."""
    tensors: list[torch.Tensor] = []
    seen: set[int] = set()

    def walk(x):
        if isinstance(x, torch.Tensor):
            tensors.append(x)
            return ("tensor", tuple(x.shape), x.dtype, str(x.device))
        if x is None or isinstance(x, (bool, int, float, str, torch.dtype)):
            return x
        if isinstance(x, (list, tuple)):
            return (type(x).__name__, tuple(walk(item) for item in x))
        if isinstance(x, dict):
            return ("dict", tuple((key, walk(value)) for key, value in x.items()))
        if id(x) in seen:
            return ("again", type(x).__qualname__)
        seen.add(id(x))
        if hasattr(x, "__dict__"):
            return (type(x).__qualname__, walk(vars(x)))
        return (type(x).__qualname__, id(x))  # opaque (a function, a module): the object itself

    return walk(plan), tensors


def private_plan(plan):
    """A copy of the plan whose tensors are its own (the graph reads them; replays copy new values in)."""
    memo: dict[int, object] = {}

    def clone(x):
        if id(x) in memo:
            return memo[id(x)]
        if isinstance(x, torch.Tensor):
            out = _static_copy(x)
        elif x is None or isinstance(x, (bool, int, float, str, torch.dtype)):
            return x
        elif isinstance(x, list):
            out = [clone(item) for item in x]
        elif isinstance(x, tuple):
            out = tuple(clone(item) for item in x)
        elif isinstance(x, dict):
            out = {key: clone(value) for key, value in x.items()}
        elif hasattr(x, "__dict__"):
            out = object.__new__(type(x))
            memo[id(x)] = out
            out.__dict__.update({key: clone(value) for key, value in vars(x).items()})
            return out
        else:
            return x
        memo[id(x)] = out
        return out

    return clone(plan)


@dataclass
class _Entry:
    inputs: tuple[torch.Tensor, ...]  # static input buffers
    run: Callable[..., torch.Tensor]  # the closure captured (what a replay runs)
    plans: list  # per layer: the private plan the graph reads
    binding: tuple | None  # ids of the cache buffers it writes
    graph: "torch.cuda.CUDAGraph | None" = None
    output: torch.Tensor | None = None  # the graph's static output
    runs: int = field(default=0)


class StepGraphs:
    """Captured forwards, least recently used dropped past `capacity`. Counts what it did: captures, runs (every
    forward it served, the first of each capture included) and graphs dropped."""

    def __init__(self, device, capture: bool | None = None, capacity: int = 32, warmup: int = 2):
        self.device = torch.device(device)
        self.capture = self.device.type == "cuda" if capture is None else bool(capture)
        if self.capture and self.device.type != "cuda":
            raise ValueError("CUDA graphs capture only on a CUDA device")
        self.capacity, self.warmup = int(capacity), int(warmup)
        self.entries: OrderedDict[tuple, _Entry] = OrderedDict()
        self.binding: tuple | None = None
        self.spares: dict[tuple, tuple] = {}  # cache key -> (K, V buffers) of a finished cache (keep_buffers)
        self.private: dict[tuple, tuple] = {}  # (layer, plan structure) -> (private plan, its tensors)
        self.captures = self.runs = self.dropped = 0
        self.pool = torch.cuda.graph_pool_handle() if self.capture else None

    # ---- cache buffers ------------------------------------------------------------------------------------------
    def keep_buffers(self, key: tuple, k: list, v: list) -> None:
        """A finished cache's buffers, for the next cache of the same key (one set per key: the latest)."""
        self.spares[key] = (k, v)

    def take_buffers(self, key: tuple) -> tuple[list, list] | None:
        return self.spares.pop(key, None)

    def clear(self) -> None:
        self.dropped += len(self.entries)
        self.entries.clear()
        self.private.clear()

    def bind(self, binding: tuple) -> None:
        """The cache buffers the next forwards write. Graphs bound to buffers that can no longer come back (neither
        these nor a spare set) are dropped, and with them the last hold on those buffers."""
        if binding == self.binding:
            return
        live = {binding} | {tuple(map(id, (*k, *v))) for k, v in self.spares.values()}
        for full_key in [key for key, entry in self.entries.items() if entry.binding not in live]:
            del self.entries[full_key]
            self.dropped += 1
        self.binding = binding

    # ---- forwards -----------------------------------------------------------------------------------------------
    def __call__(self, key: tuple, inputs: tuple[torch.Tensor, ...], run: Callable[..., torch.Tensor],
                 processors: Sequence) -> torch.Tensor:
        """run(*inputs) -> output, from the graph of (key, the processors' plan structures), captured now if new.
        processors: the cross-attention processor of each layer (their current plans are what a replay reads)."""
        structures, currents = [], []
        for processor in processors:
            structure, tensors = plan_structure(processor.plan)
            structures.append(structure)
            currents.append(tensors)
        full_key = (self.binding, key, tuple(structures))
        entry = self.entries.get(full_key)
        if entry is None:
            entry = self._record(inputs, run, processors, structures)
            self.entries[full_key] = entry
            while len(self.entries) > self.capacity:
                self.entries.popitem(last=False)
                self.dropped += 1
        else:
            self.entries.move_to_end(full_key)
            for static, value in zip(entry.inputs, inputs):
                static.copy_(value)
        self._copy_plans(entry, currents)
        self.runs += 1
        entry.runs += 1
        if entry.graph is not None:
            entry.graph.replay()
            return entry.output.clone()
        with _installed(processors, [plan for plan, _ in entry.plans]):
            return entry.run(*entry.inputs)

    @staticmethod
    def _copy_plans(entry: _Entry, currents: list[list[torch.Tensor]]) -> None:
        """The current plans' values into the private plans the graph reads."""
        for (_, private_tensors), tensors in zip(entry.plans, currents):
            for static, value in zip(private_tensors, tensors):
                if static is not value:
                    static.copy_(value)

    def _private(self, layer: int, structure: tuple, plan) -> tuple:
        """The private copy of a layer's plan for this structure, shared by every graph of that structure (replays
        never overlap, and each copies its values in first)."""
        slot = (layer, structure)
        if slot not in self.private:
            copy = private_plan(plan)
            self.private[slot] = (copy, plan_structure(copy)[1])
        return self.private[slot]

    def _record(self, inputs, run, processors, structures) -> _Entry:
        self.captures += 1
        static = tuple(x.clone() for x in inputs)
        plans = [self._private(layer, structure, processor.plan)
                 for layer, (processor, structure) in enumerate(zip(processors, structures))]
        entry = _Entry(static, run, plans, self.binding)
        if not self.capture:
            return entry
        with _installed(processors, [plan for plan, _ in plans]):
            # Warm up on a side stream (kernel selection, workspaces), then capture. Each warm-up writes the cache
            # slots the replay writes, with the same values: the inputs are the real ones.
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    run(*static)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # One pool for every graph: they never run at once, and each output is copied out before the next
            # replay. thread_local: the overlapped decode's worker thread goes on working during a capture.
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                entry.output = run(*static)
        entry.graph = graph
        return entry


class _installed:
    """Give each processor a plan for the duration (its plan key unchanged, so prepare() keeps it), then put the
    processors' own plans back."""

    def __init__(self, processors, plans):
        self.processors, self.plans = list(processors), list(plans)

    def __enter__(self):
        self.saved = [p.plan for p in self.processors]
        for processor, plan in zip(self.processors, self.plans):
            processor.plan = plan

    def __exit__(self, *exc):
        for processor, plan in zip(self.processors, self.saved):
            processor.plan = plan


def indexed(device) -> torch.device:
    """The device with its index ("cuda" -> "cuda:0"), as a tensor on it reports it: keys compare equal."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def resolve_cuda_graphs(enable: bool | None, device) -> bool:
    """The --cuda-graphs switch. None (the default) is off on every device until a GPU bench shows graphs win
    (scripts/bench_gpu.sh measures on and off); True on a CPU runs the static-buffer path eagerly (for tests)."""
    return False if enable is None else bool(enable)
