"""The one decode of a source video that every analysis shares.

`decode_for_analysis` opens the file with PyAV once, decodes with codec threads, scales each frame
straight to the analysis size in swscale (no full-size RGB copy), rotates it to display orientation,
and hands runs of consecutive frames to every consumer's `process_frames(start, frames)` in order
(shot detector, motion, blur, brightness, text, ...). Consumers work on the whole run at once
(one OpenCV call over a stack of frames, numpy over the run): at the analysis size a frame decodes
in ~0.1 ms, so per-frame Python calls would cost more than the decode. Every `thumb_every_s`
seconds it also keeps a JPEG at CLIP resolution, so embeddings and report thumbnails never need a
second decode.
"""
import time
from dataclasses import dataclass, field
from typing import Protocol

import av
import cv2
from av.video.reformatter import VideoReformatter
import numpy as np


class FrameConsumer(Protocol):
    def process_frames(self, start: int, frames: np.ndarray) -> None:
        """frames: (N, H, W, 3) uint8 RGB, source frames start .. start+N-1. The buffer is reused
        after the call: copy what you keep."""


@dataclass
class Decoded:
    """What one pass over a video produced. Frame indices are 0-based decode order."""
    num_frames: int = 0
    pts_s: list[float] = field(default_factory=list)   # presentation time (s) of each frame
    thumbs: dict[int, bytes] = field(default_factory=dict)  # frame index -> JPEG at thumb size
    analysis_size: tuple[int, int] = (0, 0)            # (width, height) after rotation
    error: str | None = None                           # decode error that ended the pass early


def scaled_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(w, h) with the short side at `short_side` (never upscaled), both even, aspect kept."""
    scale = min(1.0, short_side / max(1, min(width, height)))
    return max(2, int(round(width * scale / 2)) * 2), max(2, int(round(height * scale / 2)) * 2)


def halve_frames(frames: np.ndarray, min_short_side: int) -> np.ndarray:
    """Halve each frame of a stack (N, H, W[, C]) by 2x2 area averages while its short side is
    >= 2 * min_short_side and both sides are even, so every step takes OpenCV's fast integer-factor
    path. One call per step for the whole stack: the frames are stacked along the rows, and with H
    even every 2x2 block stays inside its own frame."""
    n, h, w = frames.shape[:3]
    flat = frames.reshape(n * h, w, *frames.shape[3:])
    while min(h, w) >= 2 * min_short_side and h % 2 == 0 and w % 2 == 0:
        h, w = h // 2, w // 2
        flat = cv2.resize(flat, (w, n * h), interpolation=cv2.INTER_AREA)
    return flat.reshape(n, h, w, *frames.shape[3:])


def _rotate(img: np.ndarray, rotation: int) -> np.ndarray:
    # `rotation` is clockwise degrees (the probe's convention); np.rot90 turns counter-clockwise.
    k = (-rotation // 90) % 4
    return np.ascontiguousarray(np.rot90(img, k)) if k else img


def decode_for_analysis(path: str, consumers: list[FrameConsumer], *, rotation: int = 0,
                        short_side: int = 144, thumb_side: int = 224, thumb_every_s: float = 0.25,
                        threads: int = 0, timeout_s: float = 600.0, run: int = 32) -> Decoded:
    """Decode `path` once; feed its frames (RGB uint8, display orientation, analysis size) to every
    consumer in runs of up to `run` consecutive frames.

    Raises TimeoutError past `timeout_s`; a decode error mid-stream ends the pass and is recorded in
    `Decoded.error` (the frames before it stay usable, as a truncated file's would be).
    """
    out = Decoded()
    t0 = time.monotonic()
    try:
        path.encode("utf-8")
        src = path
    except UnicodeEncodeError:  # a non-UTF-8 file name: hand libav an open file instead of the name
        src = open(path, "rb")
    with av.open(src) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        if threads:
            stream.codec_context.thread_count = threads
        cw, ch = stream.codec_context.width, stream.codec_context.height
        aw, ah = scaled_size(cw, ch, short_side)
        tw, th = scaled_size(cw, ch, thumb_side)
        tb = float(stream.time_base) if stream.time_base else 0.0
        next_thumb = 0.0
        # One reformatter per output size: PyAV builds a new swscale context per to_ndarray() call
        # otherwise, which costs more than decoding these frames (measured 4x).
        to_analysis, to_thumb = VideoReformatter(), VideoReformatter()
        buf = np.empty((run, *((aw, ah) if (rotation // 90) % 2 else (ah, aw)), 3), np.uint8)
        filled = 0

        def flush():
            for c in consumers:
                c.process_frames(out.num_frames - filled, buf[:filled])

        try:
            for frame in container.decode(stream):
                i = out.num_frames
                t = float(frame.pts * tb) if frame.pts is not None and tb else (out.pts_s[-1] if out.pts_s else 0.0)
                # swscale scales the planes; OpenCV's I420->RGB is ~2x faster than swscale's rgb24 output
                small = to_analysis.reformat(frame, aw, ah, "yuv420p", interpolation="AREA").to_ndarray()
                if rotation:
                    buf[filled] = _rotate(cv2.cvtColor(small, cv2.COLOR_YUV2RGB_I420), rotation)
                else:
                    cv2.cvtColor(small, cv2.COLOR_YUV2RGB_I420, dst=buf[filled])
                if t >= next_thumb or i == 0:
                    thumb = _rotate(to_thumb.reformat(frame, tw, th, "bgr24", interpolation="AREA").to_ndarray(), rotation)
                    out.thumbs[i] = cv2.imencode(".jpg", thumb, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
                    next_thumb = t + thumb_every_s
                out.pts_s.append(t)
                out.num_frames += 1
                filled += 1
                if filled == run:
                    flush()
                    filled = 0
                    if time.monotonic() - t0 > timeout_s:
                        raise TimeoutError(f"analysis exceeded {timeout_s:.0f}s at frame {i}")
        except av.error.FFmpegError as e:
            out.error = f"decode error after {out.num_frames} frames: {e}"
        if filled:  # the last short run, or the frames before a decode error
            flush()
        out.analysis_size = (ah, aw) if (rotation // 90) % 2 else (aw, ah)
    return out


def pick_frames(thumbs: dict[int, bytes], start: int, end: int, k: int) -> list[bytes]:
    """k thumbnails spread over source frames [start, end): nearest kept thumb to each target."""
    if not thumbs:
        return []
    keys = np.array(sorted(thumbs))
    inside = keys[(keys >= start) & (keys < end)]
    pool = inside if len(inside) else keys
    targets = start + (np.arange(k) + 0.5) * (end - start) / k
    chosen = sorted({int(pool[np.abs(pool - t).argmin()]) for t in targets})
    return [thumbs[i] for i in chosen]
