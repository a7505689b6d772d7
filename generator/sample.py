"""Sampling: text-to-video and text-to-image with a trained DiT and VAE, and the writers.

    video = sample(model, vae, text, frames=17, height=256, width=448, steps=50, cfg_scale=4.0, seed=0)
    write_video(video, "out.mp4")
    videos = sample_batch(model, vae, [text_a, text_b], frames=17, seeds=[0, 0])  # one packed batch

The path from prompt to pixels: text embedding (L, D_text) -> seeded noise in latent tokens over the
patch grid of the requested size -> rectified-flow sampler (Euler or Heun) with classifier-free
guidance against the model's null text -> vae.from_dit (unscale, unshift) -> VAE decode (chunked in time,
tiled in space for big frames) -> video (3, T, H, W) in [-1, 1].

`generate_latents` is the shared core: any number of samples of any sizes packed into one batch (Patch
n' Pack at inference), each the same as it would be alone. The tasks (generator/tasks.py) call it with
frames held clean (conditioning) and with a partial schedule that starts from a noised input (SDEdit).
Sizes are in pixels and frames; a latent is (C, t, h, w). The same seed gives the same video.
"""
import json
import math
import os
import warnings
from fractions import Fraction
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from generator.conditioning import token_mask
from generator.dit import DiT, DiTConfig
from generator.flow import RectifiedFlow, shift_t
from generator.patches import pack, pack_sequences, unpack
from generator.train import checkpoint_file, prefixed, sha256_file
from generator.vae import VAE, load_state_strict, load_vae

MAX_SIDE = 2048        # pixels: the largest height or width sample() makes
DECODE_TILE = 512      # pixels: frames larger than this decode tile by tile
DECODE_OVERLAP = 64


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

def resolve_checkpoint(path) -> Path:
    """The weights file of a checkpoint: the file itself, or the one a training dir's latest.json
    names (its sha256 checked). ValueError when missing or not matching."""
    p = Path(path)
    if p.is_dir():
        p = Path(checkpoint_file(str(p)))  # CheckpointError is a ValueError
    if not p.is_file():
        raise ValueError(f"checkpoint {p} not found")
    return p


def trained_cond_ratios(path) -> dict | None:
    """The conditioning mix a training checkpoint was trained with ({strategy: weight}), or None when
    the file does not record one (a save_dit file)."""
    with safe_open(str(resolve_checkpoint(path)), "pt") as f:
        meta = f.metadata() or {}
    return json.loads(meta["train"])["config"].get("cond_ratios") if "train" in meta else None


def load_model(path, device="cpu"):
    """(DiT in eval mode, base_tokens) from a training checkpoint (dir or step file: its EMA
    weights) or a save_dit file (base_tokens then defaults to RectifiedFlow's 256).
    base_tokens must match training: it sets the resolution shift of the time schedule."""
    p = resolve_checkpoint(path)
    try:
        with safe_open(str(p), "pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for non-safetensors files
        raise ValueError(f"checkpoint {p} is not a safetensors file: {e}") from e
    if "train" in meta:
        train_cfg = json.loads(meta["train"])["config"]
        d = dict(train_cfg["dit"])
        d["patch"] = tuple(d["patch"])
        model = DiT(DiTConfig(**d))
        tensors = load_file(str(p), device=str(device))
        load_state_strict(model, prefixed(tensors, "ema."), "DiT (EMA)")
        base_tokens = int(train_cfg["base_tokens"])
    elif "config" in meta:
        from generator.dit import load_dit
        if not set(json.loads(meta["config"])) <= set(DiTConfig.__dataclass_fields__):  # a VAE file, say
            raise ValueError(f"checkpoint {p} is not a DiT: its config is another model's (a VAE? that goes to --vae)")
        model, base_tokens = load_dit(str(p), device=device), RectifiedFlow().base_tokens
    else:
        raise ValueError(f"checkpoint {p} carries no model config (neither a training checkpoint nor save_dit)")
    return model.to(device).eval(), base_tokens


def resolve_vae(path) -> Path:
    """A VAE checkpoint: the file, or vae.safetensors inside a train-vae output dir (as precompute --vae
    takes it); ValueError when missing."""
    p = Path(path)
    p = p / "vae.safetensors" if p.is_dir() else p
    if not p.is_file():
        raise ValueError(f"VAE checkpoint {p} not found")
    return p


def load_codec(path, device="cpu") -> VAE:
    """The VAE saved by generator.vae.save_vae (the file or a train-vae dir), in eval mode; ValueError
    when missing."""
    path = resolve_vae(path)
    try:
        return load_vae(str(path), device=device).eval()
    except ValueError:
        raise
    except Exception as e:  # safetensors' own errors for a file that is not one
        raise ValueError(f"VAE checkpoint {path} cannot be loaded: {e}") from e


# --------------------------------------------------------------------------------------------
# Sizes
# --------------------------------------------------------------------------------------------

def grid_multiples(vae: VAE, patch) -> tuple[int, int, int]:
    """(frame step, height multiple, width multiple) in pixels/frames that the VAE + patch grid allow:
    frames = 1 + step * k, with the latent frame count divisible by p_t."""
    f, s = vae.cfg.time_factor, vae.cfg.space_factor
    return f, s * patch[1], s * patch[2]


def nearest(n: int, m: int) -> int:
    """n rounded to the nearest multiple of m, halves up (round() takes halves to even: --frames 3 on a
    1 + 4k grid became 1 frame while 7 became 9)."""
    return (n + m // 2) // m * m


def fit_size(vae: VAE, patch, frames: int, height: int, width: int, warn: bool = True):
    """Nearest (frames, height, width) the patch grid allows (halfway: the longer / larger one), warning
    when it differs from the request.
    ValueError for non-positive sizes or a side over MAX_SIDE after rounding."""
    if min(frames, height, width) < 1:
        raise ValueError(f"frames, height and width must be positive, got {frames}x{height}x{width}")
    f, mh, mw = grid_multiples(vae, patch)
    pt = patch[0]
    t = max(1, nearest(frames - 1, f) // f + 1)  # latent frames
    t = math.ceil(t / pt) * pt
    fit = (1 + f * (t - 1), max(mh, nearest(height, mh)), max(mw, nearest(width, mw)))
    if max(fit[1:]) > MAX_SIDE:
        raise ValueError(f"size {fit[1]}x{fit[2]} is over the {MAX_SIDE}-pixel limit per side")
    if warn and fit != (frames, height, width):
        warnings.warn(f"rounded {frames} frames x {height}x{width} to {fit[0]} x {fit[1]}x{fit[2]} "
                      f"to fit the patch grid (frames 1 + {f}k, sides multiples of {mh}x{mw})", stacklevel=2)
    return fit


# --------------------------------------------------------------------------------------------
# Latents <-> pixels
# --------------------------------------------------------------------------------------------

@torch.no_grad()
def encode_video(vae: VAE, video) -> torch.Tensor:
    """Video (3, T, H, W) in [-1, 1], T = 1 + time_factor k -> scaled latent (C, t, h, w) (posterior mean).
    Chunked in time and tiled in space as decode_latent is, so a long input encodes in bounded memory."""
    x = video[None].to(next(vae.parameters()).device, torch.float32)
    f = vae.cfg.time_factor
    tile = DECODE_TILE if max(x.shape[-2:]) > DECODE_TILE else None
    chunk = 4 * f if x.shape[2] > 1 + 4 * f else None
    return vae.to_dit(vae.encode(x, chunk_frames=chunk, tile=tile, overlap=DECODE_OVERLAP).mean[0])


@torch.no_grad()
def decode_latent(vae: VAE, latent) -> torch.Tensor:
    """Scaled latent (C, t, h, w) -> video (3, 1 + f(t-1), sH, sW) in [-1, 1]. Chunked in time and tiled
    in space (blended overlaps) past DECODE_TILE pixels, so a 2048x2048 image decodes in bounded memory."""
    z = vae.from_dit(latent[None].to(next(vae.parameters()).device, torch.float32))
    f, s = vae.cfg.time_factor, vae.cfg.space_factor
    tile = DECODE_TILE if max(z.shape[-2:]) * s > DECODE_TILE else None
    chunk = 4 * f if z.shape[2] > 5 else None
    return vae.decode(z, chunk_frames=chunk, tile=tile, overlap=DECODE_OVERLAP)[0].clamp(-1, 1)


# --------------------------------------------------------------------------------------------
# The sampler core
# --------------------------------------------------------------------------------------------

class PartialSchedule(RectifiedFlow):
    """The same flow with its sampling grids starting at u = start instead of 1 (SDEdit): the
    unshifted times linspace(start, 0), then each sample's resolution shift."""

    def __init__(self, start: float, **kw):
        super().__init__(**kw)
        self.start = start

    def timesteps(self, steps: int, cu_seqlens):
        lens = cu_seqlens[1:] - cu_seqlens[:-1]
        u = torch.linspace(self.start, 0, steps + 1, device=cu_seqlens.device)
        return shift_t(u[None], self.shift(lens)[:, None])


def embed_texts(texts, text_encoder, text_dim: int) -> list[torch.Tensor]:
    """(L, text_dim) embeddings of `texts`: tensors pass through; the strings go through
    text_encoder(list[str]) -> list[(L, D)] in one call. ValueError on a missing encoder or wrong width."""
    strings = [t for t in texts if isinstance(t, str)]
    if strings and text_encoder is None:
        raise ValueError("text is a string but no text_encoder was given")
    encoded = iter(text_encoder(strings) if strings else [])
    out = [next(encoded) if isinstance(t, str) else t for t in texts]
    for e in out:
        if e.ndim != 2 or e.shape[1] != text_dim or e.shape[0] < 1:
            raise ValueError(f"text embedding must be (L >= 1, {text_dim}), got {tuple(e.shape)}")
    return out


def embed_text(text, text_encoder, text_dim: int) -> torch.Tensor:
    """embed_texts for one text."""
    return embed_texts([text], text_encoder, text_dim)[0]


@torch.no_grad()
def generate_latents(model: DiT, texts, shapes, seeds, *, steps: int = 50, cfg_scale: float = 4.0,
                     method: str = "euler", base_tokens: int = 256, conds=None, inits=None,
                     strength: float = 1.0) -> list[torch.Tensor]:
    """Sample scaled latents (C, t, h, w), one per (texts[i], shapes[i], seeds[i]), packed into ONE batch:
    each step is one forward over every sample and, for CFG, its null-text twin (DiT's sample.py).

    Sample i equals what it would be alone: attention is block-diagonal, and its noise (from seeds[i]
    alone) and time grid (its own resolution shift) are its own. conds: per sample None or (cond latent
    (C, t, h, w), (t,) bool mask of latent frames given and held clean at t = 0). inits / strength:
    SDEdit — start each sample from inits[i] noised to unshifted time `strength` in (0, 1] and integrate
    round(steps * strength) steps to 0; strength 1 ignores inits."""
    B = len(texts)
    if not B or len(shapes) != B or len(seeds) != B:
        raise ValueError(f"need one shape and one seed per text: {B} texts, {len(shapes)} shapes, {len(seeds)} seeds")
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    if steps < 1:  # 0 steps returned the noise as the sample
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not math.isfinite(cfg_scale):  # NaN / inf make every pixel NaN
        raise ValueError(f"cfg_scale must be a finite number, got {cfg_scale}")
    device = next(model.parameters()).device
    zeros = [torch.zeros(*s, device=device) for s in shapes]
    p = pack(zeros, model.cfg.patch)
    texts = [t.to(device, torch.float32) for t in texts]
    if cfg_scale == 1.0:
        y, ycu = pack_sequences(texts)
        velocity = lambda z, tt: model(z, tt, p.positions, p.cu_seqlens, y, ycu)
    else:  # the conditional and unconditional velocities in ONE packed forward
        p2 = pack(zeros * 2, model.cfg.patch)
        y2, ycu2 = pack_sequences(texts * 2)
        drop = torch.arange(2 * B, device=device) >= B

        def velocity(z, tt):
            v, vu = model(torch.cat([z, z]), torch.cat([tt, tt]), p2.positions, p2.cu_seqlens, y2, ycu2,
                          drop_text=drop).float().chunk(2)  # fp32: the scale amplifies bf16 rounding
            return vu + cfg_scale * (v - vu)

    lens = (p.cu_seqlens[1:] - p.cu_seqlens[:-1]).tolist()
    D = p.tokens.shape[1]  # a CPU generator per sample: the same noise on any device, in any batch
    noise = torch.cat([torch.randn(n, D, generator=torch.Generator().manual_seed(s)) for n, s in zip(lens, seeds)])
    noise = noise.to(device)
    flow = PartialSchedule(strength, base_tokens=base_tokens)
    n_steps = steps
    if strength < 1.0:
        if inits is None or any(x is None for x in inits):
            raise ValueError("strength < 1 needs an init latent to start from")
        x0 = pack([x.to(device, torch.float32) for x in inits], model.cfg.patch).tokens
        t0 = flow.timesteps(1, p.cu_seqlens)[:, 0].repeat_interleave(torch.tensor(lens, device=device))[:, None]
        noise = (1 - t0) * x0 + t0 * noise  # z at t0 on the straight path from the input to the noise
        n_steps = max(1, round(steps * strength))

    clean = x_clean = None
    if conds is not None and any(c is not None for c in conds):
        masks, held = [], []
        for (C, t, h, w), c in zip(shapes, conds):
            cond, frames = c if c is not None else (torch.zeros(C, t, h, w), torch.zeros(t, dtype=torch.bool))
            if cond.shape != (C, t, h, w) or frames is None or len(frames) != t:
                raise ValueError(f"cond must be a latent {(C, t, h, w)} with a ({t},) frame mask")
            masks.append(torch.as_tensor(frames).cpu())
            held.append(cond.to(device, torch.float32))
        clean = token_mask(masks, p.grids, p.patch).to(device)
        x_clean = pack(held, model.cfg.patch).tokens
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        x = flow.sample(velocity, noise, p.cu_seqlens, steps=n_steps, method=method, clean=clean, x_clean=x_clean)
    return unpack(x.float(), p)


def generate_latent(model: DiT, text, latent_shape, *, seed: int = 0, cond=None, cond_frames=None, init=None,
                    **kw) -> torch.Tensor:
    """generate_latents for one sample: text (L, text_dim), cond / cond_frames as one of its conds,
    init as its init; the other keywords are generate_latents'."""
    return generate_latents(model, [text], [latent_shape], [seed], conds=None if cond is None else [(cond, cond_frames)],
                            inits=None if init is None else [init], **kw)[0]


def sample_batch(model: DiT, vae: VAE, texts, frames: int = 1, height: int = 256, width: int = 256, steps: int = 50,
                 cfg_scale: float = 4.0, seeds=None, method: str = "euler", base_tokens: int = 256,
                 text_encoder=None) -> list[torch.Tensor]:
    """Text-to-video (frames > 1) or text-to-image (frames = 1) for several texts at one size, in one
    packed batch -> videos (3, T, H, W) in [-1, 1]; video i equals sample(texts[i], seed=seeds[i]).

    texts: prompt strings (need text_encoder(list[str]) -> list[(L, D)]) or their (L, D) embeddings.
    seeds: one per text (default 0 for each). frames / height / width: pixels; rounded to the patch
    grid with a warning (see fit_size). base_tokens: the training config's resolution-shift reference
    (load_model returns it)."""
    frames, height, width = fit_size(vae, model.cfg.patch, frames, height, width)
    embs = embed_texts(texts, text_encoder, model.cfg.text_dim)
    shape = vae.latent_shape(frames, height, width)
    latents = generate_latents(model, embs, [shape] * len(embs), list(seeds or [0] * len(embs)), steps=steps,
                               cfg_scale=cfg_scale, method=method, base_tokens=base_tokens)
    return [decode_latent(vae, z) for z in latents]


def sample(model: DiT, vae: VAE, text, frames: int = 1, height: int = 256, width: int = 256, steps: int = 50,
           cfg_scale: float = 4.0, seed: int = 0, method: str = "euler", base_tokens: int = 256,
           text_encoder=None) -> torch.Tensor:
    """sample_batch for one text -> video (3, T, H, W) in [-1, 1]."""
    return sample_batch(model, vae, [text], frames, height, width, steps, cfg_scale, [seed], method, base_tokens,
                        text_encoder)[0]


# --------------------------------------------------------------------------------------------
# Writers: temp file, then rename, so a failure never leaves half a file under the real name
# --------------------------------------------------------------------------------------------

def to_uint8(video) -> "numpy.ndarray":
    """(3, T, H, W) in [-1, 1] -> (T, H, W, 3) uint8."""
    return ((video.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()


def _partial(path: Path) -> Path:
    return path.with_name(f".{path.name}.partial")


def check_fps(fps: float, name: str = "fps") -> None:
    """libx264 takes 0 as its default 24 fps (a file whose sidecar lies) and refuses < 0 (and NaN); an
    infinite rate has no frame duration."""
    if not fps > 0 or math.isinf(fps):
        raise ValueError(f"{name} must be > 0 and finite, got {fps}")


def write_video(video, path, fps: float = 24.0) -> Path:
    """Write (3, T, H, W) in [-1, 1] to `path`: .mp4 (H.264 via PyAV's libx264, yuv420p) or .png
    (T must be 1). Written to a hidden temp file and renamed into place."""
    import av  # PyAV: only the writers need it, so the sampler runs where av is not installed

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".mp4", ".png"):
        raise ValueError(f"output must end in .mp4 or .png, got {path.name!r}")
    check_fps(fps)
    frames = to_uint8(video)
    if suffix == ".png" and len(frames) != 1:
        raise ValueError(f"a .png holds one frame, the video has {len(frames)}: write .mp4")
    T, H, W, _ = frames.shape
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _partial(path)
    try:
        if suffix == ".mp4":
            with av.open(str(tmp), "w", format="mp4") as c:
                s = c.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
                s.width, s.height, s.pix_fmt = W, H, "yuv420p"
                s.codec_context.options = {"crf": "12", "preset": "medium"}
                for a in frames:
                    for packet in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                        c.mux(packet)
                for packet in s.encode():
                    c.mux(packet)
        else:
            with av.open(str(tmp), "w", format="image2", options={"update": "1"}) as c:
                s = c.add_stream("png")
                s.width, s.height, s.pix_fmt = W, H, "rgb24"
                for packet in s.encode(av.VideoFrame.from_ndarray(frames[0], format="rgb24")):
                    c.mux(packet)
                for packet in s.encode():
                    c.mux(packet)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_json(obj, path) -> Path:
    """JSON to `path` via a temp file and rename."""
    path = Path(path)
    tmp = _partial(path)
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)
    return path
