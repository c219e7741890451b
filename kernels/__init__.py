"""Triton kernels for zero-init gated prompt attention (installed as `llama_adapter.kernels`).

Only Triton code and its launchers live here; the autograd Function, custom op and dispatch live in
`llama_adapter.ops` and `llama_adapter.attention`.
"""
