"""Shared fixtures. Ray starts once per test module (≈3-20 s each), never per test."""
import pytest


@pytest.fixture(scope="module")
def ray_session():
    """A real local Ray with 2 CPUs for this module; yields the ray module."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def one_torch_thread():
    """Torch on one thread for this module: on a shared machine OpenMP spin-waits cost more than it gains."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def vgg16_weights(tmp_path_factory):
    """Randomly initialised VGG16 features as a local weights file, for the VAE's perceptual loss
    (no download: tests build models from configs; random conv features still make a perceptual space)."""
    import torch
    from safetensors.torch import save_file
    from torchvision.models import vgg16

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vgg") / "vgg16.safetensors"
    save_file({f"features.{k}": v.contiguous() for k, v in vgg16(weights=None).features.state_dict().items()}, str(path))
    return str(path)


def _exit_when_done(rank, fn, args):
    """One rank: fn(rank, *args), then leave without interpreter teardown. Its results are written by
    then; gloo's threads can abort the process while the interpreter finalises (SIGABRT, 'terminate
    called without an active exception', seen once in CI), which would fail a rank that did its work.
    An exception in fn still fails the rank (spawn records it before this line)."""
    import os
    import sys

    fn(rank, *args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@pytest.fixture
def run_ranks():
    """run_ranks(fn, args, nprocs, timeout): torch.multiprocessing.spawn of fn(rank, *args) on nprocs
    processes; a collective mismatch hangs every rank, so past `timeout` seconds they are killed and
    the test fails instead of hanging CI."""
    import time

    import torch.multiprocessing as mp

    def run(fn, args, nprocs=2, timeout=300):
        procs = mp.spawn(_exit_when_done, args=(fn, args), nprocs=nprocs, join=False)
        deadline = time.time() + timeout
        while not procs.join(timeout=5):
            if time.time() > deadline:
                for p in procs.processes:
                    p.kill()
                pytest.fail(f"the {nprocs} ranks did not finish in {timeout} s (a hang in a collective?)")
    return run


@pytest.fixture
def ray_with_fake_gpu():
    """ray_with_fake_gpu(code, num_cpus) -> stdout: `code` run in a fresh Python whose local Ray
    advertises one GPU the machine does not have, so GPU-asking actors schedule and fall back to CPU
    torch (a subprocess: the module's own Ray has no GPU). Fails the test with its stderr on error."""
    import subprocess
    import sys
    from pathlib import Path

    def run(code: str, num_cpus: int = 2) -> str:
        script = (f"import ray\nray.init(address='local', num_cpus={num_cpus}, num_gpus=1, include_dashboard=False, "
                  f"log_to_driver=False)\n{code}")
        r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                           cwd=Path(__file__).resolve().parents[1])
        assert r.returncode == 0, (r.stdout, r.stderr[-2000:])
        return r.stdout
    return run
