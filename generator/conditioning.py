"""Frame conditioning: which latent frames of a sample are given clean (held at t = 0).

One model does text-to-video, image-to-video, extension forwards and backwards, looping and
transitions if, during training, some samples keep a few of their own latent frames clean while
the rest are noised (the Sora report's "prompting with images and videos"). The clean frames
carry per-token timestep 0 and are left out of the loss (RectifiedFlow.loss(clean=...)); at
sampling time the same mask holds the given frames fixed (RectifiedFlow.sample(clean=...)).

Strategies, drawn per sample with the probabilities of a `ratios` dict:
  none    nothing clean: plain text-to-video (and every 1-frame sample: an image has no context)
  first   the first k latent frames (animate, extend forwards)
  last    the last k latent frames (extend backwards)
  ends    the first k1 and the last k2 (loop, transition)
  random  k frames anywhere (infilling; keeps the model from relying on position alone)
k is uniform over what leaves at least one frame noised. A strategy a sample is too short for
(ends needs 3 frames, the others 2) falls back to none.

Masks are over latent frames, 0-based, one bool per frame. With a temporal patch p_t > 1 a token
covers p_t frames: training draws masks over patch-grid time steps, so whole tokens are clean; a
token given to `token_mask` is clean only when all its frames are.
"""
import math

import torch

STRATEGIES = ("none", "first", "last", "ends", "random")
MIN_FRAMES = {"none": 1, "first": 2, "last": 2, "ends": 3, "random": 2}

# A mix for models that should support every task: 40% of samples unconditional so text-to-video
# stays good, the rest spread over the tasks' patterns. last (extend backward) weighs as much as first:
# measured on benchmarks/tasks.py (same VAE, 12 DiT minutes, 32 test videos), moving 0.1 of none to
# last raised backward extension 66% -> 75%, forward 78% -> 97%, and brought the loop seam 1.11 -> 0.82.
TASK_MIX = {"none": 0.4, "first": 0.2, "last": 0.2, "ends": 0.1, "random": 0.1}
MIXES = {"tasks": TASK_MIX, "t2v": {"none": 1.0}}


def check_ratios(ratios: dict) -> dict:
    """Validated, normalised copy of {strategy: weight}; ValueError on unknown names or bad weights."""
    unknown = sorted(set(ratios) - set(STRATEGIES))
    if unknown:
        raise ValueError(f"unknown conditioning strategies {unknown}; expected some of {STRATEGIES}")
    # not (w >= 0) also refuses NaN, which passed both checks and made every probability NaN (the
    # sampler's multinomial then failed mid-training); inf made them NaN too
    if any(not 0 <= float(w) < math.inf for w in ratios.values()) or sum(float(w) for w in ratios.values()) <= 0:
        raise ValueError(f"conditioning ratios must be finite, >= 0 with a positive sum, got {ratios}")
    total = sum(float(w) for w in ratios.values())
    return {s: float(ratios.get(s, 0.0)) / total for s in STRATEGIES}


def parse_ratios(text: str) -> dict:
    """A named mix ('tasks', 't2v') or 'name=weight,...' (e.g. 'none=0.5,first=0.5') -> a validated,
    normalised {strategy: weight} dict; ValueError naming what is wrong."""
    if text.strip() in MIXES:
        return check_ratios(MIXES[text.strip()])
    try:
        ratios = {k.strip(): float(w) for k, w in (part.split("=") for part in text.split(","))}
    except ValueError:
        raise ValueError(f"conditioning mix must be one of {sorted(MIXES)} or name=weight,... "
                         f"(names {', '.join(STRATEGIES)}), got {text!r}") from None
    return check_ratios(ratios)


def _randint(lo: int, hi: int, generator) -> int:
    """Uniform integer in [lo, hi] (inclusive) from `generator`."""
    return int(torch.randint(lo, hi + 1, (1,), generator=generator, device=generator.device))


def frame_mask(strategy: str, frames: int, generator) -> torch.Tensor:
    """(frames,) bool CPU mask of clean frames for one sample under `strategy`."""
    mask = torch.zeros(frames, dtype=torch.bool)
    if frames < MIN_FRAMES[strategy] or strategy == "none":
        return mask
    if strategy == "first":
        mask[:_randint(1, frames - 1, generator)] = True
    elif strategy == "last":
        mask[frames - _randint(1, frames - 1, generator):] = True
    elif strategy == "ends":
        k1 = _randint(1, frames - 2, generator)
        k2 = _randint(1, frames - 1 - k1, generator)
        mask[:k1] = True
        mask[frames - k2:] = True
    else:  # random
        k = _randint(1, frames - 1, generator)
        mask[torch.randperm(frames, generator=generator, device=generator.device)[:k].cpu()] = True
    return mask


def token_mask(frame_masks, grids, patch) -> torch.Tensor:
    """Per-token clean mask (N,) for packed samples laid out in (t, h, w) raster order.

    frame_masks: one (T_i,) bool over latent frames per sample (T_i = grid t * p_t); grids: each
    sample's (t, h, w) patch grid. A token is clean when all p_t frames it covers are clean."""
    pt = patch[0]
    out = []
    for m, (t, h, w) in zip(frame_masks, grids):
        if len(m) != t * pt:
            raise ValueError(f"frame mask has {len(m)} frames, the sample has {t * pt} latent frames")
        per_t = m.view(t, pt).all(1)  # (t,)
        out.append(per_t.repeat_interleave(h * w))
    return torch.cat(out)


def sample_clean_tokens(packed, ratios: dict, generator):
    """Draw a strategy and a frame mask per sample of a Packed batch -> (N,) bool on the tokens'
    device, or None when no token is clean. With all weight on 'none' nothing is drawn from
    `generator`, so training without conditioning is bit-for-bit what it was."""
    probs = check_ratios(ratios)
    if probs["none"] == 1.0:
        return None
    weights = torch.tensor([probs[s] for s in STRATEGIES], device=generator.device)
    picks = torch.multinomial(weights, len(packed.grids), replacement=True, generator=generator).tolist()
    pt = packed.patch[0]
    masks = [frame_mask(STRATEGIES[k], t, generator).repeat_interleave(pt) for k, (t, _, _) in zip(picks, packed.grids)]
    clean = token_mask(masks, packed.grids, packed.patch)
    if not clean.any():
        return None
    return clean.to(packed.tokens.device)
