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
