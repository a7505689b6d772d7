"""Probe a source video with PyAV before anything decodes it: is it a video we can curate?

Every source goes through `probe` first. It reads the container header and the first
`PROBE_PACKETS` packets of the video stream, decodes one frame (for the rotation and the real
pixel format), and never a whole file. It never raises and never hangs: every failure -- a
missing file, a fifo, random bytes, a truncated mp4, audio only, a 1x1 or 20000x20000 stream --
comes back as `ProbeResult(ok=False, reason=...)` with a reason specific enough to act on, and a
watchdog thread bounds the wall time.

No ffprobe: the imageio-ffmpeg wheel ships none (../shared/STACK.md), PyAV bundles libavformat.
"""
import errno
import hashlib
import math
import os
import stat
import statistics
import threading
import time
from dataclasses import dataclass
from typing import Optional

import av

# Limits. A source outside them is rejected here, before a decoder allocates frames for it.
MAX_PIXELS = 8192 * 8192   # per frame; 8K DCI fits, a declared 12000x12000 does not
MAX_SIDE = 16384           # either side, pixels
MIN_SIDE = 16              # either side; below this no analysis (flow, blur, CLIP) means anything
MAX_FPS = 1000.0           # an average rate above this is a timestamp bug, not high-speed footage
PROBE_PACKETS = 100        # packets read for the frame-rate / VFR check
REORDER_SLACK = 16         # h264/hevc reorder depth: the last pts of a partial read may be missing
VFR_TOLERANCE = 0.10       # a frame gap differing from the median by more than this is VFR

# Demuxers that open *other* files named inside the input (playlists, concat lists): a source
# must be one self-contained file, or a manifest could smuggle in any path on the machine.
# Their text headers are refused before libav sees them; the format check is the backstop.
REFERENCE_FORMATS = frozenset({"concat", "hls", "dash", "imf"})
_SNIFF_BYTES = 4096

# Top-level ISO-BMFF (mp4/mov) box types; a file starting with one is walked for truncation.
_BMFF_BOXES = frozenset({b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"styp", b"pdin", b"moof"})

_FILE_KINDS = ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "fifo"), (stat.S_ISSOCK, "socket"),
               (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"))


@dataclass
class ProbeResult:
    """What the probe learned about one source. Sizes in pixels, times in seconds.

    `width`/`height` are the DISPLAY size (after `rotation`), `coded_width`/`coded_height` what
    the decoder outputs. `rotation` is degrees clockwise (0/90/180/270) that a player turns the
    decoded picture, from the stream's display matrix. `num_frames` is the container's count
    when it has one, else duration x fps. `vfr` is True when packet timestamps in the first
    `PROBE_PACKETS` packets have irregular gaps.
    """
    path: str
    ok: bool
    reason: Optional[str] = None
    fps: float = 0.0
    num_frames: int = 0
    duration_s: float = 0.0
    width: int = 0
    height: int = 0
    coded_width: int = 0
    coded_height: int = 0
    rotation: int = 0
    pix_fmt: Optional[str] = None
    codec: Optional[str] = None
    container: Optional[str] = None
    size_bytes: int = 0
    vfr: bool = False
    is_image: bool = False


def sha256_file(path, chunk: int = 8 << 20) -> str:
    """Hex sha256 of a file's bytes, read `chunk` bytes at a time into one reused buffer."""
    h = hashlib.sha256()
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def probe(path, timeout_s: float = 30) -> ProbeResult:
    """Probe `path` (str, bytes or PathLike) in at most ~`timeout_s` seconds; never raises.

    A watchdog runs the probe on a daemon thread: if libav wedges on a pathological file, the
    caller gets ok=False "probe timed out" and goes on (the stuck thread is abandoned; it holds
    one file descriptor until libav returns).
    """
    try:
        path = os.fsdecode(path)
    except TypeError as e:
        return ProbeResult(path=repr(path), ok=False, reason=f"bad path: {e}")
    box: list[ProbeResult] = []

    def run():
        try:
            box.append(_probe(path, time.monotonic() + timeout_s, timeout_s))
        except Exception as e:  # the contract is "never raises": a bug here is a rejected row, not a crash
            box.append(ProbeResult(path=path, ok=False, reason=f"probe error: {type(e).__name__}: {e}"))

    t = threading.Thread(target=run, name="probe", daemon=True)
    t.start()
    t.join(timeout_s)
    if box:
        return box[0]
    return ProbeResult(path=path, ok=False, reason=f"probe timed out after {timeout_s:g} s")


def _reject(r: ProbeResult, reason: str) -> ProbeResult:
    r.ok, r.reason = False, reason
    return r


def _stat_reason(e: OSError) -> str:
    if isinstance(e, FileNotFoundError):
        return "missing file"
    if isinstance(e, PermissionError):
        return "permission denied"
    if e.errno == errno.ELOOP:
        return "symlink loop"
    if e.errno == errno.ENAMETOOLONG:
        return "file name too long"
    if e.errno == errno.ENOTDIR:
        return "missing file (a parent is not a directory)"
    return f"cannot open: {e.strerror or e}"


def _bmff_truncation(f, size: int) -> Optional[str]:
    """Why an mp4/mov is cut short, from its top-level box headers alone; None if it is not.

    Only a missing or cut `moov` is judged here (libav then fails with a bare "Invalid data",
    or half-opens the file with no sample table). A cut `mdat` after a complete `moov` is left
    to the sample index, which can say how many frames survived. Non-BMFF files: None.
    """
    f.seek(0)
    head = f.read(8)
    if len(head) < 8 or head[4:8] not in _BMFF_BOXES:
        return None
    pos, moov = 0, False
    while pos < size:
        f.seek(pos)
        hdr = f.read(16)
        n, kind = int.from_bytes(hdr[:4], "big"), hdr[4:8].decode("latin-1")
        if len(hdr) < 8 or n == 1 and len(hdr) < 16:
            return f"truncated: file ends inside a box header at byte {pos}" + ("" if moov else "; no moov box")
        if n == 1:  # 64-bit largesize follows the type
            n = int.from_bytes(hdr[8:16], "big")
        elif n == 0:  # the box "extends to end of file"
            n = size - pos
        if n < 8:
            return None  # not a box structure we understand; let libav judge it
        if pos + n > size:
            if moov:
                return None
            return (f"truncated: file ends at byte {size} inside the '{kind}' box declared to end at "
                    f"byte {pos + n}; no complete moov box")
        moov = moov or kind == "moov"
        pos += n
    return None if moov else f"truncated: no moov box (top-level boxes end cleanly at byte {size})"


def _probe(path: str, deadline: float, timeout_s: float) -> ProbeResult:
    r = ProbeResult(path=path, ok=True)
    if not path:
        return _reject(r, "missing file (empty path)")

    # 1. The file itself, before libav sees it: a fifo or a device would block or never end.
    try:
        st = os.stat(path)
    except OSError as e:
        return _reject(r, _stat_reason(e))
    except ValueError as e:  # an embedded NUL: no file can have this name
        return _reject(r, f"bad path: {e}")
    for is_kind, name in _FILE_KINDS:
        if is_kind(st.st_mode):
            return _reject(r, f"not a regular file ({name})")
    r.size_bytes = st.st_size
    if st.st_size == 0:
        return _reject(r, "zero-byte file")

    # 2. Read through a Python file object: libav never parses the name, so "pipe:0.mp4" or
    # "concat:a|b" stays a file name, and non-UTF-8 bytes in it are fine.
    try:
        f = open(path, "rb")
    except OSError as e:
        return _reject(r, _stat_reason(e))
    with f:
        head = f.read(_SNIFF_BYTES)
        if head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith((b"ffconcat", b"#EXTM3U")) or b"<MPD" in head:
            return _reject(r, "references other files (playlist or concat list): not a self-contained video")
        cut = _bmff_truncation(f, st.st_size)
        if cut:
            return _reject(r, cut)
        f.seek(0)
        # 3. The container. The whitelist keeps any nested open a demuxer attempts local.
        try:
            container = av.open(f, options={"protocol_whitelist": "file"}, timeout=(timeout_s, timeout_s))
        except av.error.ExitError:  # libav's interrupt callback fired: the open took past the deadline
            return _reject(r, f"probe timed out after {timeout_s:g} s (opening)")
        except av.error.FFmpegError as e:
            return _reject(r, f"not a video container: {e.strerror or e}")
        with container:
            return _probe_container(r, container, st.st_size, deadline)


def _probe_container(r: ProbeResult, c, size: int, deadline: float) -> ProbeResult:
    fmt = c.format.name
    r.container = fmt
    if fmt in REFERENCE_FORMATS:
        return _reject(r, f"references other files ({fmt} list): not a self-contained video")

    attached = av.stream.Disposition.attached_pic
    videos = [s for s in c.streams.video if not s.disposition & attached]
    if not videos:
        kinds = sorted({s.type for s in c.streams})
        if "audio" in kinds:
            return _reject(r, "no video stream (audio only)")
        return _reject(r, f"no video stream ({', '.join(kinds) or 'no streams'})")
    vs = videos[0]
    cc = vs.codec_context
    r.codec, r.pix_fmt = cc.name, cc.pix_fmt
    w, h = cc.width, cc.height
    r.width, r.height = w, h
    if w <= 0 or h <= 0:
        return _reject(r, f"unknown dimensions {w}x{h}")
    if w * h > MAX_PIXELS or max(w, h) > MAX_SIDE:
        return _reject(r, f"huge dimensions {w}x{h} exceeds limit ({MAX_PIXELS} pixels, side {MAX_SIDE})")
    if min(w, h) < MIN_SIDE:
        return _reject(r, f"unsupported dimensions {w}x{h} (minimum side {MIN_SIDE})")

    # Image demuxers (png_pipe, jpeg_pipe, image2, ...) mean a picture, whatever the extension.
    if fmt == "image2" or fmt.endswith("_pipe"):  # yuv4mpegpipe is a video
        r.is_image = True
        return _reject(r, f"still image ({fmt.removesuffix('_pipe')})")

    # 4. The index. mp4/mov index every sample with its byte range, so truncation is exact and
    # cheap; other containers (mkv cues, avi idx1) index only some frames, at known offsets.
    entries = vs.index_entries
    n_index = len(entries) if fmt.startswith("mov,mp4") else 0
    if n_index:
        present = sum(1 for e in entries if e.pos + e.size <= size)
        if present < n_index:
            return _reject(r, f"truncated: {present} of {n_index} frames present "
                              f"(file is {size} bytes)")
    elif len(entries) and entries[len(entries) - 1].pos > size:
        return _reject(r, f"truncated: index points past the end of the file ({size} bytes)")

    # 5. The first packets: timestamps for fps/VFR, and one decoded frame for rotation.
    pts, frame, n_packets, eof, decode_err = [], None, 0, False, None
    packets = c.demux(vs)
    try:
        while n_packets < PROBE_PACKETS:
            if time.monotonic() > deadline:
                return _reject(r, "probe timed out reading packets")
            pkt = next(packets, None)
            if pkt is None or pkt.size == 0 and pkt.pts is None:  # the demuxer's end-of-stream flush
                eof = True
                break
            n_packets += 1
            pts.append(pkt.pts)
            if frame is None:
                try:
                    frames = vs.decode(pkt)
                    frame = frames[0] if frames else None
                except av.error.FFmpegError as e:
                    decode_err = e
    except av.error.ExitError:
        return _reject(r, "probe timed out reading packets")
    except av.error.FFmpegError as e:
        if n_packets == 0:
            return _reject(r, f"unreadable packets: {e.strerror or e}")
        eof = True  # a damaged tail; what was read is still worth judging
    if frame is None:
        try:
            frames = vs.decode(None)  # flush: a decoder with delay holds the first frame back
            frame = frames[0] if frames else None
        except av.error.FFmpegError as e:
            decode_err = e
    if n_packets == 0:
        return _reject(r, "truncated: no video packets")
    if frame is None:
        why = decode_err.strerror if isinstance(decode_err, av.error.FFmpegError) else "no frame decoded"
        return _reject(r, f"undecodable: {why} (first {n_packets} packets)")

    # 6. Frame count: the container's, else exact when the whole stream fit in the read.
    r.num_frames = vs.frames or n_index or (n_packets if eof else 0)
    if r.num_frames == 1:
        r.is_image = True
        return _reject(r, "still image (1 frame)")

    # 7. Timestamps. Duplicates or missing pts make every frame-indexed decision ambiguous.
    known = sorted(p for p in pts if p is not None)
    if len(known) < len(pts):
        return _reject(r, f"broken timestamps ({len(pts) - len(known)} of {len(pts)} packets without pts)")
    dups = len(known) - len(set(known))
    if dups:
        return _reject(r, f"broken timestamps ({dups} duplicate pts in the first {len(known)} packets)")
    rate = vs.average_rate or vs.guessed_rate
    fps = float(rate) if rate else 0.0
    if not math.isfinite(fps) or fps <= 0 or fps > MAX_FPS:
        return _reject(r, f"broken timestamps (fps {fps:g})")
    r.fps = fps
    # A partial read of a stream with B-frames may lack a few low pts at its end: drop that tail.
    tail = known if eof else known[:max(2, len(known) - REORDER_SLACK)]
    gaps = [b - a for a, b in zip(tail, tail[1:])]
    if gaps:
        med = statistics.median(gaps)
        r.vfr = any(abs(g - med) > max(1, VFR_TOLERANCE * med) for g in gaps)

    tb = vs.time_base
    if vs.duration and tb:
        r.duration_s = float(vs.duration * tb)
    elif c.duration:
        r.duration_s = c.duration / av.time_base
    if not r.num_frames:
        r.num_frames = max(1, round(r.duration_s * fps))
    # The whole stream fit in the read, yet the header promises much more: a cut file whose
    # container (mkv, avi, ...) has no per-sample index. Only for a lone video stream, since
    # a container's duration is that of its longest stream.
    declared = round(r.duration_s * fps)
    # ... and whose frames, by their own timestamps, end well before it: a variable-rate stream (a
    # browser's webm) has fewer frames than its nominal rate times its duration, and is not cut.
    span_s = (known[-1] - known[0]) * float(tb) + 1 / fps if known and tb else 0.0
    if eof and len(c.streams) == 1 and n_packets < 0.9 * declared - 1 and span_s < 0.9 * r.duration_s - 1 / fps:
        return _reject(r, f"truncated: {n_packets} frames present, header declares {r.duration_s:.3g} s "
                          f"(~{declared} frames)")
    if not r.duration_s:
        r.duration_s = r.num_frames / fps

    # 8. Display geometry. frame.rotation is the display matrix's counter-clockwise angle in
    # [-180, 180]; the table stores clockwise degrees, snapped to a quarter turn.
    r.rotation = int(round(-frame.rotation / 90.0)) % 4 * 90
    r.coded_width, r.coded_height = frame.width, frame.height
    r.pix_fmt = frame.format.name
    if r.rotation in (90, 270):
        r.width, r.height = frame.height, frame.width
    else:
        r.width, r.height = frame.width, frame.height
    return r
