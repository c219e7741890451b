"""Drop-in LLaMA-Adapter for transformers' LlamaForCausalLM / MistralForCausalLM, in PEFT's adaption-prompt format.

`apply_adapter(model, AdapterConfig(...))` gives the top `adapter_layers` attention modules a learnable prompt
`adaption_prompt` (1, K, hidden) and gate `adaption_gate` ((1,) for gate="scalar", (Hq,) for "head") and switches
the model to the "llama_adapter" attention implementation, registered in transformers' AttentionInterface. That
function runs every layer's attention through `llama_adapter.attention.adapter_attention` (the fused Triton kernel on
a GPU), with prompt keys/values k_proj(prompt), v_proj(prompt): no RoPE, no norm, Hkv heads for GQA.

With gate="scalar", gate_act="none" this is PEFT's AdaptionPrompt (peft/tuners/adaption_prompt): same layers, same
parameter names, shapes and dtype (q_proj's), same math, so `save_peft` / `load_peft` round-trip with
`PeftModel.save_pretrained` / `from_pretrained`. `accelerate_peft(peft_model)` goes the other way: a model built by
PEFT keeps its own modules and parameters and runs its prompts through the same attention function. Two differences
from PEFT, both outside its tested use: PEFT applies o_proj to the two attention outputs separately, so with
`attention_bias=True` it adds o_proj's bias twice (here once); PEFT takes the prompt softmax in float32 and rounds it to
the model dtype before gating, even for a float64 model (here the op's accumulation: float32, float64 for float64).

Masks: the mask function registered with the attention and how each kind of mask is attended live in `hf_layout`.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from llama_adapter import adapter
from llama_adapter.adapter import AdapterConfig, copy_in, fit_adapter_layers, gate_value, project_prompt, read_peft
from llama_adapter.attention import adapter_attention
from llama_adapter.hf_layout import PackedSequences, attend_padded, check_window, kwarg_packing, padding_mask

ATTN_IMPLEMENTATION = "llama_adapter"
SUPPORTED_MODEL_TYPES = ("llama", "mistral")
PEFT_PREFIX = "base_model.model."  # PeftModel -> AdaptionPromptModel -> the transformers model
PROMPT_OWNER_KWARG = "llama_adapter_prompt_owner"  # how a PEFT AdaptedAttention hands its prompt to the attention


def is_adapter_param(name: str) -> bool:
    """What trains and what is saved on a transformers model: `adapter.is_adapter_param` in PEFT's naming."""
    return adapter.is_adapter_param(name, naming="peft")


def adapter_attention_forward(
    module,
    query,
    key,
    value,
    attention_mask,
    scaling=None,
    dropout=0.0,
    sliding_window=None,
    cu_seq_lens_q=None,
    cu_seq_lens_k=None,
    max_length_q=None,
    **kwargs,
):
    """transformers attention function: query (B, Hq, N, D), key/value (B, Hkv, Nk, D) -> ((B, N, Hq, D), None)."""
    if dropout:
        raise ValueError(f"attention dropout is not supported by the llama_adapter attention, got dropout={dropout}")
    if kwargs.get("is_causal") is False:
        raise ValueError("the llama_adapter attention is causal; got is_causal=False")
    owner = kwargs.get(PROMPT_OWNER_KWARG)
    owner = module if owner is None else owner
    prompt = {}
    if getattr(owner, "adaption_prompt", None) is not None:
        prompt_k, prompt_v = prompt_keys_values(module, owner.adaption_prompt, query.dtype)
        prompt = dict(adapter_k=prompt_k, adapter_v=prompt_v, gate=_gate_of(owner, query.shape[1]))

    def attend(q, k, v, **extra):
        return adapter_attention(q, k, v, causal=True, sm_scale=scaling, **prompt, **extra)

    B, _, Nq, _ = query.shape
    mask = attention_mask
    if isinstance(mask, torch.Tensor) and mask.dim() not in (1, 2):
        raise ValueError(
            f"the llama_adapter attention takes transformers' 2D padding mask (B, L) of 0/1 (any left or right "
            f"padding), not a {mask.dim()}D mask of shape {tuple(mask.shape)}: custom masks are not supported"
        )
    check_window(sliding_window, mask.shape[1] if isinstance(mask, torch.Tensor) and mask.dim() == 2 else key.shape[2])
    if mask is None:
        mask = kwarg_packing(query, key, cu_seq_lens_q, cu_seq_lens_k, max_length_q)
    if mask is None:
        return attend(query, key, value).transpose(1, 2), None
    if isinstance(mask, PackedSequences):
        flat = [
            t.transpose(1, 2).reshape(1, B * t.shape[2], t.shape[1], t.shape[3]).transpose(1, 2)
            for t in (query, key, value)
        ]  # (1, H, B*N, D): rows laid end to end
        out = attend(*flat, cu_seqlens=mask.cu_seqlens, max_seqlen=mask.max_seqlen)  # (1, Hq, B*N, D)
        return out.transpose(1, 2).reshape(B, Nq, out.shape[1], out.shape[3]), None
    if mask.dim() == 1:  # a static cache's valid lengths; the queries are the last Nq of them
        return attend(query, key, value, kv_lens=mask.to(torch.int32)).transpose(1, 2), None
    return attend_padded(attend, query, key, value, mask.bool(), bool(prompt)), None


def prompt_keys_values(module, prompt: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A (1, K, hidden) prompt through the layer's frozen k_proj / v_proj: two (Hkv, K, D) tensors in `dtype`."""
    n_kv = module.config.num_key_value_heads
    keys, values = project_prompt(module.k_proj, module.v_proj, prompt[0], n_kv, module.head_dim)  # (Hkv, K, D)
    return keys.to(dtype), values.to(dtype)


def _gate_of(owner, n_heads: int) -> torch.Tensor:
    """gate_act(adaption_gate) expanded to (Hq,): what the op multiplies each head's prompt output by.

    `owner` holds adaption_gate: one of our adapted attention modules, or a PEFT AdaptedAttention (no gate_act)."""
    return gate_value(owner.adaption_gate, getattr(owner, "adapter_gate_act", "none")).expand(n_heads)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, adapter_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, padding_mask)


_register()


def attention_modules(model) -> list[nn.Module]:
    """The decoder layers' attention modules in layer order (PEFT's rule: names ending in ".self_attn")."""
    return [m for name, m in model.named_modules() if name.endswith(".self_attn")]


def _fit_config(config, n_layers: int):
    """`config`, checked, with adapter_layers clamped to n_layers (warning) as `LLaMA.attach_adapter` does."""
    import dataclasses
    import warnings

    if not isinstance(config, AdapterConfig):
        raise TypeError(f"config must be a llama_adapter AdapterConfig, got {type(config).__name__}")
    layers, note = fit_adapter_layers(config.adapter_layers, n_layers, "config.adapter_layers")
    if note:
        warnings.warn(note, stacklevel=3)
        config = dataclasses.replace(config, adapter_layers=layers)
    return config


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
    config = _fit_config(config, len(layers))

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
    with open(os.path.join(directory, adapter.CONFIG_FILE), "w") as f:
        json.dump(peft_config, f, indent=2)
    tensors = {PEFT_PREFIX + name: t.detach().contiguous() for name, t in adapter_state_dict(model).items()}
    save_file(tensors, os.path.join(directory, adapter.WEIGHTS_FILE), metadata={"format": "pt"})


def load_peft(model, directory: str | os.PathLike):
    """Read a PEFT adaption-prompt directory into `model` (adding the adapter first if it has none). Returns model."""
    directory = os.fspath(directory)
    config_path = os.path.join(directory, adapter.CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise ValueError(f"{config_path} not found: not a PEFT adapter directory")
    layers = [(name, m) for name, m in model.named_modules() if name.endswith(".self_attn")]  # attention_modules
    # read and checked before the model is touched: a missing or damaged file leaves it as it was
    peft = read_peft(directory, len(layers), model.config.hidden_size)
    wanted = peft.config()
    current = getattr(model, "adapter_config", None)
    if current is None:
        apply_adapter(model, wanted)
    elif current != wanted:
        raise ValueError(f"{config_path} describes {wanted}, but the model already has adapter {current}")
    tensors = {}
    for i, prompt in peft.prompts.items():
        tensors[f"{layers[i][0]}.adaption_prompt"] = prompt[None]  # (1, K, hidden), as PEFT keeps it
        tensors[f"{layers[i][0]}.adaption_gate"] = peft.gates[i]
    copy_in({name: p for name, p in model.named_parameters() if is_adapter_param(name)}, tensors, directory)
    return model


def accelerate_peft(peft_model):
    """Run a PEFT AdaptionPrompt model's prompts through the fused attention. Returns `peft_model` (changed in place).

    `peft_model` is what `peft.get_peft_model(model, AdaptionPromptConfig(...))` or `PeftModel.from_pretrained`
    returns for a transformers Llama/Mistral model. Its AdaptedAttention modules (active, and cached for inactive
    adapters) keep their parameters `adaption_prompt` / `adaption_gate`, names and state dict, so `save_pretrained`,
    `PeftModel.from_pretrained`, `set_adapter` and `disable_adapter` work as before; only their forward changes: the
    wrapped attention computes words and prompt in one call of the "llama_adapter" attention implementation, to
    which the base model is switched. Adapters added to the model afterwards run PEFT's own forward (correct, not
    fused) until this is called again. Should the base later be switched to another attention implementation, the
    adapted modules run PEFT's forward again.
    """
    from peft.tuners.adaption_prompt.layer import AdaptedAttention

    tuner = getattr(peft_model, "base_model", None)
    peft_type = getattr(
        getattr(peft_model, "peft_config", {}).get(getattr(peft_model, "active_adapter", None)), "peft_type", None
    )
    if not hasattr(tuner, "_cached_adapters") or str(getattr(peft_type, "value", peft_type)) != "ADAPTION_PROMPT":
        raise TypeError(
            f"peft_model must be a PeftModel with an AdaptionPromptConfig adapter (peft.get_peft_model), "
            f"got {type(peft_model).__name__} with peft_type {peft_type!r}"
        )
    model = tuner.model
    model_type = getattr(model.config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"peft_model must wrap a transformers model of type {SUPPORTED_MODEL_TYPES}, got {model_type!r}"
        )
    fused_cls = _fused_adapted_attention_class(AdaptedAttention)
    modules = [m for m in model.modules() if isinstance(m, AdaptedAttention)]
    modules += [m for cached in tuner._cached_adapters.values() for m in cached if isinstance(m, AdaptedAttention)]
    for module in modules:
        module.__class__ = fused_cls  # a subclass: PEFT's isinstance checks and its state dict see no change
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
    else:
        model.config._attn_implementation = ATTN_IMPLEMENTATION
    return peft_model


_FUSED_CLASSES: dict[type, type] = {}


def _fused_adapted_attention_class(base: type) -> type:
    """PEFT's AdaptedAttention with a forward that hands its prompt to the wrapped attention (one class per base)."""
    if base not in _FUSED_CLASSES:

        def forward(self, **kwargs):
            if self.model.config._attn_implementation != ATTN_IMPLEMENTATION:
                return base.forward(self, **kwargs)
            if kwargs.get("output_attention", False):
                raise NotImplementedError("output_attention is not supported (nor by PEFT's AdaptedAttention)")
            return self.model(**kwargs, **{PROMPT_OWNER_KWARG: self})

        _FUSED_CLASSES[base] = type("FusedAdaptedAttention", (base,), {"forward": forward, "__module__": __name__})
    return _FUSED_CLASSES[base]
