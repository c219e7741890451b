"""Read a Hugging Face Llama checkpoint directory into a `Checkpoint` under Meta's parameter names.

The directory holds config.json + model.safetensors, a sharded model.safetensors.index.json, or pytorch_model.bin
(also sharded). HF's q/k rows are permuted so that rotate-half RoPE pairs dims (i, i + D/2); Meta's
interleaved RoPE pairs (2i, 2i + 1), so the reader undoes that permutation.
"""

from __future__ import annotations

import os
import re

import torch

from llama_adapter.checkpoint import Checkpoint, Deferred, check_model_args
from llama_adapter.files import CheckpointError, read_json_object, read_tensor_file

HF_CONFIG = "config.json"

_HF_LAYER_NAMES = {
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}
_HF_TOP_NAMES = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
_HF_KEYS = dict(
    dim="hidden_size",
    n_layers="num_hidden_layers",
    n_heads="num_attention_heads",
    n_kv_heads="num_key_value_heads",
    hidden_dim="intermediate_size",
    norm_eps="rms_norm_eps",
    max_seq_len="max_position_embeddings",
    rope_scaling="rope_scaling / rope_parameters",
)
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)\.weight$")


def hf_model_args(config: dict, path: str = HF_CONFIG) -> dict:
    """ModelArgs fields from a transformers LlamaConfig dict (transformers 4 and 5 layouts)."""
    if config.get("model_type", "llama") != "llama":
        raise CheckpointError(f"{path}: model_type {config.get('model_type')!r} is not supported, only 'llama'")
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag):
            raise CheckpointError(f"{path}: {flag}=true is not supported (LLaMA has no biases)")
    missing = [
        k
        for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
        if k not in config
    ]
    if missing:
        raise CheckpointError(f"{path} lacks {missing}")
    if config.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{path}: hidden_act {config['hidden_act']!r} is not supported, only 'silu'")
    args = dict(
        dim=config["hidden_size"],
        n_layers=config["num_hidden_layers"],
        n_heads=config["num_attention_heads"],
        n_kv_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
        vocab_size=config["vocab_size"],
        hidden_dim=config["intermediate_size"],
        norm_eps=config.get("rms_norm_eps", 1e-6),
    )
    if config.get("max_position_embeddings"):
        args["max_seq_len"] = config["max_position_embeddings"]
    # transformers 5 keeps rope_theta and the scaling in rope_parameters; 4.x had rope_theta + rope_scaling.
    rope_key = "rope_parameters" if config.get("rope_parameters") else "rope_scaling"
    rope = config.get(rope_key) or {}
    if not isinstance(rope, dict):
        raise CheckpointError(f"{path}: {rope_key} must be an object, got {rope!r}")
    args["rope_theta"] = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        if any(k not in rope for k in keys):
            raise CheckpointError(f"{path}: llama3 rope scaling needs {keys}, got {sorted(rope)}")
        args["rope_scaling"] = {k: rope[k] for k in keys}
    elif rope_type not in ("default", None):
        raise CheckpointError(f"{path}: rope_type {rope_type!r} is not supported (only default and llama3)")
    args = check_model_args(args, path, _HF_KEYS)
    if config.get("head_dim") not in (None, args["dim"] // args["n_heads"]):
        raise CheckpointError(
            f"{path}: head_dim {config['head_dim']} != hidden_size / num_attention_heads is not supported"
        )
    return args


def unpermute_rotate_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF q/k rows (per head: first halves, then second halves) -> Meta's interleaved pairs."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_to_meta_name(name: str) -> str | None:
    """Meta name of an HF Llama tensor; None for tensors to skip (old checkpoints' rotary inv_freq)."""
    if name in _HF_TOP_NAMES:
        return _HF_TOP_NAMES[name]
    if name.endswith("rotary_emb.inv_freq"):
        return None
    m = _HF_LAYER.match(name)
    if m and m.group(2) in _HF_LAYER_NAMES:
        return f"layers.{m.group(1)}.{_HF_LAYER_NAMES[m.group(2)]}.weight"
    return name  # unknown: kept, so the model check reports it as unexpected


def _hf_weight_files(path: str) -> dict[str, list[str] | None]:
    """{file: tensor names to read (None: all)} for the HF dir's weights."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index_path = os.path.join(path, index_name)
        if os.path.isfile(index_path):
            weight_map = read_json_object(index_path).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index_path} has no weight_map")
            files: dict[str, list[str]] = {}
            for name, fname in weight_map.items():
                files.setdefault(os.path.join(path, fname), []).append(name)
            return files
    for single in ("model.safetensors", "pytorch_model.bin"):
        if os.path.isfile(os.path.join(path, single)):
            return {os.path.join(path, single): None}
    raise FileNotFoundError(
        f"no weights in {path}: looked for model.safetensors(.index.json) and pytorch_model.bin(.index.json)"
    )


def read_hf_checkpoint(path: str, deferred: bool = False) -> Checkpoint:
    """The HF directory `path` under Meta's names, q/k rows un-permuted (`Deferred` un-permutes when `deferred`)."""
    config_path = os.path.join(path, HF_CONFIG)
    config = read_json_object(config_path)
    quantized = config.get("quantization_config")
    if quantized:  # bitsandbytes / GPTQ / AWQ / ... tensors under other names: refuse before reading any
        method = quantized.get("quant_method", "unknown") if isinstance(quantized, dict) else quantized
        raise CheckpointError(
            f"{config_path}: the checkpoint is already quantized ({method}); load the original floating-point "
            "weights (quantize='nf4' or 'int8' quantizes them while loading)"
        )
    ckpt = Checkpoint(hf_model_args(config, config_path), config_path=config_path)
    for fname, names in _hf_weight_files(path).items():
        for name, t in read_tensor_file(fname, names).items():
            meta_name = hf_to_meta_name(name)
            if meta_name is None:
                continue
            if meta_name.endswith(("attention.wq.weight", "attention.wk.weight")):
                heads = ckpt.args["n_heads"] if meta_name.endswith("wq.weight") else ckpt.args["n_kv_heads"]
                if t.dim() != 2 or t.shape[0] % (2 * heads):
                    raise CheckpointError(
                        f"tensor {name!r} in {fname} has shape {tuple(t.shape)}, not ({heads}*D, dim)"
                    )
                if deferred:
                    t = Deferred(t.shape, t.dtype, lambda t=t, heads=heads: unpermute_rotate_half(t, heads))
                else:
                    t = unpermute_rotate_half(t, heads)
            ckpt.tensors[meta_name] = t
            ckpt.sources[meta_name] = fname
    if (
        "output.weight" not in ckpt.tensors
        and config.get("tie_word_embeddings")
        and "tok_embeddings.weight" in ckpt.tensors
    ):
        ckpt.tensors["output.weight"] = ckpt.tensors["tok_embeddings.weight"]
        ckpt.sources["output.weight"] = ckpt.sources["tok_embeddings.weight"] + " (tied)"
    return ckpt
