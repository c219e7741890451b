"""The shape of a LLaMA network (`ModelArgs`) and the named configurations (`CONFIGS`), checked field by field.

The checkpoint loaders check params.json and config.json against the same rules (`ModelArgs.RULES`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from llama_adapter.validation import POSITIVE, POSITIVE_INT, ConfigError, Number, Table, check_fields

# The seven linear layers of a block, in Meta's parameter names: what V2 bias/scale tuning wraps and what a
# quantized base stores quantized.
BLOCK_LINEARS = (
    "attention.wq",
    "attention.wk",
    "attention.wv",
    "attention.wo",
    "feed_forward.w1",
    "feed_forward.w2",
    "feed_forward.w3",
)
_ROPE_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    vocab_size: int = 32000
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    rope_scaling: dict | None = None  # LLaMA-3.1: factor, low_freq_factor, high_freq_factor, original_max_pos...
    hidden_dim: int | None = None  # None: Meta's SwiGLU rule below
    head_dim: int = field(init=False)

    # Every field's type and range (llama_adapter.validation); the checkpoint loaders check params.json and
    # config.json against the same rules, naming the file and key.
    RULES: ClassVar[dict] = dict(
        dim=POSITIVE_INT,
        n_layers=POSITIVE_INT,
        n_heads=POSITIVE_INT,
        n_kv_heads=Number(int, min=1, optional=True),
        vocab_size=POSITIVE_INT,
        multiple_of=POSITIVE_INT,
        ffn_dim_multiplier=Number(float, min=0, min_open=True, optional=True),
        norm_eps=POSITIVE,
        rope_theta=POSITIVE,
        max_seq_len=POSITIVE_INT,
        rope_scaling=Table(tuple((k, POSITIVE) for k in _ROPE_SCALING_KEYS), optional=True),
        hidden_dim=Number(int, min=1, optional=True),
    )

    def __post_init__(self):
        check_fields(self, self.RULES)
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.dim % self.n_heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})")
        self.head_dim = self.dim // self.n_heads
        if self.hidden_dim is None:
            hidden = int(2 * 4 * self.dim / 3)
            if self.ffn_dim_multiplier is not None:
                hidden = int(self.ffn_dim_multiplier * hidden)
            self.hidden_dim = self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)
        if self.head_dim % 2:
            raise ConfigError("n_heads", f"head_dim = dim / n_heads = {self.head_dim} must be even (RoPE pairs dims)")
        if self.rope_scaling is not None:  # check_fields made a copy: CONFIGS' dict is never aliased
            if self.rope_scaling["high_freq_factor"] == self.rope_scaling["low_freq_factor"]:
                raise ConfigError("rope_scaling", "rope_scaling's high_freq_factor must differ from low_freq_factor")

    @classmethod
    def from_name(cls, name: str, **overrides) -> ModelArgs:
        if name not in CONFIGS:
            raise ValueError(f"unknown model name {name!r}; known: {sorted(CONFIGS)}")
        return cls(**{**CONFIGS[name], **overrides})


_LLAMA3_8B = dict(
    dim=4096,
    n_layers=32,
    n_heads=32,
    n_kv_heads=8,
    vocab_size=128256,
    multiple_of=1024,
    ffn_dim_multiplier=1.3,
    rope_theta=500000.0,
    max_seq_len=8192,
)
_LLAMA31_SCALING = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
CONFIGS = {
    "7B": dict(dim=4096, n_layers=32, n_heads=32),
    "13B": dict(dim=5120, n_layers=40, n_heads=40),
    "70B": dict(
        dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.3, multiple_of=4096, max_seq_len=4096
    ),
    "llama3-8B": _LLAMA3_8B,
    "llama3.1-8B": {**_LLAMA3_8B, "rope_scaling": _LLAMA31_SCALING},
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=16, max_seq_len=256),
}
