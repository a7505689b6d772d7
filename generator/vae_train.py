"""Training the video compression network: reconstruction + KL, optionally perceptual and adversarial.

One step, in order: sample a batch -> encode, sample the posterior, decode (bf16 autocast on CUDA)
-> L1 + MSE + KL (+ LPIPS-style perceptual distance, when VGG16 weights are given locally)
(+ the generator's adversarial term once the discriminator has started) -> NaN/inf guard (skip,
count, log) -> backward -> grad clip -> step; then, while the discriminator is on, one hinge-loss
step of a 3D PatchGAN on real clips vs. the (detached) reconstructions.

The adversarial recipe is VQGAN's (Esser et al. 2021): reconstruction-only for `disc_start` steps,
hinge loss, and the generator's GAN term scaled by ||grad nll|| / ||grad gan|| at the decoder's
last layer, so neither loss drowns the other whatever their scales. The discriminator convolves
3D (time too) with stride 1 in time, so a one-frame video (an image) is scored the same way.

Checkpoints (VAE, discriminator, both optimizers, every rank's RNG, step) use the DiT loop's
atomic safetensors writer, so a killed run resumes exactly. `vae_loop_per_worker` is the Ray Train
entry point: TorchTrainer sets up the process group, DDP wraps both nets, each rank samples its own
batches (seeded by rank), rank 0 writes the checkpoints.
"""
import logging
import os
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from generator.train import (_any_rank, _per_rank, check_resume_config, guarded_update, optimizer_state, optimizer_tensors,
                             pick_device, prefixed, read_checkpoint_file, write_checkpoint_file)
from generator.vae import VAE, VAEConfig, load_state_strict, psnr, vae_loss

log = logging.getLogger(__name__)


@dataclass
class VAETrainConfig:
    steps: int = 500
    lr: float = 1e-3
    batch_size: int = 4
    kl_weight: float = 1e-4
    l1_weight: float = 1.0
    l2_weight: float = 1.0
    grad_clip: float = 1.0
    perceptual: str | None = None       # local VGG16 weights (torchvision state dict) -> LPIPS-style loss
    perceptual_lin: str | None = None   # optional LPIPS linear-layer weights (lpips' vgg.pth)
    perceptual_weight: float = 0.1
    adversarial_weight: float = 0.0     # 0: no discriminator
    disc_start: int = 0                 # reconstruction-only steps before the discriminator starts
    disc_lr: float | None = None        # None: lr
    disc_channels: int = 64
    disc_layers: int = 3
    seed: int = 0
    device: str = "auto"
    log_every: int = 50
    max_seconds: float | None = None    # compute budget: wall-clock seconds of this run
    ckpt_dir: str | None = None
    ckpt_every: int = 0                 # 0: only at the end (when ckpt_dir is set)
    keep_ckpts: int = 2
    resume: bool = True                 # continue from ckpt_dir/latest.json when present


class PatchDiscriminator3D(nn.Module):
    """pix2pix / VQGAN's N-layer PatchGAN with 3D convolutions: one logit per spacetime patch.
    Stride 2 in space only, so any frame count (1 included) works; GroupNorm, not BatchNorm, so
    the statistics do not depend on the per-rank batch."""

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3):
        super().__init__()
        mods = [nn.Conv3d(in_channels, channels, (3, 4, 4), (1, 2, 2), (1, 1, 1)), nn.LeakyReLU(0.2)]
        c = channels
        for i in range(1, layers + 1):
            c_out = channels * min(2 ** i, 8)
            stride = (1, 2, 2) if i < layers else (1, 1, 1)
            mods += [nn.Conv3d(c, c_out, (3, 4, 4), stride, (1, 1, 1), bias=False),
                     nn.GroupNorm(min(32, c_out // 4), c_out), nn.LeakyReLU(0.2)]
            c = c_out
        mods.append(nn.Conv3d(c, 1, (3, 4, 4), 1, (1, 1, 1)))
        self.net = nn.Sequential(*mods)

    def forward(self, x):  # (B, 3, T, H, W) -> (B, 1, T, h, w) logits
        return self.net(x)

    @staticmethod
    def min_size(layers: int) -> int:
        """Smallest frame side it scores: `layers` 4x4 stride-2 convs halve it, the two stride-1 ones
        take 1 pixel each and need 1 left."""
        return 3 * 2 ** layers


def hinge_d_loss(real, fake):
    return 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())


def adaptive_weight(nll, g_loss, last_layer):
    """VQGAN's balance: ||d nll / d W_last|| / ||d g_loss / d W_last||, clamped, no gradient."""
    g1 = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g2 = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (g1.norm() / (g2.norm() + 1e-4)).clamp(0.0, 1e4).detach()


def _wrap(module, world_size: int, cuda: bool):
    if world_size == 1:
        return module
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=[torch.cuda.current_device()] if cuda else None)


# what a resume must keep to continue exactly (a discriminator or perceptual loss may join late)
VAE_EXACT_RESUME = ("seed", "batch_size", "kl_weight", "l1_weight", "l2_weight")


def data_signature(videos) -> str:
    """Shape + a hash of a strided sample of the training videos: another clips version, --max-clips,
    --frames or --size gives another signature (cheap: a 1/256th of the pixels)."""
    import hashlib
    sample = videos[:, :, ::4, ::8, ::8].float().contiguous().numpy().tobytes()
    return f"{tuple(videos.shape)}:{hashlib.sha256(sample).hexdigest()[:16]}"


def save_vae_checkpoint(cfg: VAETrainConfig, vae, opt, disc, dopt, gens, step: int, skipped: int,
                        rank: int = 0, world_size: int = 1, data: str | None = None):
    """Every rank calls it (each rank's RNG is gathered); rank 0 writes. data: data_signature."""
    rngs = _per_rank([g.get_state().cpu() for g in gens] + [torch.get_rng_state()], world_size)
    if rank == 0:
        osd = opt.state_dict()
        tensors = {f"vae.{k}": v for k, v in vae.state_dict().items()}
        tensors.update(optimizer_tensors(osd, "optim."))
        meta = {"step": step, "skipped": skipped, "world_size": world_size, "param_groups": osd["param_groups"],
                "config": asdict(cfg), "vae": asdict(vae.cfg), "data": data}
        if disc is not None:
            dsd = dopt.state_dict()
            tensors.update({f"disc.{k}": v for k, v in disc.state_dict().items()})
            tensors.update(optimizer_tensors(dsd, "doptim."))
            meta["disc_param_groups"] = dsd["param_groups"]
        for r, states in enumerate(rngs):
            tensors.update({f"rng.{i}.{r}": s for i, s in enumerate(states)})
        write_checkpoint_file(cfg.ckpt_dir, step, tensors, meta, cfg.keep_ckpts)
    if world_size > 1:
        import torch.distributed as dist
        dist.barrier()


def load_vae_checkpoint(ckpt_dir: str, vae, opt, disc, dopt, gens, device, rank: int = 0,
                        world_size: int = 1) -> dict:
    """Restore what save_vae_checkpoint wrote; returns its metadata. ValueError naming keys on a
    mismatch, CheckpointError on a bad sha256. A checkpoint without a discriminator may resume
    with one (it starts fresh): adding the GAN loss late is VQGAN's recipe anyway."""
    tensors, meta = read_checkpoint_file(ckpt_dir)
    load_state_strict(vae, prefixed(tensors, "vae."), "VAE")
    opt.load_state_dict(optimizer_state(tensors, "optim.", meta["param_groups"], device))
    has_disc = "disc_param_groups" in meta
    if has_disc and disc is None:
        raise ValueError(f"checkpoint {ckpt_dir} was trained with a discriminator: pass the same "
                         f"adversarial weight to resume it")
    if has_disc:
        load_state_strict(disc, prefixed(tensors, "disc."), "discriminator")
        dopt.load_state_dict(optimizer_state(tensors, "doptim.", meta["disc_param_groups"], device))
    elif disc is not None:
        log.info("checkpoint has no discriminator: it starts fresh at step %d", meta["step"])
    r = rank if meta.get("world_size", 1) == world_size else 0
    if r != rank:
        log.warning("checkpoint was written by %d rank(s), resuming on %d: weights and optimizer are exact, "
                    "RNG streams are not", meta.get("world_size", 1), world_size)
    for i, g in enumerate(gens):
        g.set_state(tensors[f"rng.{i}.{r}"])
    torch.set_rng_state(tensors[f"rng.{len(gens)}.{r}"])
    return meta


def train_vae(vae: VAE, videos, cfg: VAETrainConfig, rank: int = 0, world_size: int = 1, report=None) -> list[dict]:
    """Train `vae` in place on videos (N, 3, T, H, W) in [-1, 1] (in memory; each step samples a
    batch with replacement). Returns one record per step: step, loss, psnr (of the training batch),
    and, with a discriminator, g_loss, d_loss, gan_weight. `report(record)` is called at log steps."""
    device = pick_device(cfg.device)
    cuda = device.type == "cuda"
    vae.to(device).train()
    g = torch.Generator().manual_seed(cfg.seed + 1_000_003 * rank)  # batch indices
    gens = [g] if not cuda else [g, torch.Generator(device).manual_seed(cfg.seed + 1_000_003 * rank + 1)]
    noise = gens[-1]  # posterior samples
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, betas=(0.9, 0.99))
    disc = dopt = None
    if cfg.adversarial_weight > 0:
        need = PatchDiscriminator3D.min_size(cfg.disc_layers)
        if min(videos.shape[-2:]) < need:  # else a torch error at step disc_start + 1, after the recon-only phase
            raise ValueError(f"the discriminator ({cfg.disc_layers} layers) needs frames at least {need} pixels on a "
                             f"side, got {videos.shape[-2]}x{videos.shape[-1]}: raise --size or drop --adversarial-weight")
        disc = PatchDiscriminator3D(vae.cfg.in_channels, cfg.disc_channels, cfg.disc_layers).to(device)
        dopt = torch.optim.AdamW(disc.parameters(), lr=cfg.disc_lr or cfg.lr, betas=(0.5, 0.9))
    perceptual = None
    if cfg.perceptual:
        from generator.perceptual import Perceptual
        perceptual = Perceptual(cfg.perceptual, cfg.perceptual_lin).to(device)
    step, skipped, sig = 0, 0, data_signature(videos)
    if cfg.ckpt_dir and cfg.resume and os.path.exists(os.path.join(cfg.ckpt_dir, "latest.json")):
        meta = load_vae_checkpoint(cfg.ckpt_dir, vae, opt, disc, dopt, gens, device, rank, world_size)
        check_resume_config(meta.get("config", {}), cfg, VAE_EXACT_RESUME)
        if meta.get("data") not in (None, sig):
            raise ValueError(f"resuming {cfg.ckpt_dir} on other training videos would not continue it exactly "
                             f"({meta['data']} -> {sig}: another --dataset or clips version, --max-clips, --frames "
                             f"or --size?)")
        step, skipped = meta["step"], meta["skipped"]
        # load_state_dict restored the checkpoint's learning rates; this run's (--lr may change on resume) hold
        for o, lr in ((opt, cfg.lr), (dopt, cfg.disc_lr or cfg.lr)):
            for group in o.param_groups if o is not None else ():
                group["lr"] = lr
        log.info("resumed VAE training from %s at step %d", cfg.ckpt_dir, step)
    net = _wrap(vae, world_size, cuda)
    dnet = _wrap(disc, world_size, cuda) if disc is not None else None
    last_layer = vae.decoder.conv_out.conv.weight
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)
    history, t0 = [], time.time()
    while step < cfg.steps:
        if cfg.max_seconds is not None and _any_rank(time.time() - t0 >= cfg.max_seconds, world_size):
            break
        idx = torch.randint(len(videos), (cfg.batch_size,), generator=g)
        x = videos[idx].to(device)
        with autocast():
            rec, post = net(x, generator=noise)
        rec = rec.float()
        step += 1
        loss = vae_loss(x, rec, post, cfg.kl_weight, cfg.l1_weight, cfg.l2_weight,
                        perceptual, cfg.perceptual_weight)
        record = {"step": step}
        gan = disc is not None and step > cfg.disc_start
        if gan:  # (a non-finite loss makes the total non-finite too: guarded_update skips it)
            disc.requires_grad_(False)  # the generator's term trains the VAE only
            with autocast():
                g_loss = -disc(rec).float().mean()
            w = adaptive_weight(loss, g_loss, last_layer)
            loss = loss + cfg.adversarial_weight * w * g_loss
            record.update(g_loss=g_loss.item(), gan_weight=w.item())
        if guarded_update(loss, opt, vae.parameters(), cfg.grad_clip, world_size, "VAE step", step) is None:
            skipped += 1  # no discriminator step and no record, but still its checkpoint (below)
        else:
            if gan:
                disc.requires_grad_(True)
                with autocast():  # one forward over real + fake: DDP wants one forward per backward
                    real, fake = dnet(torch.cat([x, rec.detach()])).float().chunk(2)
                d_loss = hinge_d_loss(real, fake)
                guarded_update(d_loss, dopt, disc.parameters(), cfg.grad_clip, world_size, "discriminator step", step)
                record.update(d_loss=d_loss.item(), d_real=real.mean().item(), d_fake=fake.mean().item())
            record.update(loss=loss.item(), psnr=psnr(rec.detach(), x), skipped=skipped)
            history.append(record)
            if cfg.log_every and step % cfg.log_every == 0:
                log.info("vae step %d loss %.4f psnr %.2f dB%s", step, record["loss"], record["psnr"],
                         f" d_loss {record['d_loss']:.3f}" if "d_loss" in record else "")
                if report is not None:
                    report(record)
        if cfg.ckpt_dir and cfg.ckpt_every and step % cfg.ckpt_every == 0:
            save_vae_checkpoint(cfg, vae, opt, disc, dopt, gens, step, skipped, rank, world_size, sig)
    if cfg.ckpt_dir:
        save_vae_checkpoint(cfg, vae, opt, disc, dopt, gens, step, skipped, rank, world_size, sig)
    vae.eval()
    return history


def load_training_videos(root, version: int, frames: int, size: int, space_factor: int, max_clips: int,
                         warn=log.warning):
    """Square centre crops of `frames` x `size` x `size` from the kept clips of <root>/clips at
    `version` (at most max_clips) -> (videos (N, 3, T, H, W) in [-1, 1], too_short, unreadable).
    An unreadable clip is reported through `warn` and skipped."""
    import numpy as np

    from generator.precompute import decode_clip, kept_clips

    videos, short, bad = [], 0, 0
    for r in kept_clips(root, version)[:max_clips]:
        if r["n_frames"] and r["n_frames"] < frames:
            short += 1
            continue
        try:  # one size for every clip: the batch is one tensor
            v, _ = decode_clip(r["clip_uri"], r["n_frames"] or None, (frames,), (size,), space_factor, max_aspect=1.0)
        except Exception as e:  # noqa: BLE001 - an unreadable clip is reported and skipped
            bad += 1
            warn(f"skipping clip {r['clip_id']}: {e}")
            continue
        videos.append(torch.from_numpy(np.ascontiguousarray(v)).permute(3, 0, 1, 2).float() / 127.5 - 1.0)
    return (torch.stack(videos) if videos else None), short, bad


def vae_loop_per_worker(config: dict):
    """Ray Train entry point. config: {"vae": VAEConfig dict, "train": VAETrainConfig dict, "data": the
    videos tensor, an ObjectRef of it (decoded once, shared through the object store), or a
    zero-argument callable returning it}."""
    import ray
    import ray.train

    from generator.train import ray_worker

    cfg = VAETrainConfig(**config["train"])
    rank, world_size, cfg.device = ray_worker(cfg.device)
    data = config["data"]
    data = ray.get(data) if isinstance(data, ray.ObjectRef) else data() if callable(data) else data
    torch.manual_seed(cfg.seed)  # the driver's initial weights (DDP also broadcasts rank 0's)
    train_vae(VAE(VAEConfig.from_dict(config["vae"])), data, cfg, rank, world_size, report=ray.train.report)
