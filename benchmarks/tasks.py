"""Prompting with images and videos, measured: train a small VAE + DiT on moving shapes with the
task conditioning mix (CPU, ~10 minutes), then run each task on new videos and check the issue's bar:

  animate     first frame PSNR to the image >= 30 dB (the VAE round trip of the image shown as the ceiling)
  extend      the kept frames' PSNR to the input >= 30 dB; the generated part moves the input's way >= 80%
  loop        |last - first| <= the typical |frame t+1 - frame t| of the same video. A straight-line
              move cannot loop, so a fraction (--back) of the training videos go there and back
              ("... moving left and back"), and the loop prompt asks for that; the one-way prompt's
              seam is printed beside it
  edit        strength 0.3 ends closer to the input than strength 0.9
  transition  the first frame is nearer A's end than B's start, the last nearer B's start than A's end

    python benchmarks/tasks.py [--vae-minutes 4] [--dit-minutes 6] [--samples 8]
"""
import argparse
import logging
import os
import random
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from generator import tasks  # noqa: E402
from generator.conditioning import TASK_MIX  # noqa: E402
from generator.dit import DiTConfig  # noqa: E402
from generator.sample import decode_latent, encode_video  # noqa: E402
from generator.shapes import COLOURS, caption_of, embed_caption, judge, make_dataset, make_video  # noqa: E402
from generator.train import TrainConfig, train, train_vae  # noqa: E402
from generator.vae import VAE, VAEConfig, psnr  # noqa: E402

FRAMES, SIZE, TEXT_DIM = 17, 32, 32


def text_encoder(prompts):
    return [embed_caption(p, TEXT_DIM) for p in prompts]


def frame_diff(a, b) -> float:
    """Mean absolute difference of two frames (3, H, W) in [-1, 1]."""
    return (a - b).abs().mean().item()


def step(video) -> float:
    """Mean |frame t+1 - frame t| of a video (3, T, H, W)."""
    return statistics.mean(frame_diff(video[:, t + 1], video[:, t]) for t in range(video.shape[1] - 1))


def seam_ratio(video) -> float:
    """|last - first| over the video's typical frame step: <= 1 loops seamlessly."""
    return frame_diff(video[:, -1], video[:, 0]) / max(step(video), 1e-6)


def direction_of(video):  # (3, T, H, W) -> judged direction or None
    return judge(video.permute(1, 0, 2, 3))[1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--vae-minutes", type=float, default=4.0)
    ap.add_argument("--dit-minutes", type=float, default=6.0)
    ap.add_argument("--train-videos", type=int, default=768)
    ap.add_argument("--samples", type=int, default=8, help="test videos per task")
    ap.add_argument("--back", type=float, default=0.25, help="fraction of training videos that go there and back")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--cfg", type=float, default=3.0)
    args = ap.parse_args()
    torch.set_num_threads(1)  # the CPU box is shared
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    torch.manual_seed(0)
    t0 = time.time()

    # 1. VAE (4x time, 4x space, 4 channels) and scaled latents, as benchmarks/generator_learns.py
    data = make_dataset(args.train_videos, FRAMES, SIZE, seed=0, back=args.back)
    videos = torch.stack([v.permute(1, 0, 2, 3) for v, _, _ in data])
    vae = VAE(VAEConfig(channels=(16, 32, 32), time_downsample=2, latent_channels=4))
    # train on 9-frame clips (half the cost): the causal conv net runs unchanged on 17
    hist = train_vae(vae, videos[:, :, :9].contiguous(), steps=100000, lr=3e-3, batch_size=4, log_every=0,
                     max_seconds=args.vae_minutes * 60, l1_weight=0.0)
    print(f"[vae] {len(hist)} steps, PSNR -> {statistics.mean(h['psnr'] for h in hist[-20:]):.1f} dB")
    with torch.no_grad():
        lat = torch.cat([vae.encode(videos[i:i + 32]).mean for i in range(0, len(videos), 32)])
    vae.cfg.scaling_factor = 1.0 / lat.std().item()
    pairs = [(lat[i] * vae.cfg.scaling_factor, embed_caption(c, TEXT_DIM)) for i, (_, c, _) in enumerate(data)]

    # 2. DiT with the task conditioning mix
    tokens = pairs[0][0].shape[1] * (SIZE // 4 // 2) ** 2
    cfg = TrainConfig(dit=DiTConfig(in_channels=4, hidden_size=192, depth=4, num_heads=3, text_dim=TEXT_DIM),
                      steps=100000, lr=5e-4, warmup_steps=50, ema_decay=0.995, cfg_dropout=0.1,
                      cond_ratios=TASK_MIX, max_tokens=tokens * 16, base_tokens=tokens, log_every=0,
                      max_seconds=args.dit_minutes * 60)
    res = train(cfg, pairs)
    losses = [h["loss"] for h in res.history]
    print(f"[dit] {res.step} steps, loss {statistics.mean(losses[:20]):.3f} -> {statistics.mean(losses[-50:]):.3f}")
    model = res.ema.eval()
    kw = dict(steps=args.steps, cfg_scale=args.cfg, base_tokens=tokens, text_encoder=text_encoder)

    test = make_dataset(args.samples, FRAMES, SIZE, seed=11)
    rng = random.Random(5)
    rows = {k: [] for k in ("animate", "roundtrip", "kept_fwd", "kept_back", "dir_fwd", "dir_back", "loop",
                            "loop_oneway", "loop_motion", "edit", "trans")}
    for i, (v, cap, (colour, shape, direction)) in enumerate(test):
        x = v.permute(1, 0, 2, 3)  # (3, T, H, W)
        # animate: the image is the first frame
        r = tasks.animate(model, vae, v[0], cap, frames=FRAMES, resolution=SIZE, seed=i, **kw)
        rows["animate"].append(psnr(r.video[:, 0], x[:, 0]))
        rows["roundtrip"].append(psnr(decode_latent(vae, encode_video(vae, x[:, :1]))[:, 0], x[:, 0]))
        # extend forward from the first 9 frames; backward from frames 8..16 (kept: 8..15)
        r = tasks.extend(model, vae, v[:9], cap, frames=FRAMES, direction="forward", resolution=SIZE, seed=i, **kw)
        rows["kept_fwd"].append(psnr(r.video[:, :9], x[:, :9]))
        rows["dir_fwd"].append(direction_of(r.video[:, 8:]) == direction)
        r = tasks.extend(model, vae, v[8:], cap, frames=FRAMES, direction="backward", resolution=SIZE, seed=i, **kw)
        start, given = r.given[0]
        rows["kept_back"].append(psnr(r.video[:, start:], given))
        rows["dir_back"].append(direction_of(r.video[:, :start + 1]) == direction)
        # loop from the first frame: the there-and-back prompt, and the one-way one for comparison
        for key, prompt in (("loop", caption_of(colour, shape, direction, back=True)), ("loop_oneway", cap)):
            r = tasks.loop(model, vae, prompt, frames=FRAMES, image=v[0], resolution=SIZE, seed=i, **kw)
            rows[key].append(seam_ratio(r.video))
            if key == "loop":  # a still video is a trivial loop: show that it moves as much as the data
                rows["loop_motion"].append(step(r.video) / step(x))
        # edit to another colour at two strengths
        new = caption_of(rng.choice([c for c in COLOURS if c != colour]), shape, direction)
        near = tasks.edit(model, vae, v, new, strength=0.3, resolution=SIZE, seed=i, **kw)
        far = tasks.edit(model, vae, v, new, strength=0.9, resolution=SIZE, seed=i, **kw)
        rows["edit"].append((psnr(near.video, x), psnr(far.video, x)))
        # transition from this video to another colour/shape
        other = make_video(rng.choice([c for c in COLOURS if c != colour]), shape, direction, FRAMES, SIZE,
                           random.Random(100 + i))
        r = tasks.transition(model, vae, v, other, cap, frames=FRAMES, resolution=SIZE, seed=i, **kw)
        a_end, b_start = x[:, -1], other[0]
        first, last = r.video[:, 0], r.video[:, -1]
        rows["trans"].append(frame_diff(first, a_end) < frame_diff(first, b_start)
                             and frame_diff(last, b_start) < frame_diff(last, a_end))

    m = statistics.mean
    n = len(test)
    print(f"\n{n} test videos per task, {FRAMES} frames at {SIZE}x{SIZE}")
    print(f"animate     first-frame PSNR to the image {m(rows['animate']):.1f} dB (bar 30; VAE round trip of the "
          f"image {m(rows['roundtrip']):.1f} dB)")
    print(f"extend fwd  kept-frame PSNR {m(rows['kept_fwd']):.1f} dB, continues the motion {m(rows['dir_fwd']):.0%} "
          f"(bars 30 dB, 80%)")
    print(f"extend back kept-frame PSNR {m(rows['kept_back']):.1f} dB, leads into the motion {m(rows['dir_back']):.0%}")
    ok = sum(r <= 1.0 for r in rows["loop"])
    print(f"loop        seam / typical frame step: median {statistics.median(rows['loop']):.2f} "
          f"(<= 1 in {ok}/{n}; bar <= 1); with the one-way prompt {statistics.median(rows['loop_oneway']):.2f} "
          f"(<= 1 in {sum(r <= 1.0 for r in rows['loop_oneway'])}/{n}); loop frame step / input's "
          f"{m(rows['loop_motion']):.2f}")
    print(f"edit        PSNR to input at 0.3 {m(a for a, _ in rows['edit']):.1f} dB vs at 0.9 "
          f"{m(b for _, b in rows['edit']):.1f} dB; 0.3 closer in {sum(a > b for a, b in rows['edit'])}/{n}")
    print(f"transition  starts nearer A and ends nearer B in {sum(rows['trans'])}/{n}")
    print(f"total {(time.time() - t0) / 60:.1f} min on {torch.get_num_threads()} CPU thread(s)")


if __name__ == "__main__":
    main()
