"""Prompting with images and videos: animate, extend, loop, edit, transition, image.

Every task is text-to-video with some latent frames given: they are encoded by the VAE, held clean
(t = 0) through the sampler (generator/conditioning.py masks, as trained with cond_ratios), and the
rest is generated around them. SDEdit (edit) instead starts the sampler part-way from the noised
input. Each task returns a TaskResult: the video (3, T, H, W) in [-1, 1], its latent, the mask of
given latent frames, and which output frames reproduce which input frames.

Frame bookkeeping (causal VAE, time factor f = 4): latent 0 is pixel frame 0 alone, latent j >= 1
is pixel frames f(j-1)+1 .. fj. So a clip given at the START of the output must be 1 + fk frames
(encoded as it is), and a clip given LATER must be whole groups of f frames: it is encoded after a
copy of its own first frame (the causal start), whose latent is then dropped. Inputs are cut to
those lengths (extend backward keeps the first f*floor(T/f) frames of the video, for example).
After sampling, such a later clip is decoded again in the causal context it was encoded in (after
its start latent), not after the generated frames, and those frames are put in place: the decoder
is causal, so the frames before it are unchanged, and the given frames come out as their own VAE
round trip, exactly as a clip given at the start does (measured: 29.7 dB to that round trip when
decoded after the generated frames, exact when decoded in context).

Inputs are file paths (read with PyAV, any image or video it decodes, display rotation honoured)
or tensors (T, 3, H, W) / (3, H, W) in [-1, 1]. They are resized to cover the output size with
the aspect ratio kept, then centre-cropped, frame by frame as they are decoded; only the frames a task
uses are decoded (a transition seeks to A's tail). The output size comes from the first input: about
`resolution`^2 pixels at its aspect ratio, on the patch grid. Bad input raises one ValueError.
"""
import math
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from generator.sample import (MAX_SIDE, check_fps, decode_latent, embed_text, encode_video, fit_size,
                              generate_latent, grid_multiples, write_video)

DIRECTIONS = ("forward", "backward")


@dataclass
class TaskResult:
    video: torch.Tensor                 # (3, T, H, W) in [-1, 1]
    latent: torch.Tensor                # (C, t, h, w) the sampled scaled latent (given later parts decode in context)
    cond_frames: torch.Tensor | None    # (t,) bool: latent frames given (held clean), None if none
    cond: torch.Tensor | None           # (C, t, h, w) the given latents at those frames
    given: list = field(default_factory=list)  # [(first output frame, input frames (3, n, H, W))]


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------

def _rotate_upright(a: torch.Tensor, rotation_ccw: float) -> torch.Tensor:
    """Turn a decoded (H, W, 3) frame upright. PyAV's frame.rotation is the display matrix's
    counter-clockwise angle, so a player turns the picture -rotation degrees (as pipeline/probe.py reads it)."""
    cw = int(round(-rotation_ccw / 90.0)) % 4 * 90  # clockwise degrees to display upright
    return torch.rot90(a, k=(-cw // 90) % 4, dims=(0, 1))  # rot90 turns counter-clockwise


def _upright(frame) -> torch.Tensor:  # a decoded av.VideoFrame -> (H, W, 3) uint8, upright
    return _rotate_upright(torch.from_numpy(frame.to_ndarray(format="rgb24")), frame.rotation or 0)


def _seek_tail(c, stream, n: int):
    """The last n frames of `stream`, decoded from a keyframe shortly before them rather than from the
    start: seek about 2n frames before the end (then 8n, 32n, ... while that gives fewer than n frames
    from the first keyframe on) and decode to the end. None when the file gives no duration or frame
    rate, cannot seek, or the tail reaches back to the start (then the caller decodes it whole)."""
    import av

    rate, tb = stream.average_rate or stream.guessed_rate, stream.time_base
    duration = (float(stream.duration * tb) if stream.duration else c.duration / 1e6 if c.duration else None)
    if not rate or not tb or not duration:
        return None
    back = 2 * n
    while back / rate < duration:
        try:
            c.seek(int((stream.start_time or 0) + (duration - back / rate) / tb), stream=stream, backward=True)
        except av.error.FFmpegError:  # not seekable: decode it whole
            return None
        tail, keyed = deque(maxlen=n), False
        for frame in c.decode(stream):
            keyed = keyed or frame.key_frame  # frames before the first keyframe may miss their references
            if keyed:
                tail.append(frame)
        if len(tail) == n:
            return list(tail)
        back *= 4
    return None


def input_fps(path) -> float | None:
    """A video file's frame rate; None for an image (PyAV's image demuxers report a nominal 25) or a file
    that gives no usable rate. The output of a task on a video plays at the input's own speed."""
    import av

    try:
        with av.open(str(path)) as c:
            if not c.streams.video or c.format.name == "image2" or c.format.name.endswith("_pipe"):
                return None
            rate = c.streams.video[0].average_rate or c.streams.video[0].guessed_rate
    except (av.error.FFmpegError, OSError):  # unreadable: the task itself names the problem
        return None
    return float(rate) if rate and 0 < float(rate) < math.inf else None


def read_frames(path, max_frames: int | None = None, last: int | None = None, fit=None) -> torch.Tensor:
    """Decode an image or video file -> (T, 3, H, W) float in [-1, 1], upright: its first `max_frames`
    frames, or its last `last` frames (decoded from a keyframe before them, not from the start, where
    the file can seek), or all of them. fit: (h, w) of the first frame -> (H, W): each frame is
    resize_cover'ed to it as it is decoded, so memory holds output-size frames (a 140-frame 1080p input
    held 7.8 GB at full size). ValueError when the file is missing or nothing decodes."""
    import av

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"input {path} not found")
    size = None

    def convert(frame) -> torch.Tensor:  # -> (3, H, W) float in [-1, 1]
        nonlocal size
        x = _upright(frame).permute(2, 0, 1).float() / 127.5 - 1.0
        if fit is None:
            return x
        size = size or fit(x.shape[1], x.shape[2])
        return resize_cover(x[None], *size)[0]

    def decode(c) -> list:  # from the start; with `last`, only the tail is kept
        frames = deque(maxlen=last)
        for frame in c.decode(video=0):
            frames.append(convert(frame))
            if max_frames is not None and len(frames) >= max_frames:
                break
        return list(frames)

    frames, streams = [], 1
    try:
        with av.open(str(path)) as c:
            streams = len(c.streams.video)
            tail = _seek_tail(c, c.streams.video[0], last) if streams and last is not None else None
            if tail is not None:
                frames = [convert(frame) for frame in tail]
            elif streams and last is None:
                frames = decode(c)
        if streams and last is not None and tail is None:  # from the start of a fresh open (after any seek)
            with av.open(str(path)) as c:
                frames = decode(c)
    except (av.error.FFmpegError, OSError) as e:  # a file PyAV cannot read is bad input
        raise ValueError(f"cannot read input {path}: {e}") from e
    if not streams:
        raise ValueError(f"input {path} has no video or image stream")
    if not frames:
        raise ValueError(f"input {path} has no decodable frames")
    return torch.stack(frames)


def as_frames(x, max_frames: int | None = None, last: int | None = None, fit=None) -> torch.Tensor:
    """A path, (3, H, W) image or (T, 3, H, W) video tensor in [-1, 1] -> (T, 3, H, W) float: its first
    max_frames frames, its last `last` frames, or all; resize_cover'ed to fit(h, w) when given."""
    if isinstance(x, (str, Path)):
        return read_frames(x, max_frames, last, fit)
    if not torch.is_tensor(x) or x.ndim not in (3, 4) or x.shape[-3] != 3 or min(x.shape) < 1:
        raise ValueError(f"input must be a file path or a (T, 3, H, W) / (3, H, W) tensor, got "
                         f"{type(x).__name__} {tuple(x.shape) if torch.is_tensor(x) else ''}")
    x = (x[None] if x.ndim == 3 else x)[:max_frames][-last if last else None:].float()
    return x if fit is None else resize_cover(x, *fit(*x.shape[-2:]))


def grid_size(h: int, w: int, resolution: int, multiples) -> tuple[int, int]:
    """(H, W) of about resolution^2 pixels with the aspect ratio h:w, sides on the grid multiples
    (mh, mw) and at most MAX_SIDE (both scaled down together: capping the long side alone turned a
    16:9 input asked at 4000x4000 into a 2048x2048 crop)."""
    mh, mw = multiples
    H = math.sqrt(resolution * resolution * h / w)
    W = H * w / h
    shrink = min(1.0, MAX_SIDE / max(H, W))
    H, W = H * shrink, W * shrink
    return (min(MAX_SIDE // mh * mh, max(mh, round(H / mh) * mh)),
            min(MAX_SIDE // mw * mw, max(mw, round(W / mw) * mw)))


def resize_cover(frames, height: int, width: int) -> torch.Tensor:
    """(T, 3, h, w) -> (T, 3, height, width): scale to cover (aspect kept, antialiased), centre-crop."""
    T, _, h, w = frames.shape
    if (h, w) == (height, width):
        return frames
    s = max(height / h, width / w)
    rh, rw = max(height, math.ceil(h * s - 1e-6)), max(width, math.ceil(w * s - 1e-6))
    x = F.interpolate(frames, size=(rh, rw), mode="bilinear", antialias=True, align_corners=False)
    y0, x0 = (rh - height) // 2, (rw - width) // 2
    return x[:, :, y0:y0 + height, x0:x0 + width].clamp(-1, 1)


def _to_vae(frames) -> torch.Tensor:  # (T, 3, H, W) -> (3, T, H, W)
    return frames.permute(1, 0, 2, 3).contiguous()


def encode_start(vae, frames) -> torch.Tensor:
    """Frames (T, 3, H, W), T = 1 + fk, given at the start of the output -> latent (C, 1 + k, h, w)."""
    return encode_video(vae, _to_vae(frames))


def encode_later(vae, frames) -> tuple[torch.Tensor, torch.Tensor]:
    """Frames (T, 3, H, W), T = f m, given after the start -> (latent (C, m, h, w), lead (C, 1, h, w)):
    encoded after a copy of the first frame as the causal start, whose latent `lead` is not part of
    the output but decodes the given frames in the context they were encoded in."""
    z = encode_video(vae, _to_vae(torch.cat([frames[:1], frames])))
    return z[:, 1:], z[:, :1]


def decode_later(vae, z, lead) -> torch.Tensor:
    """encode_later's (latent, lead) -> the given frames (3, f m, H, W) as the VAE renders them in the
    causal context they were encoded in: their round trip."""
    return decode_latent(vae, torch.cat([lead, z], 1))[:, 1:]


# --------------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------------

def _setup(model, vae, text, text_encoder, first, resolution, max_frames=None, last=None):
    """(embedding, first input frames resized, (H, W)) for a task whose size comes from `first`."""
    emb = embed_text(text, text_encoder, model.cfg.text_dim)
    _, mh, mw = grid_multiples(vae, model.cfg.patch)
    x = as_frames(first, max_frames, last, fit=lambda h, w: grid_size(h, w, resolution, (mh, mw)))
    return emb, x, tuple(x.shape[-2:])


def _frames(vae, model, frames: int, H: int, W: int, max_frames: int):
    frames = fit_size(vae, model.cfg.patch, frames, H, W)[0]
    if frames > max_frames:
        raise ValueError(f"{frames} frames is longer than the model supports ({max_frames})")
    return frames


def _run(model, vae, emb, frames, H, W, cond_parts, sampling, init=None, strength=1.0, drop_tail: int = 0):
    """Sample with `cond_parts` [(latent frame index, latent (C, n, h, w), lead latent or None)] held
    clean, decode, re-decode each part that has a lead in its own causal context (module docstring),
    and drop `drop_tail` pixel frames from the end."""
    shape = vae.latent_shape(frames, H, W)
    cond = cond_frames = None
    if cond_parts:
        cond = torch.zeros(shape)
        cond_frames = torch.zeros(shape[1], dtype=torch.bool)
        for j, z, _ in cond_parts:
            cond[:, j:j + z.shape[1]] = z.cpu()
            cond_frames[j:j + z.shape[1]] = True
        if cond_frames.all():
            raise ValueError("every latent frame is given: nothing left to generate; ask for more frames")
    latent = generate_latent(model, emb, shape, cond=cond, cond_frames=cond_frames, init=init, strength=strength,
                             **sampling)
    video = decode_latent(vae, latent)
    f = vae.cfg.time_factor
    for j, z, lead in cond_parts or ():
        if lead is not None and j >= 1:  # latent j >= 1 is pixel frames f(j-1)+1 .. fj
            p = f * (j - 1) + 1
            video[:, p:p + f * z.shape[1]] = decode_later(vae, z, lead)
    if drop_tail:
        video = video[:, :-drop_tail]
    return TaskResult(video, latent, cond_frames, cond)


def animate(model, vae, image, text, frames: int = 17, resolution: int = 256, text_encoder=None,
            max_frames: int = 129, **sampling) -> TaskResult:
    """Image -> video whose first frame is the image (latent 0 held clean). `image`: path or tensor
    (a video's first frame is used). sampling: steps, cfg_scale, seed, method, base_tokens."""
    emb, x, (H, W) = _setup(model, vae, text, text_encoder, image, resolution, max_frames=1)
    frames = _frames(vae, model, frames, H, W, max_frames)
    if frames < 2:
        raise ValueError("animate needs more than one frame")
    res = _run(model, vae, emb, frames, H, W, [(0, encode_start(vae, x[:1]), None)], sampling)
    res.given = [(0, _to_vae(x[:1]))]
    return res


def extend(model, vae, video, text, frames: int = 33, direction: str = "forward", resolution: int = 256,
           text_encoder=None, max_frames: int = 129, **sampling) -> TaskResult:
    """Video -> a longer video of `frames` frames that continues it forward in time (the input is its
    start) or backward (the input is its end). Forward keeps the first 1 + f*floor((T-1)/f) input
    frames, backward the first f*floor(T/f) (the time factor's frame groups)."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    emb, x, (H, W) = _setup(model, vae, text, text_encoder, video, resolution, max_frames=max_frames + 1)
    frames = _frames(vae, model, frames, H, W, max_frames)
    f = vae.cfg.time_factor
    t_out = vae.latent_shape(frames, H, W)[1]
    if direction == "forward":
        keep = 1 + f * ((len(x) - 1) // f)
        z = encode_start(vae, x[:keep])
        if z.shape[1] >= t_out:
            raise ValueError(f"the input keeps {keep} frames: extending needs more than that, got frames={frames}")
        res = _run(model, vae, emb, frames, H, W, [(0, z, None)], sampling)
        res.given = [(0, _to_vae(x[:keep]))]
    else:
        keep = f * (len(x) // f)
        if keep == 0:
            raise ValueError(f"extending backward needs at least {f} input frames, got {len(x)}")
        z, lead = encode_later(vae, x[:keep])
        if z.shape[1] >= t_out:
            raise ValueError(f"the input keeps {keep} frames: extending needs more than that, got frames={frames}")
        res = _run(model, vae, emb, frames, H, W, [(t_out - z.shape[1], z, lead)], sampling)
        res.given = [(frames - keep, _to_vae(x[:keep]))]
    return res


def loop(model, vae, text, frames: int = 17, image=None, resolution: int = 256, height: int | None = None,
         width: int | None = None, text_encoder=None, max_frames: int = 129, **sampling) -> TaskResult:
    """A seamless loop: the last frame flows into the first. Both ends are conditioned on the same
    frame: the start on `image` (or, when None, an image generated from the text at height x width)
    and one extra frame group past the end on that frame held still; the extra group is then cut,
    so the output's last frame leads into its first."""
    seed = sampling.get("seed", 0)
    if image is not None:
        emb, x, (H, W) = _setup(model, vae, text, text_encoder, image, resolution, max_frames=1)
    else:
        emb = embed_text(text, text_encoder, model.cfg.text_dim)
        _, H, W = fit_size(vae, model.cfg.patch, 1, height or resolution, width or resolution)
        z0 = generate_latent(model, emb, vae.latent_shape(1, H, W), **{**sampling, "seed": seed})
        x = decode_latent(vae, z0).permute(1, 0, 2, 3)  # (1, 3, H, W)
    frames = _frames(vae, model, frames, H, W, max_frames)
    f = vae.cfg.time_factor
    if frames < 1 + f:
        raise ValueError(f"a loop needs at least {1 + f} frames")
    t_out = vae.latent_shape(frames, H, W)[1]
    start = encode_start(vae, x[:1])
    hold = encode_later(vae, x[:1].expand(f, -1, -1, -1))[0]  # one group of the first frame held still
    res = _run(model, vae, emb, frames + f, H, W, [(0, start, None), (t_out, hold, None)], sampling, drop_tail=f)
    res.given = [(0, _to_vae(x[:1]))]
    return res


def edit(model, vae, video, text, strength: float = 0.5, resolution: int = 256, text_encoder=None,
         max_frames: int = 129, **sampling) -> TaskResult:
    """SDEdit: noise the input (image or video; its first 1 + f*floor((T-1)/f) frames) to `strength`
    in (0, 1] and denoise it with the new prompt. Small strength stays close to the input; 1 ignores it."""
    if not isinstance(strength, (int, float)) or not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    emb, x, (H, W) = _setup(model, vae, text, text_encoder, video, resolution, max_frames=max_frames)
    f = vae.cfg.time_factor
    keep = 1 + f * ((len(x) - 1) // f)
    frames = _frames(vae, model, keep, H, W, max_frames)
    init = encode_start(vae, x[:keep])
    res = _run(model, vae, emb, frames, H, W, [], sampling, init=init, strength=float(strength))
    res.given = []
    return res


def transition(model, vae, video_a, video_b, text, frames: int = 33, context: int = 1, resolution: int = 256,
               text_encoder=None, max_frames: int = 129, **sampling) -> TaskResult:
    """A video that starts as the end of A and ends as the start of B: the last 1 + f*context frames of
    A are given at the start, the first f*context frames of B at the end; the middle is generated.
    The size comes from A; B is resized to cover it."""
    if context < 1:
        raise ValueError(f"context must be >= 1 frame group, got {context}")
    f = vae.cfg.time_factor
    # only A's tail is given: decoded from a keyframe before it, not the whole (long) video
    emb, a, (H, W) = _setup(model, vae, text, text_encoder, video_a, resolution, last=1 + f * context)
    b = as_frames(video_b, f * context, fit=lambda h, w: (H, W))
    if len(a) < 1 + f * context or len(b) < f * context:
        raise ValueError(f"transition with context {context} needs >= {1 + f * context} frames of A and "
                         f">= {f * context} of B, got {len(a)} and {len(b)}")
    frames = _frames(vae, model, frames, H, W, max_frames)
    t_out = vae.latent_shape(frames, H, W)[1]
    if t_out < 2 * context + 2:
        raise ValueError(f"transition with context {context} needs at least {1 + f * (2 * context + 1)} frames")
    za = encode_start(vae, a[-(1 + f * context):])
    zb, lead = encode_later(vae, b[:f * context])
    res = _run(model, vae, emb, frames, H, W, [(0, za, None), (t_out - context, zb, lead)], sampling)
    res.given = [(0, _to_vae(a[-(1 + f * context):])), (frames - f * context, _to_vae(b[:f * context]))]
    return res


def image(model, vae, text, height: int = 256, width: int = 256, text_encoder=None, **sampling) -> TaskResult:
    """Text-to-image: one frame at any aspect up to MAX_SIDE x MAX_SIDE (rounded to the grid with a warning)."""
    emb = embed_text(text, text_encoder, model.cfg.text_dim)
    frames, H, W = fit_size(vae, model.cfg.patch, 1, height, width)  # p_t > 1: the shortest video it can make
    res = _run(model, vae, emb, frames, H, W, [], sampling)
    res.video = res.video[:, :1]  # the causal VAE's frame 0 is latent 0 alone: the image
    return res


# --------------------------------------------------------------------------------------------
# One entry point for the CLI: inputs by count, output written atomically
# --------------------------------------------------------------------------------------------

INPUTS = {"animate": (1, 1), "extend": (1, 1), "loop": (0, 1), "edit": (1, 1), "transition": (2, 2), "image": (0, 0)}


def run_task(task: str, model, vae, text, inputs=(), out=None, frames: int = 17, height: int = 256,
             width: int = 256, direction: str = "forward", strength: float = 0.5, fps: float = 24.0,
             text_encoder=None, max_frames: int = 129, **sampling) -> TaskResult:
    """Run `task` with its list of `inputs` (paths or tensors) and write the video to `out` (.mp4, or
    .png for one frame) when given. Inputs set the output's aspect ratio; height x width sets its
    area (and the size outright for image and for loop without an input). Every bad argument is a
    ValueError raised before anything is written."""
    if task not in INPUTS:
        raise ValueError(f"unknown task {task!r}; expected one of {sorted(INPUTS)}")
    lo, hi = INPUTS[task]
    if not lo <= len(inputs) <= hi:
        want = str(lo) if lo == hi else f"{lo} to {hi}"
        raise ValueError(f"task {task} takes {want} input(s), got {len(inputs)}")
    if out is not None and Path(out).suffix.lower() not in (".mp4", ".png"):
        raise ValueError(f"output must end in .mp4 or .png, got {Path(out).name!r}")
    # a video refuses a .png now, not at the write after sampling: these tasks always make one, and edit
    # does of an input of 1 + f frames or more (it keeps the input's frames)
    f = vae.cfg.time_factor
    if out is not None and Path(out).suffix.lower() == ".png" and (
            task in ("animate", "extend", "loop", "transition") or task == "edit" and len(as_frames(inputs[0], 1 + f)) > f):
        raise ValueError(f"task {task} makes a video here: write .mp4, not {Path(out).name!r}")
    check_fps(fps)
    if task != "image" and model.cfg.patch[0] > 1:  # their held / added latent frames are counted one by one
        raise ValueError(f"task {task} needs a DiT with temporal patch 1, this one's patch is {tuple(model.cfg.patch)}")
    res_px = int(round(math.sqrt(height * width)))
    common = dict(text_encoder=text_encoder, **sampling)
    if task == "animate":
        res = animate(model, vae, inputs[0], text, frames, res_px, max_frames=max_frames, **common)
    elif task == "extend":
        res = extend(model, vae, inputs[0], text, frames, direction, res_px, max_frames=max_frames, **common)
    elif task == "loop":
        res = loop(model, vae, text, frames, inputs[0] if inputs else None, res_px, height, width,
                   max_frames=max_frames, **common)
    elif task == "edit":
        res = edit(model, vae, inputs[0], text, strength, res_px, max_frames=max_frames, **common)
    elif task == "transition":
        res = transition(model, vae, inputs[0], inputs[1], text, frames, resolution=res_px, max_frames=max_frames,
                         **common)
    else:
        res = image(model, vae, text, height, width, **common)
    if out is not None:
        write_video(res.video, out, fps)
    return res
