"""A minimal LLaMA (1/2/3) with LLaMA-Adapter's zero-init gated prompts, in Meta's parameter names.

One forward serves training (full sequences, no cache) and cached generation: with a `KVCache`, each row
starts at its own position (`input_pos`, (B,)) and attends to its own number of cached keys (`kv_lens`), so
right-padded prompts of different lengths give exactly what each gives alone. The adapter's prompt keys and
values are recomputed from the current parameters on every call unless the caller passes `adapter_kv`
(generation computes them once per call, never across calls, so training never sees stale ones).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from llama_adapter.attention import adapter_attention, packed_max_seqlen
from llama_adapter.validation import (
    NON_NEGATIVE_INT,
    POSITIVE,
    POSITIVE_INT,
    Choice,
    ConfigError,
    Flag,
    Number,
    Table,
    check_fields,
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
        dim=POSITIVE_INT, n_layers=POSITIVE_INT, n_heads=POSITIVE_INT, n_kv_heads=Number(int, min=1, optional=True),
        vocab_size=POSITIVE_INT, multiple_of=POSITIVE_INT, ffn_dim_multiplier=Number(float, min=0, min_open=True,
        optional=True), norm_eps=POSITIVE, rope_theta=POSITIVE, max_seq_len=POSITIVE_INT,
        rope_scaling=Table(tuple((k, POSITIVE) for k in _ROPE_SCALING_KEYS), optional=True),
        hidden_dim=Number(int, min=1, optional=True),
    )  # fmt: skip

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
    dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=1024, ffn_dim_multiplier=1.3,
    rope_theta=500000.0, max_seq_len=8192,
)  # fmt: skip
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


@dataclass
class AdapterConfig:
    adapter_len: int = 10
    adapter_layers: int = 30
    gate: str = "head"  # "head": one gate per head (official v1); "scalar": one per layer (PEFT)
    gate_act: str = "tanh"  # "tanh": official training code; "none": official inference code, PEFT, lit-llama
    # Off by default (plain v1). LLaMA-Adapter V2 (Gao et al. 2023, arXiv 2304.15010: norm, bias and scale
    # unlocked plus early fusion, "14M parameters over LLaMA" in all) and v1's image-conditioned prompts:
    bias_tuning: bool = False  # V2: y = scale * (W x + bias) on the 7 linears of every block (7B: 2.7M, 0.040%)
    norm_tuning: bool = False  # V2: every RMSNorm weight trains (7B: 65 x 4096 = 0.27M)
    visual_dim: int | None = None  # v1 Eqs. 9-10: per-image feature size (M x C) -> `visual_proj` MLP to dim
    visual_hidden: int = 512  # hidden width of that MLP
    early_fusion: int = 0  # V2: image offsets go only to the first N layers (own prompts); static prompts above

    RULES: ClassVar[dict] = dict(
        adapter_len=POSITIVE_INT, adapter_layers=POSITIVE_INT, gate=Choice(("head", "scalar")),
        gate_act=Choice(("tanh", "none")), bias_tuning=Flag(), norm_tuning=Flag(),
        visual_dim=Number(int, min=1, optional=True), visual_hidden=POSITIVE_INT, early_fusion=NON_NEGATIVE_INT,
    )  # fmt: skip

    def __post_init__(self):
        check_fields(self, self.RULES)

    def to_dict(self) -> dict:
        """The fields, less the V2 / multimodal switches left at their defaults (v1 configs read as before)."""
        defaults = AdapterConfig()
        v1 = ("adapter_len", "adapter_layers", "gate", "gate_act")
        return {k: v for k, v in asdict(self).items() if k in v1 or v != getattr(defaults, k)}

    @classmethod
    def from_dict(cls, d: dict) -> AdapterConfig:
        if not isinstance(d, dict):
            raise ConfigError("adapter", f"an AdapterConfig must be an object of fields, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown AdapterConfig keys {unknown}; known: {sorted(known)}")
        return cls(**d)


def _upcast(dtype: torch.dtype) -> torch.dtype:
    """float32, or the dtype itself when wider (float64): norms, RoPE and softmax never round down."""
    return torch.promote_types(dtype, torch.float32)


def rope_frequencies(head_dim: int, theta: float, scaling: dict | None = None) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,) in float64; LLaMA-3.1 scaling stretches the low frequencies."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    if scaling is None:
        return inv_freq
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, blended)
    return torch.where(wavelen < old_len / high, inv_freq, scaled)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Meta's interleaved-pair rotation (x[2i], x[2i+1]) in real arithmetic. x (B, N, H, D); cos, sin (B|1, N, D/2)."""
    xr = x.to(_upcast(x.dtype)).unflatten(-1, (-1, 2))  # (B, N, H, D/2, 2)
    x0, x1 = xr[..., 0], xr[..., 1]
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # broadcast over heads
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2).type_as(x)


def effective_gate(gate: torch.Tensor, gate_act: str) -> torch.Tensor:
    """What the attention multiplies the prompt's output by: tanh(gate) or the gate itself (AdapterConfig.gate_act)."""
    return torch.tanh(gate) if gate_act == "tanh" else gate


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x):
        xf = x.to(_upcast(x.dtype))
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class KVCache:
    """Preallocated static keys/values, one (B, Hkv, max_len, D) pair per layer (gpt-fast style).

    static=False: attention reads the first `length` keys (the longest row's), which costs one host sync per
    forward to learn that length. static=True: attention always reads all max_len keys and `kv_lens` masks the
    unwritten ones, so shapes never change and a decode step compiles into one graph (CUDA graphs replay it).
    """

    def __init__(self, n_layers, batch, n_kv_heads, max_len, head_dim, *, dtype, device, static=False):
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.batch, self.max_len, self.static = batch, max_len, static
        self.length = 0  # keys in use this step (the longest row's): set once per forward, unless static

    def write(self, layer: int, k, v, positions):
        """Store k, v (B, Hkv, N, D) at per-row positions (B, N); return the first `length` cached keys/values."""
        index = positions[:, None, :, None].expand_as(k)
        self.k[layer].scatter_(2, index, k)
        self.v[layer].scatter_(2, index, v)
        if self.static:
            return self.k[layer], self.v[layer]
        return self.k[layer][:, :, : self.length], self.v[layer][:, :, : self.length]


class BiasScaleLinear(nn.Linear):
    """V2's bias and scale tuning of a frozen linear layer: y = scale * (W x + bias), bias 0 and scale 1 at init.

    Shares the wrapped layer's weight, so the state-dict names stay `...wq.weight` (plus `.bias`, `.scale`).
    """

    def __init__(self, linear: nn.Linear):
        nn.Module.__init__(self)
        self.in_features, self.out_features, self.weight = linear.in_features, linear.out_features, linear.weight
        w = linear.weight
        self.bias = nn.Parameter(torch.zeros(self.out_features, device=w.device, dtype=_upcast(w.dtype)))
        self.scale = nn.Parameter(torch.ones(self.out_features, device=w.device, dtype=_upcast(w.dtype)))

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias.to(self.weight.dtype))
        return y * self.scale.to(y.dtype)

    def plain(self) -> nn.Linear:
        linear = nn.Linear(self.in_features, self.out_features, bias=False, device="meta")
        linear.weight = self.weight
        return linear


_TUNED_LINEARS = ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                  "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")  # fmt: skip


def _set_bias_scale(block: nn.Module, enabled: bool) -> None:
    """Wrap (fresh bias 0, scale 1) or unwrap the block's linear layers."""
    for path in _TUNED_LINEARS:
        parent_name, name = path.split(".")
        parent = getattr(block, parent_name)
        linear = getattr(parent, name)
        if isinstance(linear, BiasScaleLinear):
            linear = linear.plain()
        setattr(parent, name, BiasScaleLinear(linear) if enabled else linear)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int, device=None, dtype=None):
        super().__init__()
        self.layer_id, self.n_heads, self.n_kv_heads = layer_id, args.n_heads, args.n_kv_heads
        self.head_dim = args.head_dim
        kv_dim = args.n_kv_heads * args.head_dim
        self.wq = nn.Linear(args.dim, args.dim, bias=False, device=device, dtype=dtype)
        self.wk = nn.Linear(args.dim, kv_dim, bias=False, device=device, dtype=dtype)
        self.wv = nn.Linear(args.dim, kv_dim, bias=False, device=device, dtype=dtype)
        self.wo = nn.Linear(args.dim, args.dim, bias=False, device=device, dtype=dtype)
        self.remove_adapter()

    def remove_adapter(self):
        self.adapter_prompt = None
        self.adapter_gate = None
        self.gate_act = None

    def add_adapter(self, cfg: AdapterConfig):
        w = self.wk.weight
        pdtype = torch.float64 if w.dtype == torch.float64 else torch.float32
        dim = self.wq.in_features
        self.adapter_prompt = nn.Parameter(torch.randn(cfg.adapter_len, dim, device=w.device, dtype=pdtype))
        n_gates = self.n_heads if cfg.gate == "head" else 1
        self.adapter_gate = nn.Parameter(torch.zeros(n_gates, device=w.device, dtype=pdtype))
        self.gate_act = cfg.gate_act

    def prompt_kv(self, prompt_offset=None):
        """Prompt keys/values (Hkv, K, D), or (B, Hkv, K, D) with a (B, K|1, dim) offset, and the gate (n_heads,)."""
        prompt = self.adapter_prompt
        if prompt_offset is not None:
            prompt = prompt + prompt_offset  # (B, K, dim)
        ak, av = self.project_prompt(prompt)
        return ak, av, effective_gate(self.adapter_gate, self.gate_act).expand(self.n_heads)

    def project_prompt(self, prompt):
        """Keys and values (..., Hkv, K, D) of prompts (..., K, dim) through this layer's frozen wk, wv."""
        prompt = prompt.to(self.wk.weight.dtype)
        ak = self.wk(prompt).unflatten(-1, (self.n_kv_heads, self.head_dim)).transpose(-3, -2)  # (..., Hkv, K, D)
        av = self.wv(prompt).unflatten(-1, (self.n_kv_heads, self.head_dim)).transpose(-3, -2)
        return ak, av

    def forward(self, x, cos, sin, adapter_kv=None, cache=None, positions=None, kv_lens=None, packed=None):
        B, N, _ = x.shape
        q = apply_rope(self.wq(x).unflatten(-1, (self.n_heads, self.head_dim)), cos, sin).transpose(1, 2)
        k = apply_rope(self.wk(x).unflatten(-1, (self.n_kv_heads, self.head_dim)), cos, sin).transpose(1, 2)
        v = self.wv(x).unflatten(-1, (self.n_kv_heads, self.head_dim)).transpose(1, 2)  # (B, Hkv, N, D)
        if cache is not None:
            k, v = cache.write(self.layer_id, k, v, positions)
        ak, av, gate = adapter_kv if adapter_kv is not None else (None, None, None)
        out = adapter_attention(q, k, v, ak, av, gate, causal=True, kv_lens=kv_lens, **(packed or {}))  # (B, H, N, D)
        return self.wo(out.transpose(1, 2).flatten(2))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, device=None, dtype=None):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False, device=device, dtype=dtype)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False, device=device, dtype=dtype)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False, device=device, dtype=dtype)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int, device=None, dtype=None):
        super().__init__()
        self.attention = Attention(args, layer_id, device=device, dtype=dtype)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim, device=device, dtype=dtype)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps, device=device, dtype=dtype)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps, device=device, dtype=dtype)

    def forward(self, x, cos, sin, adapter_kv=None, cache=None, positions=None, kv_lens=None, packed=None):
        h = x + self.attention(self.attention_norm(x), cos, sin, adapter_kv, cache, positions, kv_lens, packed)
        return h + self.feed_forward(self.ffn_norm(h))


def _is_adapter_param(name: str, cfg: AdapterConfig | None = None) -> bool:
    """The single source of truth for what trains and what an adapter file holds.

    Prompts, gates, the image projector and V2's biases and scales (the base has no biases) exist only when
    the adapter adds them; the norm weights belong to the base and count only under cfg.norm_tuning.
    """
    if name.rsplit(".", 1)[-1] in ("adapter_prompt", "adapter_gate", "bias", "scale"):
        return True
    if name.startswith("visual_proj."):
        return True
    return cfg is not None and cfg.norm_tuning and name.endswith("norm.weight")



def fit_adapter_layers(requested: int, n_layers: int, name: str = "adapter_layers") -> tuple[int, str | None]:
    """The adapted layer count for a model of n_layers, and a note when `requested` had to be clamped to it.
    One rule for AdapterConfig on a model and for `finetune --adapter-layers` (name: how the caller spells it)."""
    if requested > n_layers:
        return n_layers, f"{name} {requested} > the model's {n_layers} layers; adapting all {n_layers}"
    return requested, None

class LLaMA(nn.Module):
    def __init__(self, params: ModelArgs, adapter: AdapterConfig | None = None, *, device=None, dtype=None):
        super().__init__()
        self.params = params
        self.tok_embeddings = nn.Embedding(params.vocab_size, params.dim, device=device, dtype=dtype)
        self.layers = nn.ModuleList(TransformerBlock(params, i, device, dtype) for i in range(params.n_layers))
        self.norm = RMSNorm(params.dim, params.norm_eps, device=device, dtype=dtype)
        self.output = nn.Linear(params.dim, params.vocab_size, bias=False, device=device, dtype=dtype)
        self.requires_grad_(False)
        self.adapter_config = None
        self.visual_proj = None  # multimodal.VisualProjector when the adapter has visual_dim
        self._base_norms = None  # the checkpoint's norm weights, kept once norm tuning may change them
        self.gradient_checkpointing = False
        self._rope_tables = {}
        if adapter is not None:
            self.attach_adapter(adapter)

    # ----- adapter -----
    def attach_adapter(self, cfg: AdapterConfig) -> None:
        """Add fresh prompts (N(0,1)) and zero gates to the top `cfg.adapter_layers` layers (replacing any)."""
        if not isinstance(cfg, AdapterConfig):
            raise TypeError(f"cfg must be an AdapterConfig, got {type(cfg).__name__}")
        layers, note = fit_adapter_layers(cfg.adapter_layers, self.params.n_layers)
        if note:  # as `finetune --adapter-layers` does: the recipe's 30 on a smaller model adapts all its layers
            warnings.warn(note, stacklevel=2)
            cfg = replace(cfg, adapter_layers=layers)
        if cfg.early_fusion > self.params.n_layers:
            raise ValueError(f"early_fusion ({cfg.early_fusion}) exceeds the model's n_layers {self.params.n_layers}")
        adapted = set(self.adapted_layers(cfg))
        for i, layer in enumerate(self.layers):
            layer.attention.remove_adapter()
            if i in adapted:
                layer.attention.add_adapter(cfg)
            _set_bias_scale(layer, cfg.bias_tuning)
        norms = {n: p for n, p in self.named_parameters() if n.endswith("norm.weight")}
        with torch.no_grad():
            if self._base_norms is not None:  # a fresh adapter starts from the checkpoint's norms
                for n, p in norms.items():
                    p.copy_(self._base_norms[n])
            elif cfg.norm_tuning:
                self._base_norms = {n: p.detach().clone() for n, p in norms.items()}
        self.visual_proj = None
        if cfg.visual_dim is not None:
            from llama_adapter.multimodal import VisualProjector

            w = self.tok_embeddings.weight
            self.visual_proj = VisualProjector(cfg.visual_dim, self.params.dim, cfg.adapter_len, cfg.visual_hidden,
                                               device=w.device, dtype=_upcast(w.dtype))  # fmt: skip
        self.adapter_config = cfg
        for name, p in self.named_parameters():
            p.requires_grad_(_is_adapter_param(name, cfg))

    def adapted_layers(self, cfg: AdapterConfig | None = None) -> list[int]:
        """Layers with prompts: the top cfg.adapter_layers, and the first cfg.early_fusion (V2)."""
        cfg = cfg or self.adapter_config
        if cfg is None:
            return []
        n = self.params.n_layers
        return sorted(set(range(n - cfg.adapter_layers, n)) | set(range(cfg.early_fusion)))

    def visual_layers(self) -> list[int]:
        """Layers whose prompts take the per-sample offset: all adapted ones (v1), or the early-fusion ones (V2)."""
        cfg = self.adapter_config
        return list(range(cfg.early_fusion)) if cfg and cfg.early_fusion else self.adapted_layers()

    def first_adapter_layer(self, cfg: AdapterConfig | None = None) -> int:
        """The first layer holding trainable parameters (no gradient is needed below it)."""
        cfg = cfg or self.adapter_config
        if cfg is not None and (cfg.bias_tuning or cfg.norm_tuning):
            return 0
        return min(self.adapted_layers(cfg), default=self.params.n_layers)

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [p for name, p in self.named_parameters() if _is_adapter_param(name, self.adapter_config)]

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        return {name: t for name, t in self.state_dict().items() if _is_adapter_param(name, self.adapter_config)}

    def trainable_summary(self) -> str:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        share = 100 * trainable / total
        return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {share:.4f}"

    def print_trainable_parameters(self) -> None:
        print(self.trainable_summary())

    def adapter_kv(self, prompt_offset: torch.Tensor | None = None, batch: int | None = None) -> list:
        """Per layer: None, or (prompt keys, prompt values, effective gate) from the current parameters."""
        if prompt_offset is not None:
            cfg = self.adapter_config
            if cfg is None:
                raise ValueError("prompt_offset was given but the model has no adapter (attach_adapter first)")
            K, dim = cfg.adapter_len, self.params.dim
            ok = prompt_offset.dim() == 3 and prompt_offset.shape[1] in (1, K) and prompt_offset.shape[2] == dim
            if not ok or (batch is not None and prompt_offset.shape[0] != batch):
                got = tuple(prompt_offset.shape)
                raise ValueError(f"prompt_offset must have shape (B={batch}, {K} or 1, {dim}), got {got}")
        visual = set(self.visual_layers())
        return [
            layer.attention.prompt_kv(prompt_offset if i in visual else None)
            if layer.attention.adapter_prompt is not None
            else None
            for i, layer in enumerate(self.layers)
        ]

    # ----- forward -----
    def rope_tables(self, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (max_seq_len, D/2): computed in float64, kept in float32 (float64 for float64 models)."""
        tdtype = _upcast(dtype)
        key = (torch.device(device), tdtype)
        if key not in self._rope_tables:
            p = self.params
            inv_freq = rope_frequencies(p.head_dim, p.rope_theta, p.rope_scaling).to(device)
            angles = torch.outer(torch.arange(p.max_seq_len, dtype=torch.float64, device=device), inv_freq)
            self._rope_tables[key] = (angles.cos().to(tdtype), angles.sin().to(tdtype))
        return self._rope_tables[key]

    def new_cache(self, batch: int, max_len: int | None = None, *, static: bool = False) -> KVCache:
        """A KV cache for `batch` rows; static=True for fixed shapes (compiled decode, see KVCache)."""
        p = self.params
        max_len = p.max_seq_len if max_len is None else max_len
        if not 1 <= max_len <= p.max_seq_len:
            raise ValueError(f"cache max_len must be in [1, max_seq_len={p.max_seq_len}], got {max_len}")
        w = self.tok_embeddings.weight
        shape = (p.n_layers, batch, p.n_kv_heads, max_len, p.head_dim)
        return KVCache(*shape, dtype=w.dtype, device=w.device, static=static)

    def forward(
        self,
        tokens: torch.Tensor,
        prompt_offset: torch.Tensor | None = None,
        *,
        cache: KVCache | None = None,
        input_pos: torch.Tensor | None = None,
        adapter_kv: list | None = None,
        logits_pos: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
    ) -> torch.Tensor:
        """tokens (B, N) -> logits (B, N, vocab).

        Packed sequences: tokens (1, T) hold several sequences back to back, cu_seqlens (S+1,) int32 their
        boundaries (`adapter_attention`'s varlen contract); each attends only within itself, sees the shared
        prompt and has RoPE positions from 0. max_seqlen: the longest (None: read from cu_seqlens, one sync).

        With `cache`, row b's tokens sit at positions input_pos[b] + arange(N) and attend to the cached keys
        before them only. `adapter_kv` (from `adapter_kv()`) skips recomputing the prompt keys/values;
        `logits_pos` (B,) returns only the logits at those positions, (B, 1, vocab). `image_features` (B, M*C)
        go through the adapter's `visual_proj` to become the prompt offset.
        """
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
            got = getattr(tokens, "shape", type(tokens).__name__)
            raise ValueError(f"tokens must be an integer tensor of shape (B, N), got {got}")
        B, N = tokens.shape
        device = tokens.device
        packed = None
        if cu_seqlens is not None:
            if cache is not None or prompt_offset is not None or image_features is not None or B != 1:
                raise ValueError("cu_seqlens packs sequences into tokens (1, T) for training or prefill, without "
                                 "cache, prompt_offset or image_features (those are per row)")  # fmt: skip
            if max_seqlen is None or cu_seqlens.device.type == "cpu":
                # a CPU cu_seqlens (what collate makes) is checked before it moves: free here, a sync on the GPU
                longest = packed_max_seqlen(cu_seqlens, N)
                if max_seqlen is not None and max_seqlen < longest:
                    raise ValueError(f"max_seqlen must be at least the longest sequence ({longest}), got {max_seqlen}")
                max_seqlen = longest if max_seqlen is None else max_seqlen
            cu_seqlens = cu_seqlens.to(device=device, dtype=torch.int32)
            if max_seqlen > self.params.max_seq_len:
                raise ValueError(f"a packed sequence has {max_seqlen} positions, more than max_seq_len")
            seq = torch.searchsorted(cu_seqlens[1:].long(), torch.arange(N, device=device), right=True)  # (T,)
            positions = (torch.arange(N, device=device) - cu_seqlens.long()[seq])[None]  # (1, T), from 0 per sequence
            kv_lens = None
            packed = dict(cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        elif cache is None:
            if N > self.params.max_seq_len:
                raise ValueError(f"tokens has {N} positions, more than max_seq_len={self.params.max_seq_len}")
            positions = torch.arange(N, device=device)[None]  # (1, N)
            kv_lens = None
        else:
            if input_pos is None or cache.batch != B:
                raise ValueError(f"cache (batch {cache.batch}) needs input_pos of shape ({B},) and tokens batch {B}")
            input_pos = torch.as_tensor(input_pos, device=device, dtype=torch.long).expand(B)  # int or (B,)
            positions = input_pos[:, None] + torch.arange(N, device=device)  # (B, N)
            if not cache.static:  # a static cache skips this host sync: the caller keeps positions < max_len
                cache.length = int(positions.max()) + 1
                if cache.length > cache.max_len:
                    raise ValueError(f"positions up to {cache.length - 1} exceed the cache's max_len={cache.max_len}")
            kv_lens = (input_pos + N).to(torch.int32)
        if image_features is not None:
            if self.visual_proj is None:
                raise ValueError("image_features were given but the adapter has no visual projector (visual_dim)")
            if prompt_offset is not None:
                raise ValueError("pass image_features or prompt_offset, not both")
            prompt_offset = self.visual_proj(image_features)
        if adapter_kv is None:
            adapter_kv = self.adapter_kv(prompt_offset, B)
        elif prompt_offset is not None:
            raise ValueError("pass prompt_offset or adapter_kv, not both (adapter_kv already includes the offset)")

        cos, sin = self.rope_tables(device, self.tok_embeddings.weight.dtype)
        cos, sin = cos[positions], sin[positions]  # (B|1, N, D/2)
        h = self.tok_embeddings(tokens)
        first = self.first_adapter_layer()
        for i, layer in enumerate(self.layers):
            args = (h, cos, sin, adapter_kv[i], cache, positions, kv_lens, packed)
            if self.gradient_checkpointing and i >= first and cache is None and torch.is_grad_enabled():
                h = checkpoint(layer, *args, use_reentrant=False)
            else:
                h = layer(*args)
        if logits_pos is not None:
            h = h.gather(1, logits_pos.to(device=device, dtype=torch.long).view(B, 1, 1).expand(B, 1, h.shape[-1]))
        return self.output(self.norm(h))

    # ----- delegations (imported lazily: these modules import this one) -----
    @classmethod
    def from_pretrained(
        cls, path, adapter: AdapterConfig | None = None, dtype=None, device=None, quantize=None, **overrides
    ) -> LLaMA:
        """Meta or Hugging Face directory; quantize: None, "nf4" or "int8" for the frozen block linears
        (llama_adapter.quantize); `overrides` are ModelArgs fields (e.g. max_seq_len=4096)."""
        from llama_adapter.loading import load_pretrained

        return load_pretrained(path, adapter=adapter, dtype=dtype, device=device, quantize=quantize, **overrides)

    def save_adapter(self, directory) -> None:
        from llama_adapter.adapter_io import save_adapter

        return save_adapter(self, directory)

    def load_adapter(self, path, **kwargs):
        """Our adapter dir, a PEFT adaption-prompt dir or the official v1 .pth (kwargs: adapter_len=)."""
        from llama_adapter.adapter_io import load_adapter

        return load_adapter(self, path, **kwargs)

    def generate(self, prompts, max_new_tokens, temperature=0.0, top_p=1.0, eos_id=None, **kwargs):
        from llama_adapter.generation import generate

        return generate(self, prompts, max_new_tokens, temperature=temperature, top_p=top_p, eos_id=eos_id, **kwargs)
