"""`LLaMA`: the network (`model.Transformer`) with the four conveniences users call on it.

`from_pretrained`, `generate`, `save_adapter` and `load_adapter` live in the modules that own their work
(`loading`, `generation`, `adapter_io`); this module, at the top of the import graph, joins them to the
network, so that `model.py` stays a leaf that imports none of them. Nothing in the package imports this module
except through `llama_adapter.LLaMA`; code that needs only the network uses `Transformer` (or `type(model)`).
"""

from __future__ import annotations

from llama_adapter import adapter_io, generation, loading
from llama_adapter.adapter import AdapterConfig
from llama_adapter.model import Transformer


class LLaMA(Transformer):
    @classmethod
    def from_pretrained(
        cls, path, adapter: AdapterConfig | None = None, dtype=None, device=None, quantize=None, **overrides
    ) -> LLaMA:
        """Meta or Hugging Face directory; quantize: None, "nf4" or "int8" for the frozen block linears
        (llama_adapter.quantize); `overrides` are ModelArgs fields (e.g. max_seq_len=4096)."""
        return loading.load_pretrained(
            path, adapter=adapter, dtype=dtype, device=device, quantize=quantize, cls=cls, **overrides
        )

    def save_adapter(self, directory) -> None:
        return adapter_io.save_adapter(self, directory)

    def load_adapter(self, path, **kwargs):
        """Our adapter dir, a PEFT adaption-prompt dir or the official v1 .pth (kwargs: adapter_len=)."""
        return adapter_io.load_adapter(self, path, **kwargs)

    def generate(self, prompts, max_new_tokens, *args, **options):
        """`generation.generate` on this model: the new tokens of each prompt. The options (temperature=0.0,
        top_p=1.0, eos_id, seed, stop_ids, adapters, compile, ...) are documented once, in
        `generation.generate_stream`."""
        return generation.generate(self, prompts, max_new_tokens, *args, **options)
