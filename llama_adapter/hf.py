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

Masks. The mask function registered with the attention (`padding_mask`) hands the attention one of four things
(once per model forward), all of which run the fused op:
- None: no padding; every key the layer sees is visible, causal aligned bottom-right (training, prefill, decoding
  with a DynamicCache).
- a (B,) int32 tensor: valid lengths of a static cache without padding (kv_lens; no device sync to build it).
- a (B, L) bool padding mask (1 = token), as transformers' FlashAttention-2 path gets. Without a past (training,
  prefill: L = the number of queries) the batch is unpadded into packed sequences (cu_seqlens, max_seqlen) for the
  varlen kernel and the output padded back. Pads before a row's first token get the gated prompt attention (no
  word is visible to them: what SDPA + PEFT give, and the shifted LM loss reads that pad's logits); other pads
  get zero, as in FA2. With a past (decoding), each row's valid keys are gathered to the front (what FA2's
  unpadding copies too) and attended with per-row kv_lens. Any 0/1 pattern works, left or right padding alike,
  except that the tokens fed with a cache must not be padding.
- PackedSequences (below).
Rows packed without a mask (position_ids restarting at each sequence, found once per forward outside torch.compile,
or FA2's cu_seq_lens_q keywords, as transformers' DataCollatorWithFlattening gives) take the varlen kernel too.
A 4D mask, a sliding window shorter than the keys, or padding among the new tokens of a cached step raise
ValueError: there is no unfused fallback.
"""

from __future__ import annotations

import json
import os
from typing import NamedTuple

import torch
from torch import nn

from llama_adapter import adapter
from llama_adapter.adapter import AdapterConfig, copy_in, fit_adapter_layers, gate_value, project_prompt, read_peft
from llama_adapter.attention import adapter_attention

ATTN_IMPLEMENTATION = "llama_adapter"
SUPPORTED_MODEL_TYPES = ("llama", "mistral")
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModel -> AdaptionPromptModel -> the transformers model
PROMPT_OWNER_KWARG = "llama_adapter_prompt_owner"  # how a PEFT AdaptedAttention hands its prompt to the attention


def is_adapter_param(name: str) -> bool:
    """What trains and what is saved on a transformers model: `adapter.is_adapter_param` in PEFT's naming."""
    return adapter.is_adapter_param(name, naming="peft")


def padding_mask(
    batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None, attention_mask=None, **kwargs
):
    """transformers mask interface for "llama_adapter": None, (B,) int32 valid lengths, a (B, L) bool mask, or
    PackedSequences.

    Called once per model forward (not per layer). Device syncs: `all()` on a given 2D mask, as in transformers'
    FlashAttention-2 mask, and reading the packing probe where transformers built a packed mask function."""
    # A new forward: its mask and FA2 keywords are read afresh (their tensors may be buffers refilled in place).
    _last_packing[0] = _last_plan[0] = None
    if attention_mask is not None:
        if attention_mask.dim() == 1:  # already ours: generate builds a static cache's mask ahead, then again
            return attention_mask
        if attention_mask.dim() != 2:
            return attention_mask  # a 4D mask: the attention says what it supports
        mask = attention_mask[:, -kv_length:].bool()
        if isinstance(q_offset, int) and kv_length == q_offset + q_length and mask.shape[1] < kv_length:
            # a growing cache (a static one's kv_length is its capacity): the mask must cover every key, else its
            # columns cannot be matched to keys (SDPA would silently misread it too)
            raise ValueError(
                f"attention_mask covers {mask.shape[1]} positions, but the attention sees {kv_length} keys ("
                f"{q_offset} cached, {q_length} new): pass the mask of every token so far, as generate() does"
            )
        if not bool(mask.all()):
            return mask
        if mask.shape[1] == kv_length:
            return None
        return torch.full((batch_size,), mask.shape[1], dtype=torch.int32, device=mask.device)
    packing_possible = kv_length == q_length > 1 and isinstance(q_offset, int) and q_offset == 0  # no cache
    if packing_possible and not kwargs.get("allow_is_causal_skip", True):
        packed = _packed_sequences(batch_size, q_length, mask_function, kwargs.get("device", "cpu"))
        if packed is not None:
            return packed
    if isinstance(q_offset, torch.Tensor):  # a static cache: kv_length is its capacity, q_offset what it holds
        filled = (q_offset + q_length).to(torch.int32).reshape(1)
        return filled.expand(batch_size).contiguous()  # the kernels index kv_lens with stride 1
    if kv_length != q_offset + q_length:  # a static cache before its first write reports q_offset as the int 0
        device = kwargs.get("device", "cpu")
        return torch.full((batch_size,), q_offset + q_length, dtype=torch.int32, device=device)
    return None


def adapter_attention_forward(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None,
    cu_seq_lens_q=None, cu_seq_lens_k=None, max_length_q=None, **kwargs,
):  # fmt: skip
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
        prompt = dict(adapter_k=prompt_k, adapter_v=prompt_v, gate=effective_gate(owner, query.shape[1]))

    def attend(q, k, v, **extra):
        return adapter_attention(q, k, v, causal=True, sm_scale=scaling, **prompt, **extra)

    B, _, Nq, _ = query.shape
    mask = attention_mask
    if isinstance(mask, torch.Tensor) and mask.dim() not in (1, 2):
        raise ValueError(
            f"the llama_adapter attention takes transformers' 2D padding mask (B, L) of 0/1 (any left or right "
            f"padding), not a {mask.dim()}D mask of shape {tuple(mask.shape)}: custom masks are not supported"
        )
    _check_window(sliding_window, mask.shape[1] if isinstance(mask, torch.Tensor) and mask.dim() == 2 else key.shape[2])
    if mask is None:
        mask = _kwarg_packing(query, key, cu_seq_lens_q, cu_seq_lens_k, max_length_q)
    if mask is None:
        return attend(query, key, value).transpose(1, 2), None
    if isinstance(mask, PackedSequences):
        flat = [t.transpose(1, 2).reshape(1, B * t.shape[2], t.shape[1], t.shape[3]).transpose(1, 2)
                for t in (query, key, value)]  # fmt: skip  # (1, H, B*N, D): rows laid end to end
        out = attend(*flat, cu_seqlens=mask.cu_seqlens, max_seqlen=mask.max_seqlen)  # (1, Hq, B*N, D)
        return out.transpose(1, 2).reshape(B, Nq, out.shape[1], out.shape[3]), None
    if mask.dim() == 1:  # a static cache's valid lengths; the queries are the last Nq of them
        return attend(query, key, value, kv_lens=mask.to(torch.int32)).transpose(1, 2), None
    return _attend_padded(attend, query, key, value, mask.bool(), bool(prompt)), None


def _check_window(sliding_window, n_keys: int) -> None:
    # A window reaching every key changes nothing (Mistral v0.2+ has none; v0.1's 4096 covers shorter inputs).
    if sliding_window is not None and n_keys > sliding_window:
        raise ValueError(
            f"the llama_adapter attention has no sliding window: sliding_window={sliding_window} must cover all "
            f"{n_keys} keys (use inputs and caches of at most {sliding_window} tokens)"
        )


class PackedSequences(NamedTuple):
    """Rows holding several sequences each, laid end to end: FlashAttention-varlen's cu_seqlens and max_seqlen."""

    cu_seqlens: torch.Tensor  # (S+1,) int32 over the B*N flattened tokens
    max_seqlen: int


def _packed_sequences(batch_size, q_length, mask_function, device) -> PackedSequences | None:
    """The packing transformers found in position_ids (restarting at each sequence), read off its mask function.

    transformers builds a packed mask function only without a mask and a cache. Probing it on the sub-diagonal
    (query i, key i - 1) is O(B*N): key i - 1 is hidden from query i exactly where a new sequence starts. Reading the
    result is one device sync per forward; under torch.compile that would break the graph, so packing is then only
    taken from FA2's cu_seq_lens_q keyword (transformers' DataCollatorWithFlattening gives it)."""
    if mask_function is None or torch.compiler.is_compiling():
        return None
    rows = torch.arange(batch_size, device=device)[:, None]
    queries = torch.arange(1, q_length, device=device)[None, :]
    starts = torch.ones(batch_size, q_length, dtype=torch.bool, device=device)
    starts[:, 1:] = ~mask_function(rows, 0, queries, queries - 1)
    if not bool(starts[:, 1:].any()):
        return None
    bounds = torch.nonzero(starts.reshape(-1)).reshape(-1)
    cu_seqlens = torch.cat([bounds, bounds.new_tensor([batch_size * q_length])]).to(torch.int32)
    return PackedSequences(cu_seqlens, int((cu_seqlens[1:] - cu_seqlens[:-1]).max()))


def _kwarg_packing(query, key, cu_seq_lens_q, cu_seq_lens_k, max_length_q) -> PackedSequences | None:
    """FA2's padding-free keywords (cu_seq_lens_q/_k, max_length_q) as PackedSequences, or None without them."""
    if cu_seq_lens_q is None:
        return None
    if key.shape[2] != query.shape[2]:
        raise ValueError(f"cu_seq_lens_q packs {query.shape[2]} queries, but the layer has {key.shape[2]} keys")
    keywords = (cu_seq_lens_q, cu_seq_lens_k, max_length_q)
    last = _last_packing[0]
    if last is not None and all(a is b for a, b in zip(last[0], keywords)):
        return last[1]  # every layer of a forward gets these very objects: check and convert them once (syncs)
    if cu_seq_lens_k is not None and not torch.equal(cu_seq_lens_k, cu_seq_lens_q):
        raise ValueError("the llama_adapter attention needs cu_seq_lens_k equal to cu_seq_lens_q (self-attention)")
    cu_seqlens = cu_seq_lens_q.to(torch.int32)
    max_seqlen = int(max_length_q) if max_length_q is not None else int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    _last_packing[0] = (keywords, PackedSequences(cu_seqlens, max_seqlen))
    return _last_packing[0][1]


_last_packing: list[tuple | None] = [None]  # the current forward's keywords and their PackedSequences


class _PaddingPlan(NamedTuple):
    """What a (B, L) padding mask means for the op, worked out (with its device syncs) once per model forward."""

    mask: torch.Tensor  # the mask it was made for: every layer of one forward gets this very tensor
    n_queries: int
    lengths: torch.Tensor  # (B,) int32 real tokens per row
    tokens: torch.Tensor | None  # no past: (T,) flat indices of real tokens, packed by cu_seqlens
    cu_seqlens: torch.Tensor | None
    max_seqlen: int
    leading: torch.Tensor | None  # no past: flat indices of pads before a row's first token
    order: torch.Tensor | None  # with a past: (B, longest) cache slots, real tokens first; None if no pad in reach


_last_plan: list[_PaddingPlan | None] = [None]  # the current forward's; holding its mask keeps its id unique


def _padding_plan(mask: torch.Tensor, n_queries: int) -> _PaddingPlan:
    plan = _last_plan[0]
    if plan is not None and plan.mask is mask and plan.n_queries == n_queries:
        return plan
    B, L = mask.shape
    lengths = mask.sum(dim=1, dtype=torch.int32)
    tokens = cu_seqlens = leading = order = None
    max_seqlen = int(lengths.max())
    if L == n_queries:  # no past: FA2-style unpadding into the varlen kernel
        tokens = torch.nonzero(mask.reshape(-1)).reshape(-1)
        cu_seqlens = torch.zeros(B + 1, dtype=torch.int32, device=mask.device)
        cu_seqlens[1:] = torch.cumsum(lengths, 0)
        leading = torch.nonzero((mask.cumsum(dim=1) == 0).reshape(-1)).reshape(-1)
    else:
        if not bool(mask[:, L - n_queries :].all()):
            raise ValueError(
                "with a KV cache the new tokens must not be padding: the llama_adapter attention supports padding "
                "(left, right or anywhere) in the tokens of a step without a past, and any padding already in the cache"
            )
        if int(lengths.min()) < L:  # the pads' cache slots must leave: real tokens to the front, in order
            order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :max_seqlen]
    plan = _PaddingPlan(mask, n_queries, lengths, tokens, cu_seqlens, max_seqlen, leading, order)
    _last_plan[0] = plan
    return plan


def _attend_padded(attend, query, key, value, mask, has_prompt):
    """`attend` under a (B, L) bool padding mask: unpad into packed sequences without a past, compact keys with one.

    Padded query positions get what SDPA with transformers' mask gives them where the loss can read it: a pad
    before a row's first token sees no word (output = the gated prompt attention; the shifted LM loss reads its
    logits, predicting the row's first token). Other pads (after the last token, or between tokens) get zero, as
    in FA2."""
    B, Hq, Nq, D = query.shape
    L = mask.shape[1]
    if not Nq <= L <= key.shape[2]:
        raise ValueError(
            f"attention_mask covers {L} positions; it must cover the {Nq} queries and at most the {key.shape[2]} keys"
        )
    plan = _padding_plan(mask, Nq)
    key, value = key[:, :, :L], value[:, :, :L]  # a static cache holds its capacity; the mask says what is filled
    if plan.tokens is None:  # a past: per-row cache lengths over its real tokens
        if plan.order is not None:
            index = plan.order[:, None, :, None].expand(B, key.shape[1], plan.order.shape[1], D)
            key, value = key.gather(2, index), value.gather(2, index)  # (B, Hkv, longest, D)
        return attend(query, key, value, kv_lens=plan.lengths).transpose(1, 2)

    def packed(t, rows):  # (B, H, L, D) -> (1, H, len(rows), D)
        return t.transpose(1, 2).reshape(B * L, t.shape[1], D).index_select(0, rows).transpose(0, 1)[None]

    out = query.new_zeros(B * L, Hq, D)
    if plan.tokens.numel():
        o = attend(*(packed(t, plan.tokens) for t in (query, key, value)), cu_seqlens=plan.cu_seqlens,
                   max_seqlen=plan.max_seqlen)  # fmt: skip
        out = out.index_copy(0, plan.tokens, o[0].transpose(0, 1))
    if has_prompt and plan.leading.numel():
        no_words = key.new_zeros(1, key.shape[1], 1, D)  # kv_lens = 0: the op's word output is 0
        o = attend(packed(query, plan.leading), no_words, no_words, kv_lens=plan.lengths.new_zeros(1))
        out = out.index_copy(0, plan.leading, o[0].transpose(0, 1))
    return out.view(B, L, Hq, D)


def prompt_keys_values(module, prompt: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A (1, K, hidden) prompt through the layer's frozen k_proj / v_proj: two (Hkv, K, D) tensors in `dtype`."""
    n_kv = module.config.num_key_value_heads
    keys, values = project_prompt(module.k_proj, module.v_proj, prompt[0], n_kv, module.head_dim)  # (Hkv, K, D)
    return keys.to(dtype), values.to(dtype)


def effective_gate(owner, n_heads: int) -> torch.Tensor:
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
    with open(os.path.join(directory, PEFT_CONFIG_NAME), "w") as f:
        json.dump(peft_config, f, indent=2)
    tensors = {PEFT_PREFIX + name: t.detach().contiguous() for name, t in adapter_state_dict(model).items()}
    save_file(tensors, os.path.join(directory, PEFT_WEIGHTS_NAME), metadata={"format": "pt"})


def load_peft(model, directory: str | os.PathLike):
    """Read a PEFT adaption-prompt directory into `model` (adding the adapter first if it has none). Returns model."""
    directory = os.fspath(directory)
    config_path = os.path.join(directory, PEFT_CONFIG_NAME)
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
    peft_type = getattr(getattr(peft_model, "peft_config", {}).get(getattr(peft_model, "active_adapter", None)),
                        "peft_type", None)  # fmt: skip
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
