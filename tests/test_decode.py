"""The shared analysis decode: frames in order at the analysis size, colour close to swscale's,
rotation, other pixel formats, and the decode thread's errors, timeouts and clean exit; and the
frame-accurate cut of clips, which seeks instead of decoding the source from its start."""
import threading
import time
from fractions import Fraction

import av
import cv2
import numpy as np
import pytest
from skimage import data

from pipeline.decode import Frames, I420Stack, decode_for_analysis, scaled_size
from tests.avspy import Container


def _video(path, n=40, size=(320, 180), pix_fmt="yuv420p", fps=25):
    """A slow pan over a photo, H.264 (`pix_fmt` yuv420p or yuv444p)."""
    big = data.astronaut()
    w, h = size
    with av.open(str(path), "w") as out:
        s = out.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, pix_fmt
        for i in range(n):
            f = cv2.resize(big[40 + i:340 + i, 20:20 + 300 * w // h], (w, h), interpolation=cv2.INTER_AREA)
            for p in s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                out.mux(p)
        for p in s.encode():
            out.mux(p)
    return str(path)


class Keep:
    """Keeps each run's RGB (and, with views=True, its luma and small views)."""

    def __init__(self, views=False):
        self.runs, self.views, self.luma, self.small = [], views, [], []

    def process_frames(self, start, frames):
        self.runs.append((start, frames.rgb.copy()))
        if self.views:
            self.luma.append(frames.luma.copy())
            self.small.append(frames.small(30).copy())


def _reference(path, short_side=144):
    """Each frame through swscale (area) to yuv420p at the analysis size, then OpenCV's I420 -> RGB:
    the slower way this decode replaced."""
    with av.open(path) as c:
        st = c.streams.video[0]
        w, h = scaled_size(st.codec_context.width, st.codec_context.height, short_side)
        return np.stack([cv2.cvtColor(f.reformat(w, h, "yuv420p", interpolation="AREA").to_ndarray(),
                                      cv2.COLOR_YUV2RGB_I420) for f in c.decode(st)])


@pytest.mark.parametrize("pix_fmt", ["yuv420p", "yuv444p"])
def test_frames_arrive_in_order_at_the_analysis_size(tmp_path, pix_fmt):
    path = _video(tmp_path / "pan.mp4", pix_fmt=pix_fmt)
    keep = Keep()
    dec = decode_for_analysis(path, [keep], run=16)
    assert dec.num_frames == 40 and dec.error is None and dec.analysis_size == (256, 144)
    assert [s for s, _ in keep.runs] == [0, 16, 32] and [len(f) for _, f in keep.runs] == [16, 16, 8]
    frames = np.concatenate([f for _, f in keep.runs])
    ref = _reference(path)
    assert frames.shape == ref.shape
    assert np.abs(frames.astype(int) - ref).mean() < 1.0  # bilinear vs area scaling: the same picture
    assert dec.thumbs and min(dec.thumbs) == 0 and all(cv2.imdecode(np.frombuffer(j, np.uint8), 1).shape[:2] == (180, 320)
                                                      for j in dec.thumbs.values())
    np.testing.assert_allclose(dec.pts_s, np.arange(40) / 25, atol=1e-6)


def test_rotation_turns_frames_and_thumbnails(tmp_path):
    path = _video(tmp_path / "pan.mp4", n=10)
    plain, turned = Keep(views=True), Keep(views=True)
    decode_for_analysis(path, [plain])
    dec = decode_for_analysis(path, [turned], rotation=90)
    a, b = plain.runs[0][1], turned.runs[0][1]
    assert dec.analysis_size == (144, 256) and b.shape == (10, 256, 144, 3)
    np.testing.assert_array_equal(b[3], np.rot90(a[3], -1))  # 90 degrees clockwise
    np.testing.assert_array_equal(turned.luma[0][3], np.rot90(plain.luma[0][3], -1))
    np.testing.assert_array_equal(turned.small[0][3], np.rot90(plain.small[0][3], -1))
    assert cv2.imdecode(np.frombuffer(dec.thumbs[0], np.uint8), 1).shape[:2] == (320, 180)  # never upscaled


def test_stacked_conversion_equals_one_frame_at_a_time(tmp_path):
    path = _video(tmp_path / "pan.mp4", n=6, size=(1280, 720))  # two halvings, then a bilinear step
    with av.open(path) as c:
        frames = list(c.decode(video=0))
    w, h = scaled_size(1280, 720, 144)
    stack, one = I420Stack(len(frames), w, h), I420Stack(1, w, h)
    for j, f in enumerate(frames):
        stack.put(j, f)
    together = stack.colour()
    for j, f in enumerate(frames):
        one.put(0, f)
        np.testing.assert_array_equal(together[j], one.colour()[0])


@pytest.mark.parametrize("rotation", [0, 270])
def test_luma_and_small_views_match_the_rgb_frames(tmp_path, rotation):
    """Consumers read the Y plane as grey and a small copy made from halved planes: the same
    pictures as OpenCV's grey and the halved RGB, to rounding (and the luma's video-range mapping)."""
    path = _video(tmp_path / "pan.mp4", n=20, size=(640, 360))
    keep = Keep(views=True)
    decode_for_analysis(path, [keep], rotation=rotation, run=8)
    rgb = np.concatenate([f for _, f in keep.runs])
    luma, small = np.concatenate(keep.luma), np.concatenate(keep.small)
    as_rgb = Frames.of(rgb)
    grey = (luma.astype(float) - 16) * 255 / 219  # Frames(stack).luma_black / luma_gain
    err = np.abs(grey - as_rgb.luma)
    assert err.mean() < 1.0 and np.percentile(err, 99) <= 2  # far apart only where RGB clips a saturated colour
    assert small.shape == as_rgb.small(30).shape == (20, rgb.shape[1] // 4, rgb.shape[2] // 4, 3)  # two halvings
    err = np.abs(small.astype(int) - as_rgb.small(30))
    assert err.mean() < 0.75 and np.percentile(err, 99) <= 2


def _decoders():
    return [t for t in threading.enumerate() if t.name == "decode"]


def test_consumer_error_stops_the_decoder(tmp_path):
    path = _video(tmp_path / "pan.mp4")

    class Boom:
        def process_frames(self, start, frames):
            raise RuntimeError("scorer failed")

    with pytest.raises(RuntimeError, match="scorer failed"):
        decode_for_analysis(path, [Boom()], run=8)
    assert not _decoders()


def test_unreadable_file_raises_from_the_decode_thread(tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video at all" * 100)
    with pytest.raises(av.error.FFmpegError):
        decode_for_analysis(str(bad), [Keep()])
    assert not _decoders()


def test_timeout_ends_the_pass(tmp_path):
    path = _video(tmp_path / "pan.mp4")

    class Slow:
        def process_frames(self, start, frames):
            time.sleep(0.2)

    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="analysis exceeded"):
        decode_for_analysis(path, [Slow()], run=4, timeout_s=0.3)
    assert time.monotonic() - t0 < 2.0
    time.sleep(0.1)
    assert not _decoders()


# --- The frame-accurate cut (pipeline.clips.transcode_clips): each batch seeks near its first clip. ---

BITS, BLOCK = 9, 16  # frame i shows i in binary: BITS blocks of BLOCK px, white for a 1


def _numbered_video(path, n=300, fps=30, gop=24, pts=None, rotation_cw=0, fmt=None):
    """H.264 with B-frames, a keyframe every `gop` frames; frame i shows i as BITS black/white blocks."""
    w, h = BITS * BLOCK + BLOCK, 32  # a grey block at the right edge
    with av.open(str(path), "w", format=fmt) as out:
        s = out.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.codec_context.options = {"preset": "veryfast", "g": str(gop), "keyint_min": str(gop), "bf": "2"}
        if pts is not None:
            s.codec_context.time_base = Fraction(1, fps)
        if rotation_cw:
            s.set_display_rotation(-rotation_cw)  # PyAV takes counter-clockwise degrees
        for i in range(n):
            a = np.full((h, w, 3), 128, np.uint8)
            for b in range(BITS):
                a[:, b * BLOCK:(b + 1) * BLOCK] = 255 if i >> b & 1 else 0
            frame = av.VideoFrame.from_ndarray(a, format="rgb24")
            if pts is not None:
                frame.pts, frame.time_base = pts[i], Fraction(1, fps)
            for p in s.encode(frame):
                out.mux(p)
        for p in s.encode():
            out.mux(p)
    return str(path)


def _frame_numbers(path, rotation_cw=0):
    with av.open(str(path)) as c:
        rgb = [np.rot90(f.to_ndarray(format="rgb24"), k=rotation_cw // 90) for f in c.decode(video=0)]
    return [sum(1 << b for b in range(BITS) if a[:, b * BLOCK + 4:(b + 1) * BLOCK - 4].mean() > 128) for a in rgb]


def _spy_ffmpeg(monkeypatch):
    import pipeline.clips as clips
    calls, real = [], clips.subprocess.run

    def run(cmd, *a, **k):
        calls.append(cmd)
        return real(cmd, *a, **k)

    monkeypatch.setattr(clips.subprocess, "run", run)
    return calls


def _seek(cmd):
    return float(cmd[cmd.index("-ss") + 1]) if "-ss" in cmd else 0.0


class _NoDemux(Container):
    """A container whose demux fails the test: the frame times must come from the analysis decode."""

    def demux(self, *a, **k):
        raise AssertionError("the source was demuxed")


@pytest.mark.parametrize("times", ["demux", "decode"])
@pytest.mark.parametrize("kind", ["cfr-mp4", "vfr-mp4", "rotation-90", "mkv"])
def test_clips_far_into_a_source_seek_and_hold_exactly_their_frames(tmp_path, monkeypatch, kind, times):
    """Each batch's ffmpeg starts near its first clip (input -ss), not at frame 0, and still cuts
    exactly the source frames [start, end) — by their timestamps, so VFR is right too. The times come
    from a demux of the source, or from the analysis decode's `pts_s` without one."""
    import pipeline.clips as clips
    n, fps = 300, 30
    gaps = np.cumsum(np.random.default_rng(0).integers(1, 4, n)).tolist() if kind == "vfr-mp4" else None
    rot = 90 if kind == "rotation-90" else 0
    src = _numbered_video(tmp_path / ("src.mkv" if kind == "mkv" else "src.mp4"), n, fps, pts=gaps,
                          rotation_cw=rot, fmt="matroska" if kind == "mkv" else None)
    pts_s = None
    if times == "decode":
        pts_s = decode_for_analysis(src, [Keep()]).pts_s
        real_open = clips.av.open
        monkeypatch.setattr(clips.av, "open", lambda f, *a, **k: _NoDemux(real_open(f, *a, **k)) if f == src
                            else real_open(f, *a, **k))
    ranges = [(0, 5), (5, 17), (150, 151), (151, 190), (261, 299), (299, 300)]
    monkeypatch.setattr(clips, "MAX_OUTPUTS_PER_FFMPEG", 2)  # three batches: at 0, mid-source, at the end
    calls = _spy_ffmpeg(monkeypatch)
    jobs = [(s, e, tmp_path / "clips" / f"{s}-{e}.mp4") for s, e in ranges]
    assert clips.transcode_clips(src, jobs, pts_s=pts_s) == {out: None for _, _, out in jobs}
    for s, e, out in jobs:
        assert _frame_numbers(out, rot) == list(range(s, e)), (s, e)
    assert len(calls) == 3  # one ffmpeg per batch, none had to fall back
    with av.open(src) as c:  # the source time of each frame, as the analysis decode numbers them
        st = c.streams.video[0]
        t = [f.pts * float(st.time_base) - c.start_time / 1e6 for f in c.decode(st)]
    assert _seek(calls[0]) == 0.0
    for cmd, first in zip(calls[1:], (150, 261)):
        assert t[first] - 1.0 < _seek(cmd) <= t[first]  # input seek near the batch's first frame


def test_a_seek_that_lands_late_falls_back_to_decoding_from_the_start(tmp_path, monkeypatch):
    import pipeline.clips as clips
    src = _numbered_video(tmp_path / "src.mp4", n=120, gop=12)
    monkeypatch.setattr(clips, "SEEK_MARGIN_S", -1.0)  # aims 1 s past the first frame: frames go missing
    calls = _spy_ffmpeg(monkeypatch)
    out = tmp_path / "c.mp4"
    assert clips.transcode_clips(src, [(40, 70, out)]) == {out: None}
    assert _frame_numbers(out) == list(range(40, 70))
    assert [_seek(c) > 0 for c in calls] == [True, False]  # the seek, then the old way from frame 0
    assert not [p for p in tmp_path.iterdir() if ".part" in p.name]  # the short attempt left nothing behind
