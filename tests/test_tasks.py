"""Sampling and prompting with images and videos: conditioning masks (ratios, training that uses
them), t2v/t2i sizes, each task's contract on a tiny model, bad inputs, atomic writes, the CLI."""
import json
import os
import random
from fractions import Fraction

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import typer
from typer.testing import CliRunner

from generator import tasks
from generator.conditioning import (STRATEGIES, TASK_MIX, check_ratios, frame_mask, parse_ratios,
                                    sample_clean_tokens)
from generator.dit import DiT, DiTConfig
from generator.flow import RectifiedFlow
from generator.patches import pack, pack_sequences
from generator.sample import (decode_latent, fit_size, load_model, sample, sha256_file, trained_cond_ratios,
                              write_video)
from generator.shapes import embed_caption, make_dataset, make_video
from generator.train import TrainConfig, train
from generator.vae import VAE, VAEConfig, save_vae
from tests.avspy import Container

TEXT_DIM = 8


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):  # conftest: one torch thread for this module
    yield


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)  # 4x time, 4x space, 4 channels: grid multiple 8 px with patch (1, 2, 2)
    return VAE(VAEConfig(channels=(8, 8, 8), time_downsample=2, latent_channels=4)).eval()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(1)
    m = DiT(DiTConfig(in_channels=4, hidden_size=32, depth=1, num_heads=2, text_dim=TEXT_DIM)).eval()
    with torch.no_grad():  # adaLN-Zero starts as v = 0; give the tiny model a non-trivial output
        for p in m.parameters():
            if p.abs().sum() == 0 and p.ndim == 2:
                p.normal_(0, 0.02)
    return m


def encoder(prompts):
    return [embed_caption(p, TEXT_DIM) for p in prompts]


KW = dict(steps=3, cfg_scale=2.0, seed=0, text_encoder=encoder)


def video(T=9, H=24, W=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(T, 3, H, W, generator=g) * 2 - 1


# ------------------------------------------------------------------ conditioning masks

def _kind(m):
    """Classify a frame mask: none / first / last / ends / other."""
    m = m.tolist()
    if not any(m):
        return "none"
    k1 = next(i for i, v in enumerate(m) if not v)
    k2 = next(i for i, v in enumerate(reversed(m)) if not v)
    middle_clean = any(m[k1:len(m) - k2])
    if middle_clean:
        return "other"
    return {(True, False): "first", (False, True): "last", (True, True): "ends"}[(k1 > 0, k2 > 0)]


def test_mask_ratios_follow_the_config():
    n, T = 1200, 6
    p = pack([torch.zeros(4, T, 2, 2) for _ in range(n)])  # one token per latent frame
    g = torch.Generator().manual_seed(0)
    ratios = {"none": 0.5, "first": 0.2, "last": 0.1, "ends": 0.2}
    clean = sample_clean_tokens(p, ratios, g).view(n, T)
    kinds = [_kind(m) for m in clean]
    for s, r in ratios.items():
        assert abs(kinds.count(s) / n - r) < 0.05, (s, kinds.count(s) / n)
    assert not clean.all(1).any()  # something is always left to generate
    # random: k clean frames anywhere, never all, never none
    for _ in range(50):
        m = frame_mask("random", T, g)
        assert 1 <= int(m.sum()) <= T - 1
    # images have no context: a 1-frame sample is never conditioned
    p1 = pack([torch.zeros(4, 1, 2, 2) for _ in range(20)])
    assert sample_clean_tokens(p1, {"first": 1.0}, g) is None


def test_ratio_validation_and_none_draws_nothing():
    with pytest.raises(ValueError, match="unknown"):
        check_ratios({"middle": 1.0})
    with pytest.raises(ValueError, match=">= 0"):
        check_ratios({"none": 1.0, "first": -0.5})
    assert set(check_ratios(TASK_MIX)) == set(STRATEGIES)
    # the CLI's --cond-mix: a named mix or name=weight pairs, normalised; errors name the problem
    assert parse_ratios("tasks") == check_ratios(TASK_MIX) and parse_ratios("t2v")["none"] == 1.0
    assert parse_ratios("none=1, last=3") == {"none": 0.25, "first": 0.0, "last": 0.75, "ends": 0.0, "random": 0.0}
    for bad, msg in (("most", "one of"), ("none=x", "one of"), ("sideways=1", "unknown"),
                     ("none=nan", "finite"), ("none=1,first=nan", "finite"), ("none=inf,first=1", "finite")):
        with pytest.raises(ValueError, match=msg):
            parse_ratios(bad)
    g = torch.Generator().manual_seed(3)
    before = g.get_state().clone()
    assert sample_clean_tokens(pack([torch.zeros(4, 3, 2, 2)]), {"none": 1.0}, g) is None
    assert torch.equal(g.get_state(), before)  # no draw: training without conditioning is unchanged
    with pytest.raises(ValueError, match="unknown"):
        train(TrainConfig(dit=DiTConfig(in_channels=4, hidden_size=32, depth=1, num_heads=2, text_dim=TEXT_DIM),
                          steps=1, cond_ratios={"bogus": 1.0}), [])


def pixel_latent(v):
    """(9, 3, 32, 32) video -> stand-in latent (3, 3, 8, 8): pooled pixels of frames 0, 4, 8."""
    z = F.avg_pool3d(v.permute(1, 0, 2, 3)[None], (1, 4, 4))[0]
    return z[:, ::4].contiguous()


def test_empty_mask_keeps_the_unconditional_loss(model):
    lat = [torch.randn(4, 3, 4, 4), torch.randn(4, 2, 4, 6)]
    p = pack(lat)
    y, ycu = pack_sequences([embed_caption("a red circle", TEXT_DIM), embed_caption("blue", TEXT_DIM)])
    fn = lambda z, t: model(z, t, p.positions, p.cu_seqlens, y, ycu)
    rf = RectifiedFlow(base_tokens=16)
    plain = rf.loss(fn, p.tokens, p.cu_seqlens, generator=torch.Generator().manual_seed(0))
    empty = rf.loss(fn, p.tokens, p.cu_seqlens, generator=torch.Generator().manual_seed(0),
                    clean=torch.zeros(len(p.tokens), dtype=torch.bool))
    torch.testing.assert_close(plain, empty)  # per-token t = per-sample t when nothing is clean


def test_conditioned_training_uses_the_given_frames():
    """Train with half the samples conditioned on their first frame; the model must then predict the
    rest better given the true first frame than a first frame from another video with the same
    caption (the shape elsewhere). Chance = 50%."""
    data = make_dataset(64, frames=9, size=32, seed=0)
    pairs = [(pixel_latent(v), embed_caption(c, TEXT_DIM)) for v, c, _ in data]
    cfg = TrainConfig(dit=DiTConfig(in_channels=3, hidden_size=64, depth=2, num_heads=2, text_dim=TEXT_DIM),
                      steps=400, lr=2e-3, warmup_steps=5, max_tokens=384, log_every=0, base_tokens=48,
                      cfg_dropout=0.1, cond_ratios={"none": 0.5, "first": 0.5})
    res = train(cfg, pairs)
    losses = [h["loss"] for h in res.history]
    assert sum(losses[-15:]) < 0.8 * sum(losses[:15]), (losses[:15], losses[-15:])
    model, rf = res.ema, RectifiedFlow(base_tokens=48)
    test = make_dataset(32, frames=9, size=32, seed=5)
    wins = 0
    for i, (v, cap, (colour, shape, direction)) in enumerate(test):
        # same caption, another start position: only the first frame tells them apart
        other = make_video(colour, shape, direction, frames=9, size=32, rng=random.Random(100 + i))
        z, z_other = pixel_latent(v), pixel_latent(other)
        y, ycu = pack_sequences([embed_caption(cap, TEXT_DIM)])
        losses = []
        for first in (z, z_other):
            x = torch.cat([first[:, :1], z[:, 1:]], 1)
            p = pack([x])
            clean = torch.zeros(len(p.tokens), dtype=torch.bool)
            clean[:16] = True  # latent frame 0: 4 x 4 tokens
            fn = lambda zz, t: model(zz, t, p.positions, p.cu_seqlens, y, ycu)
            g = torch.Generator().manual_seed(i)
            with torch.no_grad():
                losses.append(sum(rf.loss(fn, p.tokens, p.cu_seqlens, generator=g, clean=clean).item()
                                  for _ in range(6)))
        wins += losses[0] < losses[1]
    print(f"first-frame conditioning: true frame wins {wins}/{len(test)}")
    assert wins / len(test) >= 0.7, wins


# ------------------------------------------------------------------ t2v / t2i

def test_t2v_t2i_sizes_seeds_and_rounding(model, vae):
    v = sample(model, vae, "a red circle moving left", frames=9, height=24, width=40, **KW)
    assert v.shape == (3, 9, 24, 40) and v.abs().max() <= 1
    img = sample(model, vae, "a red circle", frames=1, height=16, width=48, **KW)
    assert img.shape == (3, 1, 16, 48)
    assert torch.equal(v, sample(model, vae, "a red circle moving left", frames=9, height=24, width=40, **KW))
    assert not torch.equal(v, sample(model, vae, "a red circle moving left", frames=9, height=24, width=40,
                                     **{**KW, "seed": 1}))
    with pytest.warns(UserWarning, match="rounded 8 frames x 30x40 to 9 x 32x40"):
        v2 = sample(model, vae, "x", frames=8, height=30, width=40, **KW)
    assert v2.shape == (3, 9, 32, 40)
    with pytest.raises(ValueError, match="2048"):
        fit_size(vae, model.cfg.patch, 1, 2056, 64)
    assert fit_size(vae, model.cfg.patch, 1, 2048, 2048) == (1, 2048, 2048)
    with pytest.raises(ValueError, match="no text_encoder"):
        sample(model, vae, "x", frames=1, height=16, width=16)


def test_sampler_refuses_zero_steps_and_a_guidance_scale_that_is_not_a_number(model, vae):
    """steps=0 returned the noise as the sample; cfg_scale NaN / inf made every pixel NaN."""
    for kw, msg in ((dict(steps=0), "steps must be >= 1"), (dict(cfg_scale=float("nan")), "finite"),
                    (dict(cfg_scale=float("inf")), "finite")):
        with pytest.raises(ValueError, match=msg):
            sample(model, vae, "a red circle", frames=1, height=16, width=16, **{**KW, **kw})
    for g in (0.0, 1.0, -1.0):  # unconditional, conditional only, and guidance away from the text all sample
        img = sample(model, vae, "a red circle", frames=1, height=16, width=16, **{**KW, "cfg_scale": g})
        assert img.isfinite().all()


def test_fit_size_rounds_halves_up(vae):
    """round() took halves to even: --frames 3 (halfway between 1 and 5) became 1 frame while 7 became 9,
    and a 12-pixel side became 16 while 20 became 16. Halves now go to the longer clip / larger side."""
    fit = lambda *a: fit_size(vae, (1, 2, 2), *a, warn=False)
    assert [fit(n, 16, 16)[0] for n in (2, 3, 7, 11)] == [1, 5, 9, 13]
    assert [fit(1, h, h)[1:] for h in (12, 20, 28)] == [(16, 16), (24, 24), (32, 32)]
    assert fit(4, 19, 21) == (5, 16, 24)  # off the halves: still the nearest
    assert fit_size(vae, (2, 2, 2), 3, 16, 16, warn=False)[0] == 5  # p_t = 2: 2 latent frames
    with pytest.warns(UserWarning, match="rounded 3 frames x 12x20 to 5 x 16x24"):
        fit_size(vae, (1, 2, 2), 3, 12, 20)


def test_big_frames_decode_tile_by_tile(vae):
    z = torch.randn(4, 1, 136, 144)  # 544 x 576 pixels: past DECODE_TILE, so decoded in blended tiles
    tiled = decode_latent(vae, z)
    with torch.no_grad():
        whole = vae.decode(z[None]).clamp(-1, 1)[0]
    assert tiled.shape == whole.shape == (3, 1, 544, 576)
    err = (tiled - whole).abs()
    assert err.mean() < 0.005 and err.max() < 0.15  # nearly exact: only the seams' blend differs


# ------------------------------------------------------------------ tasks

def _check_given(res):
    """Latent frames given as conditioning come out of the sampler unchanged."""
    m = res.cond_frames
    assert m is not None and m.any() and not m.all()
    assert torch.equal(res.latent[:, m], res.cond[:, m])


def test_animate_extend_loop_transition_keep_the_given_frames(model, vae):
    img = video(1, 20, 30)[0]
    r = tasks.animate(model, vae, img, "a cat", frames=9, resolution=24, **KW)
    assert r.video.shape[:2] == (3, 9) and r.cond_frames.tolist() == [True, False, False]
    _check_given(r)
    assert r.given[0][0] == 0 and r.given[0][1].shape == (3, 1, *r.video.shape[2:])

    v = video(9, 24, 24)
    fwd = tasks.extend(model, vae, v, "a cat", frames=17, direction="forward", resolution=24, **KW)
    assert fwd.video.shape == (3, 17, 24, 24) and fwd.cond_frames.tolist() == [True] * 3 + [False] * 2
    _check_given(fwd)
    back = tasks.extend(model, vae, v, "a cat", frames=17, direction="backward", resolution=24, **KW)
    assert back.cond_frames.tolist() == [False] * 3 + [True] * 2
    _check_given(back)
    start, frames = back.given[0]
    assert start + frames.shape[1] == 17 and frames.shape[1] == 8  # the input's first 8 frames end the output
    # given frames come out as their own VAE round trip, at the start and (decoded in context) later;
    # the causal decoder leaves the generated frames before them as the whole latent decodes them
    rt_fwd = decode_latent(vae, tasks.encode_start(vae, fwd.given[0][1].permute(1, 0, 2, 3)))
    torch.testing.assert_close(fwd.video[:, :9], rt_fwd, atol=1e-5, rtol=0)
    rt_back = tasks.decode_later(vae, *tasks.encode_later(vae, frames.permute(1, 0, 2, 3)))
    torch.testing.assert_close(back.video[:, start:], rt_back, atol=1e-5, rtol=0)
    torch.testing.assert_close(back.video[:, :start], decode_latent(vae, back.latent)[:, :start], atol=1e-5, rtol=0)
    assert (back.video[:, start:] - decode_latent(vae, back.latent)[:, start:]).abs().max() > 1e-3  # in context differs

    lp = tasks.loop(model, vae, "a cat", frames=9, height=24, width=32, **KW)
    assert lp.video.shape == (3, 9, 24, 32)
    assert lp.cond_frames.tolist() == [True, False, False, True]  # extra held group past the end, cut
    _check_given(lp)
    assert torch.equal(lp.cond[:, 0], tasks.encode_start(vae, lp.given[0][1].permute(1, 0, 2, 3))[:, 0])

    tr = tasks.transition(model, vae, video(9, 24, 24, 1), video(9, 24, 24, 2), "a cat", frames=17, resolution=24,
                          **KW)
    assert tr.video.shape == (3, 17, 24, 24) and tr.cond_frames.tolist() == [True, True, False, False, True]
    _check_given(tr)


def test_edit_strength_and_image(model, vae):
    v = video(9, 24, 24)
    init = tasks.encode_start(vae, v)
    d = {}
    for s in (0.3, 0.9):
        r = tasks.edit(model, vae, v, "a blue square", strength=s, resolution=24, **{**KW, "steps": 6})
        assert r.video.shape == (3, 9, 24, 24) and r.cond_frames is None
        d[s] = (r.latent - init).pow(2).mean().item()
    assert d[0.3] < d[0.9]
    im = tasks.image(model, vae, "a cat", height=24, width=56, **KW)
    assert im.video.shape == (3, 1, 24, 56)


def test_bad_inputs_raise_and_write_nothing(model, vae, tmp_path):
    out = tmp_path / "o.mp4"
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00not a video" * 100)
    cases = [
        dict(task="animate", inputs=[str(bad)], match="cannot read|no decodable"),
        dict(task="animate", inputs=[str(tmp_path / "missing.png")], match="not found"),
        dict(task="animate", inputs=[], match="takes 1 input"),
        dict(task="transition", inputs=[video()], match="takes 2 input"),
        dict(task="image", inputs=[video()], match="takes 0 input"),
        dict(task="edit", inputs=[video()], strength=0.0, match=r"strength must be in \(0, 1\]"),
        dict(task="edit", inputs=[video()], strength=1.5, match=r"strength must be in \(0, 1\]"),
        dict(task="extend", inputs=[video()], frames=201, match="longer than the model supports"),
        dict(task="extend", inputs=[video()], direction="sideways", match="direction"),
        dict(task="extend", inputs=[video(17)], frames=9, match="extending needs more"),
        dict(task="warp", inputs=[], match="unknown task"),
    ]
    for c in cases:
        match = c.pop("match")
        with pytest.raises(ValueError, match=match):
            tasks.run_task(model=model, vae=vae, text="a cat", out=out, height=24, width=24, **c, **KW)
        assert os.listdir(tmp_path) == ["bad.mp4"], c
    with pytest.raises(ValueError, match="one frame"):
        write_video(video(5).permute(1, 0, 2, 3), tmp_path / "x.png")
    assert sorted(os.listdir(tmp_path)) == ["bad.mp4"]
    from dataclasses import replace

    from generator.dit import DiT
    pt2 = DiT(replace(model.cfg, patch=(2, 2, 2)))  # its held frames would straddle temporal patches
    with pytest.raises(ValueError, match="temporal patch 1"):
        tasks.run_task("loop", pt2, vae, "a cat", out=out, height=24, width=24, **KW)


def test_multi_frame_tasks_refuse_a_png_and_bad_fps_before_sampling(model, vae, tmp_path, monkeypatch):
    """animate / extend / loop / transition always make a video, and edit does of a video input: a .png
    --out (or an fps <= 0, which libx264 silently wrote as 24 fps) is refused before sampling, not at the
    write after it. An edited image may be a .png."""
    monkeypatch.setattr(tasks, "_run", lambda *a, **k: pytest.fail("sampled before refusing"))
    for task, inputs in (("animate", [video(1)]), ("extend", [video()]), ("loop", []),
                         ("transition", [video(), video()]), ("edit", [video(5)])):
        with pytest.raises(ValueError, match="makes a video here: write .mp4"):
            tasks.run_task(task, model, vae, "a cat", inputs, tmp_path / "x.png", height=24, width=24, **KW)
    with pytest.raises(ValueError, match="fps must be > 0"):
        tasks.run_task("image", model, vae, "a cat", [], tmp_path / "x.png", fps=0, **KW)
    with pytest.raises(ValueError, match="fps must be > 0"):
        write_video(video(5).permute(1, 0, 2, 3), tmp_path / "x.mp4", fps=0)
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()
    r = tasks.run_task("edit", model, vae, "a cat", [video(4, 24, 24)], tmp_path / "e.png", height=24, width=24, **KW)
    assert r.video.shape == (3, 1, 24, 24) and (tmp_path / "e.png").is_file()


def test_image_task_with_a_temporal_patch_of_2(model, vae, tmp_path):
    """A p_t = 2 DiT cannot make a 1-latent-frame grid: the image task samples its shortest video and
    keeps frame 0 (latent 0 alone under the causal VAE) instead of failing on the patch grid."""
    from dataclasses import replace
    torch.manual_seed(0)
    pt2 = DiT(replace(model.cfg, patch=(2, 2, 2))).eval()
    r = tasks.run_task("image", pt2, vae, "a cat", [], tmp_path / "x.png", height=24, width=24, **KW)
    assert r.video.shape == (3, 1, 24, 24) and r.latent.shape[1] == 2
    assert tasks.read_frames(tmp_path / "x.png").shape == (1, 3, 24, 24)


def test_inputs_read_with_rotation_and_resized_to_grid(model, vae, tmp_path):
    path = tmp_path / "rot.mp4"
    with av.open(str(path), "w") as c:  # coded 32 wide x 16 high, displayed turned 90 degrees clockwise
        s = c.add_stream("libx264", rate=Fraction(24))
        s.width, s.height, s.pix_fmt = 32, 16, "yuv420p"
        s.set_display_rotation(-90)
        for _ in range(5):
            a = np.zeros((16, 32, 3), np.uint8)
            a[:, :8] = 255  # bright left edge -> top edge once turned clockwise
            for pkt in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)
    x = tasks.read_frames(path)
    assert x.shape == (5, 3, 32, 16)
    assert x[:, :, :6].mean() > 0.8 and x[:, :, 10:].mean() < -0.8
    r = tasks.run_task("extend", model, vae, "a cat", [str(path)], tmp_path / "ext.mp4", frames=9, height=32,
                       width=16, **KW)
    H, W = r.video.shape[2:]
    assert H % 8 == 0 and W % 8 == 0 and H > W  # portrait kept
    back = tasks.read_frames(tmp_path / "ext.mp4")
    assert back.shape == (9, 3, H, W)


def _write_mp4(path, T, H=16, W=32, rate=24, **options):
    """T frames of seeded noise with a per-frame stripe, H.264 at `rate` fps with the given encoder options."""
    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=Fraction(rate))
        s.width, s.height, s.pix_fmt = W, H, "yuv420p"
        s.codec_context.options = options
        for i in range(T):
            a = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
            a[:, :4] = i * 3 % 256
            for pkt in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)


def test_inputs_are_resized_as_they_are_decoded(tmp_path):
    """Inputs were held at full size as floats before resizing (edit of a 140-frame 1080p video peaked at
    7.8 GB, 0.95 GB now): each frame is now resized as it is decoded, to the size its first frame asks for
    (upright), with the same pixels as resizing the whole."""
    path = tmp_path / "v.mp4"
    _write_mp4(path, 12, H=20, W=36)
    asked = []

    def fit(h, w):
        asked.append((h, w))
        return 8, 16

    x = tasks.read_frames(path, fit=fit)
    assert asked == [(20, 36)] and x.shape == (12, 3, 8, 16)
    assert torch.equal(x, tasks.resize_cover(tasks.read_frames(path), 8, 16))
    assert torch.equal(tasks.read_frames(path, last=5, fit=fit), x[-5:])


def test_a_size_over_the_limit_keeps_the_inputs_aspect():
    """Each side was capped at MAX_SIDE on its own: a 16:9 input asked at 4000x4000 came out a 2048x2048
    centre crop; both sides now scale down together."""
    assert tasks.grid_size(90, 160, 4000, (8, 8)) == (1152, 2048)
    assert tasks.grid_size(160, 90, 4000, (16, 16)) == (2048, 1152)
    assert tasks.grid_size(90, 160, 256, (8, 8)) == (192, 344)  # within the limit: as before


def test_transition_decodes_only_the_tail_of_a(model, vae, tmp_path, monkeypatch):
    """A transition gives only A's last 1 + f frames: they are decoded from a keyframe shortly before
    them (seek), not after the whole of A, with the same frames and the same result."""
    a, b = tmp_path / "a.mp4", tmp_path / "b.mp4"
    _write_mp4(a, 120, g="8", bf="2")  # B-frames, a keyframe every 8 frames
    _write_mp4(b, 9)
    full = tasks.read_frames(a)
    for n in (1, 5, 9, 60, 119, 120, 500):
        assert torch.equal(tasks.read_frames(a, last=n), full[-n:]), n
    decoded = []
    real_open = av.open

    class Counting(Container):  # PyAV's container, counting the frames it decodes
        def decode(self, *args, **kw):
            for frame in self.c.decode(*args, **kw):
                decoded.append(self.c.name)
                yield frame

    monkeypatch.setattr(av, "open", lambda *args, **kw: Counting(real_open(*args, **kw)))
    r = tasks.transition(model, vae, str(a), str(b), "a cat", frames=17, resolution=24, **KW)
    assert decoded.count(str(a)) <= 20, decoded.count(str(a))  # was all 120
    monkeypatch.undo()
    whole = tasks.transition(model, vae, full, str(b), "a cat", frames=17, resolution=24, **KW)
    assert torch.equal(r.video, whole.video) and torch.equal(r.given[0][1], whole.given[0][1])


# ------------------------------------------------------------------ checkpoints and CLI

@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, vae):
    d = tmp_path_factory.mktemp("ckpt")
    pairs = [(torch.randn(4, 2, 4, 4), embed_caption("a red circle", TEXT_DIM)) for _ in range(4)]
    cfg = TrainConfig(dit=DiTConfig(in_channels=4, hidden_size=32, depth=1, num_heads=2, text_dim=TEXT_DIM),
                      steps=2, max_tokens=64, log_every=0, base_tokens=32, ckpt_dir=str(d / "run"),
                      cond_ratios=TASK_MIX)
    train(cfg, pairs)
    save_vae(vae, str(d / "vae.safetensors"))
    return d / "run", d / "vae.safetensors"


def test_load_model_from_training_dir(checkpoints):
    run, _ = checkpoints
    model, base_tokens = load_model(run)
    assert base_tokens == 32 and model.cfg.text_dim == TEXT_DIM and not model.training
    assert trained_cond_ratios(run) == TASK_MIX  # the mix travels in the checkpoint's metadata
    with pytest.raises(ValueError, match="is not a DiT"):  # the VAE given as --checkpoint: was a KeyError
        load_model(checkpoints[1])


def test_a_dit_given_as_the_vae_is_named_as_such(checkpoints, model, tmp_path):
    """A DiT checkpoint passed as --vae failed with KeyError: 'config' (sample: "cannot be loaded: 'config'";
    precompute: "precompute failed: KeyError", exit 1); a save_dit file with a TypeError."""
    from generator.dit import save_dit
    from generator.sample import load_codec
    from generator.vae import load_vae
    run, _ = checkpoints
    step = run / json.loads((run / "latest.json").read_text())["file"]
    save_dit(model, str(tmp_path / "dit.safetensors"))
    for p, said in [(step, "a DiT training checkpoint"), (tmp_path / "dit.safetensors", "another model's")]:
        with pytest.raises(ValueError, match=f"is not a VAE.*{said}"):
            load_vae(str(p))
        with pytest.raises(ValueError, match=f"is not a VAE.*{said}"):
            load_codec(p)


def test_cli_sample_and_generate_write_sidecars(checkpoints, tmp_path):
    from spacetime.cli_sample import register
    app = typer.Typer()
    register(app)
    run, vae_path = checkpoints
    runner = CliRunner()
    common = ["--checkpoint", str(run), "--vae", str(vae_path), "--steps", "2", "--seed", "3"]

    out = tmp_path / "t2i.png"
    r = runner.invoke(app, ["sample", "--prompt", "a red circle", "--frames", "1", "--height", "16", "--width",
                            "32", "--out", str(out), *common])
    assert r.exit_code == 0, r.output
    assert tasks.read_frames(out).shape == (1, 3, 16, 32)

    img = tmp_path / "in.png"
    write_video(video(1, 16, 24).permute(1, 0, 2, 3), img)
    out = tmp_path / "anim.mp4"
    r = runner.invoke(app, ["generate", "--task", "animate", "--prompt", "a red circle", "--input", str(img),
                            "--frames", "5", "--height", "16", "--width", "24", "--out", str(out), *common])
    assert r.exit_code == 0, r.output
    meta = json.loads((tmp_path / "anim.mp4.json").read_text())
    assert meta["task"] == "animate" and meta["seed"] == 3 and meta["prompt"] == "a red circle"
    assert meta["upsampled_prompt"] == "a red circle"  # no upsampler dir: used as written, with a warning
    ckpt_file = run / json.loads((run / "latest.json").read_text())["file"]
    assert meta["checkpoint_sha256"] == sha256_file(ckpt_file) and meta["trained_cond_mix"] == TASK_MIX
    assert tasks.read_frames(out).shape[0] == 5 and "text-only" not in r.output

    # a text-only checkpoint still runs a conditioned task, with a warning saying why it may not follow
    t2v = tmp_path / "t2v"
    train(TrainConfig(dit=DiTConfig(in_channels=4, hidden_size=32, depth=1, num_heads=2, text_dim=TEXT_DIM), steps=1,
                      max_tokens=64, log_every=0, base_tokens=32, ckpt_dir=str(t2v)),
          [(torch.randn(4, 2, 4, 4), embed_caption("a red circle", TEXT_DIM))])
    r = runner.invoke(app, ["generate", "--task", "animate", "--prompt", "a red circle", "--input", str(img),
                            "--no-upsample", "--frames", "5", "--height", "16", "--width", "24", "--out",
                            str(tmp_path / "t2v.mp4"), *common[2:], "--checkpoint", str(t2v)])
    assert r.exit_code == 0 and "text-only" in r.output and "--cond-mix tasks" in r.output, r.output

    out = tmp_path / "loop.mp4"
    r = runner.invoke(app, ["generate", "--task", "loop", "--prompt", "a red circle", "--no-upsample", "--frames",
                            "5", "--height", "16", "--width", "16", "--out", str(out), *common])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "loop.mp4.json").read_text())["upsampled_prompt"] is None

    bad = tmp_path / "never.mp4"
    r = runner.invoke(app, ["generate", "--task", "transition", "--prompt", "x", "--no-upsample", "--input",
                            str(img), "--out", str(bad), *common])
    assert r.exit_code == 2 and "takes 2 --input" in r.output
    assert not bad.exists() and not (tmp_path / "never.mp4.json").exists()


def test_cli_sample_takes_the_train_vae_output_dir_as_vae(checkpoints, tmp_path):
    """--vae runs/vae (the dir train-vae writes, as precompute --vae takes it) said 'VAE checkpoint runs/vae
    not found'; it is the vae.safetensors inside, and the sidecar hashes that file."""
    from spacetime.cli_sample import register
    app = typer.Typer()
    register(app)
    run, vae_path = checkpoints
    out = tmp_path / "t2i.png"
    r = CliRunner().invoke(app, ["sample", "--prompt", "a red circle", "--no-upsample", "--frames", "1", "--height",
                                 "16", "--width", "16", "--out", str(out), "--checkpoint", str(run), "--vae",
                                 str(vae_path.parent), "--steps", "1"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "t2i.png.json").read_text())["vae_sha256"] == sha256_file(vae_path)
    r = CliRunner().invoke(app, ["sample", "--prompt", "a red circle", "--no-upsample", "--out", str(out),
                                 "--checkpoint", str(run), "--vae", str(tmp_path)])
    assert r.exit_code == 2 and "vae.safetensors" in r.output and "not found" in r.output, r.output


def test_cli_refuses_a_text_encoder_of_another_width_without_a_run_json(checkpoints, tmp_path):
    """A DiT trained from Python (no run.json, so no encoder sha to check) sampled with an open_clip
    encoder died mid-sampling on "text embedding must be (L >= 1, 8), got (5, 256)". The widths are
    compared when the encoder is built: one line naming both."""
    from spacetime.cli_sample import register
    app = typer.Typer()
    register(app)
    run, vae_path = checkpoints
    out = tmp_path / "x.png"
    r = CliRunner().invoke(app, ["sample", "--prompt", "a red circle", "--no-upsample", "--frames", "1", "--height",
                                 "16", "--width", "16", "--steps", "1", "--out", str(out), "--checkpoint", str(run),
                                 "--vae", str(vae_path), "--text-encoder", "open_clip:ViT-S-32-alt"])
    assert r.exit_code == 2 and f"-wide embeddings, the DiT {run} takes {TEXT_DIM}" in r.output, r.output
    assert not out.exists()


def test_cli_refuses_a_vae_the_dit_did_not_train_on(checkpoints, tmp_path):
    """A --vae other than the one whose latents the DiT trained on decoded them to noise without a word (same
    latent channels) or died in a conv with a traceback (other channels): refused in one line, as another
    text encoder is. run.json's vae_sha is the latents table's (sha256 of the VAE file precompute used)."""
    import shutil
    from spacetime.cli_sample import register
    app = typer.Typer()
    register(app)
    run, vae_path = checkpoints
    mine = tmp_path / "run"
    shutil.copytree(run, mine)
    (mine / "run.json").write_text(json.dumps({"vae_sha": "0" * 64}))
    torch.manual_seed(0)
    wide = VAE(VAEConfig(channels=(8, 8, 8), time_downsample=2, latent_channels=8))
    save_vae(wide, str(tmp_path / "wide.safetensors"))
    args = ["--prompt", "a red circle", "--no-upsample", "--frames", "1", "--height", "16", "--width", "16",
            "--steps", "1", "--out", str(tmp_path / "x.png")]
    for cmd in (["sample"], ["generate", "--task", "image"]):
        r = CliRunner().invoke(app, [*cmd, *args, "--checkpoint", str(mine), "--vae", str(vae_path)])
        assert r.exit_code == 2 and "trained on latents of VAE sha 000000000000" in r.output, r.output
        r = CliRunner().invoke(app, [*cmd, *args, "--checkpoint", str(run), "--vae", str(tmp_path / "wide.safetensors")])
        assert r.exit_code == 2 and "8 latent channels" in r.output and "4" in r.output, r.output
    assert not (tmp_path / "x.png").exists()
    (mine / "run.json").write_text(json.dumps({"vae_sha": sha256_file(vae_path)}))  # its own VAE: accepted
    r = CliRunner().invoke(app, ["sample", *args, "--checkpoint", str(mine), "--vae", str(vae_path)])
    assert r.exit_code == 0, r.output


def test_prompts_file_with_a_bom_crlf_and_unicode(tmp_path):
    """A prompts file saved with a byte-order mark (Windows editors) made its first line, a '# comment'
    behind the mark, a prompt that was sampled; CRLF line ends and unicode prompts read as written."""
    from spacetime.cli_sample import read_prompts
    listed = tmp_path / "prompts.txt"
    listed.write_bytes("\ufeff# eval set\r\na red circle\r\n\r\n  # indented\r\nun café bleu ✓\r\n".encode("utf-8"))
    assert read_prompts(listed) == ["a red circle", "un café bleu ✓"]
    listed.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        read_prompts(listed)
    with pytest.raises(ValueError, match="is a directory, not a file"):  # it said "not found" of a dir
        read_prompts(tmp_path)


def test_cli_sample_prompts_file_packs_batches_that_match_single_prompts(checkpoints, tmp_path):
    from spacetime.cli_sample import register
    app = typer.Typer()
    register(app)
    run, vae_path = checkpoints
    runner = CliRunner()
    common = ["--checkpoint", str(run), "--vae", str(vae_path), "--steps", "2", "--seed", "3", "--no-upsample",
              "--frames", "1", "--height", "16", "--width", "24"]
    listed = tmp_path / "prompts.txt"
    listed.write_text("# eval set\na red circle\n\na blue square moving left\na green triangle\n")
    r = runner.invoke(app, ["sample", "--prompts", str(listed), "--out-dir", str(tmp_path / "set"),
                            "--batch-size", "2", *common])
    assert r.exit_code == 0, r.output
    outs = [tmp_path / "set" / f"prompt_{i}.png" for i in range(3)]
    assert all(p.is_file() for p in outs) and not (tmp_path / "set" / "prompt_3.png").exists()
    meta = json.loads((tmp_path / "set" / "prompt_1.png.json").read_text())
    assert meta["prompt"] == "a blue square moving left" and meta["seed"] == 3 and meta["upsampled_prompt"] is None

    one = tmp_path / "one.png"  # the second batch's prompt, alone
    r = runner.invoke(app, ["sample", "--prompt", "a green triangle", "--out", str(one), *common])
    assert r.exit_code == 0, r.output
    a, b = tasks.read_frames(outs[2]), tasks.read_frames(one)
    assert (a - b).abs().max() <= 2 / 255 + 1e-6  # one uint8 level at most (float sums in another order)
    # (batches vs single samples of distinct texts and seeds: test_generate_latents_batch_equals_each_sample_alone)

    for args, msg in [(["--prompt", "x", "--prompts", str(listed), "--out", str(one)], "give one of"),
                      (["--prompts", str(listed), "--out", str(one)], "give --out-dir"),
                      (["--prompts", str(tmp_path / "none.txt"), "--out-dir", str(tmp_path)], "not found")]:
        r = runner.invoke(app, ["sample", *args, *common])
        assert r.exit_code == 2 and msg in r.output, r.output


def test_cli_sample_file_type_follows_the_patch_grids_frames(checkpoints, tmp_path):
    """p_t = 2 makes --frames 1 a 2-latent-frame video: --prompts writes .mp4 files, --prompt refuses a .png
    before sampling (it used to sample, then fail at the write)."""
    from generator.dit import save_dit
    from spacetime.cli_sample import register
    app = typer.Typer()
    register(app)
    _, vae_path = checkpoints
    torch.manual_seed(0)
    dit = tmp_path / "pt2.safetensors"
    save_dit(DiT(DiTConfig(in_channels=4, hidden_size=32, depth=1, num_heads=2, text_dim=TEXT_DIM, patch=(2, 2, 2))),
             str(dit))
    common = ["--checkpoint", str(dit), "--vae", str(vae_path), "--steps", "1", "--no-upsample", "--frames", "1",
              "--height", "16", "--width", "16"]
    listed = tmp_path / "prompts.txt"
    listed.write_text("a red circle\n")
    r = CliRunner().invoke(app, ["sample", "--prompts", str(listed), "--out-dir", str(tmp_path / "set"), *common])
    assert r.exit_code == 0, r.output
    assert tasks.read_frames(tmp_path / "set" / "prompt_0.mp4").shape[0] == 5  # 2 latent frames, 4x in time
    r = CliRunner().invoke(app, ["sample", "--prompt", "a red circle", "--out", str(tmp_path / "x.png"), *common])
    assert r.exit_code == 2 and "write .mp4" in r.output and not (tmp_path / "x.png").exists(), r.output
    assert "turns --frames 1 into 5 frames" in " ".join(r.output.split()), r.output  # was 'makes 1 frame(s) 5'


def test_cli_refuses_fps_that_is_not_positive(checkpoints, tmp_path):
    """--fps 0 used to write a 24 fps video whose sidecar said 0; --fps -1 failed in libx264 after sampling."""
    from spacetime.cli_sample import register
    app = typer.Typer()
    register(app)
    run, vae_path = checkpoints
    common = ["--prompt", "a red circle", "--checkpoint", str(run), "--vae", str(vae_path), "--steps", "1",
              "--no-upsample", "--frames", "5", "--height", "16", "--width", "16", "--out", str(tmp_path / "x.mp4")]
    for cmd in (["sample"], ["generate", "--task", "loop"]):
        for fps in ("0", "-1"):
            r = CliRunner().invoke(app, [*cmd, *common, "--fps", fps])
            assert r.exit_code == 2 and "--fps must be > 0" in r.output, r.output
    assert os.listdir(tmp_path) == []


def test_cli_refuses_a_blank_prompt_and_cfg_or_fps_that_are_not_finite(checkpoints, tmp_path):
    """A blank --prompt failed in the words encoder with a traceback; --cfg nan wrote a blank video and a
    sidecar with a bare NaN (not JSON); --fps inf failed with a traceback after sampling. Each is now one
    error line before anything loads."""
    from spacetime.cli_sample import register
    app = typer.Typer()
    register(app)
    run, vae_path = checkpoints
    common = ["--checkpoint", str(run), "--vae", str(vae_path), "--steps", "1", "--frames", "5", "--height",
              "16", "--width", "16", "--out", str(tmp_path / "x.mp4")]
    for cmd in (["sample"], ["generate", "--task", "loop"]):
        for args, msg in ((["--prompt", "  "], "--prompt is empty"),
                          (["--prompt", "", "--no-upsample"], "--prompt is empty"),
                          (["--prompt", "x", "--no-upsample", "--cfg", "nan"], "--cfg must be a finite number"),
                          (["--prompt", "x", "--no-upsample", "--fps", "inf"], "--fps must be > 0 and finite"),
                          (["--prompt", "x", "--no-upsample", "--method", "rk4"],  # refused once all had loaded
                           "--method must be one of euler | heun, got 'rk4'")):
            r = CliRunner().invoke(app, [*cmd, *args, *common])
            assert r.exit_code == 2 and msg in r.output, r.output
    assert os.listdir(tmp_path) == []


def test_generate_sidecar_records_what_was_asked(checkpoints, tmp_path):
    """The output's size follows the input's aspect and the asked area: a wide input asked at 16x16 comes
    out 8x24, and asking 8x24 gives 8x16. The sidecar recorded only the output's size, so it could not
    reproduce the run; it now records the asked --frames/--height/--width and --max-frames too."""
    from spacetime.cli_sample import register
    app = typer.Typer()
    register(app)
    run, vae_path = checkpoints
    wide = tmp_path / "wide.png"
    write_video(video(1, 17, 33).permute(1, 0, 2, 3), wide)
    out = tmp_path / "a.mp4"
    r = CliRunner().invoke(app, ["generate", "--task", "animate", "--prompt", "a red circle", "--no-upsample",
                                 "--input", str(wide), "--frames", "5", "--height", "16", "--width", "16", "--out",
                                 str(out), "--checkpoint", str(run), "--vae", str(vae_path), "--steps", "1"])
    assert r.exit_code == 0, r.output
    meta = json.loads((tmp_path / "a.mp4.json").read_text())
    assert (meta["frames"], meta["height"], meta["width"]) == (5, 8, 24)
    assert (meta["requested_frames"], meta["requested_height"], meta["requested_width"], meta["max_frames"]) == (
        5, 16, 16, 129)
    assert meta["input_sha256"] == [sha256_file(wide)]
    from generator.sample import load_codec
    model, codec = load_model(run)[0], load_codec(vae_path)

    def redo(h, w):
        return tasks.run_task("animate", model, codec, "a red circle", [str(wide)], frames=5, height=h, width=w,
                              steps=1, text_encoder=encoder).video.shape[2:]

    assert redo(meta["requested_height"], meta["requested_width"]) == (8, 24)
    assert redo(meta["height"], meta["width"]) == (8, 16)  # the output's size is not what was asked


def test_cli_refuses_an_upsampler_dir_that_is_missing(checkpoints, tmp_path):
    """A mistyped --upsampler was a warning: the prompt went in as written and the sidecar named that
    path as its upsampler."""
    from spacetime.cli_sample import register
    app = typer.Typer()
    register(app)
    run, vae_path = checkpoints
    common = ["--prompt", "a red circle", "--checkpoint", str(run), "--vae", str(vae_path), "--steps", "1",
              "--frames", "1", "--height", "16", "--width", "16", "--upsampler", str(tmp_path / "missing")]
    for cmd in (["sample"], ["generate", "--task", "image"]):
        r = CliRunner().invoke(app, [*cmd, *common, "--out", str(tmp_path / "x.png")])
        assert r.exit_code == 2 and "--upsampler" in r.output and "not found" in r.output, r.output
    assert os.listdir(tmp_path) == []


def test_cli_refuses_a_text_encoder_the_dit_did_not_train_on(checkpoints, tmp_path):
    import shutil

    from generator.precompute import TextEncoder
    from spacetime.cli_sample import _text_encoder, register
    app = typer.Typer()
    register(app)
    run, vae_path = checkpoints
    mine = tmp_path / "run"
    shutil.copytree(run, mine)
    clip = TextEncoder("open_clip:ViT-B-32")  # seeded random tower: the sha precompute records without weights
    (mine / "run.json").write_text(json.dumps({"text_encoder_sha": clip.sha}))
    for task in (["sample"], ["generate", "--task", "image", "--no-upsample"]):
        r = CliRunner().invoke(app, [*task, "--prompt", "a red circle", "--checkpoint", str(mine), "--vae", str(vae_path),
                                     "--frames", "1", "--height", "16", "--width", "16", "--steps", "1",
                                     "--out", str(tmp_path / "x.png")])
        assert r.exit_code == 2 and "trained on text embeddings of encoder sha" in r.output, r.output
        assert "--text-weights" in r.output and not (tmp_path / "x.png").exists()
    encode, name, _ = _text_encoder("open_clip:ViT-B-32", 512, None, mine)  # the same encoder is accepted
    assert encode(["a red circle"])[0].shape[1] == 512
    assert _text_encoder("words", 8, None, run)[0](["a red circle"])[0].shape[1] == 8  # no record: not checked
    # without --text-encoder: the one the training run recorded (precompute's lineage names it), else words
    (mine / "run.json").write_text(json.dumps({"text_encoder_sha": clip.sha, "text_encoder": "open_clip:ViT-B-32",
                                               "text_weights": None}))
    assert _text_encoder(None, 512, None, mine)[1] == "open_clip:ViT-B-32"
    assert _text_encoder(None, 8, None, run)[1] == "words"


def test_generate_plays_at_the_input_videos_frame_rate_by_default(checkpoints, tmp_path):
    """--fps defaulted to 24 for every task: a 30 fps video extended or edited came back slowed down, its
    own frames included. Without --fps the output now takes the first input video's rate (an image: 24)."""
    from spacetime.cli_sample import register
    app = typer.Typer()
    register(app)
    run, vae_path = checkpoints
    clip, still = tmp_path / "in30.mp4", tmp_path / "still.png"
    _write_mp4(clip, 9, rate=30)
    write_video(video(1, 16, 32).permute(1, 0, 2, 3), still)
    assert tasks.input_fps(clip) == 30.0 and tasks.input_fps(still) is None
    common = ["--prompt", "a red circle", "--no-upsample", "--checkpoint", str(run), "--vae", str(vae_path),
              "--steps", "1", "--frames", "13", "--height", "16", "--width", "16"]
    for task, given, extra, want in (("extend", clip, [], 30.0), ("animate", still, [], 24.0),
                                     ("extend", clip, ["--fps", "12"], 12.0)):
        out = tmp_path / f"{task}{len(extra)}.mp4"
        r = CliRunner().invoke(app, ["generate", "--task", task, "--input", str(given), "--out", str(out),
                                     *common, *extra])
        assert r.exit_code == 0, r.output
        with av.open(str(out)) as c:
            assert float(c.streams.video[0].average_rate) == want
        assert json.loads(out.with_name(out.name + ".json").read_text())["fps"] == want


def test_upsample_dataset_gives_an_llm_upsampler_the_datasets_examples(tmp_path, monkeypatch):
    """sample/generate loaded an LLM upsampler with no few-shot examples (only `spacetime upsample
    --dataset` passed them), so it never saw the dataset's dense style. --upsample-dataset passes them."""
    import pyarrow as pa
    from deltalake import write_deltalake

    import captioner.upsample as up
    from spacetime.cli_sample import _upsample
    rows = [{"clip_id": str(i), "status": "kept", "caption_short": f"short {i}", "caption_dense": f"dense {i}",
             "caption_teacher_short": None, "caption_teacher_dense": None} for i in range(4)]
    write_deltalake(str(tmp_path / "ds" / "clips"), pa.Table.from_pylist(rows))
    (tmp_path / "llm").mkdir()
    seen = []

    def fake_load(path, examples=()):
        seen.append(list(examples))
        return lambda prompt, seed=0: f"{prompt}, in detail"
    monkeypatch.setattr(up, "load_upsampler", fake_load)
    assert _upsample(["a cat"], tmp_path / "llm", 0, tmp_path / "ds") == ["a cat, in detail"]
    assert len(seen[0]) == 3 and all(s.startswith("short") and d.startswith("dense") for s, d in seen[0])
    assert _upsample(["a cat"], tmp_path / "llm", 0) and seen[1] == []
    with pytest.raises(ValueError, match="give --upsampler"):
        _upsample(["a cat"], None, 0, tmp_path / "ds")
