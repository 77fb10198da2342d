"""packserve kernels."""
