"""Speed and memory benchmarks against PyTorch diffusers (see README, Performance)."""
