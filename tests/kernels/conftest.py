"""Fixtures of the kernel tests."""

from __future__ import annotations

import pytest

from packserve.kernels.native import NativeKernels, build


@pytest.fixture(scope="session")
def kernels() -> NativeKernels:
    """packserve's C++ kernels; the tests that need them skip where they do not build."""
    built = build()
    if built.kernels is None:
        pytest.skip(f"the C++ kernels do not build here: {built.error}")
    return built.kernels
