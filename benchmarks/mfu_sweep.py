"""bf16 MFU of the compiled DiT train step across sample lengths and depths (CUDA), and where the
step's time goes (the profiler's top kernels): what to change to raise MFU.

    python benchmarks/mfu_sweep.py
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.generator import bench_mfu, make_step  # noqa: E402
from generator.dit import DiT, DiTConfig, compile_blocks  # noqa: E402
from generator.train import adamw  # noqa: E402


def profile(width=1152, depth=4, sample=(4, 32, 32), tokens=32768):
    dev = torch.device("cuda")
    model = DiT(DiTConfig(in_channels=4, hidden_size=width, depth=depth, num_heads=width // 64, text_dim=64)).to(dev)
    compile_blocks(model)
    opt = adamw(model.parameters(), dev, lr=1e-4)
    per = sample[0] * (sample[1] // 2) * (sample[2] // 2)
    lat = [torch.randn(4, *sample) for _ in range(tokens // per)]
    step, _ = make_step(model, opt, lat, [torch.randn(16, 64) for _ in lat], dev, torch.bfloat16)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile as prof
    with prof(activities=[ProfilerActivity.CUDA]) as p:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    print(p.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=70))


if __name__ == "__main__":
    dev = torch.device("cuda")
    profile()
    for depth, sample in ((8, (4, 32, 32)), (4, (16, 32, 32))):
        bench_mfu(dev, torch.bfloat16, 1152, depth, 32768, 3, compiled=True, sample=sample, eager=False)
        sys.stdout.flush()
