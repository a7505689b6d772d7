"""Clip scores from synthetic frame sequences, the CLIP embedder inside Ray Data, and the aesthetic head."""
import json
import time

import av
import cv2
import numpy as np
import pytest
import torch
from skimage import data

from pipeline import scores as S
from pipeline.decode import Frames
from pipeline.embed import AestheticHead, ClipEmbedder, train_aesthetic

W, H = 256, 144  # analysis size


def _photo(name="astronaut") -> np.ndarray:
    im = getattr(data, name)()
    return np.stack([im] * 3, -1) if im.ndim == 2 else im[..., :3]


def pan(n=24, px_per_frame=2.0, photo="astronaut") -> list[np.ndarray]:
    """A camera pan over a photo: `px_per_frame` pixels/frame at analysis size, RGB uint8 (H, W, 3)."""
    big = _photo(photo)
    k = big.shape[1] / W
    out = []
    for i in range(n):
        m = np.float32([[1, 0, -i * px_per_frame * k], [0, 1, 0]])
        f = cv2.warpAffine(big, m, (big.shape[1], big.shape[0]), borderMode=cv2.BORDER_REFLECT)
        out.append(cv2.resize(f, (W, H), interpolation=cv2.INTER_AREA))
    return out


def feed(frames, analyzers=None, start_index=0, run=7):
    """Frames to the scorers in runs of `run` (odd, so runs straddle every sampling period)."""
    analyzers = analyzers if analyzers is not None else S.default_analyzers()
    for i in range(0, len(frames), run):
        stack = np.stack(frames[i:i + run])
        for a in analyzers:
            a.process_frames(start_index + i, stack)
    return analyzers


def scores(frames):
    return S.clip_scores(feed(frames), 0, len(frames))


def with_text(frames, style="white"):
    """Burn in two caption lines: white, white outlined in black (subtitles), or dark on a light banner."""
    out = []
    for f in frames:
        f = f.copy()
        colour = (255, 255, 255)
        if style == "banner":
            f[100:136, 6:200] = (0.35 * f[100:136, 6:200] + 0.65 * 235).astype(np.uint8)
            colour = (20, 20, 20)
        for text, y in (("BREAKING NEWS at ten", 112), ("live from the studio", 130)):
            if style == "outlined":
                cv2.putText(f, text, (12, y), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 3, cv2.LINE_AA)
            cv2.putText(f, text, (12, y), cv2.FONT_HERSHEY_SIMPLEX, 0.5, colour, 1, cv2.LINE_AA)
        out.append(f)
    return out


def test_motion_orders_speeds_and_flags_static():
    still, slow, fast = scores(pan(px_per_frame=0.0)), scores(pan(px_per_frame=0.5)), scores(pan(px_per_frame=3.0))
    assert still["motion"] < 0.05 < slow["motion"] < fast["motion"]
    assert 2.4 < fast["motion"] < 3.6  # px/frame at analysis size, though flow runs at ~48 px
    assert still["static"] and not slow["static"] and not fast["static"]


def test_motion_ignores_a_neighbouring_shot_frame():
    # A clip cut one frame late: its first frame belongs to the previous shot.
    other = pan(1, photo="coffee")
    frozen = S.clip_scores(feed(other + pan(20, 0.0)), 0, 21)
    assert frozen["static"] and frozen["motion"] < 0.05
    moving = S.clip_scores(feed(other + pan(20, 2.0)), 0, 21)
    assert 1.6 < moving["motion"] < 2.4


def test_scores_aggregate_the_requested_frame_range():
    frames = pan(16, 0.0) + pan(16, 2.0)
    a = feed(frames)
    first, second = S.clip_scores(a, 0, 16), S.clip_scores(a, 16, 32)
    assert first["static"] and not second["static"]
    assert first["motion"] < 0.05 < 1.5 < second["motion"]
    empty = S.clip_scores(a, 100, 120)  # no frame measured there: NaN, which the filters report as missing
    assert np.isnan(empty["motion"]) and np.isnan(empty["blur"]) and np.isnan(empty["text_ratio"])


def test_blur_brightness_contrast_order():
    sharp = pan(8, 1.0)
    blurred = [cv2.GaussianBlur(f, (0, 0), 2.0) for f in sharp]
    dark = [(f * 0.15).astype(np.uint8) for f in sharp]
    flat = [(f * 0.2 + 100).astype(np.uint8) for f in sharp]
    s, b, d, fl = scores(sharp), scores(blurred), scores(dark), scores(flat)
    assert b["blur"] > s["blur"] and b["sharpness"] < s["sharpness"]
    assert b["blur"] > 0.5 > s["blur"]
    assert 0.0 <= s["blur"] <= 1.0 and 0.0 <= b["blur"] <= 1.0
    assert d["brightness"] < 0.1 < s["brightness"] < 1.0
    assert fl["contrast"] < s["contrast"]


@pytest.mark.parametrize("photo", ["astronaut", "coffee", "chelsea", "rocket"])
def test_text_overlay_raises_text_ratio(photo):
    base = pan(8, 1.0, photo)
    plain = scores(base)["text_ratio"]
    for style in ("white", "outlined", "banner"):
        text = scores(with_text(base, style))["text_ratio"]
        assert text > plain + 0.01, (style, plain, text)


def test_run_length_does_not_change_any_measurement():
    """The decoder hands consumers runs of frames; where the runs split must not matter."""
    from pipeline.dedup import EdgeLayout
    from pipeline.shots import ShotDetector

    a, b = pan(24, 2.0), pan(24, 1.0, "coffee")
    dissolve = [((1 - t) * x + t * y).astype(np.uint8) for t, x, y in zip(np.linspace(0, 1, 10), a[-10:], b[:10])]
    fade = [(f * t).astype(np.uint8) for t, f in zip(np.linspace(1, 0, 8), b[-8:])] + [b[0] * 0] * 4
    frames = a[:-10] + dissolve + b[10:] + fade + pan(20, 1.5, "chelsea") + pan(12, 0.0, "rocket")

    def measure(run):
        consumers = [ShotDetector(25.0), EdgeLayout(), *S.default_analyzers()]
        feed(frames, consumers, run=run)
        sd, layout, scorers = consumers[0], consumers[1], consumers[2:]
        spans = [(0, 30), (5, 47), (40, len(frames))]
        return (sd.boundaries(), sd.scores, sd.levels, [layout.clip_vector(s, e) for s, e in spans],
                [S.clip_scores(scorers, s, e) for s, e in spans])

    one = measure(1)
    assert len(one[0]) >= 3  # the cut, the dissolve and the fade all found
    for run in (5, 32):
        other = measure(run)
        assert other[0] == one[0]
        np.testing.assert_allclose(other[1], one[1], rtol=1e-9)
        np.testing.assert_allclose(other[2], one[2], rtol=1e-9)
        np.testing.assert_allclose(other[3], one[3], rtol=1e-6)
        for x, y in zip(other[4], one[4]):
            assert x.keys() == y.keys()
            for k in x:
                assert (x[k] == y[k]) if isinstance(x[k], bool) else np.isclose(x[k], y[k], rtol=1e-9, equal_nan=True), k


def _encode_h264(path, frames, fps=30):
    with av.open(str(path), "w") as out:
        s = out.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuv420p"
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(p)
        for p in s.encode():
            out.mux(p)


def test_scorers_cost_against_decode(tmp_path):
    """Per-frame cost of each scorer, and decode+scorers vs decode-only, measured side by side."""
    # A 720p source, as real footage is at least that; a 360p source's cheaper decode makes this ~2x.
    src = [cv2.resize(f, (1280, 720)) for f in pan(60, 2.0)]
    path = tmp_path / "pan.mp4"
    _encode_h264(path, src)

    def decode(analyzers):
        t0 = time.perf_counter()
        with av.open(str(path)) as c:
            st = c.streams.video[0]
            st.thread_type = "AUTO"
            for i, fr in enumerate(c.decode(st)):
                rgb = fr.to_ndarray(width=W, height=H, format="rgb24")[None]
                for a in analyzers:
                    a.process_frames(i, rgb)
        return time.perf_counter() - t0

    plain, full = [], []
    for _ in range(2):  # interleaved, best of two: the machine is shared
        plain.append(decode([]))
        full.append(decode(S.default_analyzers()))
    ratio = min(full) / min(plain)

    frames = pan(48, 2.0)
    runs = [np.stack(frames[i:i + 16]) for i in range(0, len(frames), 16)]
    per_frame = {}
    for name, make in (("grey", lambda: None), *((c.__name__, c) for c in (S.MotionScore, S.SharpnessScore,
                                                                         S.BrightnessScore, S.TextScore))):
        best = float("inf")
        for _ in range(2):
            a = make()
            t0 = time.perf_counter()
            for i, run in enumerate(runs):
                Frames.of(run).luma if a is None else a.process_frames(16 * i, run)
            best = min(best, (time.perf_counter() - t0) / len(frames))
        per_frame[name] = best
    grey = per_frame["grey"]
    print("\nper-frame us (each incl. its own grey conversion):",
          {k: round(v * 1e6) for k, v in per_frame.items()},
          f"\ncost relative to the grey conversion: "
          f"{ {k: round(v / grey, 1) for k, v in per_frame.items()} }",
          f"\ndecode 1280x720 -> 144p with all scorers / decode-only: {ratio:.2f}x")
    assert ratio < 2.5  # target <= 1.5x (benchmarks/curate.py); loose here: a shared machine is noisy


# ----------------------------------------------------------------------------- embeddings

TINY_CLIP = {"model_cfg": {"embed_dim": 64,
                           "vision_cfg": {"image_size": 64, "layers": 2, "width": 128, "patch_size": 8,
                                          "head_width": 32},
                           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 4,
                                        "layers": 2}},
             "preprocess_cfg": {}}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """An open_clip model directory holding only a config: `local-dir:` builds it at random init."""
    d = tmp_path_factory.mktemp("tinyclip")
    (d / "open_clip_config.json").write_text(json.dumps(TINY_CLIP))
    return f"local-dir:{d}"


def frames_column(rows: list) -> np.ndarray:
    """A numpy batch's `frames` column: a 1-D object array, one list of JPEG bytes per row."""
    col = np.empty(len(rows), dtype=object)
    for i, r in enumerate(rows):
        col[i] = r
    return col


def jpeg(rgb, size=(96, 96)) -> bytes:
    return cv2.imencode(".jpg", cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)[..., ::-1])[1].tobytes()


PHOTOS = ["astronaut", "camera", "chelsea", "coffee", "coins", "rocket", "clock", "immunohistochemistry",
          "hubble_deep_field", "brick", "grass", "gravel", "retina", "moon"]


def good_and_bad(photo: str, crops: int = 5, seed: int = 0):
    """Sharp crops of a photo, and low-quality versions of the same crops (blurred or dark), as JPEG."""
    rng = np.random.default_rng(seed)
    im = _photo(photo)
    good, bad = [], []
    for k in range(crops):
        side = int(min(im.shape[:2]) * rng.uniform(0.5, 0.9))
        y, x = rng.integers(0, im.shape[0] - side + 1), rng.integers(0, im.shape[1] - side + 1)
        crop = cv2.resize(im[y:y + side, x:x + side], (96, 96), interpolation=cv2.INTER_AREA)
        low = cv2.GaussianBlur(crop, (0, 0), 3.0) if k % 2 else (crop * 0.2).astype(np.uint8)
        good.append(jpeg(crop))
        bad.append(jpeg(low))
    return good, bad


def test_clip_embedder_in_ray_data_survives_a_bad_row(ray_session, tiny_clip, tmp_path):
    ray = ray_session
    head_path = tmp_path / "head.safetensors"
    AestheticHead(64).save(head_path)
    rows = [{"clip_id": p, "frames": [jpeg(_photo(p)), jpeg(_photo(p)[::-1])]} for p in ("astronaut", "coffee")]
    rows.append({"clip_id": "corrupt", "frames": [b"\xff\xd8\xff\xe0 not really a jpeg"]})
    rows.append({"clip_id": "truncated", "frames": [jpeg(_photo("chelsea"))[:300]]})
    rows.append({"clip_id": "empty", "frames": []})
    ds = ray.data.from_items(rows).map_batches(
        ClipEmbedder, fn_constructor_kwargs={"model": tiny_clip, "aesthetic_weights": str(head_path)},
        compute=ray.data.ActorPoolStrategy(size=1), batch_size=8, batch_format="pyarrow")
    out = {r["clip_id"]: r for r in ds.take_all()}
    assert len(out) == 5
    for p in ("astronaut", "coffee"):
        e = np.asarray(out[p]["embedding"], dtype=np.float32)
        assert e.shape == (64,) and abs(np.linalg.norm(e) - 1) < 1e-4
        assert np.isfinite(out[p]["aesthetic"]) and out[p]["embed_error"] is None
    for bad in ("corrupt", "truncated", "empty"):
        assert out[bad]["embedding"] is None and np.isnan(out[bad]["aesthetic"])
        assert out[bad]["embed_error"].startswith("frame decode failed"), out[bad]["embed_error"]
    # Random init is seeded: an embedder built here computes what the Ray actor computed.
    local = ClipEmbedder(model=tiny_clip)
    res = local({"frames": frames_column([rows[0]["frames"]])})
    np.testing.assert_allclose(res["embedding"][0], out["astronaut"]["embedding"], atol=1e-5)
    assert np.isnan(res["aesthetic"][0])  # no head given


def test_aesthetic_head_learns_to_rank_low_quality_below_good(tiny_clip, tmp_path):
    torch.set_num_threads(2)
    emb = ClipEmbedder(model=tiny_clip)

    def embed(jpegs):
        return np.stack(emb({"frames": frames_column([[j] for j in jpegs])})["embedding"])

    xs, ys = [], []
    for p in PHOTOS:
        good, bad = good_and_bad(p)
        xs += [embed(good), embed(bad)]
        ys += [np.ones(len(good)), np.zeros(len(bad))]
    path = tmp_path / "aesthetic.safetensors"
    hist = train_aesthetic(np.concatenate(xs), np.concatenate(ys), path, epochs=300)
    assert hist["loss"][-1] < 0.5 * hist["loss"][0]

    head = AestheticHead.load(path)
    good_s, bad_s = [], []
    with torch.no_grad():
        for p in PHOTOS:  # held-out crops (another seed) of each photo
            good, bad = good_and_bad(p, seed=1)
            good_s += head(torch.from_numpy(embed(good))).tolist()
            bad_s += head(torch.from_numpy(embed(bad))).tolist()
    # AUC: the chance that a held-out good crop outranks a held-out low-quality one (chance = 0.5).
    # Measured ~0.88 on this random-init tiny CLIP (dark ~0.99, blurred ~0.75: blur is the harder cue).
    auc = np.mean([g > b for g in good_s for b in bad_s])
    assert auc > 0.75, auc

    # The same weights as a plain torch state dict load through weights_only=True.
    pt = tmp_path / "aesthetic.pt"
    torch.save(head.state_dict(), pt)
    x = torch.from_numpy(embed(good_and_bad("coffee")[0]))
    with torch.no_grad():
        torch.testing.assert_close(AestheticHead.load(pt)(x), head(x))
