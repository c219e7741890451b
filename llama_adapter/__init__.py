"""LLaMA-Adapter with fused Triton zero-init prompt attention.

Public names (docs/design.md §3): `adapter_attention`, `set_attention_backend`, `LLaMA`, `ModelArgs`, `AdapterConfig`,
`Layout` (a batch's layout: dense, packed, cached), `Tokenizer`, and `Adapter` / `AdapterBank` (several adapters in
one batch). Heavy modules load on first use, so
`import llama_adapter` stays cheap.
"""

from importlib import import_module

__version__ = "0.1.0"

_LAZY = {
    "adapter_attention": "llama_adapter.attention",
    "set_attention_backend": "llama_adapter.attention",
    "get_attention_backend": "llama_adapter.attention",
    "LLaMA": "llama_adapter.api",
    "ModelArgs": "llama_adapter.model_args",
    "AdapterConfig": "llama_adapter.adapter",
    "Layout": "llama_adapter.layout",
    "Tokenizer": "llama_adapter.tokenizer",
    "Adapter": "llama_adapter.multi_adapter",
    "AdapterBank": "llama_adapter.multi_adapter",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'llama_adapter' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
