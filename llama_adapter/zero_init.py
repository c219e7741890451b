"""Zero-init gated prompt attention for encoders (the paper's ViT and RoBERTa experiments).

`ZeroInitPromptAttention` replaces a transformers self-attention module (ViT's `ViTAttention`, RoBERTa's
`RobertaSelfAttention`, or any module with q/k/v projections) and adds K learnable prompt tokens per layer:

    o = softmax(s q k^T) v + g * softmax(s q ak^T) av,    ak = key(P), av = value(P), g = gate_act(gate) = 0 at init

through `llama_adapter.attention.adapter_attention(causal=False)`, so it runs the fused kernel's
non-causal path on the "triton" backend. The wrapped module keeps its own projections (frozen, biases
included); only the prompts and gates train. At init the outputs equal the wrapped model's exactly.

Masks: a key-padding mask (each row's valid keys a prefix, as with right padding) becomes the op's
kv_lens; other masks are refused. Attention-probability dropout is not applied (the fused op has none):
in eval mode, or with attention_probs_dropout_prob = 0, the wrapper matches the original.
"""

from __future__ import annotations

import torch
from torch import nn

from llama_adapter.adapter import gate_value, project_prompt
from llama_adapter.attention import adapter_attention

_PROJECTIONS = (("q_proj", "k_proj", "v_proj"), ("query", "key", "value"))


def _projections(attn: nn.Module):
    for names in _PROJECTIONS:
        if all(isinstance(getattr(attn, n, None), nn.Linear) for n in names):
            return names
    raise TypeError(
        f"{type(attn).__name__} is not a supported self-attention module: it needs q_proj/k_proj/v_proj or "
        "query/key/value linear layers"
    )


def padding_mask_to_kv_lens(mask: torch.Tensor, n_keys: int) -> torch.Tensor:
    """A transformers 4D mask (B, 1|H, Nq, Nk), bool (True = keep) or additive (0 = keep), -> kv_lens (B,) int32."""
    keep = mask if mask.dtype == torch.bool else mask == 0
    if keep.dim() != 4 or keep.shape[-1] != n_keys:
        raise ValueError(f"attention_mask must be 4D (B, 1, Nq, Nk={n_keys}), got {tuple(mask.shape)}")
    keys = keep[:, 0, 0]  # (B, Nk)
    lens = keys.sum(-1)
    prefix = torch.arange(n_keys, device=mask.device)[None] < lens[:, None]
    if not (keep == prefix[:, None, None]).all():
        raise ValueError(
            "ZeroInitPromptAttention supports key-padding masks with right padding only (the same valid key "
            "prefix for every query); got another mask"
        )
    return lens.to(torch.int32)


class ZeroInitPromptAttention(nn.Module):
    """Wraps `attn` (kept as `.base`, frozen) with `prompt_len` prompts (K, hidden) and zero-init gates."""

    def __init__(self, attn: nn.Module, prompt_len: int = 10, gate: str = "head", gate_act: str = "tanh"):
        super().__init__()
        if not isinstance(prompt_len, int) or prompt_len < 1:
            raise ValueError(f"prompt_len must be a positive int, got {prompt_len!r}")
        if gate not in ("head", "scalar") or gate_act not in ("tanh", "none"):
            raise ValueError(
                f"gate must be 'head' or 'scalar' and gate_act 'tanh' or 'none', got {gate!r}, {gate_act!r}"
            )
        self.base = attn
        self.q_name, self.k_name, self.v_name = _projections(attn)
        q = getattr(attn, self.q_name)
        self.n_heads = getattr(attn, "num_attention_heads", None) or attn.config.num_attention_heads
        self.head_dim = q.out_features // self.n_heads
        self.scaling = getattr(attn, "scaling", self.head_dim**-0.5)
        self.gate_act = gate_act
        attn.requires_grad_(False)
        w = q.weight
        pdtype = torch.promote_types(w.dtype, torch.float32)
        # Prompts stand where LayerNorm-ed hidden states stand: unit scale.
        self.prompt = nn.Parameter(torch.randn(prompt_len, q.in_features, device=w.device, dtype=pdtype))
        self.gate = nn.Parameter(torch.zeros(self.n_heads if gate == "head" else 1, device=w.device, dtype=pdtype))

    def _heads(self, linear_name: str, x: torch.Tensor) -> torch.Tensor:
        y = getattr(self.base, linear_name)(x)
        return y.unflatten(-1, (self.n_heads, self.head_dim)).transpose(-3, -2)  # (..., H, N, D)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, *args, **kwargs):
        for name in ("head_mask", "encoder_hidden_states", "past_key_values", "cache"):
            if kwargs.get(name) is not None:
                raise ValueError(f"ZeroInitPromptAttention does not support {name}")
        B, N, _ = hidden_states.shape
        q = self._heads(self.q_name, hidden_states)
        k = self._heads(self.k_name, hidden_states)
        v = self._heads(self.v_name, hidden_states)
        prompt = self.prompt.to(hidden_states.dtype)
        k_proj, v_proj = getattr(self.base, self.k_name), getattr(self.base, self.v_name)
        ak, av = project_prompt(k_proj, v_proj, prompt, self.n_heads, self.head_dim)  # (H, K, D)
        gate = gate_value(self.gate, self.gate_act).to(q.dtype).expand(self.n_heads)
        kv_lens = None if attention_mask is None else padding_mask_to_kv_lens(attention_mask, N)
        out = adapter_attention(q, k, v, ak, av, gate, causal=False, sm_scale=self.scaling, kv_lens=kv_lens)
        out = out.transpose(1, 2).flatten(2)  # (B, N, H*D)
        o_proj = getattr(self.base, "o_proj", None)  # ViT (transformers 5) projects inside its attention module
        return (o_proj(out) if o_proj is not None else out), None


def _self_attention_slots(model: nn.Module):
    """(parent, attribute name) of every supported self-attention module, in layer order."""
    slots = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, ZeroInitPromptAttention) or "Cross" in type(child).__name__:
                continue
            if any(all(isinstance(getattr(child, n, None), nn.Linear) for n in names) for names in _PROJECTIONS):
                slots.append((parent, name))
    return slots


def apply_zero_init_attention(model: nn.Module, prompt_len: int = 10, layers: int | None = None, **kwargs):
    """Freeze `model` and wrap the self-attention of its top `layers` layers (all by default); returns the
    wrappers. Only their prompts and gates require grad afterwards."""
    model.requires_grad_(False)
    slots = _self_attention_slots(model)
    if not slots:
        raise TypeError(f"no supported self-attention module found in {type(model).__name__}")
    if layers is not None:
        if not 1 <= layers <= len(slots):
            raise ValueError(f"layers must be in 1..{len(slots)} (the model's attention layers), got {layers}")
        slots = slots[len(slots) - layers :]
    wrappers = []
    for parent, name in slots:
        wrapper = ZeroInitPromptAttention(getattr(parent, name), prompt_len, **kwargs)
        setattr(parent, name, wrapper)
        wrappers.append(wrapper)
    return wrappers


__all__ = ["ZeroInitPromptAttention", "apply_zero_init_attention", "padding_mask_to_kv_lens"]
