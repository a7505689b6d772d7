"""Causal 3D-convolutional VAE: the video compression network.

Videos are (B, 3, T, H, W) in [-1, 1]. The encoder compresses 4x in time and 8x in space (by default)
into a KL-regularised latent of C channels. With patch_size p > 1 the encoder first folds p x p
pixels into channels (space-to-depth, as LTX-Video's VAE does) and the decoder unfolds them last:
the full-resolution 3D convolutions are most of a small VAE's cost. Time is causal: frame 0 is
encoded on its own, so an image is a 1-frame video, and T = 1 + 4k frames map to 1 + k latent frames.

Every temporal convolution pads only the past. That makes chunked processing exact: encode frame 0,
then chunks of 4m frames, with each causal conv carrying its last (k_t - 1) input frames into the
next chunk. Spatial tiling with linearly blended overlaps bounds the frame size per pass. Together
they keep peak memory flat as videos get longer or larger (a 2048x2048 image decodes tile by tile).
Norms are per-pixel RMS over channels, so nothing but the convolutions' receptive field couples
pixels — which is what makes tiling nearly exact.

Only torch + einops + safetensors at import: this file runs on a bare GPU box.
"""
import json
import math
import os
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from safetensors.torch import load_file, save_file


@dataclass
class VAEConfig:
    in_channels: int = 3
    channels: tuple = (64, 128, 256, 256)  # one stage per entry; len-1 spatial 2x downsamplings
    time_downsample: int = 2               # how many of the (last) downsamplings also halve time
    res_blocks: int = 1                    # residual blocks per stage
    latent_channels: int = 4
    scaling_factor: float = 1.0            # latents are multiplied by this for the DiT (1/std of data latents)
    shift_factor: float = 0.0              # ... after subtracting this (mean of data latents; SD3's shift/scale)
    patch_size: int = 1                    # pixel (un)shuffle at input/output: p x p pixels -> one position

    def __post_init__(self):
        # each time halving rides on a spatial downsampling: more than there are stages would
        # build a net that compresses time less than time_factor says (a shape error much later)
        if not 0 <= self.time_downsample <= len(self.channels) - 1:
            raise ValueError(f"time_downsample must be 0..{len(self.channels) - 1} (one per downsampling "
                             f"between the {len(self.channels)} stages of channels={tuple(self.channels)}), "
                             f"got {self.time_downsample}")
        if self.patch_size < 1:
            raise ValueError(f"patch_size must be >= 1, got {self.patch_size}")

    @classmethod
    def from_dict(cls, d: dict) -> "VAEConfig":
        return cls(**{**d, "channels": tuple(d["channels"])})

    @property
    def space_factor(self) -> int:
        return self.patch_size * 2 ** (len(self.channels) - 1)

    @property
    def time_factor(self) -> int:
        return 2 ** self.time_downsample


class ChannelRMSNorm(nn.Module):
    """RMS norm over channels at each (t, h, w) position: pointwise, so chunk- and tile-safe."""

    def __init__(self, c: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(c, 1, 1, 1))

    def forward(self, x):  # (B, C, T, H, W)
        return x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + 1e-6) * self.weight


class CausalConv3d(nn.Module):
    """3D conv padded only on the past in time. Keeps the last (k_t - 1) input frames in `cache` so
    the next chunk continues exactly where this one stopped; `cache=None` means 'start of video'
    (pad by repeating frame 0)."""

    def __init__(self, cin: int, cout: int, k: int = 3, k_t: int | None = None):
        super().__init__()
        self.k_t = k if k_t is None else k_t
        self.conv = nn.Conv3d(cin, cout, (self.k_t, k, k), padding=(0, k // 2, k // 2))
        self.cache = None

    def forward(self, x):  # (B, C, T, H, W)
        if self.k_t > 1 and self.cache is None and x.shape[2] == 1:
            # a video's first frame alone (every image, frame 0 of every video): each temporal tap sees
            # that frame, so the 3D conv is a 2D conv with the taps' weights summed -- k_t times fewer FLOPs
            self.cache = x.expand(-1, -1, self.k_t - 1, -1, -1).clone()
            w = self.conv.weight.sum(2)
            return F.conv2d(x[:, :, 0], w, self.conv.bias, padding=self.conv.padding[1:])[:, :, None]
        if self.k_t > 1:
            past = x[:, :, :1].expand(-1, -1, self.k_t - 1, -1, -1) if self.cache is None else self.cache
            x = torch.cat([past, x], 2)
            # clone: a view would keep the whole chunk alive until the next call
            self.cache = x[:, :, -(self.k_t - 1):].clone()
        return self.conv(x)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = ChannelRMSNorm(cin), CausalConv3d(cin, cout)
        self.norm2, self.conv2 = ChannelRMSNorm(cout), CausalConv3d(cout, cout)
        self.skip = nn.Conv3d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class SpaceDown(nn.Module):
    """Halve H and W, frame by frame (no time coupling)."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv3d(c, c, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))

    def forward(self, x):
        return self.conv(x)


class SpaceUp(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv3d(c, c, (1, 3, 3), padding=(0, 1, 1))

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=(1, 2, 2), mode="nearest"))


class TimeDown(nn.Module):
    """Halve time by folding frame pairs into channels. The first chunk of a video is frame 0 alone:
    it is paired with itself, so an image goes through the same weights."""

    def __init__(self, c: int):
        super().__init__()
        self.proj = nn.Conv3d(2 * c, c, 1)
        self.started = False

    def forward(self, x):  # (B, C, T, H, W)
        if not self.started:
            self.started = True
            if x.shape[2] != 1:
                raise ValueError(f"first chunk must be frame 0 alone, got {x.shape[2]} frames")
            x = torch.cat([x, x], 1)
        else:
            if x.shape[2] % 2:
                raise ValueError(f"chunk after frame 0 needs an even frame count, got {x.shape[2]}")
            x = rearrange(x, "b c (t two) h w -> b (two c) t h w", two=2)
        return self.proj(x)


class TimeUp(nn.Module):
    """Double time (inverse of TimeDown); the first latent frame expands to one frame."""

    def __init__(self, c: int):
        super().__init__()
        self.proj = nn.Conv3d(c, 2 * c, 1)
        self.started = False

    def forward(self, x):
        x = self.proj(x)
        if not self.started:
            self.started = True
            return x[:, x.shape[1] // 2:]
        return rearrange(x, "b (two c) t h w -> b c (t two) h w", two=2)


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch = cfg.channels
        n_down = len(ch) - 1
        self.patch = cfg.patch_size
        self.conv_in = CausalConv3d(cfg.in_channels * self.patch ** 2, ch[0])
        layers = []
        for i, c in enumerate(ch):
            cin = ch[max(i - 1, 0)]
            for j in range(cfg.res_blocks):
                layers.append(ResBlock(cin if j == 0 else c, c))
            if i < n_down:
                layers.append(SpaceDown(c))
                if i >= n_down - cfg.time_downsample:  # halve time at the coarse stages: cheaper
                    layers.append(TimeDown(c))
        self.layers = nn.Sequential(*layers)
        self.mid = ResBlock(ch[-1], ch[-1])
        self.norm_out = ChannelRMSNorm(ch[-1])
        self.conv_out = CausalConv3d(ch[-1], 2 * cfg.latent_channels)
        # start nearly deterministic (posterior std ~0.05): with std 1 the decoder first sees mostly
        # noise and learns only the background for hundreds of steps
        with torch.no_grad():
            self.conv_out.conv.bias[cfg.latent_channels:] = -6.0

    def forward(self, x):  # (B, 3, T, H, W) -> (B, 2C, t, h, w): mean and log-variance
        # space-to-depth first: the full-resolution convolutions dominate the cost, and p x p pixels
        # folded into channels lose nothing (the decoder unfolds them exactly)
        x = rearrange(x, "b c t (h p) (w q) -> b (c p q) t h w", p=self.patch, q=self.patch)
        h = self.mid(self.layers(self.conv_in(x)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch = tuple(reversed(cfg.channels))
        n_up = len(ch) - 1
        self.conv_in = CausalConv3d(cfg.latent_channels, ch[0])
        self.mid = ResBlock(ch[0], ch[0])
        layers = []
        for i, c in enumerate(ch):
            cin = ch[max(i - 1, 0)]
            for j in range(cfg.res_blocks):
                layers.append(ResBlock(cin if j == 0 else c, c))
            if i < n_up:
                if i < cfg.time_downsample:
                    layers.append(TimeUp(c))
                layers.append(SpaceUp(c))
        self.layers = nn.Sequential(*layers)
        self.norm_out = ChannelRMSNorm(ch[-1])
        self.patch = cfg.patch_size
        self.conv_out = CausalConv3d(ch[-1], cfg.in_channels * self.patch ** 2)

    def forward(self, z):  # (B, C, t, h, w) -> (B, 3, T, H, W)
        h = self.layers(self.mid(self.conv_in(z)))
        x = self.conv_out(F.silu(self.norm_out(h)))
        return rearrange(x, "b (c p q) t h w -> b c t (h p) (w q)", p=self.patch, q=self.patch)


def _reset_stream(module: nn.Module):
    """Forget the causal caches: the next input is the start of a new video."""
    for m in module.modules():
        if isinstance(m, CausalConv3d):
            m.cache = None
        elif isinstance(m, (TimeDown, TimeUp)):
            m.started = False


def _run_causal(net: nn.Module, x, first: int, chunk: int | None, sink):
    """Run `net` over time: the first `first` frames alone, then chunks of `chunk` frames (None:
    all the rest at once), carrying the causal caches. `sink(t0, y)` receives each output chunk
    and its starting output frame."""
    _reset_stream(net)
    T = x.shape[2]
    bounds = [0, min(first, T)]
    step = chunk or max(T - first, 1)
    while bounds[-1] < T:
        bounds.append(min(bounds[-1] + step, T))
    t_out = 0
    for a, b in zip(bounds[:-1], bounds[1:]):
        y = net(x[:, :, a:b])
        sink(t_out, y)
        t_out += y.shape[2]
    _reset_stream(net)


def _tiles(size: int, tile: int, overlap: int):
    """Start offsets covering [0, size) with windows of `tile` overlapping by at least `overlap`."""
    if tile >= size:
        return [0]
    stride = tile - overlap
    starts = list(range(0, size - tile, stride)) + [size - tile]
    return starts


def _ramp(n: int, overlap: int, lo_edge: bool, hi_edge: bool, device):
    """1D blending weight for a tile of n samples: rises over `overlap` at interior edges."""
    w = torch.ones(n, device=device)
    if overlap > 0:
        r = (torch.arange(overlap, device=device) + 0.5) / overlap
        if not lo_edge:
            w[:overlap] = torch.minimum(w[:overlap], r)
        if not hi_edge:
            w[-overlap:] = torch.minimum(w[-overlap:], r.flip(0))
    return w


class DiagonalGaussian:
    def __init__(self, moments):  # (B, 2C, t, h, w)
        self.mean, logvar = moments.chunk(2, 1)
        self.logvar = logvar.clamp(-30.0, 20.0)

    def sample(self, generator=None):
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + torch.exp(0.5 * self.logvar) * noise

    def kl(self):
        """KL to N(0, I), mean over all latent elements."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar).mean()


class VAE(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    def latent_shape(self, frames: int, height: int, width: int):
        """(C, t, h, w) latent of a video of `frames` x `height` x `width` pixels."""
        self._check(frames, height, width)
        f, s = self.cfg.time_factor, self.cfg.space_factor
        return (self.cfg.latent_channels, 1 + (frames - 1) // f, height // s, width // s)

    def to_dit(self, z):
        """Posterior latents -> the DiT's zero-mean, unit-std latents. A flat dark background puts the raw
        mean far from 0, and an unshifted flow spends its capacity learning that offset."""
        return (z - self.cfg.shift_factor) * self.cfg.scaling_factor

    def from_dit(self, z):
        return z / self.cfg.scaling_factor + self.cfg.shift_factor

    def fit_latent_stats(self, means):
        """Set shift and scale from posterior means of the training data (any shape), so to_dit gives
        zero mean and unit std. A new config: the one passed to VAE() may be shared with other VAEs."""
        self.cfg = replace(self.cfg, shift_factor=float(means.mean()),
                           scaling_factor=float(1.0 / means.std().clamp_min(1e-6)))

    def _check(self, T, H, W):
        f, s = self.cfg.time_factor, self.cfg.space_factor
        if (T - 1) % f:
            raise ValueError(f"frames must be 1 + {f}k (frame 0 is encoded alone), got {T}")
        if H % s or W % s:
            raise ValueError(f"height and width must be multiples of {s}, got {H}x{W}")

    def encode(self, x, chunk_frames: int | None = None, tile: int | None = None, overlap: int = 64):
        """Video (B, 3, T, H, W) in [-1, 1] -> DiagonalGaussian over (B, C, 1 + (T-1)/4, H/8, W/8).

        chunk_frames: frames per temporal chunk after frame 0 (a multiple of the time factor);
        None processes them in one pass. tile / overlap: spatial tile size and overlap in pixels
        (multiples of the space factor); None: no tiling."""
        B, _, T, H, W = x.shape
        self._check(T, H, W)
        f, s = self.cfg.time_factor, self.cfg.space_factor
        self._check_chunk(chunk_frames)
        self._check_tiling(tile, overlap)
        t_lat = 1 + (T - 1) // f
        out = x.new_zeros(B, 2 * self.cfg.latent_channels, t_lat, H // s, W // s)
        self._tiled(x, out, self.encoder, 1, chunk_frames, tile, overlap, s, 1)
        return DiagonalGaussian(out)

    def decode(self, z, chunk_frames: int | None = None, tile: int | None = None, overlap: int = 64):
        """Latents (B, C, t, h, w) -> video (B, 3, 1 + 4(t-1), 8h, 8w).

        chunk_frames / tile / overlap are in *output pixel* units, as for `encode`."""
        B, _, t, h, w = z.shape
        f, s = self.cfg.time_factor, self.cfg.space_factor
        self._check_chunk(chunk_frames)
        self._check_tiling(tile, overlap)
        out = z.new_zeros(B, self.cfg.in_channels, 1 + (t - 1) * f, h * s, w * s)
        lat_chunk = None if chunk_frames is None else chunk_frames // f
        lat_tile = None if tile is None else tile // s
        self._tiled(z, out, self.decoder, 1, lat_chunk, lat_tile, overlap // s, 1, s)
        return out

    def _check_chunk(self, chunk_frames):
        # a negative chunk passed `% f` (-4 % 4 == 0) and the chunk loop stepped backwards forever
        f = self.cfg.time_factor
        if chunk_frames is not None and (chunk_frames < 1 or chunk_frames % f):
            raise ValueError(f"chunk_frames must be a positive multiple of {f}, got {chunk_frames}")

    def _check_tiling(self, tile, overlap):
        s = self.cfg.space_factor
        if tile is not None and (tile % s or overlap % s or not 0 <= overlap < tile):
            raise ValueError(f"tile ({tile}) and overlap ({overlap}) must be multiples of {s} with overlap < tile")

    def _tiled(self, x, out, net, first, chunk, tile, overlap, shrink, grow):
        """Run `net` tile by tile (tile/overlap in x's units), accumulating blended outputs into `out`.
        Output spatial size = input size // shrink * grow."""
        H, W = x.shape[-2:]
        tile_h = H if tile is None else min(tile, H)
        tile_w = W if tile is None else min(tile, W)
        ys, xs = _tiles(H, tile_h, overlap), _tiles(W, tile_w, overlap)
        if len(ys) == 1 and len(xs) == 1:
            def sink(t0, y):
                out[:, :, t0:t0 + y.shape[2]] = y
            _run_causal(net, x, first, chunk, sink)
            return
        weight = torch.zeros(out.shape[-2:], device=out.device, dtype=out.dtype)
        ov = overlap // shrink * grow
        for y0 in ys:
            for x0 in xs:
                wy = _ramp(tile_h // shrink * grow, ov, y0 == 0, y0 + tile_h == H, out.device)
                wx = _ramp(tile_w // shrink * grow, ov, x0 == 0, x0 + tile_w == W, out.device)
                w2 = (wy[:, None] * wx[None, :]).to(out.dtype)
                oy, ox = y0 // shrink * grow, x0 // shrink * grow
                sl = (slice(oy, oy + w2.shape[0]), slice(ox, ox + w2.shape[1]))

                def sink(t0, y, sl=sl, w2=w2):
                    out[:, :, t0:t0 + y.shape[2], sl[0], sl[1]] += y * w2
                _run_causal(net, x[..., y0:y0 + tile_h, x0:x0 + tile_w], first, chunk, sink)
                weight[sl] += w2
        out /= weight

    def forward(self, x, generator=None):
        """Training pass: x (B, 3, T, H, W) -> (reconstruction, posterior)."""
        post = self.encode(x)
        return self.decode(post.sample(generator)), post


def vae_loss(x, rec, post: DiagonalGaussian, kl_weight: float = 1e-4, l1_weight: float = 1.0, l2_weight: float = 1.0,
             perceptual=None, perceptual_weight: float = 0.1):
    """l1_weight * L1 + l2_weight * MSE reconstruction + kl_weight * KL. The MSE term matters for small moving
    objects: L1 alone settles on the per-pixel median (the background) and stalls there.
    `perceptual`, if given, is a callable (rec, x) -> scalar (e.g. an LPIPS net built from local
    weights); it is only used when supplied."""
    err = rec - x
    loss = l1_weight * err.abs().mean() + l2_weight * err.pow(2).mean() + kl_weight * post.kl()
    if perceptual is not None:
        loss = loss + perceptual_weight * perceptual(rec, x)
    return loss


def psnr(x, y) -> float:
    """PSNR in dB of two videos in [-1, 1]."""
    mse = ((x.float() - y.float()) / 2).pow(2).mean().item()
    return 10 * math.log10(1.0 / max(mse, 1e-12))


def load_state_strict(module: nn.Module, state: dict, what: str, load: bool = True):
    """load_state_dict that names missing/unexpected keys and shape mismatches in one error
    (load=False: only check, for callers that load another way, e.g. sharded)."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or shapes:
        raise ValueError(f"{what} checkpoint does not match the model: missing keys {missing[:10]}, "
                         f"unexpected keys {unexpected[:10]}, shape mismatches {shapes[:10]}")
    if load:
        module.load_state_dict(state)


def save_with_config(module: nn.Module, path: str):
    """Weights + the module's dataclass config (`module.cfg`) to one safetensors file, written beside
    it and renamed into place: a kill or a full disk never leaves a torn file under the real name
    (a resumed train-vae re-saves over the previous one)."""
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    tmp = f"{path}.partial.{os.getpid()}"
    try:
        save_file(state, tmp, metadata={"config": json.dumps(asdict(module.cfg))})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_with_config(path: str, build, cfg, device="cpu", what: str = "model"):
    """`build(cfg)` from `cfg`, or from the config stored by save_with_config (a dict passed to
    `cfg_from_dict`, given as `cfg` when it is callable), then load the weights strictly."""
    if callable(cfg):
        from safetensors import safe_open
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
        if "config" not in meta:  # e.g. a DiT training checkpoint passed as --vae: was KeyError: 'config'
            raise ValueError(f"{path} is not a {what} file: it stores no model config"
                             + (" (a DiT training checkpoint? it goes to --checkpoint)" if "train" in meta else ""))
        try:
            cfg = cfg(json.loads(meta["config"]))
        except (TypeError, KeyError) as e:  # another model's config (a save_dit file as the VAE, say)
            raise ValueError(f"{path} is not a {what} file: its config is another model's ({e})") from None
    module = build(cfg)
    load_state_strict(module, load_file(path, device=str(device)), what)
    return module.to(device)


def save_vae(vae: VAE, path: str):
    save_with_config(vae, path)


def load_vae(path: str, cfg: VAEConfig | None = None, device="cpu") -> VAE:
    """Build a VAE from the config stored in `path` (or the given cfg) and load its weights strictly."""
    return load_with_config(path, VAE, cfg or VAEConfig.from_dict,
                            device, "VAE")
