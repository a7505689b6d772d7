"""Shots -> clips, clip ids, and the frame-accurate cut.

Clips are cut from shots: `trim_frames` dropped at each edge (transition residue), shots longer
than `max_seconds` split into equal parts no longer than that. Shots shorter than `min_seconds`
still become a clip row — the duration filter marks it, so every detected shot appears in the table.

`transcode_clips` cuts all clips of one source in ONE ffmpeg process: the source is decoded once and
split to one `trim` (by frame number, so it is exact, not keyframe-snapped, and right for variable
frame rate too) + H.264 encoder per clip. Outputs land under a temporary name and are renamed into
place, so a killed run never leaves a half-written clip under a final name.
"""
import math
import os
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

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
                    timeout_s: float = 600.0, run: str = "") -> dict[Path, str | None]:
    """Cut frame ranges [start, end) of `source` into H.264 mp4s; one decode of the source per batch.

    ffmpeg applies the rotation metadata (autorotate), so outputs are in display orientation.
    Returns {out_path: None on success | error text}. Existing outputs are skipped (resume).
    Each output is written to a temp file named by `store.partial_name(out, run)`, then renamed into place.
    """
    results: dict[Path, str | None] = {}
    todo = [(s, e, Path(p)) for s, e, p in jobs if not Path(p).exists()]
    for _, _, p in jobs:
        if Path(p).exists():
            results[Path(p)] = None
    for i in range(0, len(todo), MAX_OUTPUTS_PER_FFMPEG):
        batch = todo[i:i + MAX_OUTPUTS_PER_FFMPEG]
        results.update(_transcode_batch(source, batch, crf, preset, timeout_s, run))
    return results


def _transcode_batch(source, batch, crf, preset, timeout_s, run=""):
    n = len(batch)
    head = f"[0:v]{_even_scale()}" + (f",split={n}" + "".join(f"[s{k}]" for k in range(n)) if n > 1 else "[s0]")
    trims = [f"[s{k}]trim=start_frame={s}:end_frame={e},setpts=PTS-STARTPTS[o{k}]" for k, (s, e, _) in enumerate(batch)]
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-hide_banner", "-loglevel", "error", "-y",
           "-i", source, "-filter_complex", ";".join([head] + trims)]
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
    results = {}
    for out, tmp in outs:
        if err is None and tmp.exists() and tmp.stat().st_size > 0:
            os.replace(tmp, out)
            results[out] = None
        else:
            tmp.unlink(missing_ok=True)
            results[out] = err or "ffmpeg wrote no output"
    return results
