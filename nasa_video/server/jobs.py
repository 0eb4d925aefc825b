"""A job as the API takes it: the request validated into a Job (one line per bad field, in the API's own
words), the server's limits."""
from __future__ import annotations

import asyncio
import math
import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import UserError
from ..guidance import METHODS, make_guidance
from ..request import VideoRequest

if TYPE_CHECKING:
    from .spool import ClipSpool


@dataclass
class Limits:
    max_prompt_chars: int = 400
    max_negatives: int = 4
    max_blocks: int = 60          # a finite video; 0 asks for "until stopped" (rolling cache)
    max_endless_blocks: int = 2000  # per job (device time); positions re-base, so a rolling stream can run that long
    max_queue: int = 16
    max_streams: int = 4          # jobs generated at once (one batched forward per step); later ones queue
    backlog_blocks: int = 8       # blocks kept for a viewer that reads slower than they are made (older dropped)
    unclaimed_job_seconds: float = 120.0  # a job nobody connects to is dropped
    kept_videos: int = 8          # finished videos whose frames can still be saved
    max_body_bytes: int = 16384   # a job request is a few hundred bytes; larger bodies are refused unread


class BadRequest(ValueError):
    """A request the server refuses, with the message the client sees (HTTP 400 / a WebSocket error)."""


@dataclass
class Job:
    """A viewer's job: the video it asks for (a VideoRequest, as the library takes it; its frames are set from
    `blocks` when it starts) and the job's own state on the server."""

    id: str
    request: VideoRequest  # prompt, negative (a list of texts, or None), scale, method, seed
    blocks: int  # 0: until stopped
    created: float = field(default_factory=time.monotonic)
    clip: "ClipSpool | None" = None  # the frames so far, on disk (set when the job starts)
    cancelled: bool = False
    controls: list[dict] = field(default_factory=list)
    made: int = 0                 # blocks made so far
    frames_done: int = 0
    began: float = 0.0
    outbox: deque = field(default_factory=deque)  # what the device loop made, for the job's WebSocket to send
    dropped: int = 0              # block messages dropped because the viewer fell behind (the clip has them)
    ready: "asyncio.Event | None" = None
    ended: bool = False
    body: dict = field(default_factory=dict)  # the request as posted (a cluster replica parses it again)


def _number(body: dict, key: str, default, kind, lo, hi):
    value = body.get(key, default)
    whole = kind is int
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            whole and isinstance(value, float) and math.isfinite(value) and not value.is_integer()):
        raise BadRequest(f"{key} must be {'a whole number' if whole else 'a number'}, got {str(value)[:40]!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise BadRequest(f"{key} must be a finite number, got {value}")
    if not lo <= value <= hi:  # compared exactly: a 401-digit integer is out of range, not an overflow
        raise BadRequest(f"{key} must be between {lo} and {hi}, got {str(value)[:40]}")
    return kind(value)


def _text(value, what: str, limit: int) -> str:
    if not isinstance(value, str):
        raise BadRequest(f"{what} must be a string")
    value = value.strip()
    if len(value) > limit:
        raise BadRequest(f"{what} is {len(value)} characters; the server takes at most {limit}")
    return value


def parse_negative_list(value, limits: Limits) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise BadRequest("negative must be a string or a list of strings")
    texts = [t for t in (_text(v, "a negative prompt", limits.max_prompt_chars) for v in value) if t]
    if len(texts) > limits.max_negatives:
        raise BadRequest(f"{len(texts)} negative prompts; the server takes at most {limits.max_negatives}")
    return texts


def api_words(message: str) -> str:
    """A library message in the API's field names: the checks are shared with the CLI, whose flags they name."""
    for flag, field in (("--negative-weight", "negative weight"), ("--scale", "scale"), ("--negative", "negative"),
                        ("--guidance ", "method "), ("--seed", "seed")):
        message = message.replace(flag, field)
    return message


def check_scale(method: str, scale: float, negatives: int, scale_given: bool = False) -> None:
    """The method's own scale range, negative count and weighted sum, and a scale given without a negative (it
    would do nothing), as the CLI refuses them. A negative sent mid-stream carries its own scale."""
    guidance = make_guidance(method)
    try:
        guidance.check_scale(scale)
        guidance.check_negatives(negatives)
        guidance.check_weights([1.0] * negatives, [scale])
    except UserError as error:
        raise BadRequest(api_words(str(error))) from None
    if scale_given and not negatives and guidance.in_attention:
        raise BadRequest(f"scale {scale:g} has no effect without a negative prompt ({method} steers away from it): "
                         f"add a negative, or leave scale out")


def parse_job(body, limits: Limits, default_method: str, default_scale: float) -> Job:
    """A job from the client's JSON, every field bounded; raises BadRequest with the reason."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    unknown = set(body) - {"prompt", "negative", "method", "scale", "seed", "blocks"}
    if unknown:
        raise BadRequest(f"unknown field(s): {', '.join(sorted(unknown))}")
    prompt = _text(body.get("prompt", ""), "prompt", limits.max_prompt_chars)
    if not prompt:
        raise BadRequest("prompt is empty")
    method = body.get("method", default_method)
    if not isinstance(method, str) or method not in METHODS:
        raise BadRequest(f"unknown method {str(method)[:40]!r}; choose one of {', '.join(sorted(METHODS))}")
    negative = parse_negative_list(body.get("negative"), limits)
    # the config's scale belongs to its own method; another method runs at its own default
    own_default = default_scale if method == default_method else METHODS[method].bench_scale
    scale = _number(body, "scale", own_default, float, -1e6, 1e6)
    check_scale(method, scale, len(negative), scale_given="scale" in body)
    seed = _number(body, "seed", 0, int, 0, 2**31 - 1)
    blocks = _number(body, "blocks", 0, int, 0, limits.max_blocks)
    request = VideoRequest(prompt=prompt, negative=negative or None, scale=scale, method=method, seed=seed)
    return Job(secrets.token_hex(8), request, blocks, body=dict(body))
