"""The synthetic demo footage: its plan, its files and its ground truth agree with each other.

One small corpus (3 videos: every kind of shot is in the first three) is rendered once per
module; the default 8-video plan is checked without encoding anything.
"""
import hashlib
import json
from collections import Counter

import av
import cv2
import numpy as np
import pytest

from pipeline import synthetic as S


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("footage")
    calls = []
    gt_path = S.generate_footage(out, seed=0, videos=3, progress=lambda i, n: calls.append((i, n)))
    return gt_path, json.loads(gt_path.read_text()), calls


def decode(path):
    """All frames of a video as RGB uint8, with the stream's fps, size and keyframe count."""
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(s)]
        info = (s.average_rate, s.codec_context.width, s.codec_context.height, s.codec_context.name,
                s.codec_context.pix_fmt)
    with av.open(str(path)) as c:
        keys = sum(p.is_keyframe for p in c.demux(video=0) if p.size)
    return frames, info, keys


def shot_frames(frames, shot):
    """The middle half of a shot: clear of any dissolve or fade at its edges."""
    a, z = shot["start_frame"], shot["end_frame"]
    q = (z - a) // 4
    return frames[a + q: z - q] if z - a >= 8 else frames[a:z]


def thumb(img):
    """An 8x8 colour thumbnail: blind to texture sliding by, sensitive to a change of picture."""
    return cv2.resize(img, (8, 8), interpolation=cv2.INTER_AREA).astype(np.float32)


def luma(img):
    return cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)


# ------------------------------------------------------------------------------- plan, no encoding

def test_default_plan_covers_every_kind_of_footage():
    plans = S.plan_footage(seed=0, videos=8)
    assert len(plans) == 8
    assert {p.aspect for p in plans} == set(S.ASPECTS)
    assert {p.fps for p in plans} == set(S.FPS_CHOICES)
    assert all(w % 2 == 0 and h % 2 == 0 for w, h in S.ASPECTS.values())
    shots = [s for p in plans for s in p.shots]
    assert all(3 <= len(p.shots) <= 6 for p in plans)
    assert {s.transition_in for p in plans for s in p.shots[1:]} == {"cut", "dissolve", "fade"}
    assert all(s.transition_in == "none" for s in (p.shots[0] for p in plans))
    assert {(s.motion, s.direction) for s in shots} == set(S.MOTIONS)
    defects = Counter(d for s in shots for d in s.defects)
    assert all(defects[d] >= 1 for d in ("blur", "dark", "static", "short"))
    assert any(s.text for s in shots)
    for s in shots:
        if s.transition_in == "dissolve":
            assert S.DISSOLVE_FRAMES[0] <= s.transition_frames <= S.DISSOLVE_FRAMES[1]
        if s.transition_in == "fade":
            assert S.GAP_FRAMES[0] <= s.gap_frames <= S.GAP_FRAMES[1]
    seconds = np.array([s.frames / p.fps for p in plans for s in p.shots])
    assert ((seconds >= 1.5) & (seconds <= 5.0)).mean() >= 0.9
    assert (seconds < 1.0).sum() >= 1

    dups = [(v, s) for v, p in enumerate(plans) for s in p.shots if s.duplicate_of]
    assert dups
    for v, s in dups:
        src_v, src_i = s.duplicate_of
        src = plans[src_v].shots[src_i]
        assert src_v != v and (s.photo, s.motion, s.direction) == (src.photo, src.motion, src.direction)
        assert s.window0 != src.window0        # re-cropped, not a copy


def test_plan_is_a_prefix_and_scales():
    small, big = S.plan_footage(3, 3), S.plan_footage(3, 20)
    assert [p.shots for p in small] == [p.shots for p in big[:3]]
    assert len({p.file for p in big}) == 20
    assert S.plan_footage(4, 8)[0].shots != S.plan_footage(3, 8)[0].shots
    held = ["astronaut", "coffee", "grass", "gravel", "camera", "brick"]
    assert {s.photo for p in S.plan_footage(0, 8, subjects=held) for s in p.shots} <= set(held)


def test_captions_obey_limits_and_name_what_is_shown():
    for seed in (0, 1):
        gt = S.ground_truth(S.plan_footage(seed, 8), seed)
        starts = Counter()
        for v in gt["videos"]:
            for s in v["shots"]:
                short, dense = s["caption_short"], s["caption_dense"]
                assert len(short.split()) <= 15, short
                assert 60 <= len(dense.split()) <= 120, dense
                photo = S.PHOTOS[s["subject"]]
                for cap in (short, dense):
                    low = cap.lower()
                    assert photo.subject in low or photo.name in low
                    assert any(c in low for c in s["colors"])
                    if s["text"]:
                        assert f'"{s["text"]}"' in cap
                    if s["direction"] != "none":
                        assert s["direction"] in low
                assert photo.setting in dense and photo.lighting in dense or "dark" in s["defects"]
                starts[" ".join(short.split()[:1])] += 1
                starts[" ".join(dense.split()[:2])] += 1
        assert len(starts) >= 8      # varied sentence structure, not one template


def test_color_names_follow_the_pixels():
    red = np.zeros((20, 20, 3), np.uint8)
    red[..., 0] = 220
    assert S.color_names(red) == ["red"]
    assert S.color_names(np.zeros((20, 20, 3), np.uint8)) == ["black"]
    half = np.full((20, 20, 3), 255, np.uint8)
    half[:, 10:] = (30, 60, 200)
    assert set(S.color_names(half)) == {"white", "blue"}


# ------------------------------------------------------------------------------ rendered footage

def test_files_decode_as_declared(corpus):
    gt_path, gt, calls = corpus
    assert calls == [(1, 3), (2, 3), (3, 3)]
    assert gt["seed"] == 0 and gt["generator"] == S.GENERATOR
    for v in gt["videos"]:
        frames, (fps, w, h, codec, pix), keys = decode(gt_path.parent / v["file"])
        assert (fps, w, h, codec, pix) == (v["fps"], v["width"], v["height"], "h264", "yuv420p")
        assert len(frames) == v["num_frames"]
        assert 1 <= keys < len(frames) // 10          # a normal GOP, not all-intra
        # shots tile the video and the boundaries are the shot starts
        assert v["shots"][0]["start_frame"] == 0 and v["shots"][-1]["end_frame"] == v["num_frames"]
        for a, b in zip(v["shots"], v["shots"][1:]):
            assert a["end_frame"] == b["start_frame"]
        assert v["boundaries"] == [s["start_frame"] for s in v["shots"][1:]]
        assert [s["index"] for s in v["shots"]] == list(range(len(v["shots"])))


def test_transitions_are_where_the_ground_truth_says(corpus):
    gt_path, gt, _ = corpus
    seen = set()
    for v in gt["videos"]:
        frames, _, _ = decode(gt_path.parent / v["file"])
        for prev, s in zip(v["shots"], v["shots"][1:]):
            b = s["start_frame"]
            seen.add(s["transition_in"])
            if s["transition_in"] == "fade":         # the boundary is the middle of a black gap
                assert luma(frames[b]).mean() < 4 and luma(frames[b - 1]).mean() < 4
                assert luma(frames[b - 10 - 6]).mean() > 4 * luma(frames[b]).mean() + 1
            if s["transition_in"] == "dissolve":     # the boundary frame is a mix of both shots
                before, mid, after = (thumb(frames[i]) for i in (b - 8, b, b + 8))
                apart = np.abs(after - before).mean()
                assert np.abs(mid - before).mean() < 0.8 * apart and np.abs(mid - after).mean() < 0.8 * apart
            if s["transition_in"] == "cut":          # a jump between the frames either side
                t = [thumb(frames[i]) for i in (b - 2, b - 1, b)]
                jump, steady = np.abs(t[2] - t[1]).mean(), np.abs(t[1] - t[0]).mean()
                assert jump > 3 * steady + 5
    assert seen == {"cut", "dissolve", "fade"}


def test_defects_are_measurable(corpus):
    gt_path, gt, _ = corpus
    stats = []
    for v in gt["videos"]:
        frames, _, _ = decode(gt_path.parent / v["file"])
        for s in v["shots"]:
            mid = [luma(f) for f in shot_frames(frames, s)]
            bright = float(np.mean([g.mean() for g in mid])) / 255
            sharp = float(np.median([cv2.Laplacian(g, cv2.CV_64F).var() for g in mid]))
            diff = float(np.mean([np.abs(a.astype(int) - b).mean() for a, b in zip(mid, mid[1:])]))
            stats.append((s, bright, sharp, diff, v["fps"]))
    normal = [x for x in stats if not x[0]["defects"]]
    dark = [x for x in stats if "dark" in x[0]["defects"]]
    blur = [x for x in stats if "blur" in x[0]["defects"]]
    frozen = [x for x in stats if "static" in x[0]["defects"]]
    assert dark and blur and frozen and normal
    assert max(x[1] for x in dark) < 0.08 and max(x[1] for x in dark) * 3 < min(x[1] for x in normal)
    assert max(x[2] for x in blur) * 5 < min(x[2] for x in normal)
    assert max(x[3] for x in frozen) < 0.6          # encoder noise only
    moving = [x for x in normal if x[0]["camera_motion"] in ("pan", "tilt")]
    assert min(x[3] for x in moving) > 2 * max(x[3] for x in frozen)
    short = [(x[0]["end_frame"] - x[0]["start_frame"]) / x[4] for x in stats if "short" in x[0]["defects"]]
    assert short and max(short) < 1.0


def test_colour_truth_is_what_the_encoded_video_shows(corpus):
    """The colours the ground truth names are read off the decoded files by the same labeller: the
    dominant one, and nothing outside the allowed set (the captioner is scored this way)."""
    gt_path, gt, _ = corpus
    right = []
    for v in gt["videos"]:
        frames, *_ = decode(gt_path.parent / v["file"])
        for s in v["shots"]:
            assert s["colors"] == s["colors_allowed"][: len(s["colors"])]  # named first, then the margin
            mid = shot_frames(frames, s)
            names = S.color_names(np.concatenate([mid[int(q * (len(mid) - 1))] for q in np.linspace(0, 1, 8)]))
            right.append(names[0] == s["colors"][0] and set(names) <= set(s["colors_allowed"]))
    assert np.mean(right) >= 0.9, right


def test_near_duplicate_is_the_nearest_shot(corpus):
    gt_path, gt, _ = corpus
    thumbs = {}
    for v in gt["videos"]:
        frames, _, _ = decode(gt_path.parent / v["file"])
        for s in v["shots"]:
            thumbs[(v["file"], s["index"])] = thumb(frames[(s["start_frame"] + s["end_frame"]) // 2])
    dups = [((v["file"], s["index"]), s["duplicate_of"]) for v in gt["videos"] for s in v["shots"]
            if s["duplicate_of"]]
    assert len(dups) == 1
    key, src = dups[0]
    assert src["file"] != key[0]
    dist = {k: np.abs(t - thumbs[key]).mean() for k, t in thumbs.items() if k[0] != key[0]}
    assert min(dist, key=dist.get) == (src["file"], src["shot"])


def test_same_seed_same_footage(corpus, tmp_path):
    gt_path, _, _ = corpus
    again = S.generate_footage(tmp_path, seed=0, videos=3)
    assert again.read_bytes() == gt_path.read_bytes()
    for name in ("video_000.mp4", "video_001.mp4", "video_002.mp4"):
        assert (tmp_path / name).read_bytes() == (gt_path.parent / name).read_bytes()
        h = [hashlib.sha256(b"".join(f.tobytes() for f in decode(d / name)[0])).hexdigest()
             for d in (tmp_path, gt_path.parent)]
        assert h[0] == h[1]


def test_captions_file(corpus, tmp_path):
    gt_path, gt, _ = corpus
    rows = S.ground_truth_captions(gt_path)
    assert len(rows) == sum(len(v["shots"]) for v in gt["videos"])
    assert set(rows[0]) == {"source", "start_frame", "end_frame", "caption_short", "caption_dense"}
    for r in rows:
        assert r["source"].startswith("/") and r["source"].endswith(".mp4")
    out = S.write_captions_file(gt_path, tmp_path / "captions.json")
    assert json.loads(out.read_text()) == rows


def test_fewer_videos_into_the_same_dir_leave_no_stale_videos(tmp_path):
    """`spacetime demo --videos 2` after `make demo` (8) kept video_002..007.mp4 beside a ground truth
    of 2: curating the dir took all 8, six with no teacher captions or truth. Only files the previous
    ground_truth.json listed go; the user's own stay."""
    S.generate_footage(tmp_path, seed=0, videos=2)
    (tmp_path / "mine.mp4").write_bytes(b"my own")
    gt = S.generate_footage(tmp_path, seed=0, videos=1)
    assert sorted(p.name for p in tmp_path.glob("*.mp4")) == ["mine.mp4", "video_000.mp4"]
    assert [v["file"] for v in json.loads(gt.read_text())["videos"]] == ["video_000.mp4"]


@pytest.mark.parametrize("command", ["footage", "demo"])
def test_footage_out_a_file_is_one_error_line(tmp_path, command):
    """`spacetime footage --out FILE` (and `demo --out FILE`) ended in a FileExistsError traceback from mkdir."""
    from typer.testing import CliRunner

    from spacetime.cli import app

    (tmp_path / "taken").write_bytes(b"")
    r = CliRunner().invoke(app, [command, "--out", str(tmp_path / "taken"), "--videos", "1"])
    assert r.exit_code == 2 and "is not a directory" in r.output and r.exception.__class__ is SystemExit, r.output
