"""The one decode of a source video that every analysis shares.

`decode_for_analysis` opens the file with PyAV once and decodes it on a background thread, while the
calling thread feeds runs of consecutive frames to every consumer's `process_frames(start, frames)`
in order (shot detector, motion, blur, brightness, text, ...): libav and OpenCV release the GIL, so
the decode of the next run overlaps the analysis of this one. The decode thread scales each frame's
planes to the analysis size in OpenCV (area halvings, then one bilinear step; ~2x faster than a
swscale call per frame, measured) into a stacked I420 buffer per run. Consumers get that run as
`Frames`: views made on first use and shared by every consumer: the luma plane as it is (every
grey measurement reads it), a small RGB copy made from the halved planes (the shot detector), and
full-size RGB only if some consumer asks. Consumers work on the whole run at once (one OpenCV call
over a stack of frames, numpy over the run): at the analysis size a frame decodes in ~0.1 ms, so
per-frame Python calls would cost more than the decode. Every `thumb_every_s` seconds a JPEG at CLIP
resolution is kept too, so embeddings and report thumbnails never need a second decode; the
thumbnails are made by whichever thread is free (`_Finisher`).
"""
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol

import av
import cv2
from av.video.reformatter import VideoReformatter
import numpy as np


class FrameConsumer(Protocol):
    def process_frames(self, start: int, frames: "Frames | np.ndarray") -> None:
        """Source frames start .. start+N-1 at the analysis size: `Frames`, or an (N, H, W, 3) uint8
        RGB array (`Frames.of` takes either). The buffers are reused after the call: copy what you keep."""


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


def halvings(h: int, w: int, min_short_side: int) -> int:
    """How many exact 2x2 halvings keep the short side >= min_short_side (both sides even at each)."""
    k = 0
    while min(h, w) >= 2 * min_short_side and h % 2 == 0 and w % 2 == 0:
        h, w, k = h // 2, w // 2, k + 1
    return k


def halve_frames(frames: np.ndarray, min_short_side: int = 1, steps: int | None = None) -> np.ndarray:
    """Halve each frame of a stack (N, H, W[, C]) by 2x2 area averages, `steps` times (by default
    while its short side stays >= min_short_side and both sides are even: `halvings`), so every step
    takes OpenCV's fast integer-factor path. One call per step for the whole stack: the frames are
    stacked along the rows, and with H even every 2x2 block stays inside its own frame."""
    n, h, w = frames.shape[:3]
    if steps is None:
        steps = halvings(h, w, min_short_side)
    flat = frames.reshape(n * h, w, *frames.shape[3:])
    for _ in range(steps):
        h, w = h // 2, w // 2
        flat = cv2.resize(flat, (w, n * h), interpolation=cv2.INTER_AREA)
    return flat.reshape(n, h, w, *frames.shape[3:])


def shrink_frames(frames: np.ndarray, w: int, h: int, out: np.ndarray | None = None) -> np.ndarray:
    """Scale a stack of one-channel frames (N, H, W) down to (N, h, w): exact area halvings
    (`halve_frames`), then one bilinear step, each one OpenCV call over the whole stack. A bilinear
    downscale samples each output row from two rows of its own frame (the row scale is the same
    ratio, and a frame is at least as tall as its output), so the stack gives the per-frame result.
    `out`: an (N, h, w) uint8 array to write into."""
    if min(frames.shape[1:]) >= 2 * min(w, h):  # (the check alone: this runs per frame, per plane)
        frames = halve_frames(frames, min(w, h))
    n, fh, fw = frames.shape
    if (fh, fw) == (h, w):
        if out is None:
            return frames
        out[...] = frames
        return out
    dst = None if out is None else out.reshape(n * h, w)
    return cv2.resize(frames.reshape(n * fh, fw), (w, n * h), dst=dst, interpolation=cv2.INTER_LINEAR).reshape(n, h, w)


def _rotate(img: np.ndarray, rotation: int, axes=(0, 1)) -> np.ndarray:
    # `rotation` is clockwise degrees (the probe's convention); np.rot90 turns counter-clockwise.
    k = (-rotation // 90) % 4
    return np.ascontiguousarray(np.rot90(img, k, axes)) if k else img


class I420Stack:
    """`n` frames of w x h in one I420 image n*h rows tall: the Y planes of all the frames, then all
    their U planes, then all their V planes. I420 subsamples 2x2 blocks and h is even, so each
    frame's chroma rows sit beside its own luma rows, and one OpenCV call converts the whole stack.

    `put` scales a decoded frame's planes straight into slot j (`shrink_frames`; ~2x faster than a
    swscale call per frame, measured). Other pixel formats (4:4:4, 10-bit,
    full range) go through swscale to yuv420p at their own size first."""

    def __init__(self, n: int, w: int, h: int):
        self.buf = np.empty((n * h * 3 // 2, w), np.uint8)
        chroma, q = self.buf[n * h:].reshape(-1), n * h * w // 4
        self.planes = (self.buf[:n * h].reshape(n, h, w), chroma[:q].reshape(n, h // 2, w // 2),
                       chroma[q:].reshape(n, h // 2, w // 2))
        self.to_yuv420p = VideoReformatter()

    def put(self, j: int, frame: av.VideoFrame) -> None:
        if frame.format.name != "yuv420p":
            frame = self.to_yuv420p.reformat(frame, format="yuv420p")
        for p, planes in zip(frame.planes, self.planes):
            src = np.frombuffer(p, np.uint8).reshape(-1, p.line_size)[:p.height, :p.width]
            shrink_frames(src[None], planes.shape[2], planes.shape[1], out=planes[j:j + 1])

    def colour(self, code: int = cv2.COLOR_YUV2RGB_I420) -> np.ndarray:
        """All n slots as (n, h, w, 3) uint8 (RGB, or BGR with COLOR_YUV2BGR_I420)."""
        return cv2.cvtColor(self.buf, code).reshape(*self.planes[0].shape, 3)


class Frames:
    """A run of N consecutive frames at the analysis size in display orientation: what each consumer's
    `process_frames(start, frames)` is given. Each view is made on first use, once, and shared by all
    the consumers of the run:

        rgb          (N, H, W, 3) uint8 RGB
        luma         (N, H, W) uint8 luma; as grey levels 0..255: (luma - luma_black) * luma_gain
        small(side)  (N, h, w, 3) uint8 RGB, halved by 2x2 area averages while the short side stays >= side

    Decoded video (`Frames(stack, n, rotation)`) gives the I420 stack's Y plane as `luma` with no
    conversion at all (video range: black 16, gain 255/219; OpenCV's RGB -> grey of the converted
    frame is the same picture, to rounding and clipping of saturated colours), and `small` from the
    halved planes. So a run whose consumers only measure grey and a small colour copy never converts
    its full-size frames to RGB (measured: that conversion, the grey one and the RGB halving cost
    ~25 us a frame at the demo size, against a ~100 us decode). An RGB array (`Frames.of(array)`:
    unit tests, the naive benchmark) gives OpenCV's grey (black 0, gain 1).
    """
    luma_black, luma_gain = 0.0, 1.0

    def __init__(self, stack: I420Stack | None = None, n: int = 0, rotation: int = 0, rgb: np.ndarray | None = None):
        self._stack, self._rotation, self._rgb, self._luma, self._small = stack, rotation, rgb, None, {}
        self._n = n if stack is not None else len(rgb)
        if stack is not None:
            self.luma_black, self.luma_gain = 16.0, 255.0 / 219.0

    @classmethod
    def of(cls, frames: "Frames | np.ndarray") -> "Frames":
        return frames if isinstance(frames, Frames) else cls(rgb=frames)

    def __len__(self) -> int:
        return self._n

    @property
    def rgb(self) -> np.ndarray:
        if self._rgb is None:
            self._rgb = _rotate(self._stack.colour()[:self._n], self._rotation, axes=(1, 2))
        return self._rgb

    @property
    def luma(self) -> np.ndarray:
        if self._luma is None:
            if self._stack is not None:
                self._luma = _rotate(self._stack.planes[0][:self._n], self._rotation, axes=(1, 2))
            else:
                n, h, w = self._rgb.shape[:3]
                self._luma = cv2.cvtColor(self._rgb.reshape(n * h, w, 3), cv2.COLOR_RGB2GRAY).reshape(n, h, w)
        return self._luma

    def small(self, side: int) -> np.ndarray:
        if side not in self._small:
            self._small[side] = self._small_rgb(side)
        return self._small[side]

    def _small_rgb(self, side: int) -> np.ndarray:
        if self._stack is None:
            return halve_frames(self._rgb, side)
        y, u, v = (p[:self._n] for p in self._stack.planes)
        k = halvings(*y.shape[1:], side)
        if k == 0:
            return self.rgb
        # Luma halved k times and chroma k - 1 times meet at one size (4:4:4), where one affine map
        # gives RGB: the halved RGB to rounding, since the conversion is affine until it clips and
        # OpenCV's I420 conversion shares each chroma sample over its 2x2 block.
        y, u, v = halve_frames(y, steps=k), halve_frames(u, steps=k - 1), halve_frames(v, steps=k - 1)
        n, h, w = y.shape
        yuv = cv2.merge([p.reshape(n * h, w) for p in (y, u, v)])
        return _rotate(cv2.transform(yuv, _BT601).reshape(n, h, w, 3), self._rotation, axes=(1, 2))


# Video-range BT.601 YUV -> RGB, OpenCV's I420 conversion coefficients: rows R, G, B; columns Y, U, V, 1.
_Y, _UB, _UG, _VG, _VR = 1.164, 2.018, -0.391, -0.813, 1.596
_BT601 = np.array([[_Y, 0.0, _VR, -16 * _Y - 128 * _VR],
                   [_Y, _UG, _VG, -16 * _Y - 128 * (_UG + _VG)],
                   [_Y, _UB, 0.0, -16 * _Y - 128 * _UB]], np.float32)


# Below this many pixels a frame decodes on one thread when `threads` is 0 (auto): on the demo footage
# (240x240 .. 320x180) libav's frame threads cost more CPU than they save wall time, measured beside this
# thread's own work; at 640x360 it is a wash, and at 1280x720 they cut the analysis wall time by 20%.
SMALL_FRAME = 200_000

_STOP = -1  # handed to the decode thread in place of a free slot: stop now


@dataclass
class _Run:
    """Up to `run` consecutive decoded frames, scaled into the I420 stack of ring slot `slot`."""
    slot: int
    start: int
    stack: I420Stack
    n: int
    due: list                          # (frame index, decoded frame) due for a thumbnail
    thumbs: dict | None = None         # once finished: frame index -> JPEG


class _Finisher:
    """The thumbnails of a run, by whichever thread is free: the decode thread when the analysis is
    behind (heavy scorers), the analysis thread otherwise (shot detection alone). One per thread: it
    owns the one-frame stack thumbnails are scaled into."""

    def __init__(self, rotation: int, thumb_side: int):
        self.rotation, self.thumb_side, self.thumb = rotation, thumb_side, None

    def __call__(self, r: _Run) -> _Run:
        if r.thumbs is None:
            r.thumbs = {}
            for i, frame in r.due:
                if self.thumb is None:
                    self.thumb = I420Stack(1, *scaled_size(frame.width, frame.height, self.thumb_side))
                self.thumb.put(0, frame)
                bgr = _rotate(self.thumb.colour(cv2.COLOR_YUV2BGR_I420)[0], self.rotation)
                r.thumbs[i] = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
        return r


def _decode_runs(path: str, out: Decoded, runs: queue.Queue, free: queue.Queue, stop: threading.Event,
                 finish: _Finisher, *, short_side: int, thumb_every_s: float, threads: int, run: int,
                 ring: int) -> None:
    """The decode thread: decodes into `ring` I420 stacks of `run` frames in turn, handing each to
    `runs` as a `_Run` (finished here when the analysis thread still has one waiting) and waiting on
    `free` for its slot back; then None. Exceptions go to `runs`."""
    src = None
    try:
        try:
            path.encode("utf-8")
            src = path
        except UnicodeEncodeError:  # a non-UTF-8 file name: hand libav an open file instead of the name
            src = open(path, "rb")
        with av.open(src) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            cw, ch = stream.codec_context.width, stream.codec_context.height
            if threads or cw * ch < SMALL_FRAME:
                stream.codec_context.thread_count = threads or 1
            stacks = [I420Stack(run, *scaled_size(cw, ch, short_side)) for _ in range(ring)]
            tb = float(stream.time_base) if stream.time_base else 0.0
            k, filled, next_thumb, due = free.get(), 0, 0.0, []

            def hand_over():
                r = _Run(k, out.num_frames - filled, stacks[k], filled, due)
                runs.put(finish(r) if runs.qsize() else r)

            try:
                for frame in container.decode(stream):
                    if k == _STOP or stop.is_set():
                        return
                    i = out.num_frames
                    t = float(frame.pts * tb) if frame.pts is not None and tb else (out.pts_s[-1] if out.pts_s else 0.0)
                    stacks[k].put(filled, frame)
                    if t >= next_thumb or i == 0:
                        due.append((i, frame))
                        next_thumb = t + thumb_every_s
                    out.pts_s.append(t)
                    out.num_frames += 1
                    filled += 1
                    if filled == run:
                        hand_over()
                        k, filled, due = free.get(), 0, []
            except av.error.FFmpegError as e:
                out.error = f"decode error after {out.num_frames} frames: {e}"
            if filled and k != _STOP:  # the last short run, or the frames before a decode error
                hand_over()
    except BaseException as e:  # noqa: BLE001 - handed to the calling thread, which raises it
        runs.put(e)
    finally:
        if src is not None and src is not path:
            src.close()
        runs.put(None)


def decode_for_analysis(path: str, consumers: list[FrameConsumer], *, rotation: int = 0,
                        short_side: int = 144, thumb_side: int = 224, thumb_every_s: float = 0.25,
                        threads: int = 0, timeout_s: float = 600.0, run: int = 16, ring: int = 3) -> Decoded:
    """Decode `path` once; feed its frames (`Frames`: display orientation, analysis size) to every
    consumer in runs of up to `run` consecutive frames, decoding up to `ring` - 1 runs ahead.

    Raises TimeoutError past `timeout_s` (also while the decoder itself is stuck); a decode error
    mid-stream ends the pass and is recorded in `Decoded.error` (the frames before it stay usable,
    as a truncated file's would be). Errors opening the file are raised here.
    """
    out = Decoded()
    runs: queue.Queue = queue.Queue()
    free: queue.Queue = queue.Queue()
    for k in range(ring):
        free.put(k)
    stop = threading.Event()
    decoder = threading.Thread(target=_decode_runs, name="decode", daemon=True,
                               args=(path, out, runs, free, stop, _Finisher(rotation, thumb_side)),
                               kwargs=dict(short_side=short_side, thumb_every_s=thumb_every_s, threads=threads,
                                           run=run, ring=ring))
    finish = _Finisher(rotation, thumb_side)
    deadline = time.monotonic() + timeout_s
    decoder.start()
    try:
        while True:
            try:
                if time.monotonic() > deadline:
                    raise queue.Empty
                r = runs.get(timeout=deadline - time.monotonic())
            except queue.Empty:
                raise TimeoutError(f"analysis exceeded {timeout_s:.0f}s at frame {out.num_frames}") from None
            if r is None:
                break
            if isinstance(r, BaseException):
                raise r
            finish(r)
            frames = Frames(r.stack, r.n, rotation)
            for c in consumers:
                c.process_frames(r.start, frames)
            free.put(r.slot)  # the consumers are done with the stack's planes: the decoder may refill it
            out.thumbs.update(r.thumbs)
            out.analysis_size = frames.luma.shape[:0:-1]
    finally:
        stop.set()
        free.put(_STOP)
        decoder.join(timeout=1.0)  # a decoder stuck inside libav is left behind (daemon) after a timeout
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
