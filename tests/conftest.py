"""Test set-up: Triton kernels run on the CPU through the interpreter when there is no GPU.

TRITON_INTERPRET is read when @triton.jit runs, so it is set here, before any kernel module is imported.
Every test starts on the reference attention backend; kernel tests ask for "triton" themselves.
"""

import os

import pytest

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # Tiny tensors: extra intra-op threads only contend with the other pytest worker (`make test` runs -n 2).
    torch.set_num_threads(1)

HAS_CUDA = _HAS_CUDA


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run by benchmarks/gpu_suite.sh)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _reference_backend():
    from llama_adapter import attention

    previous = attention.get_attention_backend()
    attention.set_attention_backend("reference")
    yield
    attention.set_attention_backend(previous)
