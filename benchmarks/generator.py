"""Generator core benchmark: ratios measured side by side in one run.

1. packed / padded training tokens/s on a mixed-aspect, mixed-duration batch (target >= 1.5).
   Padded = every sample padded to the longest (pad tokens cost the linears and the attention,
   exactly as a key-masked padded batch does); only real tokens are counted for both.
2. achieved FLOP/s of a DiT training step / torch matmul FLOP/s at the same width (target >= 35%
   on CPU); on CUDA in bf16 this is the MFU against the measured bf16 matmul peak (and the datasheet's),
   eager and with compile_blocks side by side (CPU: --compile), with tokens/s.
3. VAE peak memory, chunked encode + decode, at 4x frames / 1x frames (target <= 1.25): peak RSS
   growth on CPU (VmHWM reset through /proc/self/clear_refs), max_memory_allocated on CUDA.
4. VAE training step with the perceptual / adversarial / both losses, each / plain L1 + MSE + KL.
5. (CPU) training batches from the latents table: peak memory streamed / the whole table read first,
   and streamed at 2x the rows / 1x.
6. (CUDA) packed-attention backends, forward + backward on one mixed batch, each / the auto choice:
   varlen, compiled flex with a block mask, the per-sample SDPA loop, a padded batch with a key mask.

Needs only torch + einops + safetensors (+ torchvision for the VGG16 of the perceptual loss):  python benchmarks/generator.py [--quick]
"""
import argparse
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from generator.dit import DiT, DiTConfig, compile_blocks  # noqa: E402
from generator.flow import RectifiedFlow  # noqa: E402
from generator.patches import pack, pack_sequences  # noqa: E402
from generator.train import adamw  # noqa: E402
from generator.vae import VAE, VAEConfig  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def best_time(fn, device, repeats: int):
    """Fastest of `repeats` timed calls after one warm-up (the machine may be shared)."""
    fn()
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best


# mixed aspect ratios and durations, in latent units (C=4, T, H, W): images and videos
MIXED = [(1, 16, 16), (1, 8, 24), (1, 24, 8), (2, 12, 12), (3, 16, 16), (5, 8, 16), (1, 32, 16), (9, 16, 16),
         (2, 8, 8), (1, 12, 20), (4, 16, 8), (1, 16, 32)]


def make_step(model, opt, latents, texts, device, dtype):
    p = pack(latents).to(device)
    y, ycu = pack_sequences(texts)
    y, ycu = y.to(device), ycu.to(device)
    rf, g = RectifiedFlow(), torch.Generator(device).manual_seed(0)

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = rf.loss(lambda z, t: model(z, t, p.positions, p.cu_seqlens, y, ycu), p.tokens, p.cu_seqlens, generator=g)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step, p


def padded_latents(latents):
    """Each latent zero-padded along the flattened grid to the longest token count: reshape to one
    long 'row' so the pad tokens join the sequence (what a padded batch computes)."""
    n = [t * (h // 2) * (w // 2) for _, t, h, w in (z.shape for z in latents)]
    L = max(n)
    out = []
    for z in latents:
        tokens = z.shape[1] * (z.shape[2] // 2) * (z.shape[3] // 2)
        flat = torch.zeros(z.shape[0], 1, 2, 2 * L)  # (C, 1, 2, 2L): a 1 x L token grid
        body = z.reshape(z.shape[0], -1)[:, : tokens * 4].reshape(z.shape[0], 1, 2, 2 * tokens)
        flat[..., : 2 * tokens] = body
        out.append(flat)
    return out


def bench_packing(device, dtype, width, depth, repeats, scale: int = 1, copies: int = 1):
    """Packed vs padded real tokens/s on MIXED, each sample's h and w times `scale`, the set `copies`
    times (a GPU needs a batch big enough that the step is not bound by kernel launches)."""
    torch.manual_seed(0)
    model = DiT(DiTConfig(in_channels=4, hidden_size=width, depth=depth, num_heads=width // 64, text_dim=64)).to(device)
    opt = adamw(model.parameters(), device, lr=1e-4)
    shapes = [(t, h * scale, w * scale) for t, h, w in MIXED] * copies
    latents = [torch.randn(4, *s) for s in shapes]
    texts = [torch.randn(8, 64) for _ in shapes]
    real = sum(t * (h // 2) * (w // 2) for t, h, w in shapes)
    step_packed, p = make_step(model, opt, latents, texts, device, dtype)
    step_padded, pp = make_step(model, opt, padded_latents(latents), texts, device, dtype)
    t_packed = best_time(step_packed, device, repeats)
    t_padded = best_time(step_padded, device, repeats)
    print(f"[packing] {len(shapes)} samples, {real} real tokens, {pp.tokens.shape[0]} padded tokens "
          f"(lengths {min(p.seqlens.tolist())}..{p.max_seqlen}); width {width} depth {depth}")
    print(f"[packing] packed/padded real tokens/s = {t_padded / t_packed:.2f}x (target >= 1.5)")
    if device.type == "cuda":
        print(f"[packing] packed tokens/s on {torch.cuda.get_device_name()}: {real / t_packed:,.0f}")


# dense bf16 tensor-core peaks from the datasheets (no sparsity), by a substring of the device name
DATASHEET_BF16 = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "A100": 312e12,
                  "L40S": 362e12, "B200": 2250e12}


def bench_mfu(device, dtype, width, depth, tokens, repeats, compiled: bool, sample=(4, 16, 16), eager: bool = True):
    """Achieved FLOP/s of a DiT train step / the measured matmul FLOP/s at the same width, eager and
    (with `compiled`) with compile_blocks, timed interleaved so both see the same machine load.
    sample: each sample's latent (t, h, w); patch 1x2x2, so (4, 16, 16) is 256 tokens."""
    per = sample[0] * (sample[1] // 2) * (sample[2] // 2)
    latents = [torch.randn(4, *sample) for _ in range(max(tokens // per, 1))]
    texts = [torch.randn(16, 64) for _ in latents]
    steps = {}
    for mode in ("eager",) * eager + ("compiled",) * compiled:
        torch.manual_seed(0)
        model = DiT(DiTConfig(in_channels=4, hidden_size=width, depth=depth, num_heads=width // 64, text_dim=64)).to(device)
        if mode == "compiled":
            compile_blocks(model)
        opt = adamw(model.parameters(), device, lr=1e-4)
        steps[mode], p = make_step(model, opt, latents, texts, device, dtype)
        try:
            steps[mode]()  # warm-up (the compile happens here)
        except Exception as e:  # e.g. no triton on this machine: still report the eager figure
            if mode == "eager" or not eager:
                raise
            print(f"[flops] compiled step failed, eager only: {type(e).__name__}: {str(e)[:300]}")
            del steps[mode]
    N = p.tokens.shape[0]
    flops = 3 * model.flops_per_token(p.seqlens.tolist(), 16) * N
    a = torch.randn(N, width, device=device, dtype=dtype)
    b = torch.randn(width, 4 * width, device=device, dtype=dtype)
    mm = lambda: a @ b  # the MLP's up-projection: the layer shape that dominates the step
    t_mm, t_step = [], {m: [] for m in steps}
    for _ in range(repeats):  # interleave so all see the same machine load
        t_mm.append(best_time(mm, device, 3))
        for m, fn in steps.items():
            t_step[m].append(best_time(fn, device, 1))
    peak = 2 * N * width * 4 * width / min(t_mm)
    achieved = {m: flops / min(t) for m, t in t_step.items()}
    print(f"[flops] DiT width {width} depth {depth}, {N} tokens in samples of {per}, train step {flops / 1e9:.1f} GFLOP, "
          f"matmul {peak / 1e12:.1f} TFLOP/s")
    label = "MFU (bf16) vs measured matmul" if dtype == torch.bfloat16 else "achieved / matmul FLOP/s"
    for m, f in achieved.items():
        print(f"[flops] {m}: {label} = {f / peak:.1%} (target >= {40 if device.type == 'cuda' else 35}%)")
    if "compiled" in achieved and "eager" in achieved:
        print(f"[flops] compiled / eager step speed = {achieved['compiled'] / achieved['eager']:.2f}x")
    if device.type == "cuda":
        name = torch.cuda.get_device_name()
        sheet = next((v for k, v in DATASHEET_BF16.items() if k in name), None)
        for m, f in achieved.items():
            print(f"[flops] {m}: train tokens/s {f / flops * N:,.0f}" + (
                f", MFU vs the {name} datasheet bf16 peak ({sheet / 1e12:.0f} TFLOP/s) = {f / sheet:.1%}" if sheet else ""))


def bench_sampling(device, dtype, width, depth, n=8, shape=(4, 5, 32, 32), steps=10):
    """Sampling n prompts (CFG) packed into one batch per step / one at a time (what `sample --prompts`
    does with its --batch-size). Each packed sample equals its lone self (tests), so only speed differs."""
    from generator.sample import generate_latent, generate_latents
    torch.manual_seed(0)
    model = DiT(DiTConfig(in_channels=4, hidden_size=width, depth=depth, num_heads=width // 64, text_dim=64)).to(device).eval()
    texts = [torch.randn(16, 64) for _ in range(n)]
    kw = dict(steps=steps, cfg_scale=4.0)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        t_batch = best_time(lambda: generate_latents(model, texts, [shape] * n, list(range(n)), **kw), device, 2)
        t_loop = best_time(lambda: [generate_latent(model, x, shape, seed=i, **kw) for i, x in enumerate(texts)], device, 2)
    print(f"[sampling] {n} samples of {shape} latents, {steps} steps with CFG, width {width} depth {depth}: "
          f"one at a time / packed = {t_loop / t_batch:.2f}x")


def bench_attention(device, heads=16, head_dim=72, repeats=5):
    """Packed attention backends, forward + backward on one mixed batch (CUDA, bf16): varlen, flex
    (compiled, block mask), the per-sample SDPA loop, and a padded batch with a key mask (what a
    bucket-padded trainer runs). Ratios are time / the auto choice's time."""
    from generator.dit import Seqs, choose_backend, flex_attention, packed_attention, varlen_attn
    import torch.nn.functional as F

    lens = [4096, 1024, 2048, 256, 8192, 512, 3072, 1, 1024, 4096, 768, 256]
    n, dtype = sum(lens), torch.bfloat16
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), device=device, dtype=torch.int32)
    q, k, v = (torch.randn(n, heads, head_dim, device=device, dtype=dtype, requires_grad=True) for _ in range(3))

    def packed(backend):
        seqs = Seqs(cu, cu, backend)
        return lambda: packed_attention(q, k, v, seqs).sum().backward()

    L = max(lens)
    pad = lambda x: torch.stack([F.pad(x[a:b], (0, 0, 0, 0, 0, L - (b - a))) for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())])
    mask = (torch.arange(L, device=device)[None] < torch.tensor(lens, device=device)[:, None])[:, None, None, :]

    qp, kp, vp = (pad(x.detach()).transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))  # (B, H, L, Dh)

    def padded():
        F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask).sum().backward()

    runs = {"loop": packed("loop"), "padded+mask": padded}
    if flex_attention is not None:
        runs["flex"] = packed("flex")
    if varlen_attn is not None:
        runs["varlen"] = packed("varlen")
    times = {name: best_time(fn, device, repeats) for name, fn in runs.items()}
    auto = choose_backend(device, dtype)
    print(f"[attention] {len(lens)} samples, {n} tokens (longest {L}), {heads} heads x {head_dim}; fwd+bwd time / "
          f"auto ({auto}): " + ", ".join(f"{k} {t / times[auto]:.2f}" for k, t in times.items()))


def bench_vae_losses(device, size, frames=9, batch=2):
    """Cost of the VAE's optional losses: seconds per training step with the perceptual loss (VGG16,
    randomly initialised: the cost is the same as with real weights), with the adversarial loss
    (PatchGAN step + the adaptive weight's two extra backward passes through the decoder), with both,
    each / plain L1 + MSE + KL. Per-step time = (time of 6 steps - time of 2) / 4: no set-up in it."""
    import tempfile

    from safetensors.torch import save_file
    from torchvision.models import vgg16

    from generator.vae_train import VAETrainConfig, train_vae

    with tempfile.TemporaryDirectory() as d:
        vgg = os.path.join(d, "vgg16.safetensors")
        save_file({f"features.{k}": v.contiguous() for k, v in vgg16(weights=None).features.state_dict().items()}, vgg)
        videos = torch.rand(4, 3, frames, size, size) * 2 - 1
        variants = {"plain": {}, "perceptual": {"perceptual": vgg}, "adversarial": {"adversarial_weight": 0.1},
                    "both": {"perceptual": vgg, "adversarial_weight": 0.1}}

        def per_step(kw):
            def run(steps):
                torch.manual_seed(0)
                vae = VAE(VAEConfig(channels=(32, 64, 128, 128)))
                t = time.perf_counter()
                train_vae(vae, videos, VAETrainConfig(steps=steps, batch_size=batch, log_every=0, device=device.type, **kw))
                sync(device)
                return time.perf_counter() - t
            n = 12 if device.type == "cuda" else 6  # a GPU step is short: more steps over the noise
            return (min(run(n) for _ in range(2)) - min(run(n // 3) for _ in range(2))) / (n - n // 3)
        times = {name: per_step(kw) for name, kw in variants.items()}
    print(f"[vae-train] {batch} x {frames} x {size}x{size} per step, time / plain: "
          + ", ".join(f"{k} {t / times['plain']:.2f}" for k, t in times.items() if k != "plain"))


def write_latents_table(root, rows: int, latent=(16, 5, 24, 24), text=(77, 64)):
    """A latents table of `rows` random rows (~240 KB each at the defaults), written as precompute does."""
    import pyarrow as pa

    from generator.precompute import LATENTS_SCHEMA, append_new, latents_path, tensor_to_bytes

    grid = dict(zip(("frames", "height", "width"), latent[1:]))
    for start in range(0, rows, 500):  # a few commits, as several precompute runs would leave
        batch = [{"clip_id": f"{i:08d}", "bucket": grid, "pixels": grid, "frame_offset": 0, "fps": 24.0,
                  "latent": tensor_to_bytes(torch.randn(latent), "latent"), "text_embedding": tensor_to_bytes(
                      torch.randn(text), "text"), "caption": "", "vae_sha": "v", "text_encoder_sha": "t",
                  "clips_version": 0} for i in range(start, min(rows, start + 500))]
        append_new(latents_path(root), pa.Table.from_pylist(batch, schema=LATENTS_SCHEMA), {})


def latent_read_growth(root, mode: str) -> int:
    """Peak RSS growth (bytes) of one epoch of training batches from the table at `root`: `whole`
    reads the table into memory first (what LatentBatches did), `stream` is LatentBatches now."""
    from generator.data import LatentBatches, read_latents, row_tensors
    from generator.patches import crop_to_patch
    base = reset_peak_rss()
    if mode == "whole":
        table, _ = read_latents(root)
        for i in range(table.num_rows):
            crop_to_patch(row_tensors(table, i)[0], (1, 2, 2))
    else:
        b = LatentBatches(root, None, (1, 2, 2), max_tokens=4096, window_rows=256)
        for _ in range(len(b)):
            next(b)
            if b.epoch:
                break
    return _status_kb("VmHWM") * 1024 - base


def bench_latent_stream(rows: int):
    """Training batches from the latents table: peak memory streamed (row groups in shuffled windows
    of 256 rows) / the whole table read first, and streamed at 2x the rows / 1x (target ~1: flat)."""
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        growth = {}
        for n in (rows, 2 * rows):
            root = os.path.join(d, str(n))
            write_latents_table(root, n)
            for mode in ("whole", "stream"):
                growth[n, mode] = in_child("--latents-child", f"{root},{mode}")
    mib = {k: v / 2**20 for k, v in growth.items()}
    print(f"[latents] one epoch of batches, {rows} / {2 * rows} rows of ~240 KB: peak growth whole table "
          f"{mib[rows, 'whole']:.0f} / {mib[2 * rows, 'whole']:.0f} MiB, streamed {mib[rows, 'stream']:.0f} / "
          f"{mib[2 * rows, 'stream']:.0f} MiB")
    print(f"[latents] streamed / whole table = {growth[2 * rows, 'stream'] / growth[2 * rows, 'whole']:.2f}; "
          f"streamed at 2x rows / 1x = {growth[2 * rows, 'stream'] / growth[rows, 'stream']:.2f} (target ~1)")


def in_child(flag: str, arg: str) -> int:
    """A memory measurement in a fresh process (freed heap pages stay resident, so a second one in
    this process would read low): this script with `flag arg`, its last stdout line as an int."""
    out = subprocess.run([sys.executable, os.path.abspath(__file__), flag, arg], capture_output=True, text=True,
                         check=True)
    return int(out.stdout.strip().splitlines()[-1])


def reset_peak_rss() -> int:
    """Reset VmHWM (peak RSS) to the current RSS, and return that RSS in bytes."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kb("VmRSS") * 1024


def _status_kb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])


def vae_peak_growth(device, frames, size, chunk):
    """Peak memory growth (bytes) of a chunked encode + decode of one video, over the memory held
    before the call. On CPU run this in a fresh process: freed heap pages stay resident, so a
    second measurement in the same process would reuse them and read low."""
    torch.manual_seed(0)
    vae = VAE(VAEConfig(channels=(32, 64, 128, 128))).to(device).eval()
    x = torch.rand(1, 3, frames, size, size, device=device) * 2 - 1
    with torch.no_grad():
        vae.decode(vae.encode(x[:, :, :1]).mean)  # warm-up: allocator pools, lazy init
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            base = reset_peak_rss()
        vae.decode(vae.encode(x, chunk_frames=chunk).mean, chunk_frames=chunk)
        peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else _status_kb("VmHWM") * 1024
    return peak - base


def bench_vae_memory(device, frames, size, chunk):
    sizes = (frames, 4 * (frames - 1) + 1)
    if device.type == "cuda":
        peaks = [vae_peak_growth(device, T, size, chunk) for T in sizes]
    else:
        peaks = [in_child("--vae-child", f"{T},{size},{chunk}") for T in sizes]
    print(f"[vae] chunked ({chunk} frames) encode+decode at {size}x{size}: peak growth {sizes[0]} frames "
          f"{peaks[0] / 2**20:.0f} MiB, {sizes[1]} frames {peaks[1] / 2**20:.0f} MiB "
          f"(input + output video grow 4x: {2 * 3 * 4 * size * size * (sizes[1] - sizes[0]) / 2**20:.0f} MiB more)")
    print(f"[vae] peak memory 4x frames / 1x = {peaks[1] / peaks[0]:.2f} (target <= 1.25)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads (1 default: on a shared machine more threads mostly wait on each other)")
    ap.add_argument("--compile", action="store_true",
                    help="on CPU also time the step with compile_blocks (always on CUDA; the compile takes a while)")
    ap.add_argument("--vae-child", help=argparse.SUPPRESS)
    ap.add_argument("--latents-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.latents_child:
        root, mode = args.latents_child.split(",")
        print(latent_read_growth(root, mode))
        return
    if args.vae_child:
        T, size, chunk = map(int, args.vae_child.split(","))
        print(vae_peak_growth(device, T, size, chunk))
        return
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else f'{torch.get_num_threads()} threads'}), dtype {dtype}")
    if device.type == "cuda":
        bench_mfu(device, dtype, 1152, 4, 32768, 5, compiled=True)  # first: the figure issue 6 waits on
        # deeper, longer samples amortise the embedders, final layer and optimizer (H100: 41% vs 39.6%)
        bench_mfu(device, dtype, 1152, 8, 32768, 3, compiled=True, sample=(4, 32, 32), eager=False)
        bench_packing(device, dtype, 1152, 4, 5, scale=2, copies=4)
        bench_vae_memory(device, 17, 256, 8)
        bench_attention(device)
        bench_sampling(device, dtype, 1152, 4)
        bench_vae_losses(device, 128)
    else:
        r = 2 if args.quick else 4
        bench_packing(device, dtype, 256, 2, r)
        bench_mfu(device, dtype, 384, 2, 2048 if args.quick else 4096, r, compiled=args.compile)
        bench_vae_memory(device, 17, 64 if args.quick else 128, 8)
        bench_vae_losses(device, 32 if args.quick else 64)
        bench_sampling(device, dtype, 192, 2, shape=(4, 3, 16, 16))
        bench_latent_stream(1000 if args.quick else 1500)  # deltalake + pyarrow: the project's venv, not the GPU image


if __name__ == "__main__":
    main()
