"""Drop-in LLaMA-Adapter for transformers' LlamaForCausalLM / MistralForCausalLM, in PEFT's adaption-prompt format.

`apply_adapter(model, AdapterConfig(...))` gives the top `adapter_layers` attention modules a learnable prompt
`adaption_prompt` (1, K, hidden) and gate `adaption_gate` ((1,) for gate="scalar", (Hq,) for "head") and switches
the model to the "llama_adapter" attention implementation, registered in transformers' AttentionInterface. That
function runs every layer's attention through `llama_adapter.attention.adapter_attention` (the fused Triton kernel on
a GPU), with prompt keys/values k_proj(prompt), v_proj(prompt): no RoPE, no norm, Hkv heads for GQA.

With gate="scalar", gate_act="none" this is PEFT's AdaptionPrompt (peft/tuners/adaption_prompt): same layers, same
parameter names, shapes and dtype (q_proj's), same math, so `save_peft` / `load_peft` round-trip with
`PeftModel.save_pretrained` / `from_pretrained`. Two differences, both outside PEFT's tested use: PEFT applies o_proj
to the two attention outputs separately, so with `attention_bias=True` it adds o_proj's bias twice (here once); PEFT
takes the prompt softmax in float32 and rounds it to the model dtype before gating, even for a float64 model (here the
op's accumulation: float32, float64 for float64).

Masks: the mask function registered with the attention is transformers' `sdpa_mask`, which returns None when SDPA's
`is_causal` would do (no padding, no sliding window in reach: training, prefill, dynamic-cache decoding, a static
cache's prefill). Then the fused op runs. Any other mask (left padding in batched generation, static-cache decoding,
packed rows) runs PyTorch's SDPA for the words plus SDPA over the prompt: correct, not fused.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from llama_adapter.attention import adapter_attention

if TYPE_CHECKING:
    from llama_adapter.model import AdapterConfig

ATTN_IMPLEMENTATION = "llama_adapter"
SUPPORTED_MODEL_TYPES = ("llama", "mistral")
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModel -> AdaptionPromptModel -> the transformers model
_ADAPTER_PARAM_NAMES = ("adaption_prompt", "adaption_gate")


def is_adapter_param(name: str) -> bool:
    """The one predicate for what trains and what is saved (PEFT's rule: the last name starts with "adaption_")."""
    return name.rsplit(".", 1)[-1] in _ADAPTER_PARAM_NAMES


def adapter_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: query (B, Hq, N, D), key/value (B, Hkv, Nk, D) -> ((B, N, Hq, D), None)."""
    if dropout:
        raise ValueError(f"attention dropout is not supported by the llama_adapter attention, got dropout={dropout}")
    prompt_k = prompt_v = gate = None
    if getattr(module, "adaption_prompt", None) is not None:
        prompt_k, prompt_v = prompt_keys_values(module, query.dtype)
        gate = effective_gate(module, query.shape[1])

    if attention_mask is None:
        # None means what it means to SDPA: causal aligned top-left for several queries (a static cache's prefill
        # has Nk > Nq, the tail unwritten), every key for one. kv_lens=Nq turns the op's bottom-right into top-left.
        B, _, Nq, _ = query.shape
        kv_lens = None if Nq in (1, key.shape[2]) else torch.full((B,), Nq, dtype=torch.int32, device=query.device)
        out = adapter_attention(
            query, key, value, prompt_k, prompt_v, gate, causal=True, sm_scale=scaling, kv_lens=kv_lens
        )
    else:
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, scale=scaling, enable_gqa=True
        )
        if prompt_k is not None:
            B = query.shape[0]
            prompt = F.scaled_dot_product_attention(
                query, prompt_k.expand(B, -1, -1, -1), prompt_v.expand(B, -1, -1, -1), scale=scaling, enable_gqa=True
            )
            out = out + gate.to(out.dtype).view(1, -1, 1, 1) * prompt
    return out.transpose(1, 2), None


def prompt_keys_values(module, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's prompt through its frozen k_proj / v_proj: two (Hkv, K, D) tensors in `dtype` (no RoPE)."""
    prompt = module.adaption_prompt[0]  # (K, hidden)
    n_kv = module.config.num_key_value_heads
    K = prompt.shape[0]
    keys = module.k_proj(prompt).view(K, n_kv, module.head_dim).transpose(0, 1)  # (Hkv, K, D)
    values = module.v_proj(prompt).view(K, n_kv, module.head_dim).transpose(0, 1)
    return keys.to(dtype), values.to(dtype)


def effective_gate(module, n_heads: int) -> torch.Tensor:
    """gate_act(adaption_gate) expanded to (Hq,): what the op multiplies each head's prompt output by."""
    gate = module.adaption_gate
    if module.adapter_gate_act == "tanh":
        gate = torch.tanh(gate)
    return gate.expand(n_heads)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, adapter_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


_register()


def attention_modules(model) -> list[nn.Module]:
    """The decoder layers' attention modules in layer order (PEFT's rule: names ending in ".self_attn")."""
    return [m for name, m in model.named_modules() if name.endswith(".self_attn")]


def _check_config(config, n_layers: int) -> None:
    from llama_adapter.model import AdapterConfig  # validates its own fields

    if not isinstance(config, AdapterConfig):
        raise TypeError(f"config must be a llama_adapter AdapterConfig, got {type(config).__name__}")
    if config.adapter_layers > n_layers:
        raise ValueError(f"config.adapter_layers={config.adapter_layers} exceeds the model's {n_layers} layers")


def apply_adapter(model, config: AdapterConfig):
    """Add zero-init gated prompts to the top `config.adapter_layers` layers of a transformers Llama/Mistral model.

    Prompts ~ N(0, 1) of shape (1, adapter_len, hidden) and gates = 0, in q_proj's dtype (float32 if quantized), on
    its device. The base is frozen: only prompts and gates require grad. Returns `model` (changed in place), whose
    `adapter_config` is `config`. gate="scalar", gate_act="none" is PEFT's AdaptionPrompt.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model must be a transformers model of type {SUPPORTED_MODEL_TYPES}, got {model_type!r}")
    if getattr(model, "adapter_config", None) is not None:
        raise ValueError("model already has an adapter (apply_adapter was called on it before)")
    layers = attention_modules(model)
    _check_config(config, len(layers))

    for module in layers[-config.adapter_layers :]:
        weight = module.q_proj.weight
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        n_gates = module.config.num_attention_heads if config.gate == "head" else 1
        hidden = module.config.hidden_size
        module.adaption_prompt = nn.Parameter(
            torch.empty(1, config.adapter_len, hidden, device=weight.device, dtype=dtype).normal_()
        )
        module.adaption_gate = nn.Parameter(torch.zeros(n_gates, device=weight.device, dtype=dtype))
        module.adapter_gate_act = config.gate_act
    for name, param in model.named_parameters():
        param.requires_grad_(is_adapter_param(name))

    model.adapter_config = config
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
    else:  # older transformers: the config attribute is what the attention modules read
        model.config._attn_implementation = ATTN_IMPLEMENTATION
    return model


def adapter_state_dict(model) -> dict[str, torch.Tensor]:
    """{state-dict name: tensor} of the prompts and gates only, e.g. "model.layers.1.self_attn.adaption_gate"."""
    return {name: t for name, t in model.state_dict().items() if is_adapter_param(name)}


def save_peft(model, directory: str | os.PathLike) -> None:
    """Write PEFT's adaption-prompt format: adapter_config.json + adapter_model.safetensors (PEFT's key names)."""
    from safetensors.torch import save_file

    config = getattr(model, "adapter_config", None)
    if config is None:
        raise ValueError("model has no adapter: call apply_adapter(model, config) or load_peft(model, dir) first")
    if (config.gate, config.gate_act) != ("scalar", "none"):
        raise ValueError(
            f"PEFT's adaption prompt has one gate per layer, used as is (gate='scalar', gate_act='none'); "
            f"this adapter has gate={config.gate!r}, gate_act={config.gate_act!r}"
        )
    os.makedirs(directory, exist_ok=True)
    peft_config = {
        "peft_type": "ADAPTION_PROMPT",
        "task_type": "CAUSAL_LM",
        "adapter_len": config.adapter_len,
        "adapter_layers": config.adapter_layers,
        "target_modules": "self_attn",
        "base_model_name_or_path": getattr(model.config, "_name_or_path", None) or None,
        "inference_mode": True,
        "revision": None,
    }
    with open(os.path.join(directory, PEFT_CONFIG_NAME), "w") as f:
        json.dump(peft_config, f, indent=2)
    tensors = {PEFT_PREFIX + name: t.detach().contiguous() for name, t in adapter_state_dict(model).items()}
    save_file(tensors, os.path.join(directory, PEFT_WEIGHTS_NAME), metadata={"format": "pt"})


def load_peft(model, directory: str | os.PathLike):
    """Read a PEFT adaption-prompt directory into `model` (adding the adapter first if it has none). Returns model."""
    from llama_adapter.model import AdapterConfig

    config_path = os.path.join(directory, PEFT_CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise ValueError(f"{config_path} not found: not a PEFT adapter directory")
    with open(config_path) as f:
        peft_config = json.load(f)
    if peft_config.get("peft_type") != "ADAPTION_PROMPT":
        raise ValueError(f"{config_path}: peft_type must be 'ADAPTION_PROMPT', got {peft_config.get('peft_type')!r}")
    if peft_config.get("target_modules") not in (None, "self_attn"):
        raise ValueError(f"{config_path}: target_modules must be 'self_attn', got {peft_config['target_modules']!r}")
    wanted = AdapterConfig(
        adapter_len=peft_config["adapter_len"],
        adapter_layers=peft_config["adapter_layers"],
        gate="scalar",
        gate_act="none",
    )
    tensors = _read_peft_weights(directory)  # before touching the model: a missing file leaves it as it was
    current = getattr(model, "adapter_config", None)
    if current is None:
        apply_adapter(model, wanted)
    elif current != wanted:
        raise ValueError(f"{config_path} describes {wanted}, but the model already has adapter {current}")

    params = dict(model.named_parameters())
    expected = set(adapter_state_dict(model))
    found = {name.removeprefix(PEFT_PREFIX) for name in tensors}
    if found != expected:
        raise ValueError(
            f"{directory}: adapter tensors do not match the model: "
            f"missing {sorted(expected - found)}, unexpected {sorted(found - expected)}"
        )
    with torch.no_grad():
        for name, tensor in tensors.items():
            param = params[name.removeprefix(PEFT_PREFIX)]
            if tensor.shape != param.shape:
                raise ValueError(f"{directory}: {name} has shape {tuple(tensor.shape)}, expected {tuple(param.shape)}")
            param.copy_(tensor)
    return model


def _read_peft_weights(directory) -> dict[str, torch.Tensor]:
    path = os.path.join(directory, PEFT_WEIGHTS_NAME)
    if os.path.isfile(path):
        from safetensors.torch import load_file

        return load_file(path)
    legacy = os.path.join(directory, "adapter_model.bin")  # PEFT's format before safetensors became the default
    if os.path.isfile(legacy):
        return torch.load(legacy, map_location="cpu", weights_only=True)
    raise ValueError(f"{directory}: neither {PEFT_WEIGHTS_NAME} nor adapter_model.bin found")
