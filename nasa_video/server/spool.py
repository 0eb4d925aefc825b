"""A job's frames on disk as they come (H.264 segments), joined into one MP4 on save; clip names."""
from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np

from ..errors import UserError

CLIP_NAME = re.compile(r"^clip-[0-9]{8}-[0-9]{6}-[0-9a-f]{8}\.mp4$")


class ClipSpool:
    """A job's video on disk as it is made, so the server holds no frames: H.264 segments in `folder`, one open at a
    time. seal() finishes the open segment; export() seals and joins the segments into one MP4 (ffmpeg's concat
    demuxer, stream copy: no re-encode), so a save mid-stream has every frame so far and the stream goes on into a
    new segment. Disk use is the MP4's size."""

    def __init__(self, folder: Path, fps: int, display_scale: int = 1):
        self.folder, self.fps, self.zoom = Path(folder), fps, display_scale
        self.segments: list[Path] = []
        self.writer = None
        self.frames = 0

    def write(self, frames: np.ndarray) -> None:
        from ..video_io import Mp4Writer

        if self.writer is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.writer = Mp4Writer(self.folder / f"part-{len(self.segments):05d}.mp4", fps=self.fps)
        if self.zoom > 1:
            frames = frames.repeat(self.zoom, axis=1).repeat(self.zoom, axis=2)
        self.writer.write(frames)
        self.frames += len(frames)

    def seal(self) -> None:
        if self.writer is not None:
            self.segments.append(self.writer.close())
            self.writer = None

    def export(self, target: Path) -> Path:
        from ..video_io import ffmpeg_exe

        self.seal()
        partial = target.with_name(f".{target.stem}.partial.mp4")
        if len(self.segments) == 1:
            shutil.copyfile(self.segments[0], partial)
        else:
            listing = self.folder / "segments.txt"
            listing.write_text("".join(f"file '{p.resolve()}'\n" for p in self.segments))
            done = subprocess.run([ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "concat", "-safe", "0", "-i",
                                   str(listing), "-c", "copy", "-f", "mp4", str(partial)], capture_output=True)
            if done.returncode:
                partial.unlink(missing_ok=True)
                raise UserError(f"could not join the clip's segments: {done.stderr.decode(errors='replace')[-300:]}")
        partial.replace(target)
        return target

    def discard(self) -> None:
        if self.writer is not None:
            self.writer.abort()
            self.writer = None
        shutil.rmtree(self.folder, ignore_errors=True)


def png_data_url(frame: np.ndarray) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def clip_name(job_id: str) -> str:
    return f"clip-{time.strftime('%Y%m%d-%H%M%S')}-{job_id[:8]}.mp4"
