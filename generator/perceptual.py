"""LPIPS-style perceptual distance (Zhang et al. 2018) on VGG16 features loaded from a local file.

The VAE's optional perceptual loss. Nothing is downloaded: the VGG16 weights come from a file the
user gives (torchvision's `vgg16` state dict, or just its `features.*` part, as safetensors or a
torch file read with weights_only=True), and, optionally, LPIPS's learned per-channel weights
(the `lpips` package's `weights/v0.1/vgg.pth`: `lin0.model.1.weight` ... `lin4`). Without them
every channel weighs the same (LPIPS's "baseline" variant).

Distance of two frames: scale the input as LPIPS does, take the five ReLU outputs relu1_2 ...
relu5_3, unit-normalise each position's feature vector, square the difference, weight the channels,
average over space, sum over the five layers. Videos (B, 3, T, H, W) are scored frame by frame.
"""
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file

from generator.vae import load_state_strict

# the layer index after each of VGG16's relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
_CUTS = (4, 9, 16, 23, 30)
_WIDTHS = (64, 128, 256, 512, 512)


def _read_state(path: str) -> dict:
    """A state dict from safetensors, or a torch file unpickled with weights_only=True (never arbitrary code)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"perceptual weights not found: {p}")
    if p.suffix == ".safetensors":
        return load_file(str(p))
    state = torch.load(str(p), map_location="cpu", weights_only=True)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{p} holds no state dict of tensors")
    return state


class Perceptual(nn.Module):
    """Frozen LPIPS-style distance: forward(rec, x) -> mean distance over the batch's frames."""

    def __init__(self, vgg_weights: str, lin_weights: str | None = None):
        super().__init__()
        from torchvision.models import vgg16  # imported only when a perceptual loss is asked for

        features = vgg16(weights=None).features[:_CUTS[-1]]
        state = _read_state(vgg_weights)
        state = {k.removeprefix("features."): v for k, v in state.items() if not k.startswith("classifier.")}
        load_state_strict(features, state, "VGG16 features")
        self.slices = nn.ModuleList(features[a:b] for a, b in zip((0,) + _CUTS[:-1], _CUTS))
        if lin_weights:
            lin = _read_state(lin_weights)
            want = {f"lin{i}.model.1.weight": (1, c, 1, 1) for i, c in enumerate(_WIDTHS)}
            bad = {k: tuple(lin[k].shape) if k in lin else None for k in want if k not in lin or tuple(lin[k].shape) != want[k]}
            if bad:
                raise ValueError(f"LPIPS linear weights {lin_weights} do not match VGG16: {bad} (want {want})")
            ws = [lin[k].reshape(-1) for k in want]
        else:
            ws = [torch.ones(c) for c in _WIDTHS]
        for i, w in enumerate(ws):
            self.register_buffer(f"w{i}", w.float().reshape(1, -1, 1, 1), persistent=False)
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).reshape(1, 3, 1, 1), persistent=False)
        self.eval().requires_grad_(False)

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: never leaves eval mode

    def forward(self, rec, x):
        if rec.dim() == 5:  # (B, 3, T, H, W) -> frames
            rec, x = (v.transpose(1, 2).flatten(0, 1) for v in (rec, x))
        h = torch.cat([rec, x]).float()
        h = (h - self.shift) / self.scale
        dist = 0.0
        for i, block in enumerate(self.slices):
            h = block(h)
            f = h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            a, b = f.chunk(2)
            dist = dist + ((a - b).pow(2) * getattr(self, f"w{i}")).sum(1).mean((1, 2))
        return dist.mean()
