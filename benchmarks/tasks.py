"""Prompting with images and videos, measured: train a small VAE + DiT on moving shapes with the
task conditioning mix (CPU, one thread, ~35 minutes), then run each task on new videos and check the
issue's bar:

  animate     first frame PSNR to the image >= 30 dB; also printed: PSNR to the image's VAE round trip
              (the DiT holds the given latent exactly, so the VAE alone sets the first figure)
  extend      the kept frames' PSNR to the input >= 30 dB (and to their VAE round trip); the generated
              part moves the input's way >= 80% (forward; backward is printed beside it)
  loop        |last - first| <= the typical |frame t+1 - frame t| of the same video. A straight-line
              move cannot loop, so a fraction (--back) of the training videos go there and back
              ("... moving left and back"), and the loop prompt asks for that; the one-way prompt's
              seam is printed beside it, and the loop's frame step over a there-and-back video's (a
              still video would be a trivial loop)
  edit        strength 0.3 ends closer to the input than strength 0.9
  transition  the first frame is nearer A's end than B's start, the last nearer B's start than A's end

    python benchmarks/tasks.py [--frames 9] [--vae-steps 4000] [--dit-steps 3300] [--seed 0] [--samples 16]
                               [--save DIR | --load DIR] [--vae vae.safetensors] [--mix tasks|none=..,first=..]

Why 9 frames: the shapes cross ~half the frame whatever the length, so at 17 frames they move 0.9 px a
frame and this CPU-sized DiT learned appearance but not direction in 12 minutes (t2v and extension
direction 44%); at 9 frames (1.8 px a frame, as benchmarks/generator_learns.py) extension continues the
motion 81%. Why 4000 VAE and 3300 DiT steps (fixed steps, so a run is the same on a busy or idle box;
--vae-minutes / --dit-minutes only cap the time): with 10 + 12 minutes (~2300 VAE steps, 29.6 dB; ~2400
DiT steps) animate sat at 29.9 dB and backward extension at 62-75%; at these steps the VAE reaches
32.1-32.3 dB and, on seeds 0 and 1 (32 videos each), backward extension 91% / 94%, forward 97% / 100%,
loop seam median 0.35 / 0.36. --durations trains on several lengths at once (measured: mixed 9/11/13 made
the loop worse, 1.85 vs 1.02).

--save DIR keeps the trained VAE and EMA DiT (safetensors); --load DIR skips training and measures them
again (e.g. after changing a task's sampling), so one training run serves many measurements; --vae
reuses a trained VAE and trains only the DiT. --mix sets the conditioning strategy weights (default:
generator.conditioning.TASK_MIX).

The extension rows also print the frame step across the join between given and generated frames
over the input's typical step: the given frames are kept exactly (to their VAE round trip), so a
DiT that does not lead into them shows there as a jump.
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
from generator.conditioning import parse_ratios  # noqa: E402
from generator.dit import DiTConfig, load_dit, save_dit  # noqa: E402
from generator.sample import decode_latent, encode_video  # noqa: E402
from generator.shapes import COLOURS, caption_of, embed_caption, judge, make_dataset, make_video  # noqa: E402
from generator.train import TrainConfig, train  # noqa: E402
from generator.vae import VAE, VAEConfig, load_vae, psnr, save_vae  # noqa: E402
from generator.vae_train import VAETrainConfig, train_vae  # noqa: E402

SIZE, TEXT_DIM = 32, 32


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


def roundtrip(vae, frames, later: bool = False):
    """(3, T, H, W) through the VAE as a task encodes it: at the output's start (T = 1 + fk), or
    `later` after a copy of its first frame (T = fm; generator/tasks.py encode_later)."""
    if later:
        return tasks.decode_later(vae, *tasks.encode_later(vae, frames.permute(1, 0, 2, 3)))
    return decode_latent(vae, encode_video(vae, frames))


def direction_of(video):  # (3, T, H, W) -> judged direction or None
    return judge(video.permute(1, 0, 2, 3))[1]


def train_models(args):
    """The VAE, then the DiT with the task conditioning mix, on the shapes data. Returns (vae, EMA DiT).
    The recipe is benchmarks/generator_learns.py's, measured there: the VAE folds 2x2 pixels first and
    halves time once (9 frames -> 5 latent frames, so motion is explicit on the latent grid), the
    latents are shifted to zero mean and scaled to unit std, and the DiT trains at a high constant LR."""
    # videos of every duration in --durations, in equal shares (Patch n' Pack trains on them together)
    groups = [make_dataset(args.train_videos // len(args.durations), n, SIZE, seed=1000 * args.seed + k, back=args.back)
              for k, n in enumerate(args.durations)]
    clips = [torch.stack([v.permute(1, 0, 2, 3) for v, _, _ in g]) for g in groups]
    if args.vae:
        vae = load_vae(args.vae).eval()
        print(f"[vae] loaded {args.vae}")
    else:
        vae = VAE(VAEConfig(channels=(16, 32), patch_size=2, time_downsample=1, latent_channels=4))
        # 9-frame clips, then a quarter of the LR: the causal conv net runs unchanged on any length
        nine = torch.cat([c[:, :, :9] for c in clips])
        hist = []
        first = round(args.vae_steps * 0.75)
        for i, (n, share) in enumerate(((first, 0.75), (args.vae_steps - first, 0.25))):
            hist += train_vae(vae, nine, VAETrainConfig(steps=n, lr=3e-3 / 4 ** i, batch_size=8, seed=100 * args.seed + i,
                                                        log_every=0, max_seconds=args.vae_minutes * 60 * share,
                                                        l1_weight=0.0, device="cpu"))
        capped = " (stopped by --vae-minutes)" if len(hist) < args.vae_steps else ""
        print(f"[vae] {len(hist)} steps{capped}, PSNR -> {statistics.mean(h['psnr'] for h in hist[-20:]):.1f} dB")
    with torch.no_grad():
        lats = [torch.cat([vae.encode(c[i:i + 32]).mean for i in range(0, len(c), 32)]) for c in clips]
    vae.fit_latent_stats(torch.cat([z.flatten() for z in lats]))
    pairs = [(vae.to_dit(z[i]), embed_caption(c, TEXT_DIM)) for g, z in zip(groups, lats) for i, (_, c, _) in enumerate(g)]

    # 2. DiT with the task conditioning mix
    cfg = TrainConfig(dit=DiTConfig(in_channels=4, hidden_size=args.width, depth=4, num_heads=2, text_dim=TEXT_DIM),
                      steps=args.dit_steps, lr=args.lr, warmup_steps=50, seed=args.seed, ema_decay=0.995, cfg_dropout=0.1,
                      cond_ratios=args.mix, max_tokens=tokens_of(vae, args.frames) * 16,
                      base_tokens=tokens_of(vae, args.frames), log_every=0,
                      max_seconds=args.dit_minutes * 60)
    res = train(cfg, pairs)
    losses = [h["loss"] for h in res.history]
    capped = " (stopped by --dit-minutes)" if res.stop_reason == "max_seconds" else ""
    print(f"[dit] {res.step} steps{capped}, loss {statistics.mean(losses[:20]):.3f} -> {statistics.mean(losses[-50:]):.3f}")
    return vae, res.ema.eval()


def tokens_of(vae, frames: int, patch=(1, 2, 2)) -> int:
    """DiT tokens of one frames x SIZE x SIZE video: the resolution-shift reference in training and sampling."""
    _, t, h, w = vae.latent_shape(frames, SIZE, SIZE)
    return t // patch[0] * (h // patch[1]) * (w // patch[2])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=9, help="frames of the training and test videos (1 + 4k)")
    ap.add_argument("--durations", type=lambda s: [int(x) for x in s.split(",")], default=None,
                    help="training video lengths, comma-separated (default: --frames only)")
    ap.add_argument("--vae", help="a trained vae.safetensors to reuse (only the DiT trains)")
    ap.add_argument("--vae-steps", type=int, default=4000, help="VAE steps (3/4 at lr 3e-3, 1/4 at a quarter)")
    ap.add_argument("--dit-steps", type=int, default=3300, help="DiT steps")
    ap.add_argument("--vae-minutes", type=float, default=20.0, help="cap on the VAE's training time")
    ap.add_argument("--dit-minutes", type=float, default=30.0, help="cap on the DiT's training time")
    ap.add_argument("--seed", type=int, default=0, help="training data and initialisation seed (test videos fixed)")
    ap.add_argument("--width", type=int, default=128, help="DiT hidden size")
    ap.add_argument("--lr", type=float, default=3e-3, help="DiT learning rate")
    ap.add_argument("--train-videos", type=int, default=768)
    ap.add_argument("--samples", type=int, default=16, help="test videos per task")
    ap.add_argument("--save", help="write the trained vae.safetensors and dit.safetensors here")
    ap.add_argument("--load", help="load vae.safetensors and dit.safetensors from here instead of training")
    ap.add_argument("--back", type=float, default=0.25, help="fraction of training videos that go there and back")
    ap.add_argument("--mix", type=parse_ratios, default="tasks",
                    help="conditioning strategy weights, e.g. none=0.5,first=0.2,last=0.1,ends=0.1,random=0.1 "
                         "(default: tasks, generator.conditioning.TASK_MIX)")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--cfg", type=float, default=3.0)
    args = ap.parse_args()
    args.durations = args.durations or [args.frames]
    FRAMES, half = args.frames, (args.frames - 1) // 2  # extend from the first/last half + 1 frames
    torch.set_num_threads(1)  # the CPU box is shared
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    torch.manual_seed(args.seed)
    t0 = time.time()

    if args.load:
        vae = load_vae(os.path.join(args.load, "vae.safetensors")).eval()
        model = load_dit(os.path.join(args.load, "dit.safetensors")).eval()
        print(f"[load] VAE and DiT from {args.load}")
    else:
        vae, model = train_models(args)
        if args.save:
            os.makedirs(args.save, exist_ok=True)
            save_vae(vae, os.path.join(args.save, "vae.safetensors"))
            save_dit(model, os.path.join(args.save, "dit.safetensors"))
    kw = dict(steps=args.steps, cfg_scale=args.cfg, base_tokens=tokens_of(vae, args.frames, model.cfg.patch), text_encoder=text_encoder)

    test = make_dataset(args.samples, FRAMES, SIZE, seed=11)
    rng = random.Random(5)
    rows = {k: [] for k in ("animate", "animate_rt", "roundtrip", "kept_fwd", "kept_fwd_rt", "seam_fwd", "kept_back",
                            "kept_back_rt", "seam_back", "dir_fwd", "dir_back", "loop", "loop_oneway", "loop_motion", "edit", "trans")}
    for i, (v, cap, (colour, shape, direction)) in enumerate(test):
        x = v.permute(1, 0, 2, 3)  # (3, T, H, W)
        # animate: the image is the first frame
        r = tasks.animate(model, vae, v[0], cap, frames=FRAMES, resolution=SIZE, seed=i, **kw)
        rt = roundtrip(vae, x[:, :1])[:, 0]
        rows["animate"].append(psnr(r.video[:, 0], x[:, 0]))
        rows["animate_rt"].append(psnr(r.video[:, 0], rt))
        rows["roundtrip"].append(psnr(rt, x[:, 0]))
        # extend forward from the first half + 1 frames; backward from the last (kept: all but the very last)
        r = tasks.extend(model, vae, v[:half + 1], cap, frames=FRAMES, direction="forward", resolution=SIZE, seed=i, **kw)
        rows["kept_fwd"].append(psnr(r.video[:, :half + 1], x[:, :half + 1]))
        rows["kept_fwd_rt"].append(psnr(r.video[:, :half + 1], roundtrip(vae, x[:, :half + 1])))
        rows["dir_fwd"].append(direction_of(r.video[:, half:]) == direction)
        rows["seam_fwd"].append(frame_diff(r.video[:, half + 1], r.video[:, half]) / max(step(x), 1e-6))
        r = tasks.extend(model, vae, v[half:], cap, frames=FRAMES, direction="backward", resolution=SIZE, seed=i, **kw)
        start, given = r.given[0]
        rows["kept_back"].append(psnr(r.video[:, start:], given))
        rows["kept_back_rt"].append(psnr(r.video[:, start:], roundtrip(vae, given, later=True)))
        rows["dir_back"].append(direction_of(r.video[:, :start + 1]) == direction)
        rows["seam_back"].append(frame_diff(r.video[:, start], r.video[:, start - 1]) / max(step(x), 1e-6))
        # loop from the first frame: the there-and-back prompt, and the one-way one for comparison
        for key, prompt in (("loop", caption_of(colour, shape, direction, back=True)), ("loop_oneway", cap)):
            r = tasks.loop(model, vae, prompt, frames=FRAMES, image=v[0], resolution=SIZE, seed=i, **kw)
            rows[key].append(seam_ratio(r.video))
            if key == "loop":  # a still video is a trivial loop: show that it moves as much as the data
                # does (a there-and-back video covers twice the one-way distance in the same frames)
                ref = make_video(colour, shape, direction, FRAMES, SIZE, random.Random(200 + i), back=True)
                rows["loop_motion"].append(step(r.video) / step(ref.permute(1, 0, 2, 3)))
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
    print(f"animate     first-frame PSNR to the image {m(rows['animate']):.1f} dB (bar 30), to its VAE round trip "
          f"{m(rows['animate_rt']):.1f} dB (the VAE round trip's own PSNR: {m(rows['roundtrip']):.1f} dB)")
    print(f"extend fwd  kept-frame PSNR {m(rows['kept_fwd']):.1f} dB (to the VAE round trip {m(rows['kept_fwd_rt']):.1f}), "
          f"continues the motion {m(rows['dir_fwd']):.0%} (bars 30 dB, 80%); the step out of the kept frames / the "
          f"input's typical step {statistics.median(rows['seam_fwd']):.2f} (median)")
    print(f"extend back kept-frame PSNR {m(rows['kept_back']):.1f} dB (to the VAE round trip {m(rows['kept_back_rt']):.1f}), "
          f"leads into the motion {m(rows['dir_back']):.0%}; the step into the kept frames / the input's typical "
          f"step {statistics.median(rows['seam_back']):.2f} (median)")
    ok = sum(r <= 1.0 for r in rows["loop"])
    print(f"loop        seam / typical frame step: median {statistics.median(rows['loop']):.2f} "
          f"(<= 1 in {ok}/{n}; bar <= 1); with the one-way prompt {statistics.median(rows['loop_oneway']):.2f} "
          f"(<= 1 in {sum(r <= 1.0 for r in rows['loop_oneway'])}/{n}); loop frame step / a there-and-back video's "
          f"{m(rows['loop_motion']):.2f}")
    print(f"edit        PSNR to input at 0.3 {m(a for a, _ in rows['edit']):.1f} dB vs at 0.9 "
          f"{m(b for _, b in rows['edit']):.1f} dB; 0.3 closer in {sum(a > b for a, b in rows['edit'])}/{n}")
    print(f"transition  starts nearer A and ends nearer B in {sum(rows['trans'])}/{n}")
    print(f"total {(time.time() - t0) / 60:.1f} min on {torch.get_num_threads()} CPU thread(s)")


if __name__ == "__main__":
    main()
