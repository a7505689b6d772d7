"""GPU paths: packed-attention backends agree, DiT and VAE train under bf16 autocast, sampling on CUDA.

Skipped without CUDA (CI has none). On a lent GPU machine: `bash benchmarks/gpu_check.sh`, which
runs these and then benchmarks/generator.py (bf16 MFU, packing, VAE memory, attention backends).
"""
import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CUDA = torch.device("cuda")


def packed_qkv(lens, heads=4, dh=64, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(CUDA).manual_seed(seed)
    n = sum(lens)
    q, k, v = (torch.randn(n, heads, dh, device=CUDA, dtype=dtype, generator=g) for _ in range(3))
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), device=CUDA, dtype=torch.int32)
    return q, k, v, cu


def test_attention_backends_agree_and_never_cross_samples():
    from generator.dit import Seqs, flex_attention, packed_attention, varlen_attn

    lens = [256, 64, 200, 1, 512]
    q, k, v, cu = packed_qkv(lens)
    ref = packed_attention(q.float(), k.float(), v.float(), Seqs(cu, cu, "loop"))
    backends = ["loop"] + (["flex"] if flex_attention is not None else []) + (["varlen"] if varlen_attn is not None else [])
    for b in backends:
        out = packed_attention(q, k, v, Seqs(cu, cu, b)).float()
        assert (out - ref).abs().max().item() < 3e-2, b
    # changing the second sample changes nothing else: the attention is block-diagonal
    k2 = k.clone()
    k2[256:320] = torch.randn_like(k2[256:320])  # (a constant shift of every key would leave softmax unchanged)
    for b in backends:
        a, c = (packed_attention(q, kk, v, Seqs(cu, cu, b)) for kk in (k, k2))
        assert torch.allclose(a[:256], c[:256], atol=1e-6) and torch.allclose(a[320:], c[320:], atol=1e-6), b
        assert not torch.allclose(a[256:320], c[256:320], atol=1e-3), b


def shapes_pairs(n=32, text_dim=32):
    import torch.nn.functional as F

    from generator.shapes import embed_caption, make_dataset
    out = []
    for i, (v, cap, _) in enumerate(make_dataset(n, frames=9, size=32, seed=0)):
        z = F.avg_pool3d(v.permute(1, 0, 2, 3)[None], (1, 4, 4))[0][:, ::4].contiguous()
        out.append((z[:, :1].contiguous() if i % 4 == 0 else z, embed_caption(cap, text_dim)))
    return out


def test_dit_trains_under_bf16_autocast():
    from generator.dit import DiTConfig
    from generator.train import TrainConfig, train

    dit = DiTConfig(in_channels=3, hidden_size=128, depth=2, num_heads=2, text_dim=32)
    res = train(TrainConfig(dit=dit, steps=60, lr=2e-3, warmup_steps=5, max_tokens=512, log_every=0, base_tokens=48,
                            device="cuda"), shapes_pairs())
    losses = [h["loss"] for h in res.history]
    assert res.skipped == 0 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-10:]) < 0.8 * sum(losses[:10]), losses
    assert next(res.ema.parameters()).device.type == "cuda"


def test_dit_resumes_exactly_on_cuda_with_fused_adamw(tmp_path):
    """Killed at step 3 and resumed, the bf16 CUDA run (fused AdamW) repeats the uninterrupted losses."""
    from generator.dit import DiTConfig
    from generator.train import TrainConfig, train

    def cfg(steps, d):
        return TrainConfig(dit=DiTConfig(in_channels=3, hidden_size=64, depth=2, num_heads=2, text_dim=32), steps=steps,
                           lr=2e-3, warmup_steps=2, max_tokens=256, log_every=0, base_tokens=48, device="cuda",
                           ckpt_dir=str(tmp_path / d), compile=False)
    pairs = shapes_pairs(16)
    full = train(cfg(6, "a"), pairs)
    first, rest = train(cfg(3, "b"), pairs), train(cfg(6, "b"), pairs)
    assert [h["loss"] for h in first.history + rest.history] == pytest.approx([h["loss"] for h in full.history],
                                                                                rel=1e-5, abs=1e-6)


def test_vae_trains_under_bf16_autocast_with_gan():
    from generator.shapes import make_dataset
    from generator.vae import VAE, VAEConfig, psnr
    from generator.vae_train import VAETrainConfig, train_vae

    videos = torch.stack([v.permute(1, 0, 2, 3) for v, _, _ in make_dataset(16, frames=5, size=32, seed=0)])
    torch.manual_seed(0)
    vae = VAE(VAEConfig(channels=(16, 32, 32, 32), latent_channels=4))
    hist = train_vae(vae, videos, VAETrainConfig(steps=60, lr=3e-3, batch_size=4, log_every=0, adversarial_weight=0.1,
                                                 disc_start=30, disc_channels=16, device="cuda"))
    assert len(hist) == 60 and all("d_loss" in h for h in hist[30:])
    x = videos[:4].cuda()
    with torch.no_grad():
        rec = vae.decode(vae.encode(x).mean)
    assert psnr(rec, x) > hist[0]["psnr"] + 3


def test_sampling_on_cuda_is_seeded():
    from generator.dit import DiT, DiTConfig
    from generator.flow import RectifiedFlow
    from generator.patches import pack, pack_sequences

    torch.manual_seed(0)
    model = DiT(DiTConfig(in_channels=4, hidden_size=128, depth=2, num_heads=2, text_dim=32)).to(CUDA).eval()
    p = pack([torch.zeros(4, 3, 8, 12), torch.zeros(4, 1, 16, 16)]).to(CUDA)
    y, ycu = pack_sequences([torch.randn(6, 32), torch.randn(4, 32)])
    y, ycu = y.to(CUDA), ycu.to(CUDA)
    drop = torch.ones(2, dtype=torch.bool, device=CUDA)

    def draw(seed):
        g = torch.Generator(CUDA).manual_seed(seed)
        noise = torch.randn(p.tokens.shape, device=CUDA, generator=g)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return RectifiedFlow().sample(lambda z, t: model(z, t, p.positions, p.cu_seqlens, y, ycu),
                                          noise, p.cu_seqlens, steps=4, method="heun", cfg_scale=2.0,
                                          uncond=lambda z, t: model(z, t, p.positions, p.cu_seqlens, y, ycu, drop))
    a, b, c = draw(1), draw(1), draw(2)
    assert torch.isfinite(a).all() and torch.allclose(a, b, atol=1e-5) and not torch.allclose(a, c, atol=1e-2)


def test_generation_on_cuda_matches_cpu():
    """Noise comes from a CPU generator, so one seed gives the same sample on either device: bf16
    autocast on CUDA stays within a few percent of fp32 on CPU (weights re-drawn so nothing is zero-init)."""
    from generator.dit import DiT, DiTConfig
    from generator.sample import generate_latent

    torch.manual_seed(0)
    model = DiT(DiTConfig(in_channels=4, hidden_size=128, depth=2, num_heads=2, text_dim=32)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    text = torch.randn(5, 32)
    kw = dict(steps=8, cfg_scale=3.0, seed=3, method="heun")
    cpu = generate_latent(model, text, (4, 3, 16, 24), **kw)
    gpu = generate_latent(model.to(CUDA), text, (4, 3, 16, 24), **kw).cpu()
    assert ((gpu - cpu).norm() / cpu.norm()).item() < 0.05


def test_2048_image_decodes_tiled_in_bounded_memory():
    from generator.sample import decode_latent
    from generator.vae import VAE, VAEConfig

    torch.manual_seed(0)
    vae = VAE(VAEConfig(channels=(32, 64, 64, 64), latent_channels=4)).to(CUDA).eval()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    img = decode_latent(vae, torch.randn(4, 1, 256, 256))
    assert img.shape == (3, 1, 2048, 2048) and torch.isfinite(img).all()
    # one full-resolution activation of the last stage (32 channels, fp32) is 512 MiB, and an untiled
    # conv holds its input and output (>= 1 GiB); 512-px tiles hold 1/16 of that per activation, plus
    # the 64 MiB output and blend weights
    full_activation = 32 * 2048 * 2048 * 4
    assert torch.cuda.max_memory_allocated() - base < 1.5 * full_activation
