"""Generator model core: VAE, patches + packing, DiT, rectified flow (small real models, CPU)."""
import pytest
import torch

from generator.dit import DiT_T, DiTConfig, DiT, load_dit, save_dit
from generator.flow import RectifiedFlow, shift_t
from generator.patches import crop_to_patch, pack, pack_sequences, patchify, unpack, unpatchify
from generator.shapes import embed_caption, judge, make_dataset, make_video
from generator.vae_train import VAETrainConfig, train_vae
from generator.vae import VAE, VAEConfig, load_vae, psnr, save_vae

TINY_VAE = VAEConfig(channels=(8, 16, 16, 16), latent_channels=4)


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    yield


def smooth_video(b, t, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 3, (t + 3) // 4 + 1, h // 8, w // 8, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(x, size=(t, h, w), mode="trilinear")


# ----------------------------------------------------------------------------- VAE

def test_vae_shapes_video_and_image():
    vae = VAE(TINY_VAE).eval()
    with torch.no_grad():
        post = vae.encode(smooth_video(2, 9, 32, 48))
        assert post.mean.shape == (2, 4, 3, 4, 6)  # 1 + (9-1)/4 frames, /8 space
        assert vae.decode(post.mean).shape == (2, 3, 9, 32, 48)
        img = vae.encode(smooth_video(1, 1, 32, 32))  # an image is a 1-frame video
        assert img.mean.shape == (1, 4, 1, 4, 4)
        assert vae.decode(img.mean).shape == (1, 3, 1, 32, 32)
    assert vae.latent_shape(17, 64, 64) == (4, 5, 8, 8)
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        vae.encode(smooth_video(1, 8, 32, 32))
    with pytest.raises(ValueError, match="multiples of 8"):
        vae.encode(smooth_video(1, 5, 36, 32))


def test_vae_patch_size_folds_pixels(tmp_path):
    cfg = VAEConfig(channels=(8, 16), latent_channels=4, patch_size=2, time_downsample=1)  # 2x2 fold + one 2x stage
    assert cfg.space_factor == 4 and cfg.time_factor == 2
    with pytest.raises(ValueError, match="time_downsample must be 0..1"):
        VAEConfig(channels=(8, 16), time_downsample=2)
    torch.manual_seed(0)
    vae = VAE(cfg).eval()
    x = smooth_video(1, 9, 16, 24)
    with torch.no_grad():
        z = vae.encode(x).mean
        assert z.shape == (1, 4, *vae.latent_shape(9, 16, 24)[1:]) == (1, 4, 5, 4, 6)
        assert vae.decode(z).shape == x.shape
        # still causal: the first latent frame depends on frame 0 only
        y = x.clone()
        y[:, :, 1:] = -y[:, :, 1:]
        assert torch.allclose(vae.encode(y).mean[:, :, 0], z[:, :, 0], atol=1e-5)
    with pytest.raises(ValueError, match="multiples of 4"):
        vae.encode(smooth_video(1, 5, 18, 24))
    save_vae(vae, tmp_path / "v.safetensors")
    again = load_vae(tmp_path / "v.safetensors")
    assert again.cfg.patch_size == 2
    with torch.no_grad():
        assert torch.allclose(again.encode(x).mean, z)


def test_vae_causal_first_frame_independent_of_future():
    vae = VAE(TINY_VAE).eval()
    x = smooth_video(1, 9, 32, 32)
    y = x.clone()
    y[:, :, 5:] = -x[:, :, 5:]  # change only the future
    with torch.no_grad():
        a, b = vae.encode(x).mean, vae.encode(y).mean
    assert torch.equal(a[:, :, :2], b[:, :, :2])  # latent frames 0, 1 cover pixel frames 0..4
    assert not torch.allclose(a[:, :, 2:], b[:, :, 2:])


def test_vae_chunked_equals_full_and_tiled_close():
    torch.manual_seed(0)
    vae = VAE(TINY_VAE).eval()
    x = smooth_video(1, 17, 64, 64)
    with torch.no_grad():
        full = vae.encode(x).mean
        chunked = vae.encode(x, chunk_frames=4).mean
        assert torch.allclose(full, chunked, atol=1e-5)
        dec = vae.decode(full)
        assert torch.allclose(dec, vae.decode(full, chunk_frames=4), atol=1e-5)
        assert torch.allclose(dec, vae.decode(full, chunk_frames=8), atol=1e-5)
        # tiling is approximate (zero padding at tile borders); blended overlaps keep it close,
        # and closer the wider the overlap
        x = smooth_video(1, 5, 128, 128)
        full = vae.encode(x).mean
        err = [(vae.encode(x, tile=96, overlap=ov).mean - full).abs().mean() for ov in (16, 64)]
        assert err[1] < err[0] and err[1] < 0.15 * full.std(), (err, full.std())
        dec = vae.decode(full)
        dec_t = vae.decode(full, chunk_frames=4, tile=96, overlap=64)
        assert (dec_t - dec).abs().mean() < 0.15 * dec.std()
    with pytest.raises(ValueError, match="multiple of 4"):
        vae.encode(x, chunk_frames=3)


def test_vae_refuses_a_chunk_that_is_not_positive():
    """A negative chunk_frames passed the multiple-of-4 check (-4 % 4 == 0) and the chunk loop stepped
    backwards forever, its bounds list growing until memory ran out."""
    vae = VAE(TINY_VAE).eval()
    x = smooth_video(1, 9, 16, 16)
    with torch.no_grad():
        z = vae.encode(x).mean
        for chunk in (-4, -8):
            with pytest.raises(ValueError, match="positive multiple of 4"):
                vae.encode(x, chunk_frames=chunk)
            with pytest.raises(ValueError, match="positive multiple of 4"):
                vae.decode(z, chunk_frames=chunk)


def test_first_frame_conv_is_the_3d_conv_with_summed_taps():
    """A video's first frame alone runs as a 2D conv (weights summed over time): the same output and
    gradients as the 3D conv over the frame repeated into the past, and the same cache for the next chunk."""
    from generator.vae import CausalConv3d
    torch.manual_seed(0)
    conv = CausalConv3d(4, 6)
    x = torch.randn(2, 4, 1, 9, 7, requires_grad=True)
    fast = conv(x)
    ref = conv.conv(x.expand(-1, -1, 3, -1, -1))  # frame 0 repeated into the past, as a 3D conv
    assert torch.allclose(fast, ref, atol=1e-5) and fast.shape == ref.shape
    assert torch.equal(conv.cache, x.detach().expand(-1, -1, 2, -1, -1))
    g_fast = torch.autograd.grad(fast.square().sum(), (x, conv.conv.weight))
    g_ref = torch.autograd.grad(ref.square().sum(), (x, conv.conv.weight))
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(g_fast, g_ref))
    nxt = torch.randn(2, 4, 2, 9, 7)  # the next chunk continues from the cache
    assert torch.allclose(conv(nxt), conv.conv(torch.cat([x.detach().expand(-1, -1, 2, -1, -1), nxt], 2)), atol=1e-5)


def test_vae_learns_on_shapes():
    torch.manual_seed(0)
    videos = torch.stack([v.permute(1, 0, 2, 3) for v, _, _ in make_dataset(16, frames=5, size=32, seed=0)])
    vae = VAE(TINY_VAE)
    hist = train_vae(vae, videos, VAETrainConfig(steps=40, lr=3e-3, batch_size=2, log_every=0))
    first = sum(h["loss"] for h in hist[:5]) / 5
    last = sum(h["loss"] for h in hist[-5:]) / 5
    assert last < 0.5 * first, (first, last)
    with torch.no_grad():
        rec = vae.decode(vae.encode(videos[:4]).mean)
    start_psnr = sum(h["psnr"] for h in hist[:3]) / 3
    assert psnr(rec, videos[:4]) > start_psnr + 3, (start_psnr, psnr(rec, videos[:4]))


def test_vae_save_load_and_mismatch(tmp_path):
    vae = VAE(TINY_VAE)
    p = str(tmp_path / "vae.safetensors")
    save_vae(vae, p)
    back = load_vae(p)
    assert back.cfg == vae.cfg
    for k, v in vae.state_dict().items():
        assert torch.equal(v, back.state_dict()[k])
    with pytest.raises(ValueError, match="missing keys .*unexpected keys"):
        load_vae(p, VAEConfig(channels=(8, 16, 16, 16, 16), latent_channels=4))


def test_encode_video_runs_a_long_input_in_chunks():
    """encode_video (the tasks' input encoder) chunks time as decode_latent does: the encoder never
    holds the whole video (its memory grew with the input's length), and the latent is the same."""
    from generator.sample import encode_video

    torch.manual_seed(0)
    vae = VAE(VAEConfig(channels=(8, 16, 16, 16), latent_channels=4)).eval()
    x = smooth_video(1, 41, 16, 16)[0]
    seen = []
    hook = vae.encoder.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[2]))
    z = encode_video(vae, x)
    hook.remove()
    assert max(seen) <= 16, seen  # frame 0, then chunks of 4 latent frames' worth of pixels
    with torch.no_grad():
        torch.testing.assert_close(z, vae.to_dit(vae.encode(x[None]).mean[0]), atol=1e-5, rtol=0)


def test_vae_shift_and_scale_give_the_dit_standard_latents_and_undo_exactly(tmp_path):
    from generator.sample import decode_latent, encode_video

    vae = VAE(TINY_VAE).eval()
    x = smooth_video(1, 5, 16, 16)[0]
    with torch.no_grad():
        raw = vae.encode(x[None]).mean[0]
        plain = vae.decode(raw[None])[0].clamp(-1, 1)
    vae.fit_latent_stats(raw)
    z = encode_video(vae, x)
    assert abs(float(z.mean())) < 1e-5 and abs(float(z.std()) - 1) < 1e-4
    assert torch.allclose(decode_latent(vae, z), plain, atol=1e-5)   # the DiT's latents decode as the raw ones
    p = str(tmp_path / "vae.safetensors")
    save_vae(vae, p)
    assert load_vae(p).cfg.shift_factor == vae.cfg.shift_factor     # the shift travels with the weights
    # fitting one VAE leaves the config it was built from, and so every other VAE built from it, alone
    assert (TINY_VAE.shift_factor, TINY_VAE.scaling_factor) == (0.0, 1.0)
    assert torch.equal(VAE(TINY_VAE).to_dit(raw), raw)


# ------------------------------------------------------------------- patches, packing

def test_patchify_roundtrip_and_errors():
    z = torch.randn(4, 3, 6, 8)
    tokens, grid = patchify(z, (1, 2, 2))
    assert tokens.shape == (3 * 3 * 4, 16) and grid == (3, 3, 4)
    assert torch.equal(unpatchify(tokens, grid, (1, 2, 2), 4), z)
    with pytest.raises(ValueError, match="not divisible"):
        patchify(torch.randn(4, 3, 5, 8), (1, 2, 2))
    with pytest.warns(UserWarning, match="cropping"):
        assert crop_to_patch(torch.randn(4, 3, 5, 8), (1, 2, 2)).shape == (4, 3, 4, 8)


def test_pack_unpack_mixed_sizes():
    lats = [torch.randn(4, 3, 4, 6), torch.randn(4, 1, 8, 8), torch.randn(4, 5, 2, 2)]
    p = pack(lats)
    assert p.cu_seqlens.tolist() == [0, 18, 34, 39]
    assert p.tokens.shape == (39, 16) and p.positions.shape == (39, 3)
    assert p.positions[18:34, 0].eq(0).all() and p.positions[:18, 0].max() == 2  # (t, h, w) per sample
    assert p.sample_index().tolist() == [0] * 18 + [1] * 16 + [2] * 5
    for a, b in zip(lats, unpack(p.tokens, p)):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------ DiT

def _randomised_dit(**kw):
    torch.manual_seed(0)
    m = DiT_T(in_channels=4, text_dim=16, **kw)
    with torch.no_grad():  # break the zero init so every path contributes
        for p in m.parameters():
            p.normal_(0, 0.05)
    return m


def test_dit_packing_leaks_nothing_between_samples():
    m = _randomised_dit()
    lats = [torch.randn(4, 3, 4, 6), torch.randn(4, 1, 8, 8), torch.randn(4, 2, 2, 4)]  # video, image, video
    texts = [torch.randn(5, 16), torch.randn(3, 16), torch.randn(7, 16)]
    p, (y, ycu) = pack(lats), pack_sequences(texts)
    t = torch.tensor([0.2, 0.5, 0.9])
    with torch.no_grad():
        out = m(p.tokens, t, p.positions, p.cu_seqlens, y, ycu)
        assert out.shape == p.tokens.shape
        for i in range(3):
            pi, (yi, yci) = pack([lats[i]]), pack_sequences([texts[i]])
            alone = m(pi.tokens, t[i:i + 1], pi.positions, pi.cu_seqlens, yi, yci)
            a, b = p.cu_seqlens[i].item(), p.cu_seqlens[i + 1].item()
            assert torch.allclose(alone, out[a:b], atol=1e-5)
        # per-token timesteps equal to the per-sample ones give the same answer
        per_tok = m(p.tokens, t[p.sample_index()], p.positions, p.cu_seqlens, y, ycu)
        assert torch.allclose(per_tok, out, atol=1e-5)
        # a token at t = 0 changes only its own sample
        t_tok = t[p.sample_index()].clone()
        t_tok[:3] = 0
        mixed = m(p.tokens, t_tok, p.positions, p.cu_seqlens, y, ycu)
        assert not torch.allclose(mixed[:18], out[:18]) and torch.allclose(mixed[18:], out[18:], atol=1e-5)
        # CFG null text for sample 1 only changes sample 1
        dropped = m(p.tokens, t, p.positions, p.cu_seqlens, y, ycu, drop_text=torch.tensor([False, True, False]))
        assert torch.allclose(dropped[:18], out[:18], atol=1e-5) and not torch.allclose(dropped[18:34], out[18:34])


def test_dit_per_token_times_share_condition_rows_per_sample():
    # per-token times are deduplicated to one adaLN row per (sample, t): samples sharing a t value
    # must still keep their own pooled text, and a clean (t = 0) frame its own row
    m = _randomised_dit(pooled_text=True)
    lats, texts = [torch.randn(4, 2, 4, 4), torch.randn(4, 2, 4, 4)], [torch.randn(3, 16), torch.randn(5, 16)]
    p, (y, ycu) = pack(lats), pack_sequences(texts)
    t = torch.tensor([0.5, 0.5])
    with torch.no_grad():
        out = m(p.tokens, t, p.positions, p.cu_seqlens, y, ycu)
        per_tok = m(p.tokens, t[p.sample_index()], p.positions, p.cu_seqlens, y, ycu)
        torch.testing.assert_close(per_tok, out, atol=1e-5, rtol=1e-5)
        t_tok = t[p.sample_index()].clone()
        t_tok[p.positions[:, 0] == 0] = 0  # each sample's first latent frame held clean
        mixed = m(p.tokens, t_tok, p.positions, p.cu_seqlens, y, ycu)
        for i in range(2):  # = each sample alone with the same per-token times
            a, b = p.cu_seqlens[i].item(), p.cu_seqlens[i + 1].item()
            pi, (yi, yci) = pack([lats[i]]), pack_sequences([texts[i]])
            alone = m(pi.tokens, t_tok[a:b], pi.positions, pi.cu_seqlens, yi, yci)
            torch.testing.assert_close(alone, mixed[a:b], atol=1e-5, rtol=1e-5)


def test_dit_text_paths_and_absolute_positions():
    lat, text = torch.randn(4, 2, 4, 4), [torch.randn(3, 16)]
    p, (y, ycu) = pack([lat]), pack_sequences(text)
    t = torch.tensor([0.5])
    for pooled in (True, False):
        m = _randomised_dit(pooled_text=pooled)
        with torch.no_grad():
            for b in m.blocks:  # cut the cross-attention path: only adaLN can still see the text
                b.cross_attn.proj.weight.zero_()
                b.cross_attn.proj.bias.zero_()
            a = m(p.tokens, t, p.positions, p.cu_seqlens, y, ycu)
            b = m(p.tokens, t, p.positions, p.cu_seqlens, y + 1.0, ycu)
        assert torch.allclose(a, b) != pooled  # pooled text modulates; without it the words act by cross-attention only
    # absolute positions: the same content at another place in the grid gives another answer
    m = _randomised_dit(abs_pos=True)
    shifted = p.positions.clone()
    shifted[:, 2] += 1
    with torch.no_grad():
        moved = m(p.tokens, t, shifted, p.cu_seqlens, y, ycu)
        same = m(p.tokens, t, p.positions, p.cu_seqlens, y, ycu)
        assert not torch.allclose(moved, same, atol=1e-4)
        m.cfg.abs_pos = False  # RoPE alone is relative: a shift of every position changes nothing
        assert torch.allclose(m(p.tokens, t, shifted, p.cu_seqlens, y, ycu),
                              m(p.tokens, t, p.positions, p.cu_seqlens, y, ycu), atol=1e-4)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_dit_flex_forward_matches_loop():
    m = _randomised_dit()
    p = pack([torch.randn(4, 2, 4, 4), torch.randn(4, 1, 6, 4)])
    y, ycu = pack_sequences([torch.randn(4, 16), torch.randn(2, 16)])
    t = torch.tensor([0.3, 0.7])
    with torch.no_grad():
        loop = m(p.tokens, t, p.positions, p.cu_seqlens, y, ycu)
        m.cfg.attention = "flex"  # flex runs forward on CPU (no backward): check it agrees
        flex = m(p.tokens, t, p.positions, p.cu_seqlens, y, ycu)
    assert torch.allclose(loop, flex, atol=1e-5)


def test_dit_zero_init_and_grad_checkpointing():
    torch.manual_seed(0)
    m = DiT_T(in_channels=4, text_dim=16)
    p = pack([torch.randn(4, 2, 4, 4), torch.randn(4, 1, 4, 4)])
    y, ycu = pack_sequences([torch.randn(4, 16), torch.randn(2, 16)])
    t = torch.tensor([0.3, 0.7])
    assert m(p.tokens, t, p.positions, p.cu_seqlens, y, ycu).abs().max() == 0  # adaLN-Zero: output starts at 0
    m = _randomised_dit()
    grads = []
    for ckpt in (False, True):
        m.cfg.grad_checkpointing = ckpt
        m.zero_grad()
        m(p.tokens, t, p.positions, p.cu_seqlens, y, ycu).pow(2).sum().backward()
        grads.append(torch.cat([q.grad.flatten() for q in m.parameters() if q.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_dit_save_load_mismatch(tmp_path):
    m = DiT_T(in_channels=4, text_dim=16)
    path = str(tmp_path / "dit.safetensors")
    save_dit(m, path)
    assert load_dit(path).cfg == m.cfg
    with pytest.raises(ValueError, match="missing keys \\['blocks.2"):
        load_dit(path, DiTConfig(in_channels=4, text_dim=16, hidden_size=64, depth=3, num_heads=2))


# ----------------------------------------------------------------------------- flow

def test_flow_time_shift_and_oracle_samplers():
    rf = RectifiedFlow(base_tokens=16)
    small, big = torch.tensor([16] * 4000), torch.tensor([256] * 4000)
    g = torch.Generator().manual_seed(0)
    assert rf.sample_t(big, g).mean() > rf.sample_t(small, g).mean() + 0.1  # more tokens -> noisier
    assert torch.allclose(shift_t(torch.tensor([0.0, 1.0]), 3.0), torch.tensor([0.0, 1.0]))
    # with the exact velocity of a single data point, both samplers land on it
    x0 = torch.randn(10, 8)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)

    def oracle(z, t):
        t = t if t.shape[0] == z.shape[0] else t[torch.tensor([0] * 4 + [1] * 6)]
        return (z - x0) / t[:, None].clamp_min(1e-6)
    for method in ("euler", "heun"):
        out = rf.sample(oracle, torch.randn(10, 8, generator=g), cu, steps=8, method=method)
        assert torch.allclose(out, x0, atol=1e-4)
    # clean tokens stay fixed and the model is given t = 0 for them
    clean = torch.zeros(10, dtype=torch.bool)
    clean[:2] = True
    out = rf.sample(oracle, torch.randn(10, 8, generator=g), cu, steps=4, clean=clean, x_clean=x0)
    assert torch.equal(out[:2], x0[:2])


def test_flow_cfg_combines_velocities():
    rf = RectifiedFlow(resolution_shift=False)
    cu = torch.tensor([0, 3], dtype=torch.int32)
    cond = lambda z, t: torch.ones_like(z)
    uncond = lambda z, t: torch.zeros_like(z)
    out = rf.sample(cond, torch.zeros(3, 2), cu, steps=2, cfg_scale=3.0, uncond=uncond)
    assert torch.allclose(out, torch.full((3, 2), -3.0))  # integrates v = 3 from t = 1 to 0


def test_generate_latents_batch_equals_each_sample_alone():
    # Patch n' Pack at inference: mixed sizes, texts, seeds, a conditioned and an SDEdit sample in one
    # batch each give what they give alone (block-diagonal attention, per-sample noise and time grids)
    from generator.sample import generate_latent, generate_latents
    m = _randomised_dit().eval()
    shapes = [(4, 3, 4, 6), (4, 1, 8, 8), (4, 2, 2, 4)]
    texts = [torch.randn(5, 16), torch.randn(3, 16), torch.randn(7, 16)]
    kw = dict(steps=3, cfg_scale=3.0, method="heun", base_tokens=16)
    batch = generate_latents(m, texts, shapes, [0, 1, 2], **kw)
    alone = [generate_latent(m, x, s, seed=i, **kw) for i, (x, s) in enumerate(zip(texts, shapes))]
    assert [tuple(z.shape) for z in batch] == shapes
    for a, b in zip(batch, alone):
        assert torch.allclose(a, b, atol=1e-5)
    assert not torch.allclose(batch[0], generate_latent(m, texts[0], shapes[0], seed=1, **kw), atol=1e-3)

    cond = torch.randn(*shapes[0])
    frames = torch.tensor([True, False, False])
    batch = generate_latents(m, texts, shapes, [0, 1, 2], conds=[(cond, frames), None, None], **kw)
    held = generate_latent(m, texts[0], shapes[0], seed=0, cond=cond, cond_frames=frames, **kw)
    assert torch.allclose(batch[0], held, atol=1e-5) and torch.equal(held[:, 0], cond[:, 0])
    assert torch.allclose(batch[1], alone[1], atol=1e-5)  # an unconditioned neighbour is untouched

    inits = [torch.randn(*s) for s in shapes]
    batch = generate_latents(m, texts, shapes, [0, 1, 2], inits=inits, strength=0.5, **kw)
    for i in range(3):
        one = generate_latent(m, texts[i], shapes[i], seed=i, init=inits[i], strength=0.5, **kw)
        assert torch.allclose(batch[i], one, atol=1e-5)
    with pytest.raises(ValueError, match="one shape and one seed per text"):
        generate_latents(m, texts, shapes[:2], [0, 1, 2], **kw)
    with pytest.raises(ValueError, match="needs an init"):
        generate_latents(m, texts, shapes, [0, 1, 2], inits=[inits[0], None, inits[2]], strength=0.5, **kw)


def test_shapes_judge_reads_its_own_videos():
    data = make_dataset(12, frames=9, size=32, seed=3) + make_dataset(4, frames=9, size=32, seed=4, held_out=True)
    assert all(judge(v) == (c, d) for v, _, (c, _, d) in data)
    assert embed_caption("a red circle moving left", 32).shape == (5, 32)


def test_shapes_there_and_back_videos_loop_and_leave_one_way_data_unchanged():
    import random

    v = make_video("red", "circle", "left", frames=17, size=32, rng=random.Random(0), back=True)
    one_way = make_video("red", "circle", "left", frames=17, size=32, rng=random.Random(0))
    assert torch.equal(v[0], one_way[0]) and torch.equal(v[-1], v[0])  # returns to its start
    assert (v[8] - v[0]).abs().mean() > 0.1                              # and moves in between
    mixed = make_dataset(40, frames=9, size=32, seed=0, back=0.5)
    backs = [cap for _, cap, _ in mixed if cap.endswith(" and back")]
    assert 8 <= len(backs) <= 32
    plain = make_dataset(12, frames=9, size=32, seed=0)
    assert all(torch.equal(a[0], b[0]) and a[1] == b[1] for a, b in zip(plain, make_dataset(12, frames=9, size=32, seed=0, back=0.0)))


def test_save_is_atomic(tmp_path, monkeypatch):
    """A save that dies half-way (kill, full disk) leaves the previous file whole and no temp file."""
    import generator.vae as vae_mod
    from generator.vae import VAE, VAEConfig, load_vae, save_vae

    torch.manual_seed(0)
    cfg = VAEConfig(channels=(8, 8, 8), time_downsample=2, latent_channels=4)
    path = tmp_path / "vae.safetensors"
    save_vae(VAE(cfg), str(path))
    before = path.read_bytes()

    def torn(state, file, metadata=None):
        open(file, "wb").write(b"half a header")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(vae_mod, "save_file", torn)
    with pytest.raises(OSError):
        save_vae(VAE(cfg), str(path))
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["vae.safetensors"]
    load_vae(str(path))
