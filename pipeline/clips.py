"""Shots -> clips, clip ids, and the frame-accurate cut.

Clips are cut from shots: `trim_frames` dropped at each edge (transition residue), shots longer
than `max_seconds` split into equal parts no longer than that. Shots shorter than `min_seconds`
still become a clip row — the duration filter marks it, so every detected shot appears in the table.

`transcode_clips` cuts the clips of one source in batches of up to MAX_OUTPUTS_PER_FFMPEG, one ffmpeg
process each: the batch's span is decoded once and split to one `trim` + H.264 encoder per clip. Each
batch's ffmpeg seeks (input -ss) to just before its first clip rather than decoding the source from
frame 0, so the batches of a long source decode it about once in all, not once each. The trims select
frames by each frame index's source timestamp, as the analysis decode recorded it or else a demux of
the packets gives it (exact, not keyframe-snapped, right for variable frame rate too), and a batch
whose outputs come up short of frames is cut again without the seek. Sources in formats without a keyframe index to seek by, or
without one distinct timestamp per frame, are cut the plain way: trim by frame number from frame 0.
Outputs land under a temporary name and are renamed into place, so a killed run never leaves a
half-written clip under a final name.
"""
import math
import os
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

import av
import imageio_ffmpeg

from pipeline.store import partial_name

# Fixed namespace: clip ids are the same on every machine and every run.
CLIP_NAMESPACE = uuid.UUID("5b0f3c1e-2f6a-4d7e-9a51-7c0de5ace001")
MAX_OUTPUTS_PER_FFMPEG = 12  # encoders running in one process; bounds its memory


@dataclass(frozen=True)
class ClipPlan:
    start_frame: int   # 0-based in the source, end exclusive
    end_frame: int
    shot_start_frame: int
    shot_end_frame: int


def clip_id(source_sha256: str, start_frame: int, end_frame: int) -> str:
    return str(uuid.uuid5(CLIP_NAMESPACE, f"{source_sha256}:{start_frame}-{end_frame}"))


def plan_clips(shots: list[tuple[int, int]], fps: float, max_seconds: float, trim_frames: int = 0) -> list[ClipPlan]:
    """Every shot -> one or more clips of at most `max_seconds` (frames 0-based, end exclusive)."""
    max_frames = max(1, int(math.floor(max_seconds * fps)))
    plans = []
    for s, e in shots:
        a, b = s + trim_frames, e - trim_frames
        if b - a < 1:  # trimming ate the shot: keep it whole so the shot still has its row
            a, b = s, e
        parts = max(1, math.ceil((b - a) / max_frames))
        edges = [a + round(i * (b - a) / parts) for i in range(parts + 1)]
        plans += [ClipPlan(x, y, s, e) for x, y in zip(edges, edges[1:])]
    return plans


def reference_uri(source: str, start_frame: int, end_frame: int) -> str:
    return f"{source}#frames={start_frame}-{end_frame}"


def media_path(root: str | Path, cid: str) -> Path:
    return Path(root).resolve() / "media" / cid[:2] / f"{cid}.mp4"


def _even_scale() -> str:
    return "scale=trunc(iw/2)*2:trunc(ih/2)*2"  # libx264 yuv420p needs even sizes


def transcode_clips(source: str, jobs: list[tuple[int, int, Path]], crf: int = 20, preset: str = "veryfast",
                    timeout_s: float = 600.0, run: str = "",
                    pts_s: list[float] | None = None) -> dict[Path, str | None]:
    """Cut frame ranges [start, end) of `source` into H.264 mp4s; each batch decodes only its own span.

    ffmpeg applies the rotation metadata (autorotate), so outputs are in display orientation.
    Returns {out_path: None on success | error text}. Existing outputs are skipped (resume).
    Each output is written to a temp file named by `store.partial_name(out, run)`, then renamed into place.
    `pts_s`: every frame's presentation time (s) from a complete decode of the source (the analysis
    decode's `Decoded.pts_s`), which spares the packet demux that would otherwise find them.
    """
    results: dict[Path, str | None] = {}
    todo = sorted(((s, e, Path(p)) for s, e, p in jobs if not Path(p).exists()), key=lambda j: (j[0], j[1]))
    for _, _, p in jobs:
        if Path(p).exists():
            results[Path(p)] = None
    index = _frame_index(source, pts_s) if any(s > 0 for s, _, _ in todo) else None
    for i in range(0, len(todo), MAX_OUTPUTS_PER_FFMPEG):
        batch = todo[i:i + MAX_OUTPUTS_PER_FFMPEG]
        results.update(_transcode_batch(source, batch, crf, preset, timeout_s, run, index))
    return results


# Demuxers whose seek goes through an index of keyframes (so it never lands mid-GOP, where some decoders
# would show garbage) by presentation time, at or before the time asked for. Not AVI (no real pts: with
# B-frames its packet times are decode order), not MPEG-TS/PS (seek by bisecting the file's timestamps).
SEEKABLE_FORMATS = {"mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm"}
SEEK_MARGIN_S = 0.5  # the seek aims this far before a batch's first frame


@dataclass(frozen=True)
class _FrameIndex:
    """Where each source frame sits: the analysis decode's times, or the packets' (a demux: no decode).
    Frame i (in presentation order, as the analysis decode numbers them) is shown at `pts[i]`."""
    pts: list           # in `time_base` units, ascending: stream ticks (demux) or seconds (decode)
    time_base: float
    start_s: float      # the container start time: ffmpeg's -ss counts from it


def _frame_index(source: str, pts_s: list[float] | None = None) -> _FrameIndex | None:
    """None (cut the old way, counting frames from the start) unless the source is in a seekable
    format and its packets (or `pts_s`, the decoded frames' times in s) give one distinct time per frame."""
    src = source
    try:
        try:
            source.encode("utf-8")
        except UnicodeEncodeError:  # a non-UTF-8 file name: hand libav an open file instead of the name
            src = open(source, "rb")
        with av.open(src) as c:
            st = c.streams.video[0]
            if c.format.name not in SEEKABLE_FORMATS or not st.time_base:
                return None
            # frame i of the decode is the i-th time only if they ascend; else number them as the packets do
            if pts_s and all(a < b for a, b in zip(pts_s, pts_s[1:])):
                pts, tb = list(pts_s), 1.0
            else:
                pts, tb = _packet_pts(c, st), float(st.time_base)
            start_s = c.start_time / 1e6 if c.start_time is not None else 0.0
    except Exception:  # noqa: BLE001 - no index just means no seek
        return None
    finally:
        if src is not source:
            src.close()
    if not pts or any(a == b for a, b in zip(pts, pts[1:])):
        return None
    return _FrameIndex(pts, tb, start_s)


def _packet_pts(c, st) -> list[int]:
    """The shown frames' times in stream ticks, ascending, from a demux; [] if a packet has none."""
    pts = []
    for p in c.demux(st):
        if p.pts is None:
            if p.size == 0:  # the demuxer's end-of-stream flush
                continue
            return []
        if not p.is_discard:  # discarded packets (edit lists) are decoded, never shown
            pts.append(p.pts)
    return sorted(pts)


def _window(index: _FrameIndex | None, batch) -> tuple[float, list[str]] | None:
    """(-ss seek in s, one time-based trim per clip) for `batch`, or None to count frames from the start.

    The seek lands on a keyframe a little before the batch's first frame, so ffmpeg decodes only from
    there; the trims keep each clip's frames by their source timestamps (-copyts keeps them), so the
    cut is exact wherever the seek landed. Should it land late, the outputs come up short of frames
    and `_transcode_batch` cuts the batch again the old way.
    """
    if index is None or max(e for _, e, _ in batch) > len(index.pts):
        return None
    pts, tb = index.pts, index.time_base
    seek = pts[min(s for s, _, _ in batch)] * tb - index.start_s - SEEK_MARGIN_S
    seek = max(0.0, math.floor(seek * 1e6) / 1e6)  # -ss is read in microseconds

    def cut(i: int) -> str:  # 1 us before frame i: trim rounds it to the nearest tick of the stream
        return f"{pts[i] * tb - 1e-6:.6f}"  # clock, which is frame i itself, or between it and frame i - 1

    trims = []
    for s, e, _ in batch:
        edges = ([f"start={cut(s)}"] if s > 0 else []) + ([f"end={cut(e)}"] if e < len(pts) else [])
        trims.append("trim=" + ":".join(edges) if edges else "null")
    return seek, trims


def _transcode_batch(source, batch, crf, preset, timeout_s, run="", index=None):
    window = _window(index, batch)
    results = _run_batch(source, batch, crf, preset, timeout_s, run, window)
    if window is not None and results is None:  # a seek landed late (frames missing): decode from the start
        results = _run_batch(source, batch, crf, preset, timeout_s, run, None)
    return results


def _run_batch(source, batch, crf, preset, timeout_s, run, window):
    """One ffmpeg for `batch`: `window` from `_window`, or None to trim by frame count from frame 0.
    With a window, returns None (and leaves nothing behind) when an output lacks some of its frames."""
    n = len(batch)
    head = f"[0:v]{_even_scale()}" + (f",split={n}" + "".join(f"[s{k}]" for k in range(n)) if n > 1 else "[s0]")
    if window is None:
        seek_args, cuts = [], [f"trim=start_frame={s}:end_frame={e}" for s, e, _ in batch]
    else:
        seek, cuts = window
        seek_args = ["-copyts", "-noaccurate_seek"] + (["-ss", f"{seek:.6f}"] if seek > 0 else [])
    trims = [f"[s{k}]{cut},setpts=PTS-STARTPTS[o{k}]" for k, cut in enumerate(cuts)]
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-hide_banner", "-loglevel", "error", "-y",
           *seek_args, "-i", source, "-filter_complex", ";".join([head] + trims)]
    outs = []
    for k, (_, _, out) in enumerate(batch):
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = partial_name(out, run)
        outs.append((out, tmp))
        cmd += ["-map", f"[o{k}]", "-an", "-c:v", "libx264", "-preset", preset, "-crf", str(crf),
                "-pix_fmt", "yuv420p", "-threads", "1", "-movflags", "+faststart", str(tmp)]
    try:
        proc = subprocess.run(cmd, capture_output=True, timeout=timeout_s)
        err = proc.stderr.decode(errors="replace").strip()[-300:] if proc.returncode else None
    except subprocess.TimeoutExpired:
        err = f"ffmpeg timed out after {timeout_s:.0f}s"
    if err is None and window is not None and any(
            _frame_count(tmp) != e - s for (s, e, _), (_, tmp) in zip(batch, outs)):
        for _, tmp in outs:
            tmp.unlink(missing_ok=True)
        return None
    results = {}
    for out, tmp in outs:
        if err is None and tmp.exists() and tmp.stat().st_size > 0:
            os.replace(tmp, out)
            results[out] = None
        else:
            tmp.unlink(missing_ok=True)
            results[out] = err or "ffmpeg wrote no output"
    return results


def _frame_count(path: Path) -> int:
    """Frames in a clip we wrote, counted from its packets (-1 when it cannot be read)."""
    try:
        with av.open(str(path)) as c:
            return sum(1 for p in c.demux(c.streams.video[0]) if p.size)
    except Exception:  # noqa: BLE001
        return -1
