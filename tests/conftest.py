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
