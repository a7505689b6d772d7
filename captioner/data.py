"""Reading the `clips` table and the frames of a clip for the captioner.

`clip_uri` (pipeline/schema.py) is an absolute mp4 path holding exactly the clip's frames, or
`<source path>#frames=<start>-<end>` (0-based, end exclusive) naming a range of the source.
We decode with PyAV, honour the display-matrix rotation, sample T frames uniformly and
centre-crop + resize them to a square. The captioner never imports pipeline/: this file
reads the Delta table directly and relies only on the column names of the contract.
"""
import os
import re
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import av
import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from deltalake import DeltaTable

_RANGE = re.compile(r"^(?P<path>.*)#frames=(?P<start>\d+)-(?P<end>\d+)$")
SEEK_AFTER = 120  # frames: below this a decode from 0 is cheaper than a seek + pts bookkeeping


def clips_path(dataset_root) -> str:
    return str(Path(dataset_root) / "clips")


def read_clips(dataset_root, version: int | None = None) -> tuple[pa.Table, int]:
    """The clips table at `version` (default latest) -> (arrow table, the version read).
    ValueError when there is no table or no such version (deltalake's own errors are not ValueErrors)."""
    if not DeltaTable.is_deltatable(clips_path(dataset_root)):
        raise ValueError(f"no clips table under {dataset_root} (expected {clips_path(dataset_root)})")
    try:
        dt = DeltaTable(clips_path(dataset_root), version=version)
    except Exception as e:  # deltalake raises a generic error for a missing version
        raise ValueError(f"{dataset_root}: version {version} not found ({e})") from None
    # on the calling thread: a threaded scan through deltalake's filesystem handler can abort the
    # process at exit (see pipeline.store.arrow_table)
    return dt.to_pyarrow_dataset().to_table(use_threads=False), dt.version()


def training_rows(table: pa.Table) -> pa.Table:
    """Kept clips with at least one teacher caption: the captioner's training set."""
    has_teacher = pc.or_(pc.is_valid(table["caption_teacher_short"]),
                         pc.is_valid(table["caption_teacher_dense"]))
    return table.filter(pc.and_(pc.equal(table["status"], "kept"), has_teacher))


def parse_clip_uri(uri: str) -> tuple[str, int, int | None]:
    """clip_uri -> (file path, start frame, end frame or None for 'the whole file')."""
    m = _RANGE.match(uri)
    if m:
        start, end = int(m["start"]), int(m["end"])
        if end <= start:
            raise ValueError(f"empty frame range in clip_uri {uri!r}")
        return m["path"], start, end
    return uri, 0, None


def sample_indices(start: int, end: int, num_frames: int, pool: int = 1) -> np.ndarray:
    """num_frames indices spread uniformly over [start, end): the centre of each of T equal bins.
    pool > 1: num_frames * pool indices (frames for temporal jitter) laid out so that every pool-th
    from pool // 2 on is exactly the pool = 1 set (evenly_spaced picks the frames captioning sees)."""
    n, m = end - start, num_frames * pool
    # bin j of m starts at j*n/m; an odd pool takes each bin's centre, an even one its start: either way
    # index k*pool + pool//2 lands on (2k+1)n / 2T, the centre of bin k of T (integers: no float drift)
    j = np.arange(m)
    return start + np.minimum((2 * j + pool % 2) * n // (2 * m), n - 1)


FRAME_FITS = ("crop", "resize", "pad")


def to_square(img: np.ndarray, size: int, fit: str = "crop") -> np.ndarray:
    """(H, W, 3) -> (size, size, 3), area-resized. fit: "crop" the centre square (CLIP's
    preprocessing: the sides of a wide frame are never seen), "resize" the whole frame to the square
    (aspect squeezed, nothing lost), or "pad" it to a square with black bars first (LLaVA-style)."""
    h, w = img.shape[:2]
    if fit == "crop":
        s = min(h, w)
        top, left = (h - s) // 2, (w - s) // 2
        img = img[top:top + s, left:left + s]
    elif fit == "pad":
        s = max(h, w)
        canvas = np.zeros((s, s, 3), img.dtype)
        canvas[(s - h) // 2:(s - h) // 2 + h, (s - w) // 2:(s - w) // 2 + w] = img
        img = canvas
    elif fit != "resize":
        raise ValueError(f"unknown frame fit {fit!r}; choose from {FRAME_FITS}")
    return cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)


def _rotate(img: np.ndarray, ccw_degrees: float) -> np.ndarray:
    # PyAV's frame.rotation is the display matrix angle, counter-clockwise; players rotate the
    # decoded picture by it to show it upright (ffmpeg's autorotate)
    return np.rot90(img, k=int(round(ccw_degrees / 90)) % 4)


def read_clip_frames(uri: str, num_frames: int, size: int, fit: str = "crop", pool: int = 1) -> np.ndarray:
    """Decode a clip -> (num_frames * pool, size, size, 3) uint8 RGB, upright, uniformly sampled
    (sample_indices), each frame made square by `fit` (to_square).

    Raises ValueError (with the uri) if the file is unreadable or has fewer frames than the range.
    """
    path, start, end = parse_clip_uri(uri)
    try:
        with av.open(path) as container:
            if not container.streams.video:  # an audio-only file: a reason, not an IndexError that fails the batch
                raise ValueError(f"cannot decode {uri}: no video stream")
            stream = container.streams.video[0]
            if end is None:
                end = stream.frames or _count_frames(container, stream)
                container.seek(0)
            wanted = sample_indices(start, end, num_frames, pool)
            wanted_set = set(wanted.tolist())
            picks = {}
            for idx, frame in _frames_from(container, stream, start):
                if idx >= end:
                    break
                if idx in wanted_set:
                    img = _rotate(frame.to_ndarray(format="rgb24"), frame.rotation or 0)
                    picks[idx] = to_square(img, size, fit)
    except (av.error.FFmpegError, OSError) as e:
        raise ValueError(f"cannot decode {uri}: {e}") from e
    missing = [int(i) for i in wanted if i not in picks]
    if missing:
        raise ValueError(f"cannot decode {uri}: frames {missing[:3]}... not in the file")
    return np.stack([picks[i] for i in wanted])


def _count_frames(container, stream) -> int:
    return sum(1 for _ in container.decode(stream))


def _frames_from(container, stream, start: int):
    """Yield (0-based frame index, frame) from about `start` on, numbered as a decode from frame 0
    numbers them (the pipeline cut the ranges so)."""
    if start < SEEK_AFTER:
        yield from enumerate(container.decode(stream))
        return
    index = _pts_index(container, stream)
    if index is not None and start < len(index):
        # seek to the keyframe before `start`, then number frames by their rank among the packets'
        # times: pts * fps skipped or repeated numbers on variable-frame-rate sources (phones)
        rank, landed = {t: i for i, t in enumerate(index)}, False
        container.seek(index[start], stream=stream, backward=True)
        for frame in container.decode(stream):
            i = rank.get(frame.pts)
            if i is None or (not landed and i > start):
                break  # a time the demux did not list, or a seek that landed late: decode from the start
            landed = True
            yield i, frame
        else:
            return
    container.seek(0)
    yield from enumerate(container.decode(stream))


def _pts_index(container, stream) -> list | None:
    """The shown frames' times (stream ticks), ascending, from a demux (no decode): frame i is shown
    at the i-th. None when a packet has no time or two share one (then frames are counted instead)."""
    pts = []
    for p in container.demux(stream):
        if p.pts is None:
            if p.size == 0:  # the demuxer's end-of-stream flush
                continue
            return None
        if not p.is_discard:  # discarded packets (edit lists) are decoded, never shown
            pts.append(p.pts)
    pts.sort()
    return pts if pts and len(set(pts)) == len(pts) else None


def load_frames(clip_ids, uris, num_frames: int, size: int, cache_file=None, workers: int | None = None,
                fit: str = "crop", pool: int = 1):
    """Decode each clip once -> (frames {clip_id: (T * pool, S, S, 3) uint8}, errors {clip_id: reason}).

    With `cache_file` (an .npz) clips already there are loaded instead of decoded, and the
    union is written back atomically, so a resumed training run does not decode again.
    """
    frames = {}
    if cache_file and Path(cache_file).is_file():
        with np.load(cache_file) as npz:
            # frames made square another way (or by code that did not record how) are not reused
            # (and pooled frames from before sample_indices centred them: "__layout__")
            if "__fit__" in npz.files and str(npz["__fit__"]) == fit and (pool == 1 or "__layout__" in npz.files):
                frames = {k: npz[k] for k in npz.files if npz[k].shape == (num_frames * pool, size, size, 3)}
    todo = [(c, u) for c, u in zip(clip_ids, uris) if c not in frames]

    def one(item):
        cid, uri = item
        try:
            return cid, read_clip_frames(uri, num_frames, size, fit, pool), None
        except ValueError as e:
            return cid, None, str(e)

    errors = {}
    with ThreadPoolExecutor(workers or os.cpu_count() or 1) as ex:  # PyAV decodes without the GIL
        for cid, arr, err in ex.map(one, todo):
            if err is None:
                frames[cid] = arr
            else:
                errors[cid] = err
    if cache_file and todo:
        # A temp name of our own: every Ray Train worker decodes into the same out_dir, and a shared
        # temp file would be truncated by one while another renames it into place
        tmp = Path(f"{cache_file}.{uuid.uuid4().hex}.tmp.npz")
        try:
            np.savez(tmp, __fit__=np.array(fit), __layout__=np.array("centred"), **frames)
            os.replace(tmp, cache_file)
        finally:
            tmp.unlink(missing_ok=True)
    wanted = set(clip_ids)
    return {k: v for k, v in frames.items() if k in wanted}, errors
