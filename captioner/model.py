"""The video captioner: a CoCa-style model over T frames (VideoCoCa, Yan et al. 2022).

    frames (B, T, H, W, 3) uint8
      -> open_clip ViT, shared over the T frames        -> patch tokens (B, T, L, Dv)
      -> + motion tokens: a FlowNet-S style conv net over each pair of consecutive sampled
           frames (frame t, frame t+1 - frame t), down to the same patch grid  (B, T, L, Dv)
      -> + temporal position embedding, flattened        -> (B, T*L, Dv)
      -> spacetime transformer: joint attention over all T*L tokens (ViViT's factorised
           encoder), so a patch can find where its content went in the next frame
      -> attentional pooler: 1 + N learned queries cross-attend to every frame token
           query 0   -> contrastive video embedding      (B, E)
           query 1.. -> N caption-conditioning tokens    (B, N, Dt)
      -> GPT-2 decoder with cross-attention to those N tokens -> next-token logits

Why cross-attention rather than a prefix: the text keeps positions 0.. regardless of N, the KV
cache of a step holds only text, and the same decoder run *without* encoder states is a plain
causal LM over the caption, which CoCa uses as its unimodal text tower: its hidden state at the
end-of-caption token is the contrastive text embedding, so no second text model is needed.

Captions are `<short> words ... <eos>` or `<dense> words ... <eos>`: the first token selects the
style. The tokenizer is word-level, built offline from the training captions, and saved next to
the weights; a checkpoint dir holds config.json, model.safetensors and tokenizer.json.
"""
import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from open_clip.transformer import AttentionalPooler, LayerNorm, Transformer, VisionTransformer
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel

PAD, UNK, EOS, SHORT, DENSE = "<pad>", "<unk>", "<eos>", "<short>", "<dense>"
SPECIAL_TOKENS = [PAD, UNK, EOS, SHORT, DENSE]  # ids 0..4 in every tokenizer we build
STYLES = {"short": SHORT, "dense": DENSE}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # open_clip's image normalisation
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class CaptionerConfig:
    image_size: int = 224       # frames are resized to image_size x image_size pixels
    patch_size: int = 32
    vision_width: int = 768
    vision_layers: int = 12
    vision_heads: int = 12
    num_frames: int = 8         # T frames sampled uniformly from each clip
    n_queries: int = 32         # caption-conditioning tokens from the pooler
    pooler_heads: int = 8
    embed_dim: int = 512        # contrastive embedding size
    text_width: int = 512
    text_layers: int = 6
    text_heads: int = 8
    max_text_len: int = 64      # tokens, including the style token and <eos>
    vocab_size: int = 0         # set from the tokenizer
    dropout: float = 0.0        # text decoder; "small" uses 0.1: on the demo bench (90 training clips,
                                # which it memorises) held-out subject 0.69 -> 0.93, CIDEr 1.89 -> 2.19
    temporal_layers: int = 2    # joint spacetime attention layers after the per-frame ViT
    motion_channels: int = 32   # width of the frame-pair conv net's first stage; 0 = no motion tokens
    # + one token per frame pair from phase correlation and spectral scale (camera pan / tilt / zoom),
    # given to the spacetime encoder AND straight to the decoder's cross-attention. On the demo
    # benchmark ("small") this took held-out camera-move accuracy from 0.03-0.07 to 0.79. On by
    # preset for small/base; off for tiny (4 frames of 32 px), where it made held-out colour
    # learning in the unit test seed-dependent (2 of 4 seeds below chance x2)
    global_motion: bool = False
    # how a frame becomes a square (captioner.data.to_square): "crop" its centre (CLIP's
    # preprocessing, so "base" keeps it for open_clip weights; a 16:9 frame loses 44% of its width
    # and the colours, subjects and text there), "resize" it whole, or "pad" it. "small" resizes: on
    # the demo benchmark (mixed 16:9 / 9:16 / 4:3 footage) that took held-out subject accuracy from
    # 0.48 to 0.69 and CIDEr from 1.57 to 1.89 against crop, same data and steps
    frame_fit: str = "crop"
    # + one token holding the clip's colour histogram (color_histogram: hue x saturation x value
    # over all its frames), given to the spacetime encoder and straight to the decoder like the
    # camera tokens. Naming the dominant colours means judging pixel shares over the whole clip,
    # which a ViT trained from scratch on a few hundred clips learns slowly and unevenly. On by
    # preset for "small": with time reversal it took the demo bench's all-attribute accuracy from
    # 0.58 to 0.77 (57 held-out clips, 40 training videos)
    color_token: bool = False


# Size presets. "base" has the ViT-B-32 image tower, so open_clip ViT-B-32 weights load into it.
PRESETS = {
    "tiny": dict(image_size=32, patch_size=8, vision_width=64, vision_layers=2, vision_heads=4,
                 num_frames=4, n_queries=8, pooler_heads=4, embed_dim=64, text_width=64,
                 text_layers=2, text_heads=4, max_text_len=48, temporal_layers=1, motion_channels=16),
    "small": dict(image_size=112, patch_size=16, vision_width=256, vision_layers=4, vision_heads=4,
                  num_frames=8, n_queries=16, pooler_heads=4, embed_dim=256, text_width=256,
                  text_layers=4, text_heads=4, max_text_len=64, global_motion=True, frame_fit="resize",
                  dropout=0.1, color_token=True),
    "base": dict(image_size=224, patch_size=32, vision_width=768, vision_layers=12, vision_heads=12,
                 num_frames=8, n_queries=32, pooler_heads=8, embed_dim=512, text_width=512,
                 text_layers=6, text_heads=8, max_text_len=77, global_motion=True),
}


def preset(name: str, **overrides) -> CaptionerConfig:
    """A CaptionerConfig from a size preset ("tiny", "small", "base") with field overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown captioner preset {name!r}; choose from {sorted(PRESETS)}")
    return CaptionerConfig(**{**PRESETS[name], **overrides})


# ---------------------------------------------------------------- tokenizer

def build_tokenizer(texts, min_count: int = 1) -> Tokenizer:
    """A lower-cased word-level tokenizer over `texts`; ids 0..4 are SPECIAL_TOKENS.

    Words seen fewer than `min_count` times map to <unk>. Built offline: no hub, no BPE merges
    to learn, and the vocabulary of templated or teacher captions is small. Text is NFC-normalised
    first, so an accent typed as a combining mark (NFD) is the same word as the precomposed one.
    """
    norm, pre = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()]), pre_tokenizers.Whitespace()
    counts = {}
    for text in texts:
        # words split by the tokenizer's own normaliser and pre-tokenizer: Python's lower() and \w
        # differ from them on odd unicode (final sigma, dotted I, combining marks), and a word counted
        # under another spelling than the one encoding looks up would always be <unk>
        for word, _ in pre.pre_tokenize_str(norm.normalize_str(text)):
            counts[word] = counts.get(word, 0) + 1
    words = sorted(w for w, n in counts.items() if n >= min_count and w not in SPECIAL_TOKENS)
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer, tok.pre_tokenizer = norm, pre
    return tok


def encode_caption(tok: Tokenizer, text: str, style: str, max_len: int) -> list[int]:
    """[style token, word ids..., <eos>], truncated to max_len tokens (keeping the <eos>)."""
    ids = tok.encode(text).ids[: max_len - 2]
    return [tok.token_to_id(STYLES[style])] + ids + [tok.token_to_id(EOS)]


def decode_caption(tok: Tokenizer, ids) -> str:
    """Token ids -> text; stops at <eos>, drops special tokens, re-attaches punctuation."""
    words = []
    for i in ids:
        i = int(i)
        if i == SPECIAL_TOKENS.index(EOS):
            break
        if i >= len(SPECIAL_TOKENS):
            words.append(tok.id_to_token(i))
    text = re.sub(r" ([.,;:!?%)\]])", r"\1", " ".join(words))
    text = re.sub(r"([(\[]) ", r"\1", text)
    # the pre-tokenizer splits "man's", "close-up", "km/h" and "3.5" into three tokens: join them back
    # (an apostrophe only before a clitic: "said 'open' to" keeps its quotes apart)
    return re.sub(r"(?<=\w) ([-/]|['’](?= (?:s|t|d|m|re|ve|ll)\b)) (?=\w)|(?<=\d)(\.) (?=\d)", r"\1\2", text)


# ---------------------------------------------------------------- model

class MotionEncoder(nn.Module):
    """Motion tokens from pairs of consecutive sampled frames, on the ViT's patch grid.

    A per-frame ViT sees no motion, and a pooler over its tokens can only tell a pan from a
    tilt by matching content across frames at patch granularity. Like FlowNet-S, this stacks a
    frame with its difference to the next sampled frame (6 channels) and lets strided convs
    (one stride-2 stage per factor of 2 in patch_size) find the displacement at every scale.
    The output projection starts at zero, so the captioner starts as the motion-blind model.
    """

    def __init__(self, patch_size: int, width: int, channels: int):
        super().__init__()
        stages = int(round(math.log2(patch_size)))
        if 2 ** stages != patch_size:
            raise ValueError(f"motion tokens need a power-of-two patch_size, got {patch_size}")
        layers, c_in = [], 6
        for i in range(stages):
            c_out = min(channels * 2 ** i, width)
            k = 5 if i == 0 else 3
            layers += [nn.Conv2d(c_in, c_out, k, stride=2, padding=k // 2), nn.GELU()]
            c_in = c_out
        self.convs = nn.Sequential(*layers)
        self.proj = nn.Conv2d(c_in, width, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, 3, H, W) normalised frames -> (B, T, L, width); frame T-1 gets zeros."""
        B, T = x.shape[:2]
        pairs = torch.cat([x[:, :-1], x[:, 1:] - x[:, :-1]], dim=2)     # (B, T-1, 6, H, W)
        m = self.proj(self.convs(pairs.flatten(0, 1)))                  # (B*(T-1), D, g, g)
        m = m.flatten(2).transpose(1, 2).unflatten(0, (B, T - 1))       # (B, T-1, L, D)
        return torch.cat([m, torch.zeros_like(m[:, :1])], dim=1)        # (B, T, L, D)


def _spectra(x: torch.Tensor) -> torch.Tensor:
    """x (B, T, 3, H, W) -> (B, T, H, W//2+1): rfft2 of each frame's mean-removed, Hann-windowed luma."""
    g = x.mean(2)
    H, W = g.shape[-2:]
    win = torch.outer(torch.hann_window(H, periodic=False, device=x.device),
                      torch.hann_window(W, periodic=False, device=x.device))
    return torch.fft.rfft2((g - g.mean((-2, -1), keepdim=True)) * win)


def phase_correlation(x: torch.Tensor) -> torch.Tensor:
    """Global translation between consecutive frames, by phase correlation (what cv2.phaseCorrelate
    does), batched in torch. x (B, T, 3, H, W) -> (B, T-1, 3): (dx / W, dy / H, peak height).

    A camera pan or tilt moves the whole picture: the normalised cross-power spectrum of two frames
    then has one sharp peak at the shift. Zooms and object motion give a weak or central peak. A
    learned net can find this too, but not from the few hundred clips a small dataset has.
    """
    f = _spectra(x)
    H, W = x.shape[-2:]
    r = f[:, 1:] * f[:, :-1].conj()
    corr = torch.fft.irfft2(r / (r.abs() + 1e-6), s=(H, W)).flatten(2)  # (B, T-1, H*W)
    peak, idx = corr.max(-1)
    dy, dx = idx // W, idx % W
    dy = torch.where(dy >= H // 2, dy - H, dy).float() / H               # wrap to [-1/2, 1/2)
    dx = torch.where(dx >= W // 2, dx - W, dx).float() / W
    return torch.stack([dx, dy, peak], -1)


ZOOM_STEPS = torch.linspace(-0.16, 0.16, 9)  # candidate log magnifications, 0.04 apart (refined between)


def zoom_rate(x: torch.Tensor, shift: torch.Tensor | None = None, max_side: int = 64) -> torch.Tensor:
    """Log change of the view's size between consecutive frames: x (B, T, 3, H, W) -> (B, T-1),
    < 0 for a zoom in (the view shrinks, the picture grows), > 0 for a zoom out, ~0 for pans and holds.

    Each frame's luma (area-reduced to <= max_side px) is magnified about its centre by every
    ZOOM_STEPS factor, after undoing the pair's translation (`shift`: phase_correlation's dx/W,
    dy/H), and compared with the next frame over its central two-thirds; the best factor, refined
    by a parabola through its neighbours' errors, is the zoom. The spectral-centroid estimate this
    replaced gave the wrong sign or ~0 on half the demo benchmark's held-out zooms; this one
    separates zoom in / zoom out / no zoom on nearly all of them.
    """
    g = x.mean(2)
    B, T, H, W = g.shape
    if max(H, W) > max_side:
        g = F.interpolate(g, scale_factor=max_side / max(H, W), mode="area")
        H, W = g.shape[-2:]
    n, steps = B * (T - 1), ZOOM_STEPS.to(x.device)
    K = len(steps)
    theta = torch.zeros(n, K, 2, 3, device=x.device)
    theta[..., 0, 0] = theta[..., 1, 1] = (-steps).exp()                 # sample the source at p / m
    if shift is not None:                                                # ... minus the content shift
        theta[..., 0, 2] = -2 * shift[..., 0].reshape(n, 1)
        theta[..., 1, 2] = -2 * shift[..., 1].reshape(n, 1)
    grid = F.affine_grid(theta.flatten(0, 1), (n * K, 1, H, W), align_corners=False)
    src = g[:, :-1].reshape(n, 1, 1, H, W).expand(n, K, 1, H, W).reshape(n * K, 1, H, W)
    warped = F.grid_sample(src, grid, padding_mode="border", align_corners=False).view(n, K, H, W)
    h, w = H // 6, W // 6
    err = (warped - g[:, 1:].reshape(n, 1, H, W))[..., h:H - h, w:W - w].pow(2).mean((-2, -1))  # (n, K)
    k = err.argmin(1).clamp(1, K - 2)
    e0, e1, e2 = (err.gather(1, (k + d)[:, None])[:, 0] for d in (-1, 0, 1))
    offset = (0.5 * (e0 - e2) / (e0 - 2 * e1 + e2).clamp_min(1e-12)).clamp(-1, 1)
    return -(steps[k] + offset * (steps[1] - steps[0])).view(B, T - 1)


def camera_features(x: torch.Tensor) -> torch.Tensor:
    """(B, T, 3, H, W) -> (B, T-1, 4): dx, dy (x20: a few pixels are ~0.05 of the frame), phase
    correlation peak, zoom rate (x20: a zoom changes the view ~5% between sampled frames)."""
    pc = phase_correlation(x)
    return torch.cat([pc * torch.tensor([20.0, 20.0, 1.0], device=x.device),
                      20 * zoom_rate(x, pc[..., :2])[..., None]], -1)


HSV_BINS = (24, 4, 4)  # hue (15 degrees each) x saturation x value


def color_histogram(frames: torch.Tensor, bins: tuple = HSV_BINS) -> torch.Tensor:
    """frames (B, T, H, W, 3) uint8 RGB -> (B, prod(bins)): the square root of the share of the
    clip's pixels in each hue x saturation x value bin (square root: a colour on a tenth of the
    picture is still a feature of its own, next to one on half of it)."""
    x = frames.flatten(1, 3).float() / 255                                # (B, P, 3)
    v, arg = x.max(-1)
    c = v - x.min(-1).values
    s = torch.where(v > 0, c / v.clamp_min(1e-6), torch.zeros_like(v))
    r, g, b = x.unbind(-1)
    cc = c.clamp_min(1e-6)
    h = torch.where(arg == 0, ((g - b) / cc) % 6, torch.where(arg == 1, (b - r) / cc + 2, (r - g) / cc + 4)) / 6
    h = torch.where(c > 0, h, torch.zeros_like(h))                      # grey: hue 0 (saturation 0 tells)
    nh, ns, nv = bins
    idx = ((h * nh).long().clamp(0, nh - 1) * ns + (s * ns).long().clamp(0, ns - 1)) * nv \
        + (v * nv).long().clamp(0, nv - 1)
    hist = torch.zeros(x.shape[0], nh * ns * nv, device=x.device).scatter_add_(1, idx, torch.ones_like(v))
    return (hist / x.shape[1]).sqrt()


def _feature_mlp(n_in: int, width: int) -> nn.Module:
    """Hand-computed clip features (camera motion, colour histogram) -> a token of `width`."""
    return nn.Sequential(nn.Linear(n_in, width), nn.GELU(), nn.Linear(width, width))


class VideoCaptioner(nn.Module):
    def __init__(self, cfg: CaptionerConfig):
        super().__init__()
        if cfg.vocab_size <= len(SPECIAL_TOKENS):
            raise ValueError("CaptionerConfig.vocab_size must be set from the tokenizer")
        self.cfg = cfg
        self.visual = VisionTransformer(
            image_size=cfg.image_size, patch_size=cfg.patch_size, width=cfg.vision_width,
            layers=cfg.vision_layers, heads=cfg.vision_heads, mlp_ratio=4.0,
            output_dim=cfg.embed_dim, output_tokens=True)
        self.temporal_pos = nn.Parameter(torch.zeros(cfg.num_frames, cfg.vision_width))
        nn.init.normal_(self.temporal_pos, std=0.02)
        self.motion = (MotionEncoder(cfg.patch_size, cfg.vision_width, cfg.motion_channels)
                       if cfg.motion_channels > 0 else None)
        # camera_features -> a token per frame pair; the decoder also reads them directly (a
        # projection to its width): through the pooler alone, a small decoder learned to ignore them
        self.global_motion = _feature_mlp(4, cfg.vision_width) if cfg.global_motion else None
        self.motion_to_text = nn.Linear(cfg.vision_width, cfg.text_width) if cfg.global_motion else None
        self.colour = _feature_mlp(math.prod(HSV_BINS), cfg.vision_width) if cfg.color_token else None
        self.colour_to_text = nn.Linear(cfg.vision_width, cfg.text_width) if cfg.color_token else None
        self.spacetime = (Transformer(cfg.vision_width, cfg.temporal_layers, cfg.vision_heads)
                          if cfg.temporal_layers > 0 else None)
        self.pooler = AttentionalPooler(cfg.text_width, cfg.vision_width, n_head=cfg.pooler_heads,
                                        n_queries=1 + cfg.n_queries)
        self.ln_video = LayerNorm(cfg.text_width)
        self.ln_cond = LayerNorm(cfg.text_width)
        self.video_proj = nn.Linear(cfg.text_width, cfg.embed_dim, bias=False)
        self.text = GPT2LMHeadModel(GPT2Config(
            vocab_size=cfg.vocab_size, n_positions=cfg.max_text_len, n_embd=cfg.text_width,
            n_layer=cfg.text_layers, n_head=cfg.text_heads, add_cross_attention=True,
            resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
            bos_token_id=SPECIAL_TOKENS.index(SHORT), eos_token_id=SPECIAL_TOKENS.index(EOS),
            pad_token_id=SPECIAL_TOKENS.index(PAD)))
        self.text_proj = nn.Linear(cfg.text_width, cfg.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's init
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 1, 3, 1, 1), persistent=False)

    def encode_video(self, frames: torch.Tensor):
        """frames (B, T, H, W, 3) uint8 at image_size -> (video_emb (B, E) unit-norm, cond (B, N, Dt))."""
        B, T = frames.shape[:2]
        if T != self.cfg.num_frames:
            raise ValueError(f"expected {self.cfg.num_frames} frames per clip, got {T}")
        x = frames.permute(0, 1, 4, 2, 3).float().div(255)              # (B, T, 3, H, W)
        x = (x - self.mean) / self.std
        _, tokens = self.visual(x.flatten(0, 1))                        # (B*T, L, Dv)
        tokens = tokens.view(B, T, -1, tokens.shape[-1]) + self.temporal_pos[None, :, None]
        if self.motion is not None:
            tokens = tokens + self.motion(x)                            # (B, T, L, Dv)
        tokens = tokens.flatten(1, 2)                                   # (B, T*L, Dv)
        direct = []                                                     # tokens the decoder also reads
        if self.global_motion is not None:                              # + (B, T-1, Dv) camera tokens
            gm = self.global_motion(camera_features(x)) + self.temporal_pos[None, :-1]
            tokens = torch.cat([tokens, gm], dim=1)
            direct.append(self.motion_to_text(gm))
        if self.colour is not None:                                     # + (B, 1, Dv) colour token
            ct = self.colour(color_histogram(frames))[:, None]
            tokens = torch.cat([tokens, ct], dim=1)
            direct.append(self.colour_to_text(ct))
        if self.spacetime is not None:
            tokens = self.spacetime(tokens)
        pooled = self.pooler(tokens)                                    # (B, 1+N, Dt)
        video_emb = F.normalize(self.video_proj(self.ln_video(pooled[:, 0])), dim=-1)
        cond = torch.cat([pooled[:, 1:], *direct], dim=1)               # (B, N [+ T-1] [+ 1], Dt)
        return video_emb, self.ln_cond(cond)

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        """Caption ids (B, L), right-padded with <pad> -> unit-norm text embedding (B, E).

        The decoder without cross-attention is a unimodal causal LM; its final hidden state at
        the <eos> (the last non-pad token) has read the whole caption.
        """
        mask = ids != SPECIAL_TOKENS.index(PAD)
        hidden = self.text(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        last = mask.sum(1) - 1                                           # (B,)
        h = hidden[torch.arange(ids.shape[0]), last]
        return F.normalize(self.text_proj(h), dim=-1)

    def step(self, ids: torch.Tensor, cond: torch.Tensor, cache=None):
        """One decoder call: ids (B, L) new tokens -> (logits (B, L, V), cache)."""
        out = self.text(input_ids=ids, encoder_hidden_states=cond, cache=cache, use_cache=True)
        return out.logits, out.cache

    def forward(self, frames: torch.Tensor, ids: torch.Tensor, contrastive_weight: float = 1.0):
        """Training losses. frames (B, T, H, W, 3) uint8; ids (B, L) = [style, words, <eos>, <pad>...].

        Returns {"loss", "caption_loss", "contrastive_loss"}: next-token cross-entropy over
        non-pad targets, plus symmetric CLIP InfoNCE between the video and caption embeddings.
        """
        video_emb, cond = self.encode_video(frames)
        inputs = ids[:, :-1]
        logits = self.text(input_ids=inputs, attention_mask=inputs != SPECIAL_TOKENS.index(PAD),
                           encoder_hidden_states=cond).logits
        targets = ids[:, 1:].masked_fill(ids[:, 1:] == SPECIAL_TOKENS.index(PAD), -100)
        caption_loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        contrastive_loss = torch.zeros((), device=frames.device)
        if contrastive_weight > 0 and frames.shape[0] > 1:
            text_emb = self.encode_text(ids)
            # the scale is kept >= 10: at ~0 the loss is flat (ln B) and the embeddings stop learning
            scale = self.logit_scale.clamp(math.log(10), math.log(100)).exp()
            sim = scale * video_emb @ text_emb.T                          # (B, B)
            # identical captions in a batch are all positives (captions repeat across clips)
            same = (ids[:, None, :] == ids[None, :, :]).all(-1).float()
            targets = same / same.sum(1, keepdim=True)
            contrastive_loss = (F.cross_entropy(sim, targets) + F.cross_entropy(sim.T, targets)) / 2
        loss = caption_loss + contrastive_weight * contrastive_loss
        return {"loss": loss, "caption_loss": caption_loss, "contrastive_loss": contrastive_loss}


def load_open_clip_vision(model: VideoCaptioner, model_name: str, pretrained: str) -> None:
    """Copy a real open_clip image tower (e.g. "ViT-B-32" from a LOCAL weights file) into `model`.

    The config must match the tower (preset "base" matches ViT-B-32). `pretrained` is a path;
    open_clip loads it without network access.
    """
    import open_clip  # only needed here
    if not Path(pretrained).is_file():
        raise FileNotFoundError(f"open_clip weights not found: {pretrained}")
    clip = open_clip.create_model(model_name, pretrained=pretrained)
    model.visual.load_state_dict(clip.visual.state_dict())


# ---------------------------------------------------------------- checkpoints

TIED = "text.lm_head.weight"  # the same tensor as text.transformer.wte.weight

def save_captioner(model: VideoCaptioner, tok: Tokenizer, out_dir) -> Path:
    """Write config.json, model.safetensors and tokenizer.json into out_dir (created)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # lm_head shares its weight with the token embedding: store it once, re-tied on load
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if k != TIED}
    save_file(state, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(asdict(model.cfg), indent=2))
    tok.save(str(out / "tokenizer.json"))
    return out


def load_captioner(ckpt_dir, device="cpu"):
    """Checkpoint dir -> (model in eval mode, tokenizer). Raises ValueError naming a bad file."""
    d = Path(ckpt_dir)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (d / name).is_file():
            raise FileNotFoundError(f"captioner checkpoint is missing {d / name}")
    try:
        cfg = CaptionerConfig(**json.loads((d / "config.json").read_text()))
    except (json.JSONDecodeError, TypeError) as e:
        raise ValueError(f"corrupt captioner config {d / 'config.json'}: {e}") from e
    try:
        tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON
        raise ValueError(f"corrupt tokenizer {d / 'tokenizer.json'}: {e}") from e
    try:
        state = load_file(d / "model.safetensors")
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"corrupt captioner weights {d / 'model.safetensors'}: {e}") from e
    model = VideoCaptioner(cfg)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
        if set(missing) != {TIED} or unexpected:
            raise RuntimeError(f"missing {sorted(set(missing) - {TIED})}, unexpected {unexpected}")
    except RuntimeError as e:
        raise ValueError(f"weights in {d / 'model.safetensors'} do not match config.json: {e}") from e
    return model.to(device).eval(), tok


def checkpoint_hash(ckpt_dir) -> str:
    """'captioner-' + first 16 hex of sha256(model.safetensors): the caption_model value."""
    h = hashlib.sha256()
    with open(Path(ckpt_dir) / "model.safetensors", "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "captioner-" + h.hexdigest()[:16]
