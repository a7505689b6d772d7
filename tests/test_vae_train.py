"""VAE training: the perceptual and adversarial losses learn, exact resume, NaN guard, two DDP ranks."""
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from generator.perceptual import Perceptual
from generator.shapes import make_dataset
from generator.train import prefixed, read_checkpoint_file
from generator.vae import VAE, VAEConfig, psnr
from generator.vae_train import PatchDiscriminator3D, VAETrainConfig, train_vae

TINY = VAEConfig(channels=(8, 16, 16, 16), latent_channels=4)


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    yield


def shapes(n, seed):
    return torch.stack([v.permute(1, 0, 2, 3) for v, _, _ in make_dataset(n, frames=5, size=32, seed=seed)])


@pytest.fixture(scope="module")
def videos():
    return shapes(16, 0)


@pytest.fixture(scope="module")
def held():
    return shapes(8, 5)


@pytest.fixture(scope="module")
def vgg(vgg16_weights):
    return vgg16_weights


def test_perceptual_distance(vgg, held, tmp_path):
    p = Perceptual(vgg)
    x = held[:2]
    g = torch.Generator().manual_seed(0)
    noisy = [p(x + s * torch.randn(x.shape, generator=g), x).item() for s in (0.02, 0.1, 0.4)]
    assert p(x, x).item() == 0.0
    assert noisy[0] < noisy[1] < noisy[2], noisy
    assert p(x[:, :, 0], x[:, :, 1]).item() > 0  # images (B, 3, H, W) too
    # LPIPS linear weights in the lpips package's layout, read as a torch file with weights_only=True
    widths = (64, 128, 256, 512, 512)
    lin = {f"lin{i}.model.1.weight": torch.full((1, c, 1, 1), 2.0) for i, c in enumerate(widths)}
    torch.save(lin, tmp_path / "vgg.pth")
    assert Perceptual(vgg, str(tmp_path / "vgg.pth"))(x + 0.1, x).item() == pytest.approx(2 * p(x + 0.1, x).item(), rel=1e-4)
    torch.save({**lin, "lin2.model.1.weight": torch.ones(1, 3, 1, 1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="lin2"):
        Perceptual(vgg, str(tmp_path / "bad.pth"))
    from safetensors.torch import load_file
    state = load_file(vgg)
    save_file({k: v for k, v in state.items() if k != "features.28.weight"}, str(tmp_path / "short.safetensors"))
    with pytest.raises(ValueError, match="missing keys.*28.weight"):
        Perceptual(str(tmp_path / "short.safetensors"))
    with pytest.raises(ValueError, match="not found"):
        Perceptual(str(tmp_path / "none.safetensors"))


def test_perceptual_loss_alone_trains_the_vae(vgg, videos, held):
    """With L1 = MSE = 0 only the perceptual term drives the VAE: its distance on held-out clips falls."""
    p = Perceptual(vgg)
    torch.manual_seed(0)
    vae = VAE(TINY)
    with torch.no_grad():
        before = p(vae.decode(vae.encode(held).mean), held).item()
    train_vae(vae, videos, VAETrainConfig(steps=15, lr=3e-3, batch_size=2, log_every=0, l1_weight=0.0, l2_weight=0.0,
                                          perceptual=vgg, perceptual_weight=1.0))
    with torch.no_grad():
        after = p(vae.decode(vae.encode(held).mean), held).item()
    assert after < 0.5 * before, (before, after)


def test_adversarial_training_learns_to_tell_reconstructions(videos, held, tmp_path):
    """Reconstruction-only for 20 steps, then the PatchGAN: the VAE still improves, and the trained
    discriminator ranks held-out real clips above their reconstructions (chance: 0.5)."""
    torch.manual_seed(0)
    vae = VAE(TINY)
    with torch.no_grad():
        start = psnr(vae.decode(vae.encode(held).mean), held)
    cfg = VAETrainConfig(steps=40, lr=3e-3, batch_size=2, log_every=0, adversarial_weight=0.1, disc_start=20,
                         disc_channels=16, ckpt_dir=str(tmp_path / "ck"))
    hist = train_vae(vae, videos, cfg)
    assert all("d_loss" not in h for h in hist[:20]) and all("d_loss" in h and "gan_weight" in h for h in hist[20:])
    tensors, meta = read_checkpoint_file(cfg.ckpt_dir)
    assert meta["step"] == 40 and "disc_param_groups" in meta
    disc = PatchDiscriminator3D(3, 16)
    disc.load_state_dict(prefixed(tensors, "disc."))
    with torch.no_grad():
        rec = vae.decode(vae.encode(held).mean)
        real, fake = disc(held).mean((1, 2, 3, 4)), disc(rec).mean((1, 2, 3, 4))
    assert psnr(rec, held) > start + 3, (start, psnr(rec, held))
    pair_accuracy = (real[:, None] > fake[None, :]).float().mean().item()
    assert pair_accuracy > 0.75, (real, fake)


def resume_cfg(ckpt, steps, vgg, **kw):
    base = dict(lr=3e-3, batch_size=2, log_every=0, adversarial_weight=0.1, disc_start=2, disc_channels=8,
                perceptual=vgg, ckpt_every=2)
    return VAETrainConfig(steps=steps, ckpt_dir=str(ckpt), **{**base, **kw})


def test_vae_training_resumes_exactly(videos, vgg, tmp_path):
    """Killed after 3 of 6 steps and resumed: the same losses as the uninterrupted run (VAE,
    discriminator, both optimizers and the RNG are in the checkpoint)."""
    def run(ckpt, steps):
        torch.manual_seed(0)
        return train_vae(VAE(TINY), videos, resume_cfg(ckpt, steps, vgg))
    full = run(tmp_path / "full", 6)
    cut = run(tmp_path / "cut", 3) + run(tmp_path / "cut", 6)
    assert [h["step"] for h in cut] == list(range(1, 7))
    for key in ("loss", "d_loss", "psnr"):
        assert [h.get(key, 0.0) for h in cut] == pytest.approx([h.get(key, 0.0) for h in full], rel=1e-6, abs=1e-7), key
    # a checkpoint with a discriminator does not resume without one
    with pytest.raises(ValueError, match="discriminator"):
        train_vae(VAE(TINY), videos, resume_cfg(tmp_path / "full", 8, vgg, adversarial_weight=0.0))
    # a reconstruction-only checkpoint may go on with the GAN loss added (the discriminator starts fresh)
    train_vae(VAE(TINY), videos, VAETrainConfig(steps=2, batch_size=2, log_every=0, ckpt_dir=str(tmp_path / "plain")))
    hist = train_vae(VAE(TINY), videos, VAETrainConfig(steps=3, batch_size=2, log_every=0, adversarial_weight=0.1,
                                                       disc_channels=8, ckpt_dir=str(tmp_path / "plain")))
    assert [h["step"] for h in hist] == [3] and "d_loss" in hist[0]
    # other batches or other videos would not continue it exactly: refused, named
    with pytest.raises(ValueError, match="batch_size: 2 -> 3"):
        train_vae(VAE(TINY), videos, VAETrainConfig(steps=4, batch_size=3, log_every=0, adversarial_weight=0.1,
                                                    disc_channels=8, ckpt_dir=str(tmp_path / "plain")))
    with pytest.raises(ValueError, match="other training videos"):
        train_vae(VAE(TINY), videos[:-1], VAETrainConfig(steps=4, batch_size=2, log_every=0, adversarial_weight=0.1,
                                                          disc_channels=8, ckpt_dir=str(tmp_path / "plain")))


def test_resume_trains_at_the_new_learning_rate(videos, tmp_path):
    """--lr may change on resume (it is not among VAE_EXACT_RESUME): the resumed steps use it, not the
    checkpoint's (optimizer.load_state_dict had restored the old one; vae.json recorded the new)."""
    ckpt = str(tmp_path / "ckpt")
    cfg = lambda steps, **kw: VAETrainConfig(steps=steps, batch_size=2, log_every=0, ckpt_dir=ckpt, adversarial_weight=0.1,
                                             disc_channels=8, **kw)
    torch.manual_seed(0)
    train_vae(VAE(TINY), videos, cfg(2, lr=1e-3))
    before, _ = read_checkpoint_file(ckpt)
    train_vae(VAE(TINY), videos, cfg(4, lr=0.0, disc_lr=0.0))  # AdamW with lr 0 moves nothing
    after, meta = read_checkpoint_file(ckpt)
    assert meta["step"] == 4
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith(("vae.", "disc.")))
    assert meta["param_groups"][0]["lr"] == 0.0 and meta["disc_param_groups"][0]["lr"] == 0.0


def test_non_finite_batches_are_skipped_and_counted(videos):
    torch.manual_seed(0)
    vae = VAE(TINY)
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    bad = videos.clone()
    bad[:, :, 0, 0, 0] = float("nan")
    hist = train_vae(vae, bad, VAETrainConfig(steps=3, batch_size=2, log_every=0, adversarial_weight=0.1, disc_channels=8))
    assert hist == []  # every step skipped: no record, no update
    assert all(torch.equal(v, before[k]) for k, v in vae.state_dict().items())
    mixed = torch.cat([videos[:8], bad[:8]])
    hist = train_vae(vae, mixed, VAETrainConfig(steps=12, batch_size=1, log_every=0))
    assert 0 < len(hist) < 12  # the steps that drew a NaN clip left no record
    assert [h["skipped"] for h in hist] == [h["step"] - i - 1 for i, h in enumerate(hist)]  # counted as they happen
    assert all(torch.isfinite(v).all() for v in vae.state_dict().values())


def test_a_skipped_step_on_a_ckpt_every_step_still_writes_its_checkpoint(videos, tmp_path):
    """A NaN-skipped step went `continue` past the checkpoint: with ckpt_every landing on it none was
    written, so a kill after it lost every step since the previous one (as the DiT loop did)."""
    from generator.train import checkpoint_meta
    bad = videos[:2].clone()
    bad[1, :, 0, 0, 0] = float("nan")  # batch_size 1: a step that draws clip 1 is skipped
    torch.manual_seed(0)
    cfg = VAETrainConfig(steps=6, batch_size=1, log_every=0, ckpt_dir=str(tmp_path / "a"), ckpt_every=1, keep_ckpts=0)
    hist = train_vae(VAE(TINY), bad, cfg)
    done = {h["step"] for h in hist}
    assert len(done) < 6, "no step drew the NaN clip: pick another seed"
    written = sorted(f for f in os.listdir(tmp_path / "a") if f.startswith("step_"))
    assert written == [f"step_{s:08d}.safetensors" for s in range(1, 7)]  # skipped steps included
    assert checkpoint_meta(str(tmp_path / "a"))["skipped"] == 6 - len(done)


def test_a_discriminator_too_deep_for_the_frames_is_refused_before_training(videos):
    """--size 16 with --adversarial-weight: the PatchGAN's 4x4 convolutions ran out of pixels, a torch
    RuntimeError (a traceback) at step disc_start + 1, after the whole reconstruction-only phase."""
    assert PatchDiscriminator3D.min_size(3) == 24
    PatchDiscriminator3D(3, 8, 3)(torch.zeros(1, 3, 1, 24, 24))  # the smallest that runs
    small = torch.nn.functional.interpolate(videos[:2], size=(5, 16, 16))
    vae = VAE(TINY)
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    with pytest.raises(ValueError, match="at least 24 pixels"):
        train_vae(vae, small, VAETrainConfig(steps=3, batch_size=1, log_every=0, adversarial_weight=0.1,
                                             disc_start=2, disc_channels=8))
    assert all(torch.equal(v, before[k]) for k, v in vae.state_dict().items())  # refused before any step


def _ddp_ranks(rank, world, init_file, videos, out_dir):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        def run(ckpt, steps):
            torch.manual_seed(0)
            vae = VAE(TINY)
            cfg = VAETrainConfig(steps=steps, lr=3e-3, batch_size=1, log_every=0, adversarial_weight=0.1,
                                 disc_start=1, disc_channels=8, ckpt_dir=os.path.join(out_dir, ckpt), ckpt_every=2)
            return vae, train_vae(vae, videos, cfg, rank, world)
        vae, full = run("full", 4)
        _, first = run("cut", 2)
        _, rest = run("cut", 4)
        weights = torch.cat([v.flatten() for v in vae.state_dict().values()]).tolist()
        # rank 1 alone draws NaN clips: both ranks must skip those steps together (a one-rank skip hangs DDP)
        if rank == 1:
            videos = videos.clone()
            videos[::2, :, 0, 0, 0] = float("nan")
        nan_vae = VAE(TINY)
        nan_hist = train_vae(nan_vae, videos, VAETrainConfig(steps=8, batch_size=1, log_every=0, adversarial_weight=0.1,
                                                             disc_channels=8), rank, world)
        nan_weights = torch.cat([v.flatten() for v in nan_vae.state_dict().values()])
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"full": [h["loss"] for h in full], "resumed": [h["loss"] for h in first + rest],
                       "weights": weights[:200], "nan_steps": [h["step"] for h in nan_hist],
                       "nan_finite": bool(torch.isfinite(nan_weights).all()), "nan_weights": nan_weights[:200].tolist()}, f)
    finally:
        dist.destroy_process_group()


def test_two_ddp_ranks_stay_in_sync_and_resume_exactly(videos, tmp_path, run_ranks):
    """Two CPU ranks over gloo (what Ray Train's TorchTrainer sets up): different batches per rank,
    one set of weights (DDP averages the gradients, the adaptive GAN weight's extra autograd.grad
    calls included); a killed run resumes to the same losses on each rank; a NaN batch on one rank
    makes both skip that step."""
    run_ranks(_ddp_ranks, (2, str(tmp_path / "pg"), videos, str(tmp_path)), 2, 240)
    ranks = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(2)]
    assert ranks[0]["weights"] == ranks[1]["weights"]
    assert ranks[0]["full"] != ranks[1]["full"]  # each rank trained on its own batches
    for r in ranks:
        assert len(r["full"]) == 4
        assert r["resumed"] == pytest.approx(r["full"], rel=1e-6, abs=1e-7)
    # the NaN run: the same steps kept on both ranks, some skipped, weights equal and finite
    assert ranks[0]["nan_steps"] == ranks[1]["nan_steps"] and 0 < len(ranks[0]["nan_steps"]) < 8
    assert ranks[0]["nan_weights"] == ranks[1]["nan_weights"] and ranks[0]["nan_finite"]


def test_vae_reconstruction_improves_on_demo_footage(tmp_path):
    """The quality bar's 'PSNR on demo clips improves over training', on the project's synthetic
    footage (real photos, camera moves, cuts) as 5-frame 32x32 clips: every third window of each
    shot is held out. After training, held-out clips beat both the untrained VAE and the per-clip
    mean-colour baseline. (Held-out *shots* need more footage than one demo video: at 1000 steps a
    VAE reached 25 dB on its training clips but 13-14 dB on unseen shots.)"""
    import numpy as np

    from generator.precompute import decode_clip
    from pipeline.synthetic import generate_footage

    generate_footage(tmp_path, seed=0, videos=1)
    gt = json.loads((tmp_path / "ground_truth.json").read_text())["videos"][0]
    cfg = VAEConfig(channels=(8, 16), latent_channels=4, time_downsample=1)  # 2x in space and time
    train, held = [], []
    for s in gt["shots"]:
        for j, a in enumerate(range(s["start_frame"], s["end_frame"] - 5, 8)):
            v, _ = decode_clip(f"{tmp_path / gt['file']}#frames={a}-{a + 5}", 5, (5,), (32,), cfg.space_factor,
                               max_aspect=1.0)
            (held if j % 3 == 2 else train).append(torch.from_numpy(np.ascontiguousarray(v)).permute(3, 0, 1, 2) / 127.5 - 1)
    train, held = torch.stack(train), torch.stack(held)
    mean_colour = 10 * np.log10(4 / (held - held.mean((2, 3, 4), keepdim=True)).pow(2).mean().item())
    torch.manual_seed(0)
    vae = VAE(cfg)
    with torch.no_grad():
        before = psnr(vae.decode(vae.encode(held).mean), held)
    train_vae(vae, train, VAETrainConfig(steps=150, lr=3e-3, batch_size=2, log_every=0))
    with torch.no_grad():
        after = psnr(vae.decode(vae.encode(held).mean), held)
    assert len(train) > 30 and len(held) > 10
    assert after > before + 3 and after > mean_colour + 1, (before, after, mean_colour)
