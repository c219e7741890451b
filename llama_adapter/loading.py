"""Load a Meta or Hugging Face LLaMA checkpoint directory into `model.Transformer` (Meta's parameter names).

Meta dir: params.json + consolidated.NN.pth, one file per model-parallel rank. Column-parallel weights
(wq, wk, wv, w1, w3, output) are split along dim 0, row-parallel ones (wo, w2) along dim 1, norms are
replicated. The embedding is split along dim 1 in LLaMA-1/2 (fairscale ParallelEmbedding) but along
dim 0 in LLaMA-3 (VocabParallelEmbedding): the shard shapes tell which, since dim is in params.json.

HF dir: config.json + model.safetensors, a sharded model.safetensors.index.json, or pytorch_model.bin
(also sharded). HF's q/k rows are permuted so that rotate-half RoPE pairs dims (i, i + D/2); Meta's
interleaved RoPE pairs (2i, 2i + 1), so the loader undoes that permutation.

The model is built on the meta device and the checkpoint's tensors (memory-mapped) are assigned to it,
so nothing is allocated twice. Every problem with the files is a FileNotFoundError or CheckpointError
(a ValueError) naming the file and the tensor.
"""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass, field

import torch

from llama_adapter.adapter import AdapterConfig
from llama_adapter.adapter_io import load_adapter
from llama_adapter.files import CheckpointError, read_json_object, read_tensor_file
from llama_adapter.model import Transformer
from llama_adapter.model_args import ModelArgs
from llama_adapter.validation import ConfigError, check_values, require_device

META_PARAMS = "params.json"
HF_CONFIG = "config.json"
# Meta's hard-coded LLaMA-3.1 scaling (llama-models' apply_scaling); params.json may override two of them.
_META_ROPE_SCALING = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
_MODEL_ARG_FIELDS = (
    "dim n_layers n_heads n_kv_heads vocab_size multiple_of ffn_dim_multiplier norm_eps rope_theta max_seq_len".split()
)

_COLUMN_PARALLEL = ("wq", "wk", "wv", "w1", "w3")
_ROW_PARALLEL = ("wo", "w2")

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


class Deferred:
    """A tensor built only when the loader assigns it (model-parallel shards concatenated, HF q/k rows un-permuted):
    shapes and dtypes can be checked first, and a quantizing load never holds more than one such copy at a time."""

    def __init__(self, shape, dtype: torch.dtype, build):
        self.shape, self.dtype, self._build = torch.Size(shape), dtype, build

    def materialize(self) -> torch.Tensor:
        return self._build()


def _materialize(t) -> torch.Tensor:
    return t.materialize() if isinstance(t, Deferred) else t


@dataclass
class Checkpoint:
    """Model arguments and tensors (Meta names) read from a directory; `sources` maps each name to its file."""

    args: dict
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    config_path: str = ""  # params.json or config.json


def check_model_args(args: dict, path, names: dict | None = None) -> dict:
    """`args` (ModelArgs fields) checked against ModelArgs.RULES; CheckpointError naming the file and the key
    (`names`: field -> the file's key, for Hugging Face's names)."""
    try:
        return check_values(args, ModelArgs.RULES, names)
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None


# ---------------------------------------------------------------- Meta


def meta_model_args(params: dict, path: str = META_PARAMS) -> dict:
    """ModelArgs fields from a Meta params.json (LLaMA-1/2/3); vocab_size -1 is left for the embedding to fill."""
    missing = [k for k in ("dim", "n_layers", "n_heads") if k not in params]
    if missing:
        raise CheckpointError(f"{path} lacks {missing}")
    args = {k: params[k] for k in _MODEL_ARG_FIELDS if params.get(k) is not None}
    if params.get("use_scaled_rope"):
        scaling = dict(_META_ROPE_SCALING)
        for key, field_name in (("rope_scaling_factor", "factor"), ("rope_high_freq_factor", "high_freq_factor")):
            if params.get(key) is not None:  # LLaMA-3.2 1B/3B use factor 32
                scaling[field_name] = params[key]
        args["rope_scaling"] = scaling
    from_embedding = {"vocab_size": -1} if args.get("vocab_size") == -1 else {}  # filled from the embedding
    return {**check_model_args({k: v for k, v in args.items() if k not in from_embedding}, path), **from_embedding}


def _meta_split_dim(name: str, shard_shape: torch.Size, n_shards: int, dim: int) -> int | None:
    """The dim along which model-parallel shards of `name` are concatenated; None for replicated tensors."""
    if name == "tok_embeddings.weight":
        if shard_shape[1] == dim:  # LLaMA-3 VocabParallelEmbedding
            return 0
        return 1  # LLaMA-1/2 ParallelEmbedding splits the model dim
    if name == "output.weight":
        return 0
    parts = name.split(".")  # layers.{i}.{attention|feed_forward}.{w}.weight
    if len(parts) == 5 and parts[3] in _COLUMN_PARALLEL:
        return 0
    if len(parts) == 5 and parts[3] in _ROW_PARALLEL:
        return 1
    return None  # norms (and names the model check will reject)


def read_meta_checkpoint(path: str, deferred: bool = False) -> Checkpoint:
    params_path = os.path.join(path, META_PARAMS)
    args = meta_model_args(read_json_object(params_path), params_path)
    files = sorted(glob.glob(os.path.join(path, "consolidated.*.pth")))
    if not files:
        raise FileNotFoundError(f"no consolidated.*.pth checkpoint files in {path} (next to {META_PARAMS})")
    shards = [read_tensor_file(f) for f in files]
    for shard in shards:
        shard.pop("rope.freqs", None)  # LLaMA-1 stored its RoPE table; it is recomputed
    for f, shard in zip(files[1:], shards[1:]):
        if shard.keys() != shards[0].keys():
            odd = sorted(shard.keys() ^ shards[0].keys())[0]
            raise CheckpointError(
                f"model-parallel shards disagree: tensor {odd!r} is in only one of {files[0]} and {f}"
            )

    ckpt = Checkpoint(args, config_path=params_path)
    for name, first in shards[0].items():
        pieces = [s[name] for s in shards]
        split = _meta_split_dim(name, first.shape, len(files), args["dim"]) if len(files) > 1 else None
        for f, p in zip(files, pieces):
            if p.shape != first.shape:
                raise CheckpointError(
                    f"tensor {name!r} has shape {tuple(p.shape)} in {f} but {tuple(first.shape)} in {files[0]}"
                )
        if split is None:
            ckpt.tensors[name] = pieces[0]
        elif deferred:
            shape = list(first.shape)
            shape[split] *= len(pieces)
            concat = lambda pieces=pieces, split=split: torch.cat(pieces, split)  # noqa: E731 (binds this tensor's)
            ckpt.tensors[name] = Deferred(shape, first.dtype, concat)
        else:
            ckpt.tensors[name] = torch.cat(pieces, dim=split)
        ckpt.sources[name] = files[0] if split is None else f"{files[0]} .. {files[-1]}"
    if args.get("vocab_size", -1) == -1 and "tok_embeddings.weight" in ckpt.tensors:
        args["vocab_size"] = ckpt.tensors["tok_embeddings.weight"].shape[0]
    return ckpt


# ---------------------------------------------------------------- Hugging Face


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


# ---------------------------------------------------------------- model


def read_checkpoint(path, deferred: bool = False) -> Checkpoint:
    """A Meta (params.json) or HF (config.json) checkpoint directory; deferred: tensors that need a copy (shard
    concatenation, q/k un-permutation) are `Deferred` until assigned."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory not found: {path}")
    if os.path.isfile(os.path.join(path, META_PARAMS)):
        return read_meta_checkpoint(path, deferred)
    if os.path.isfile(os.path.join(path, HF_CONFIG)):
        return read_hf_checkpoint(path, deferred)
    raise FileNotFoundError(f"{path} is neither a Meta checkpoint ({META_PARAMS}) nor a Hugging Face one ({HF_CONFIG})")


def check_state_dict(ckpt: Checkpoint, expected: dict[str, torch.Size], where: str) -> None:
    """Raise CheckpointError on a missing, unexpected or wrongly shaped tensor, naming it and its file."""
    missing = [n for n in expected if n not in ckpt.tensors]
    if missing:
        raise CheckpointError(f"tensor {missing[0]!r} is missing from {where} ({len(missing)} missing in all)")
    extra = [n for n in ckpt.tensors if n not in expected]
    if extra:
        raise CheckpointError(f"unexpected tensor {extra[0]!r} in {ckpt.sources[extra[0]]} ({len(extra)} unexpected)")
    for name, shape in expected.items():
        got = ckpt.tensors[name].shape
        if got != shape:
            raise CheckpointError(
                f"tensor {name!r} in {ckpt.sources[name]} has shape {tuple(got)}, the model expects {tuple(shape)}"
            )


def check_float_tensors(ckpt: Checkpoint) -> None:
    """Raise CheckpointError on integer weights: a checkpoint already quantized (bitsandbytes, GPTQ, AWQ, ...) by
    another tool, which this loader cannot dequantize. Only metadata is read (mapped data stays on disk)."""
    for name, t in ckpt.tensors.items():
        if not t.dtype.is_floating_point:
            raise CheckpointError(
                f"tensor {name!r} in {ckpt.sources[name]} is {t.dtype}: an already-quantized checkpoint; load the "
                "original floating-point weights (quantize='nf4' or 'int8' quantizes them while loading)"
            )


def read_model_config(path) -> dict:
    """The ModelArgs fields a checkpoint dir's params.json / config.json states (checked), reading no weights."""
    path = os.fspath(path)
    meta, hf = os.path.join(path, META_PARAMS), os.path.join(path, HF_CONFIG)
    if os.path.isfile(meta):
        return meta_model_args(read_json_object(meta), meta)
    if os.path.isfile(hf):
        return hf_model_args(read_json_object(hf), hf)
    return read_checkpoint(path).args  # neither file: raises the error naming what is missing


def load_pretrained(
    path, adapter=None, dtype: torch.dtype | None = None, device=None, quantize=None, cls=Transformer, **overrides
):
    """A `cls` (the network, `Transformer`, or a subclass: `LLaMA.from_pretrained` passes `LLaMA`) with the
    weights of a Meta or HF directory.

    adapter: None, an AdapterConfig (fresh prompts, zero gates), or a path `load_adapter` accepts.
    dtype: None keeps the checkpoint's (its embedding's dtype); device: None is the CPU.
    quantize: None, "nf4" or "int8": the block linears are stored so (llama_adapter.quantize), each converted as
    it is read, so neither host nor device ever holds more than one full-precision weight beyond the mapped files.
    overrides: ModelArgs fields to replace, e.g. max_seq_len (Meta's params.json does not record it).
    """
    from llama_adapter.quantize import check_quantize, check_quantize_dtype, is_quantized_linear, quantize_weight

    require_device("cpu" if device is None else device)  # before reading gigabytes for a device we lack
    check_quantize(quantize)  # a bad name or a missing library surfaces before any file is opened
    ckpt = read_checkpoint(path, deferred=True)
    try:  # the rules were checked key by key; what remains are relations (dim divisible by n_heads, ...)
        args = ModelArgs(**{**ckpt.args, **overrides})
    except ValueError as e:
        with_overrides = f" (with overrides {overrides})" if overrides else ""
        raise CheckpointError(f"{ckpt.config_path}: {e}{with_overrides}") from None
    model = cls(args, device="meta")
    expected = {name: t.shape for name, t in model.state_dict().items()}
    check_float_tensors(ckpt)
    check_state_dict(ckpt, expected, os.fspath(path))
    if dtype is None:
        dtype = ckpt.tensors["tok_embeddings.weight"].dtype
    check_quantize_dtype(quantize, dtype)  # before the first weight is converted
    device = torch.device("cpu" if device is None else device)
    # Tensors already in the right dtype and place stay memory-mapped (torch.load's mmap is copy-on-write).
    state = {}
    for name in list(ckpt.tensors):
        # popped: a concatenated or converted copy dies once quantized
        t = _materialize(ckpt.tensors.pop(name)).to(device=device, dtype=dtype)
        state[name] = quantize_weight(t, quantize, name) if quantize and is_quantized_linear(name) else t
        del t
    model.load_state_dict(state, strict=True, assign=True)
    if adapter is not None:
        if isinstance(adapter, AdapterConfig):
            model.attach_adapter(adapter)
        elif isinstance(adapter, str | os.PathLike):
            load_adapter(model, adapter)
        else:
            raise TypeError(f"adapter must be an AdapterConfig or a path, got {type(adapter).__name__}")
    return model
