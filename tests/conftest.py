"""Test set-up: CPU runs execute the Triton kernels on Triton's interpreter.

TRITON_INTERPRET must be set before any @triton.jit function is defined, so it is set here, before
the tests import dist_compact_kernels. On a CUDA machine the compiled kernels run instead.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: longer CPU tests (still run in CI)")


@pytest.fixture(scope="session")
def small_weights(tmp_path_factory):
    """A small random embedded model's weights file (2 blocks of width 64: fast on a CPU)."""
    from dist_compact.models.embedded import EmbeddedConfig, EmbeddedDiT, save_embedded

    torch.manual_seed(0)
    m = EmbeddedDiT(EmbeddedConfig(dim=64, depth=2, heads=2, frames=4, height=16, width=16))
    path = tmp_path_factory.mktemp("small-weights") / "small.safetensors"
    save_embedded(m, path)
    return path
