"""Scaling study: three DiT sizes, the same data and the same token budget; validation loss vs FLOPs.

Sora's claim is that sample quality improves with training compute. Here each size trains in
segments on identical packed batches (same seed, same order); after every segment the EMA model's
rectified-flow loss on a fixed validation set (fixed noise and t, so curves are comparable) is
recorded against the training FLOPs spent so far. Writes `scaling.png` (matplotlib), `scaling.csv`
and `scaling.json`; the retrain report embeds the PNG.

Data: `(latent (C, T, H, W), text (L, D))` pairs — the latents table of a dataset, or by default
the moving-shapes set with pooled-pixel stand-in latents, which needs no trained VAE.
"""
import csv
import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional

import torch

from generator.dit import DiT, DiTConfig
from generator.flow import RectifiedFlow
from generator.patches import pack, pack_sequences
from generator.train import TrainConfig, train

# (name, hidden, depth, heads): ~4x parameters between neighbours.
SIZES = (("S1", 64, 2, 2), ("S2", 128, 3, 4), ("S3", 192, 4, 4))


def shapes_pairs(n: int, seed: int, text_dim: int = 32, size: int = 32, frames: int = 9) -> list:
    """Moving-shapes videos as pooled-pixel latents (3, 1 + (T-1)/4, size/4, size/4) with captions."""
    import torch.nn.functional as F

    from generator.shapes import embed_caption, make_dataset

    out = []
    for i, (v, cap, _) in enumerate(make_dataset(n, frames=frames, size=size, seed=seed)):
        z = F.avg_pool3d(v.permute(1, 0, 2, 3)[None], (1, 4, 4))[0][:, ::4].contiguous()
        out.append((z[:, :1].contiguous() if i % 4 == 0 else z, embed_caption(cap, text_dim)))
    return out


@torch.no_grad()
def validation_loss(model: DiT, pairs: list, base_tokens: int, seed: int = 1234, repeats: int = 4,
                    chunk_tokens: int = 8192) -> float:
    """Mean flow loss per token over `pairs` with fixed noise and t: comparable across models and steps.
    Run in packed chunks of about `chunk_tokens` tokens, so memory stays bounded however many pairs a
    --dataset holds out (one forward over all of them grew with the table)."""
    flow = RectifiedFlow(base_tokens)
    pt, ph, pw = model.cfg.patch
    chunks, size = [[]], 0
    for z, y in pairs:
        n = z.shape[1] // pt * (z.shape[2] // ph) * (z.shape[3] // pw)
        if chunks[-1] and size + n > chunk_tokens:
            chunks.append([])
            size = 0
        chunks[-1].append((z, y))
        size += n
    batches = [(pack([z for z, _ in c], model.cfg.patch), *pack_sequences([y for _, y in c])) for c in chunks]
    gen = torch.Generator().manual_seed(seed)
    total, tokens = 0.0, 0
    for _ in range(repeats):
        for packed, text, text_cu in batches:
            fn = lambda z, t: model(z, t, packed.positions, packed.cu_seqlens, text, text_cu)  # noqa: E731
            n = packed.tokens.shape[0]
            total += flow.loss(fn, packed.tokens, packed.cu_seqlens, generator=gen).item() * n
            tokens += n
    return total / tokens


def scale_study(out_dir: str | Path, train_pairs: Optional[list] = None, val_pairs: Optional[list] = None,
                token_budget: int = 60_000, segments: int = 6, sizes=SIZES, max_tokens: int = 512,
                lr: float = 2e-3, seed: int = 0, log: Callable[[str], None] = print) -> dict:
    """Train each size on `token_budget` training tokens; returns {size: [(flops, val_loss), ...]}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_pairs = train_pairs or shapes_pairs(96, seed)
    val_pairs = val_pairs or shapes_pairs(24, seed + 1)
    c, text_dim = train_pairs[0][0].shape[0], train_pairs[0][1].shape[1]
    steps_total = max(segments, token_budget // max_tokens)
    per_segment = max(1, steps_total // segments)
    curves: dict[str, list] = {}
    for name, hidden, depth, heads in sizes:
        dit = DiTConfig(in_channels=c, hidden_size=hidden, depth=depth, num_heads=heads, text_dim=text_dim)
        cfg = TrainConfig(dit=dit, steps=0, lr=lr, warmup_steps=per_segment, max_tokens=max_tokens, log_every=0,
                          base_tokens=48, seed=seed, ckpt_dir=str(out / "ckpt" / name), keep_ckpts=1, device="cpu")
        shutil.rmtree(cfg.ckpt_dir, ignore_errors=True)  # a study starts from scratch: an earlier one's last
        # checkpoint would make every segment a no-op resume (or continue other data's weights)
        params = sum(p.numel() for p in DiT(dit).parameters())
        curves[name] = []
        flops, tokens = 0.0, 0
        for k in range(1, segments + 1):
            res = train(replace(cfg, steps=k * per_segment), train_pairs)  # resumes from the last segment
            new = res.history
            tokens += sum(h["tokens"] for h in new)
            flops = _checkpoint_flops(Path(cfg.ckpt_dir))
            vl = validation_loss(res.ema, val_pairs, cfg.base_tokens)
            curves[name].append({"step": res.step, "tokens": tokens, "flops": flops, "val_loss": vl})
            log(f"scale-study {name} ({params / 1e6:.2f}M params) step {res.step}: "
                f"{flops:.3g} FLOPs, val loss {vl:.4f}")
        curves[name + "_params"] = params
    _write(out, curves, sizes)
    return curves


def _checkpoint_flops(ckpt_dir: Path) -> float:
    """Training FLOPs so far, as the training loop counted them (in the checkpoint's metadata)."""
    from generator.train import checkpoint_meta
    return float(checkpoint_meta(str(ckpt_dir))["flops"])


def _write(out: Path, curves: dict, sizes) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=110)
    ax = fig.add_subplot(111)
    rows = []
    for name, *_ in sizes:
        pts = curves[name]
        ax.plot([p["flops"] for p in pts], [p["val_loss"] for p in pts], marker="o",
                label=f"{name} ({curves[name + '_params'] / 1e6:.2f}M params)")
        rows += [{"size": name, "params": curves[name + "_params"], **p} for p in pts]
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("validation loss (rectified flow)")
    ax.set_title("DiT scaling on the same data and token budget")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "scaling.png")
    with (out / "scaling.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (out / "scaling.json").write_text(json.dumps(curves, indent=2))


def final_losses(curves: dict, sizes=SIZES) -> list[float]:
    return [curves[name][-1]["val_loss"] for name, *_ in sizes]
