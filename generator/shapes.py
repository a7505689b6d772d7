"""Synthetic learning data for the generator: one coloured shape moving in a straight line.

A video is (T, 3, H, W) float in [-1, 1]: a circle, square or triangle of one of four colours on a
flat dark background, moving left, right, up or down, with the caption "a red circle moving left".
A "there and back" video (`back=True`, "a red circle moving left and back") eases out and returns
to where it started, so its last frame leads into its first: the periodic motion a model must have
seen to make seamless loops.
`judge(video)` reads a video back by pixel analysis (dominant non-background colour + centroid
trajectory) so generated samples can be scored against their prompt. `embed_caption` gives fixed
random word embeddings: a stand-in text encoder for tests and the shapes benchmark.
"""
import math
import random
import zlib

import torch

COLOURS = {"red": (0.9, -0.8, -0.8), "green": (-0.8, 0.9, -0.8), "blue": (-0.8, -0.8, 0.9), "yellow": (0.9, 0.9, -0.8)}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # (dx, dy), y grows downwards
BACKGROUND = (-0.6, -0.6, -0.6)
# colour x direction pairs never shown in training, to test composition
HELD_OUT = (("red", "left"), ("green", "right"), ("blue", "up"), ("yellow", "down"))


def caption_of(colour: str, shape: str, direction: str, back: bool = False) -> str:
    return f"a {colour} {shape} moving {direction}" + (" and back" if back else "")


def _mask(shape: str, cx: float, cy: float, r: float, H: int, W: int):
    y, x = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    if shape == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= r * r
    if shape == "square":
        return ((x - cx).abs() <= r * 0.85) & ((y - cy).abs() <= r * 0.85)
    if shape == "triangle":  # apex up, base at cy + r
        rel = (y - (cy - r)) / (2 * r)  # 0 at apex, 1 at base
        return (rel >= 0) & (rel <= 1) & ((x - cx).abs() <= rel * r)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def make_video(colour: str, shape: str, direction: str, frames: int = 17, size: int = 64, rng=None,
               back: bool = False):
    """(frames, 3, size, size) in [-1, 1]: the shape travels ~half the frame in `direction`; with
    `back`, out and back on a cosine (still at both ends, the last frame equal to the first)."""
    rng = rng or random.Random(0)
    r = size / 5
    travel = size * 0.45
    dx, dy = DIRECTIONS[direction]
    # start so the whole path stays inside the frame, with some jitter across the motion
    lo, hi = r + 1, size - r - 1
    along = lo + rng.uniform(0, hi - lo - travel)
    across = rng.uniform(lo, hi)
    if dx:
        x0, y0 = (along if dx > 0 else size - along), across
    else:
        x0, y0 = across, (along if dy > 0 else size - along)
    bg = torch.tensor(BACKGROUND).view(3, 1, 1)
    fg = torch.tensor(COLOURS[colour]).view(3, 1, 1)
    video = torch.empty(frames, 3, size, size)
    for f in range(frames):
        u = f / max(frames - 1, 1)
        a = travel * ((1 - math.cos(2 * math.pi * u)) / 2 if back else u)
        m = _mask(shape, x0 + dx * a, y0 + dy * a, r, size, size)
        video[f] = torch.where(m, fg, bg)
    return video


def make_dataset(n: int, frames: int = 17, size: int = 64, seed: int = 0, held_out: bool = False,
                 back: float = 0.0):
    """n (video, caption, (colour, shape, direction)) triples. held_out=False draws only training
    colour/direction pairs; True draws only the HELD_OUT pairs. A fraction `back` of the videos
    go there and back (0 draws exactly the one-way data of earlier versions, same seed, same videos)."""
    rng = random.Random(seed)
    pairs = [(c, d) for c in COLOURS for d in DIRECTIONS if ((c, d) in HELD_OUT) == held_out]
    out = []
    for _ in range(n):
        colour, direction = rng.choice(pairs)
        shape = rng.choice(SHAPES)
        there_and_back = back > 0 and rng.random() < back
        out.append((make_video(colour, shape, direction, frames, size, rng, there_and_back),
                    caption_of(colour, shape, direction, there_and_back), (colour, shape, direction)))
    return out


def embed_caption(caption: str, dim: int = 32):
    """Fixed random unit vectors per word (seeded by the word itself): (n_words, dim)."""
    vecs = []
    for word in caption.lower().split():
        g = torch.Generator().manual_seed(zlib.crc32(word.encode()))
        v = torch.randn(dim, generator=g)
        vecs.append(v / v.norm())
    return torch.stack(vecs)


def judge(video, min_pixels: int = 4):
    """Read (colour, direction) back from a video (T, 3, H, W) in [-1, 1].

    Background = per-channel median over the video; foreground = pixels far from it. Colour =
    nearest palette colour to the mean foreground pixel; direction = dominant axis of the centroid's
    displacement between the first and last quarter of frames. None where it cannot tell."""
    v = video.float().clamp(-1, 1)
    T, _, H, W = v.shape
    bg = v.permute(1, 0, 2, 3).reshape(3, -1).median(1).values.view(1, 3, 1, 1)
    fg = (v - bg).abs().sum(1) > 0.6  # (T, H, W)
    if fg.sum() < min_pixels * T // 2:
        return None, None
    mean = (v * fg[:, None]).sum((0, 2, 3)) / fg.sum()
    colour = min(COLOURS, key=lambda c: float((mean - torch.tensor(COLOURS[c])).pow(2).sum()))
    ys, xs = torch.meshgrid(torch.arange(H).float(), torch.arange(W).float(), indexing="ij")
    cents = []
    for f in range(T):
        n = fg[f].sum()
        if n >= min_pixels:
            cents.append(torch.stack([(xs * fg[f]).sum() / n, (ys * fg[f]).sum() / n]))
    if len(cents) < 2:
        return colour, None
    q = max(len(cents) // 4, 1)
    d = torch.stack(cents[-q:]).mean(0) - torch.stack(cents[:q]).mean(0)
    if float(d.abs().max()) < 1.0:
        return colour, None
    if d[0].abs() >= d[1].abs():
        return colour, "right" if d[0] > 0 else "left"
    return colour, "down" if d[1] > 0 else "up"
