"""packserve's benchmarks, one module each; run them from the repository root as
``python -m bench.<name>`` (see bench/README.md)."""
