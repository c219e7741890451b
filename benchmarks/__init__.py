"""Benchmarks: fused attention, fine-tuning and decoding against SDPA / eager baselines.

Run from the repository root as modules (`python -m benchmarks.bench_attention --help`); each writes
benchmarks/results/<bench>-<device>.json and PNGs. `benchmarks/gpu_suite.sh` runs everything on one GPU.
"""
