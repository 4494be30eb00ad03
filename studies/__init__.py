"""Studies over the applications: train with training/, evaluate with evaluation/, report.
Like benchmarks/, they sit above the applications and may import any of them."""
