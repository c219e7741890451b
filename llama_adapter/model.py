"""The network: a minimal LLaMA (1/2/3) carrying LLaMA-Adapter's zero-init gated prompts, in Meta's names.

`Transformer` is the network alone, as Meta's own code keeps `Transformer` apart from `Llama` (loading and
generation): this module imports only the attention op, the adapter (`llama_adapter.adapter`), the batch
layout and the network's shape (`model_args`), so nothing here reaches up into loading, adapter files or
generation.
`llama_adapter.api.LLaMA` (the package's `LLaMA`) adds `from_pretrained`, `generate`, `save_adapter` and
`load_adapter` on top.

One forward serves training (full sequences or packed ones, no cache) and cached generation: with a `KVCache`,
each row starts at its own position (`input_pos`, (B,)) and attends to its own number of cached keys, so
right-padded prompts of different lengths give exactly what each gives alone (`llama_adapter.layout`). Each
attention layer projects its own prompt through its own wk, wv inside its forward (so FSDP has gathered them
there), from the current parameters, unless the caller passes `adapter_kv` (generation computes them once per
call, never across calls, so training never sees stale ones; an AdapterBank gives one prompt per row).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from llama_adapter.adapter import (
    AdapterConfig,
    VisualProjector,
    fit_adapter_layers,
    gate_value,
    is_adapter_param,
    param_dtype,
    project_prompt,
    set_bias_scale,
)
from llama_adapter.attention import adapter_attention
from llama_adapter.layout import KVCache, Layout
from llama_adapter.model_args import BLOCK_LINEARS, ModelArgs

NO_PROMPT = (None, None, None)  # an `adapter_kv` entry for a layer that runs without its prompt


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


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x):
        xf = x.to(_upcast(x.dtype))
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


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
        pdtype = param_dtype(w.dtype)
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
        return ak, av, gate_value(self.adapter_gate, self.gate_act).expand(self.n_heads)

    def project_prompt(self, prompt):
        """Keys and values (..., Hkv, K, D) of prompts (..., K, dim) through this layer's frozen wk, wv."""
        return project_prompt(self.wk, self.wv, prompt.to(self.wk.weight.dtype), self.n_kv_heads, self.head_dim)

    def forward(self, x, cos, sin, layout: Layout, adapter_kv=None, prompt_offset=None):
        """adapter_kv: this layer's (keys, values, gate) computed by the caller, NO_PROMPT, or None: the layer's
        own prompt (plus prompt_offset (B, K|1, dim), image prompts) through its own wk, wv."""
        q = apply_rope(self.wq(x).unflatten(-1, (self.n_heads, self.head_dim)), cos, sin).transpose(1, 2)
        k = apply_rope(self.wk(x).unflatten(-1, (self.n_kv_heads, self.head_dim)), cos, sin).transpose(1, 2)
        v = self.wv(x).unflatten(-1, (self.n_kv_heads, self.head_dim)).transpose(1, 2)  # (B, Hkv, N, D)
        if layout.cache is not None:
            k, v = layout.cache.write(self.layer_id, k, v, layout.positions)
        if adapter_kv is None and self.adapter_prompt is not None:
            adapter_kv = self.prompt_kv(prompt_offset)
        ak, av, gate = adapter_kv or NO_PROMPT
        out = adapter_attention(q, k, v, ak, av, gate, causal=True, **layout.op_kwargs())  # (B, H, N, D)
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

    def forward(self, x, cos, sin, layout: Layout, adapter_kv=None, prompt_offset=None):
        h = x + self.attention(self.attention_norm(x), cos, sin, layout, adapter_kv, prompt_offset)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, params: ModelArgs, adapter: AdapterConfig | None = None, *, device=None, dtype=None):
        super().__init__()
        self.params = params
        self.tok_embeddings = nn.Embedding(params.vocab_size, params.dim, device=device, dtype=dtype)
        self.layers = nn.ModuleList(TransformerBlock(params, i, device, dtype) for i in range(params.n_layers))
        self.norm = RMSNorm(params.dim, params.norm_eps, device=device, dtype=dtype)
        self.output = nn.Linear(params.dim, params.vocab_size, bias=False, device=device, dtype=dtype)
        self.requires_grad_(False)
        self.adapter_config = None
        self.visual_proj = None  # adapter.VisualProjector when the adapter has visual_dim
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
            set_bias_scale(layer, BLOCK_LINEARS, cfg.bias_tuning)
        norms = {n: p for n, p in self.named_parameters() if n.endswith("norm.weight")}
        with torch.no_grad():
            if self._base_norms is not None:  # a fresh adapter starts from the checkpoint's norms
                for n, p in norms.items():
                    p.copy_(self._base_norms[n])
            elif cfg.norm_tuning:
                self._base_norms = {n: p.detach().clone() for n, p in norms.items()}
        self.visual_proj = None
        if cfg.visual_dim is not None:
            w = self.tok_embeddings.weight
            self.visual_proj = VisualProjector(
                cfg.visual_dim,
                self.params.dim,
                cfg.adapter_len,
                cfg.visual_hidden,
                device=w.device,
                dtype=param_dtype(w.dtype),
            )
        self.adapter_config = cfg
        for name, p in self.named_parameters():
            p.requires_grad_(is_adapter_param(name, cfg))

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
        return [p for name, p in self.named_parameters() if is_adapter_param(name, self.adapter_config)]

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        return {name: t for name, t in self.state_dict().items() if is_adapter_param(name, self.adapter_config)}

    def trainable_summary(self) -> str:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        share = 100 * trainable / total
        return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {share:.4f}"

    def print_trainable_parameters(self) -> None:
        print(self.trainable_summary())

    def adapter_kv(self, prompt_offset: torch.Tensor | None = None, batch: int | None = None) -> list:
        """Per layer: None, or (prompt keys, prompt values, effective gate) from the current parameters, for a
        caller that runs several forwards with the same prompts (generation). On an FSDP-sharded model each
        adapted layer's weights are gathered for its projection (`whole_layers`), so every rank must call this, and
        the results carry no gradient to the sharded weights (training lets each layer project its own)."""
        if prompt_offset is not None:
            self._check_prompt_offset(prompt_offset, batch)
        visual = set(self.visual_layers())
        entries = [None] * len(self.layers)
        adapted = [i for i, layer in enumerate(self.layers) if layer.attention.adapter_prompt is not None]
        for i in whole_layers(self, adapted):
            entries[i] = self.layers[i].attention.prompt_kv(prompt_offset if i in visual else None)
        return entries

    def _check_prompt_offset(self, prompt_offset: torch.Tensor, batch: int | None) -> None:
        cfg = self.adapter_config
        if cfg is None:
            raise ValueError("prompt_offset was given but the model has no adapter (attach_adapter first)")
        K, dim = cfg.adapter_len, self.params.dim
        ok = prompt_offset.dim() == 3 and prompt_offset.shape[1] in (1, K) and prompt_offset.shape[2] == dim
        if not ok or (batch is not None and prompt_offset.shape[0] != batch):
            got = tuple(prompt_offset.shape)
            raise ValueError(f"prompt_offset must have shape (B={batch}, {K} or 1, {dim}), got {got}")

    def _prompt_offset(self, prompt_offset, image_features, adapter_kv, batch: int) -> torch.Tensor | None:
        """The per-row offset (B, K|1, dim) of the visual layers' prompts, from either of forward's two inputs."""
        if image_features is not None:
            if self.visual_proj is None:
                raise ValueError("image_features were given but the adapter has no visual projector (visual_dim)")
            if prompt_offset is not None:
                raise ValueError("pass image_features or prompt_offset, not both")
            prompt_offset = self.visual_proj(image_features)
        if prompt_offset is None:
            return None
        if adapter_kv is not None:
            raise ValueError("pass prompt_offset or adapter_kv, not both (adapter_kv already includes the offset)")
        self._check_prompt_offset(prompt_offset, batch)
        return prompt_offset

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

    def _layout(self, tokens: torch.Tensor, layout: Layout | None, cache, input_pos) -> Layout:
        B, N = tokens.shape
        if cache is not None:
            if layout is not None:
                raise ValueError("pass layout= (dense, or packed with cu_seqlens) or cache= with input_pos=, not both")
            return Layout.cached(cache, input_pos, B, N, tokens.device)
        layout = Layout.dense(N, tokens.device) if layout is None else layout.to(tokens.device)
        layout.check(B, N, self.params.max_seq_len)
        return layout

    def forward(
        self,
        tokens: torch.Tensor,
        prompt_offset: torch.Tensor | None = None,
        *,
        layout: Layout | None = None,
        cache: KVCache | None = None,
        input_pos: torch.Tensor | int | None = None,
        adapter_kv: list | None = None,
        logits_pos: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens (B, N) -> logits (B, N, vocab).

        layout (`llama_adapter.layout.Layout`): None, each row one sequence from position 0; or
        `Layout.packed(cu_seqlens, max_seqlen)`: tokens (1, T) hold several sequences back to back, each attending
        only within itself, seeing the shared prompt, with RoPE positions from 0 (what `collate(pack=True)` gives).
        With `cache` (Layout.cached), row b's tokens sit at positions input_pos[b] + arange(N) (input_pos an int
        or (B,)) and attend to the cached keys before them only. `adapter_kv` (from `adapter_kv()` or an
        AdapterBank) skips recomputing the prompt keys/values; `logits_pos` (B,) returns only the logits at
        those positions, (B, 1, vocab). `prompt_offset` (B, K|1, dim) is added to the prompts of the visual
        layers; `image_features` (B, M*C) become that offset through the adapter's `visual_proj`.
        """
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
            got = getattr(tokens, "shape", type(tokens).__name__)
            raise ValueError(f"tokens must be an integer tensor of shape (B, N), got {got}")
        B, device = tokens.shape[0], tokens.device
        layout = self._layout(tokens, layout, cache, input_pos)
        offset = self._prompt_offset(prompt_offset, image_features, adapter_kv, B)
        if offset is not None and layout.cu_seqlens is not None:
            per_row = "prompt_offset or image_features (those are per row)"
            raise ValueError(f"cu_seqlens packs sequences into one row, which cannot carry {per_row}")
        cos, sin = self.rope_tables(device, self.tok_embeddings.weight.dtype)
        cos, sin = cos[layout.positions], sin[layout.positions]  # (B|1, N, D/2)
        h = self.tok_embeddings(tokens)
        first, visual = self.first_adapter_layer(), set(self.visual_layers())
        for i, layer in enumerate(self.layers):
            kv = None if adapter_kv is None else adapter_kv[i] or NO_PROMPT
            args = (h, cos, sin, layout, kv, offset if i in visual else None)
            if self.gradient_checkpointing and i >= first and layout.cache is None and torch.is_grad_enabled():
                h = checkpoint(layer, *args, use_reentrant=False)
            else:
                h = layer(*args)
        if logits_pos is not None:
            h = h.gather(1, logits_pos.to(device=device, dtype=torch.long).view(B, 1, 1).expand(B, 1, h.shape[-1]))
        return self.output(self.norm(h))


def whole_layers(model: Transformer, layers):
    """Yield each index in `layers` with that layer's weights whole, for work outside its forward (projecting
    prompts once for a whole generate call). Under FSDP2 (`fully_shard`), a layer that is a unit of its own is
    all-gathered for its turn and resharded after it; layers held by the root's unit (only the root sharded) are
    gathered once, with the root, for the whole loop. These are collectives: every rank must run the same loop.
    What the loop computes is for inference: no gradient reaches the shards."""
    layers = list(layers)
    root = _is_fsdp_unit(model) and not all(_is_fsdp_unit(model.layers[i]) for i in layers)
    if root:
        model.unshard()
    try:
        for i in layers:
            unit = model.layers[i] if _is_fsdp_unit(model.layers[i]) else None
            if unit is not None:
                unit.unshard()
            try:
                yield i
            finally:
                if unit is not None:
                    unit.reshard()
    finally:
        if root:
            model.reshard()


def _is_fsdp_unit(module: nn.Module) -> bool:
    """A module `fully_shard` made a unit of its own (torch's FSDPModule: unshard / reshard)."""
    return callable(getattr(module, "unshard", None)) and callable(getattr(module, "reshard", None))
