"""MP4 in and out. Writing is atomic: frames go to a hidden temp file beside the target, renamed at the end,
so a reader never sees half a file and an interrupted run still leaves a playable video of what finished."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .errors import UserError


def ffmpeg_exe() -> str:
    try:
        import imageio_ffmpeg
        return imageio_ffmpeg.get_ffmpeg_exe()
    except Exception:
        raise UserError("ffmpeg is missing: pip install imageio-ffmpeg (it ships the binary), "
                        "or set IMAGEIO_FFMPEG_EXE to an ffmpeg on this machine") from None


def check_output_path(path: str | os.PathLike, create_parent: bool = False, suffix: str = ".mp4") -> Path:
    """An output file that can be written, checked before the work that fills it: the right suffix, an existing
    writable folder (a real probe file, so /proc or a read-only mount fails here, not in ffmpeg after the video)."""
    path = Path(path)
    if path.suffix.lower() != suffix:
        raise UserError(f"output {path} must end in {suffix}")
    if path.is_dir():
        raise UserError(f"output {path} is a folder; give a file name ending in {suffix}")
    parent = path.parent if str(path.parent) else Path(".")
    if create_parent:
        parent.mkdir(parents=True, exist_ok=True)
    if not parent.is_dir():
        raise UserError(f"cannot write {path}: folder {parent} does not exist (create it or choose another --out)")
    if path.exists() and not os.access(path, os.W_OK):
        raise UserError(f"cannot write {path}: the file exists and is read-only (choose another --out)")
    probe = parent / f".{path.name}.{os.getpid()}.probe"
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        os.unlink(probe)
    except OSError as error:
        raise UserError(f"cannot write {path}: folder {parent} does not take new files ({error.strerror}); "
                        f"choose another --out") from None
    return path


class Mp4Writer:
    """H.264 MP4 through imageio-ffmpeg, opened lazily on the first frames (their size sets the video's)."""

    def __init__(self, path: str | os.PathLike, fps: int = 16, quality: int = 18):
        self.path = check_output_path(path)
        self.tmp = self.path.with_name(f".{self.path.stem}.partial.mp4")
        self.fps, self.quality = fps, quality
        self._exe = ffmpeg_exe()
        self._gen = None
        self.frames = 0

    def write(self, frames: np.ndarray) -> None:
        """frames [T, H, W, 3] uint8."""
        if self._gen is None:
            import imageio_ffmpeg

            height, width = frames.shape[1:3]
            self._gen = imageio_ffmpeg.write_frames(
                str(self.tmp), (width, height), fps=self.fps, codec="libx264", pix_fmt_out="yuv420p",
                macro_block_size=2, ffmpeg_log_level="error", output_params=["-crf", str(self.quality)])
            self._gen.send(None)
        for frame in frames:
            self._gen.send(np.ascontiguousarray(frame))
        self.frames += len(frames)

    def close(self) -> Path:
        if self._gen is None:
            raise UserError("no frames were generated; nothing to write")
        self._gen.close()
        self._gen = None
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        if self._gen is not None:
            self._gen.close()
            self._gen = None
        self.tmp.unlink(missing_ok=True)

    def keep_partial(self) -> Path | None:
        """After a failure: the frames written so far go to <name>.partial.mp4 beside the output (never under
        the output's own name, so nothing looks finished). None when there were none."""
        if self._gen is None:
            return None
        self._gen.close()
        self._gen = None
        partial = self.path.with_name(f"{self.path.stem}.partial.mp4")
        os.replace(self.tmp, partial)
        return partial


def write_mp4(path: str | os.PathLike, frames: np.ndarray, fps: int = 16) -> Path:
    writer = Mp4Writer(path, fps)
    writer.write(frames)
    return writer.close()


def write_json(path: str | os.PathLike, obj) -> Path:
    """JSON written atomically (temp file beside it, then rename)."""
    import json

    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)
    return path


def read_video(path: str | os.PathLike) -> np.ndarray:
    """[T, H, W, 3] uint8 frames, read with decord."""
    try:
        import decord
    except ImportError:
        raise UserError("reading videos needs decord: pip install decord") from None
    reader = decord.VideoReader(str(path))
    return reader.get_batch(list(range(len(reader)))).asnumpy()
