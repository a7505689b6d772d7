"""Spacetime patches and Patch n' Pack.

A latent (C, T, H, W) is cut into p_t x p_h x p_w patches, each flattened to one token of
C * p_t * p_h * p_w values, in (t, h, w) raster order. A batch of latents of different durations
and aspect ratios is packed into ONE (N_tokens, D) sequence with cu_seqlens (cumulative token
counts, int32, B + 1 entries) and per-token grid positions (t, h, w) for 3D RoPE — no padding.
"""
import warnings
from dataclasses import dataclass

import torch
from einops import rearrange


def check_divisible(shape, patch):
    """Raise ValueError unless latent (C, T, H, W) divides into the patch grid."""
    _, T, H, W = shape
    pt, ph, pw = patch
    if T % pt or H % ph or W % pw:
        raise ValueError(f"latent (T, H, W) = {(T, H, W)} is not divisible by patch {tuple(patch)}; "
                         f"crop with crop_to_patch() or choose a bucket that fits")


def crop_to_patch(latent, patch):
    """Crop a latent (C, T, H, W) down to the patch grid, warning when anything is cut. Frames are
    cut from the end (frame 0 carries the causal start), rows/columns from the bottom/right."""
    _, T, H, W = latent.shape
    pt, ph, pw = patch
    T2, H2, W2 = T - T % pt, H - H % ph, W - W % pw
    if (T2, H2, W2) != (T, H, W):
        warnings.warn(f"cropping latent {(T, H, W)} to {(T2, H2, W2)} to fit patch {tuple(patch)}")
    return latent[:, :T2, :H2, :W2]


def patchify(latent, patch):
    """(C, T, H, W) -> tokens (T/pt * H/ph * W/pw, C*pt*ph*pw), grid (T/pt, H/ph, W/pw)."""
    check_divisible(latent.shape, patch)
    pt, ph, pw = patch
    tokens = rearrange(latent, "c (t pt) (h ph) (w pw) -> (t h w) (c pt ph pw)", pt=pt, ph=ph, pw=pw)
    _, T, H, W = latent.shape
    return tokens, (T // pt, H // ph, W // pw)


def unpatchify(tokens, grid, patch, channels: int):
    """Inverse of patchify: tokens (t*h*w, C*pt*ph*pw) -> (C, t*pt, h*ph, w*pw)."""
    t, h, w = grid
    pt, ph, pw = patch
    return rearrange(tokens, "(t h w) (c pt ph pw) -> c (t pt) (h ph) (w pw)",
                     t=t, h=h, w=w, c=channels, pt=pt, ph=ph, pw=pw)


def grid_positions(grid, device=None):
    """(t*h*w, 3) long tensor of each token's (t, h, w) grid index, raster order."""
    t, h, w = grid
    axes = [torch.arange(n, device=device) for n in (t, h, w)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)


@dataclass
class Packed:
    """One packed sequence: tokens (N, D); cu_seqlens (B+1,) int32; positions (N, 3) long (t, h, w);
    grids: each sample's (t, h, w) patch grid; patch and channels to unpack."""
    tokens: torch.Tensor
    cu_seqlens: torch.Tensor
    positions: torch.Tensor
    grids: list
    patch: tuple
    channels: int

    @property
    def seqlens(self):
        return self.cu_seqlens[1:] - self.cu_seqlens[:-1]

    @property
    def max_seqlen(self) -> int:
        return int(self.seqlens.max())

    def sample_index(self):
        """(N,) long: which sample each token belongs to."""
        return torch.repeat_interleave(torch.arange(len(self.grids), device=self.tokens.device),
                                       self.seqlens.long())

    def to(self, device):
        return Packed(self.tokens.to(device), self.cu_seqlens.to(device), self.positions.to(device),
                      self.grids, self.patch, self.channels)


def pack(latents, patch=(1, 2, 2)) -> Packed:
    """Pack a list of latents (C, T_i, H_i, W_i) (sizes may differ) into one Packed sequence."""
    toks, pos, grids = [], [], []
    for z in latents:
        tk, g = patchify(z, patch)
        toks.append(tk)
        pos.append(grid_positions(g, z.device))
        grids.append(g)
    lens = torch.tensor([0] + [len(t) for t in toks])
    cu = torch.cumsum(lens, 0).to(torch.int32).to(latents[0].device)
    return Packed(torch.cat(toks), cu, torch.cat(pos), grids, tuple(patch), latents[0].shape[0])


def unpack(tokens, packed: Packed):
    """Split a (N, D) token tensor laid out like `packed` back into the list of latents (C, T, H, W)."""
    cu = packed.cu_seqlens.tolist()
    return [unpatchify(tokens[a:b], g, packed.patch, packed.channels)
            for a, b, g in zip(cu[:-1], cu[1:], packed.grids)]


def pack_sequences(seqs):
    """Concatenate variable-length (L_i, D) sequences (e.g. text tokens) -> ((sum L_i, D), cu_seqlens int32)."""
    lens = torch.tensor([0] + [len(s) for s in seqs])
    return torch.cat(seqs), torch.cumsum(lens, 0).to(torch.int32).to(seqs[0].device)
