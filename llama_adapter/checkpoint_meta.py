"""Read a Meta checkpoint directory (LLaMA-1/2/3) into a `Checkpoint`.

The directory holds params.json + consolidated.NN.pth, one file per model-parallel rank. Column-parallel weights
(wq, wk, wv, w1, w3, output) are split along dim 0, row-parallel ones (wo, w2) along dim 1, norms are
replicated. The embedding is split along dim 1 in LLaMA-1/2 (fairscale ParallelEmbedding) but along
dim 0 in LLaMA-3 (VocabParallelEmbedding): the shard shapes tell which, since dim is in params.json.
"""

from __future__ import annotations

import glob
import os

import torch

from llama_adapter.checkpoint import Checkpoint, Deferred, check_model_args
from llama_adapter.files import CheckpointError, read_json_object, read_tensor_file

META_PARAMS = "params.json"
# Meta's hard-coded LLaMA-3.1 scaling (llama-models' apply_scaling); params.json may override two of them.
_META_ROPE_SCALING = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
_MODEL_ARG_FIELDS = (
    "dim n_layers n_heads n_kv_heads vocab_size multiple_of ffn_dim_multiplier norm_eps rope_theta max_seq_len".split()
)

_COLUMN_PARALLEL = ("wq", "wk", "wv", "w1", "w3")
_ROW_PARALLEL = ("wo", "w2")


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
    """The Meta directory `path`, its model-parallel shards joined (`Deferred` joins when `deferred`)."""
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
