"""A corpus of hostile inputs for the curation pipeline, built in seconds from tiny videos.

`make_hostile_corpus(dir)` writes every case under `dir/root/` (the dataset root a curate run
is pointed at) plus `dir/outside/` (files a manifest must not be able to reach), and returns one
`HostileCase` per case saying what must happen to it: "rejected" with a reason containing
`reason_contains`, or "curated" with the stated fps / display size / rotation.

Valid videos are 64x48 libx264 at 24 fps, written with PyAV; broken ones are valid ones cut,
patched or renamed, so each case differs from a good file in exactly one way.

Notes on cases that depend on the machine:
- permission-denied: a mode-000 file. Root reads it anyway, so under root its expectation is
  "curated"; tests check the rejection by probing from a process that dropped to uid 65534.
- huge-dimensions: a y4m stream whose header declares 12000x12000 (probe rejects it by
  MAX_PIXELS before any frame is allocated). A declared 20000x20000 is refused by libavformat
  itself (av_image_check_size) with an unhelpful errno; that case only requires "rejected".
- big-valid: a real 4096x2160 clip, inside the limits: it must curate.
- many-tiny-files: `many_files` garbage files in `root/many/` (default small; pass 10_000 for
  the stress case, ~2 s to create).
"""
import os
import stat
import struct
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Optional

import av
import numpy as np
from PIL import Image

W, H, FPS = 64, 48, 24


@dataclass(frozen=True)
class HostileCase:
    """One hostile input and what must become of it.

    `path` is a str (undecodable bytes in a name are surrogate-escaped, `os.fsencode` gives them
    back). `stage` names who must catch it: "probe" (pipeline.probe on the file itself) or
    "sources" (expanding a directory / manifest into files: paths escaping the root). For a
    curated case, `fps`, `width`, `height` (display size), `rotation` (degrees clockwise),
    `pix_fmt`, `vfr` are the expected probe values; None means "not checked".
    """
    path: str
    kind: str
    expect: str                       # "rejected" | "curated"
    reason_contains: Optional[str] = None
    stage: str = "probe"
    fps: Optional[float] = None
    width: Optional[int] = None
    height: Optional[int] = None
    rotation: Optional[int] = None
    pix_fmt: Optional[str] = None
    vfr: Optional[bool] = None


def write_video(path, n: int = 12, w: int = W, h: int = H, fps: int | Fraction = FPS, pix_fmt: str = "yuv420p",
                codec: str = "libx264", fmt: Optional[str] = None, rotation_cw: int = 0,
                pts: Optional[list[int]] = None, noise: bool = False, faststart: bool = False,
                bframes: bool = True, same_pts: bool = False) -> str:
    """Write an `n`-frame test video: a white bar sweeping right (plus noise if `noise`).

    `pts` gives each frame's timestamp in units of 1/`fps` s (irregular gaps make VFR);
    `same_pts` stamps every packet 0 (broken timestamps). `rotation_cw` writes a display
    matrix telling players to turn the picture that many degrees clockwise.
    """
    rng = np.random.default_rng(0)
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(os.fsdecode(path), "w", format=fmt, options=options) as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = w, h, pix_fmt
        if codec == "libx264":
            s.codec_context.options = {"preset": "ultrafast"} if not bframes else {"preset": "veryfast"}
        if pts is not None:
            s.codec_context.time_base = Fraction(1, fps)
        if rotation_cw:
            s.set_display_rotation(-rotation_cw)  # PyAV takes counter-clockwise degrees
        packets = []
        for i in range(n):
            a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8) if noise else np.zeros((h, w, 3), np.uint8)
            a[:, (i * 3) % w] = 255
            frame = av.VideoFrame.from_ndarray(a, format="rgb24")
            if pts is not None:
                frame.pts, frame.time_base = pts[i], Fraction(1, fps)
            packets += s.encode(frame)
        packets += s.encode()
        for p in packets:
            if same_pts:
                p.pts = p.dts = 0
            c.mux(p)
    return os.fsdecode(path)


def _write_audio(path, codec: str, fmt: Optional[str] = None):
    with av.open(path, "w", format=fmt) as c:
        s = c.add_stream(codec, rate=16000)
        s.layout = "mono"
        frame_size = s.codec_context.frame_size or 1152
        t = np.arange(frame_size * 12, dtype=np.float32) / 16000
        tone = (0.3 * np.sin(2 * np.pi * 440 * t)).reshape(12, 1, frame_size)
        for i, block in enumerate(tone):
            f = av.AudioFrame.from_ndarray(block, format="fltp", layout="mono")
            f.sample_rate, f.pts = 16000, i * frame_size
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def _box(data: bytes, kind: bytes) -> tuple[int, int]:
    """(start, end) of the first top-level ISO-BMFF box of this type."""
    pos = 0
    while pos < len(data):
        n = struct.unpack(">I", data[pos:pos + 4])[0]
        if data[pos + 4:pos + 8] == kind:
            return pos, pos + n
        pos += n
    raise ValueError(f"no {kind!r} box")


def make_hostile_corpus(dir, many_files: int = 32) -> list[HostileCase]:
    """Build the corpus under `dir` (created if missing) and return its cases.

    Everything lands in `dir/root/` except `dir/outside/secret.mp4`, a valid video that the
    manifest and an escaping symlink point at: a sources stage must refuse to reach it.
    """
    dir = Path(dir)
    root, outside = dir / "root", dir / "outside"
    root.mkdir(parents=True, exist_ok=True)
    outside.mkdir(exist_ok=True)
    cases: list[HostileCase] = []

    def rejected(name, kind, reason, stage="probe"):
        cases.append(HostileCase(os.fsdecode(root / name) if name else "", kind, "rejected", reason, stage))

    def curated(path, kind, **expect):
        geometry = dict(fps=FPS, width=W, height=H, rotation=0) | expect
        cases.append(HostileCase(os.fsdecode(path), kind, "curated", **geometry))

    valid = write_video(root / "valid.mp4")
    curated(valid, "valid")
    good = Path(valid).read_bytes()

    # --- files that are not videos at all
    (root / "zero_byte.mp4").touch()
    rejected("zero_byte.mp4", "zero-byte", "zero-byte file")
    (root / "random_bytes.mp4").write_bytes(np.random.default_rng(1).bytes(4096))
    rejected("random_bytes.mp4", "random-bytes", "not a video container")
    (root / "text.mp4").write_text("this is not a video\n" * 50)
    rejected("text.mp4", "text-file", "not a video container")
    img = np.zeros((H, W, 3), np.uint8)
    img[10:30, 20:40] = (200, 50, 50)
    Image.fromarray(img).save(root / "png_image.mp4", format="PNG")
    rejected("png_image.mp4", "still-image-png", "still image")
    Image.fromarray(img).save(root / "jpg_image.mp4", format="JPEG")
    rejected("jpg_image.mp4", "still-image-jpg", "still image")
    write_video(root / "one_frame.mp4", n=1)
    rejected("one_frame.mp4", "still-image-1-frame", "still image (1 frame)")
    _write_audio(os.fspath(root / "audio_aac.mp4"), "aac")
    rejected("audio_aac.mp4", "audio-only-aac", "no video stream (audio only)")
    _write_audio(os.fspath(root / "audio_mp3.mp4"), "mp3", fmt="mp3")
    rejected("audio_mp3.mp4", "audio-only-mp3", "no video stream (audio only)")
    # an ffconcat list named .mp4: libavformat would happily open the file it names
    (root / "concat_list.mp4").write_text(f"ffconcat version 1.0\nfile '{outside / 'secret.mp4'}'\n")
    rejected("concat_list.mp4", "concat-reference", "references other files")

    # --- truncated mp4s: moov at the end (as recorded) and moov first (faststart, as streamed)
    big = Path(write_video(root / "_src_truncate.mp4", n=30, noise=True)).read_bytes()
    fast = Path(write_video(root / "_src_faststart.mp4", n=30, noise=True, faststart=True)).read_bytes()
    (root / "_src_truncate.mp4").unlink()
    (root / "_src_faststart.mp4").unlink()
    for pct in (10, 50, 90):
        (root / f"truncated_{pct}.mp4").write_bytes(big[:len(big) * pct // 100])
        rejected(f"truncated_{pct}.mp4", f"truncated-{pct}%", "truncated")
        (root / f"truncated_faststart_{pct}.mp4").write_bytes(fast[:len(fast) * pct // 100])
        rejected(f"truncated_faststart_{pct}.mp4", f"truncated-faststart-{pct}%", "truncated: ")
    mkv = Path(write_video(root / "_src.mkv", n=60, noise=True, fmt="matroska")).read_bytes()
    (root / "_src.mkv").unlink()
    for pct in (10, 50):  # no sample index: the header's duration is what gives the cut away
        (root / f"truncated_{pct}.mkv").write_bytes(mkv[:len(mkv) * pct // 100])
        rejected(f"truncated_{pct}.mkv", f"truncated-mkv-{pct}%", "truncated: ")
    ftyp_end = _box(fast, b"ftyp")[1]
    moov_end = _box(fast, b"moov")[1]
    (root / "header_only.mp4").write_bytes(fast[:moov_end])       # ftyp + moov, no samples
    rejected("header_only.mp4", "header-only", "truncated: 0 of 30 frames")
    (root / "ftyp_only.mp4").write_bytes(fast[:ftyp_end])
    rejected("ftyp_only.mp4", "ftyp-only", "truncated: no moov box")
    # every sample's bytes zeroed: the container is perfect, the h264 payload is nothing
    mdat = _box(good, b"mdat")
    (root / "zeroed_payload.mp4").write_bytes(good[:mdat[0] + 8] + bytes(mdat[1] - mdat[0] - 8) + good[mdat[1]:])
    rejected("zeroed_payload.mp4", "zeroed-payload", "undecodable")

    # --- geometry
    write_video(root / "tiny_1x1.mp4", w=1, h=1, pix_fmt="yuv444p")
    rejected("tiny_1x1.mp4", "1x1", "unsupported dimensions 1x1")
    y4m = Path(write_video(root / "_src.y4m", n=4, codec="rawvideo", fmt="yuv4mpegpipe")).read_bytes()
    (root / "_src.y4m").unlink()
    assert y4m.startswith(b"YUV4MPEG2 W64 H48 ")
    (root / "huge_declared.mp4").write_bytes(y4m.replace(b"W64 H48", b"W12000 H12000", 1))
    rejected("huge_declared.mp4", "huge-dimensions", "huge dimensions 12000x12000")
    (root / "huge_declared_20000.mp4").write_bytes(y4m.replace(b"W64 H48", b"W20000 H20000", 1))
    rejected("huge_declared_20000.mp4", "huge-dimensions-unopenable", None)
    (root / "valid_y4m.mp4").write_bytes(y4m)                      # raw video, header by y4m
    curated(root / "valid_y4m.mp4", "y4m-raw")
    curated(write_video(root / "big_4096x2160.mp4", n=2, w=4096, h=2160, bframes=False),
            "big-valid", width=4096, height=2160)
    for cw in (90, 180, 270):
        portrait = cw in (90, 270)
        curated(write_video(root / f"rotated_{cw}.mp4", rotation_cw=cw), f"rotation-{cw}", rotation=cw,
                width=H if portrait else W, height=W if portrait else H)

    # --- timing
    write_video(root / "same_pts.mp4", bframes=False, same_pts=True)
    rejected("same_pts.mp4", "broken-timestamps-mp4", "broken timestamps")
    write_video(root / "same_pts.mkv", fmt="matroska", bframes=False, same_pts=True)
    rejected("same_pts.mkv", "broken-timestamps-mkv", "broken timestamps")
    gaps = [0, 1, 2, 4, 5, 9, 10, 11, 15, 16, 17, 18, 25, 26, 27, 30, 31, 35, 36, 40]
    curated(write_video(root / "vfr.mp4", n=len(gaps), pts=gaps), "vfr", fps=None, vfr=True)
    curated(write_video(root / "ntsc.mkv", n=30, fps=Fraction(30000, 1001), fmt="matroska"),
            "cfr-mkv-ms-timebase", fps=30000 / 1001, vfr=False)  # 33/34 ms gaps are rounding, not VFR

    # --- pixel formats and containers that must curate
    curated(write_video(root / "yuv444p.mp4", pix_fmt="yuv444p"), "yuv444p", pix_fmt="yuv444p")
    curated(write_video(root / "yuv420p10le.mp4", pix_fmt="yuv420p10le"), "10-bit", pix_fmt="yuv420p10le")
    curated(write_video(root / "mpeg4_part2.avi", codec="mpeg4", fmt="avi"), "mpeg4-avi")
    for ext in ("mov", "avi", "bin"):
        (root / f"wrong_extension.{ext}").write_bytes(good)
        curated(root / f"wrong_extension.{ext}", f"wrong-extension-{ext}")

    # --- file names
    names = {
        "non-utf8-name": b"bad_\xff\xfe_name.mp4",
        "long-name": ("long_" + "x" * 231 + ".mp4").encode(),      # 240 bytes (ext4 allows 255)
        "unicode-name": "ünïcødé 视频 🎬.mp4".encode(),
        "protocol-name-pipe": b"pipe:0.mp4",                       # libav would read stdin
        "protocol-name-concat": b"concat:valid.mp4|valid.mp4",
        "newline-name": b"new\nline.mp4",
        "dash-name": b"-y.mp4",                                    # an ffmpeg CLI option
    }
    for kind, name in names.items():
        p = os.path.join(os.fsencode(root), name)
        with open(p, "wb") as f:
            f.write(good)
        curated(p, kind)

    # --- the file system itself
    rejected("missing.mp4", "missing-file", "missing file")
    os.symlink("loop_b.mp4", root / "loop_a.mp4")
    os.symlink("loop_a.mp4", root / "loop_b.mp4")
    rejected("loop_a.mp4", "symlink-loop", "symlink loop")
    os.symlink("nowhere.mp4", root / "dangling.mp4")
    rejected("dangling.mp4", "dangling-symlink", "missing file")
    os.symlink("/dev/zero", root / "dev_zero.mp4")                 # endless: reading never ends
    rejected("dev_zero.mp4", "device", "not a regular file (character device)")
    os.mkfifo(root / "fifo.mp4")                                   # open() would block forever
    rejected("fifo.mp4", "fifo", "not a regular file (fifo)")
    (root / "directory.mp4").mkdir()
    rejected("directory.mp4", "directory", "not a regular file (directory)")
    denied = root / "permission_denied.mp4"
    denied.write_bytes(good)
    denied.chmod(0)
    if os.geteuid() == 0:  # root reads mode-000 files: correct behaviour is to curate it
        curated(denied, "permission-denied")
    else:
        rejected(denied.name, "permission-denied", "permission denied")

    # --- paths escaping the root: valid video outside, reached by manifest or symlink
    secret = write_video(outside / "secret.mp4")
    os.symlink(secret, root / "escape_link.mp4")
    rejected("escape_link.mp4", "symlink-escape", "escapes its root", stage="sources")
    # one path per line, relative to the manifest's directory (pipeline/sources.py's format)
    (root / "manifest.txt").write_text("\n".join([
        "../outside/secret.mp4", "sub/../../outside/secret.mp4", secret, "escape_link.mp4",
        "/etc/passwd", "../../../../../../etc/passwd"]) + "\n")
    rejected("manifest.txt", "manifest-escape", "escapes its root", stage="sources")

    # --- many tiny garbage files: a sources stage and a curate run must scale to them
    many = root / "many"
    many.mkdir(exist_ok=True)
    rng = np.random.default_rng(2)
    for i in range(many_files):
        (many / f"tiny_{i:05d}.mp4").write_bytes(rng.bytes(1 + i % 64))
    rejected("many", "many-tiny-files", "not a video container", stage="sources")
    return cases
