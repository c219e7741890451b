"""Save and load adapters: ours, PEFT's AdaptionPrompt directories, and the official LLaMA-Adapter v1 .pth.

Ours: a directory with adapter_model.safetensors (the model's `adapter_state_dict()`) and
adapter_config.json ({"format": "llama_adapter", "adapter": AdapterConfig, "base_model": shape}).

PEFT (adapter_config.json with peft_type ADAPTION_PROMPT): `...layers.N.self_attn.adaption_prompt`
(1, K, dim) and `...adaption_gate` (1,) on the top `adapter_layers` layers; the gate is one scalar per
layer applied as is (no tanh): AdapterConfig(gate="scalar", gate_act="none").

Official v1 (`llama/model.py` of the LLaMA-Adapter repo, loaded by its example.py): `adapter_query.weight`
(L*K, dim) whose j-th block of K rows is the prompt of layer n_layers - L + j (the top L layers, in order),
and `layers.N.attention.gate` (1, H, 1, 1). Its extraction script saves a gate for every layer, but only
the top L are used; the inference code applies the gate without tanh (the training code's tanh is not in
the released weights' semantics): AdapterConfig(gate="head", gate_act="none"). The first release had one
scalar gate per layer, `layers.N.attention.gate` (1,): such a file loads as gate="scalar", gate_act="none".
K is not stored: the official default 10 is assumed unless `adapter_len` says otherwise.
"""

from __future__ import annotations

import json
import os
import re

import torch

from llama_adapter.adapter import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    AdapterConfig,
    check_tensors,
    copy_in,
    is_adapter_param,
    read_peft,
)
from llama_adapter.files import CheckpointError, fsync_dir, read_json_object, read_tensor_file
from llama_adapter.model import Transformer
from llama_adapter.validation import Number, check_arg

FORMAT = "llama_adapter"
FORMAT_VERSION = 1
OFFICIAL_ADAPTER_LEN = 10

_OFFICIAL_GATE = re.compile(r"^layers\.(\d+)\.attention\.gate$")


def base_shape(model) -> dict:
    p = model.params
    return dict(dim=p.dim, n_layers=p.n_layers, n_heads=p.n_heads, n_kv_heads=p.n_kv_heads, vocab_size=p.vocab_size)


def save_adapter(model, directory) -> None:
    """Write adapter_model.safetensors + adapter_config.json into `directory` (created if needed).

    Both files are written and fsynced in a temporary sibling directory first, so a crash while serializing
    leaves the previous adapter untouched. A new directory is then renamed into place whole (atomic); an
    existing one gets the two files renamed in (atomic each; POSIX cannot swap a directory atomically, and
    the target may hold other files that are not ours to move or delete)."""
    import shutil
    import uuid

    from safetensors.torch import save_file

    if model.adapter_config is None:
        raise ValueError("the model has no adapter to save (attach_adapter or load_adapter first)")
    directory = os.path.abspath(os.fspath(directory))
    parent, name = os.path.split(directory)
    os.makedirs(parent, exist_ok=True)
    tensors = {name: t.detach().contiguous().cpu() for name, t in model.adapter_state_dict().items()}
    config = dict(
        format=FORMAT,
        format_version=FORMAT_VERSION,
        adapter=model.adapter_config.to_dict(),
        base_model=base_shape(model),
    )
    staging = os.path.join(parent, f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.mkdir(staging)  # unlike mkdtemp's 0700, honours the umask: it may become the adapter directory
    try:
        save_file(tensors, os.path.join(staging, WEIGHTS_FILE), metadata={"format": FORMAT})
        with open(os.path.join(staging, CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
        for file in (WEIGHTS_FILE, CONFIG_FILE):
            with open(os.path.join(staging, file), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(staging)
        if not os.path.exists(directory):
            os.rename(staging, directory)
        else:
            for file in (WEIGHTS_FILE, CONFIG_FILE):  # config last: it names what the weights are
                os.replace(os.path.join(staging, file), os.path.join(directory, file))
            fsync_dir(directory)
        fsync_dir(parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load_adapter(model, path, *, adapter_len: int | None = None):
    """Set (or replace) the model's adapter from one of the three formats; returns its AdapterConfig.

    adapter_len: prompt length of an official .pth (default 10, the official one); ignored for directories.
    """
    cfg, tensors = read_adapter(model, path, adapter_len=adapter_len)
    model.attach_adapter(cfg)
    params = {name: p for name, p in model.named_parameters() if is_adapter_param(name, cfg)}
    copy_in(params, tensors, f"adapter {os.fspath(path)}")
    return cfg


def read_adapter(model, path, *, adapter_len: int | None = None) -> tuple:
    """(AdapterConfig, {state-dict name: tensor}) of an adapter file for `model`, checked but not installed."""
    check_arg("adapter_len", adapter_len, Number(int, min=1, optional=True))
    path = os.fspath(path)
    if os.path.isdir(path):
        config_path = os.path.join(path, CONFIG_FILE)
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"no {CONFIG_FILE} in adapter directory {path}")
        config = read_json_object(config_path)
        if config.get("format") == FORMAT:
            cfg, tensors = _read_ours(model, path, config)
        elif config.get("peft_type") == "ADAPTION_PROMPT":
            cfg, tensors = _read_peft(model, path, config)
        else:
            raise CheckpointError(
                f"{config_path} is neither our format (format={FORMAT!r}) nor a PEFT adaption prompt "
                f"(peft_type='ADAPTION_PROMPT'); got format={config.get('format')!r}, "
                f"peft_type={config.get('peft_type')!r}"
            )
    elif os.path.isfile(path):
        cfg, tensors = _read_official(model, path, OFFICIAL_ADAPTER_LEN if adapter_len is None else adapter_len)
    else:
        raise FileNotFoundError(f"adapter not found: {path}")
    check_adapter_tensors(model, cfg, tensors, path)
    return cfg, tensors


def _expected_shapes(model, cfg) -> dict[str, tuple]:
    """What `cfg` adds to this model (V2 options and projector included), from a copy on the meta device."""
    probe = Transformer(model.params, cfg, device="meta")
    return {name: tuple(t.shape) for name, t in probe.adapter_state_dict().items()}


def check_adapter_tensors(model, cfg, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Raise CheckpointError unless `tensors` are exactly the adapter `cfg` describes on this model."""
    if cfg.adapter_layers > model.params.n_layers:
        raise CheckpointError(
            f"adapter {source} adapts {cfg.adapter_layers} layers, the model has only {model.params.n_layers}"
        )
    check_tensors(_expected_shapes(model, cfg), tensors, f"adapter {source}")


def _shape_error(source: str, made_for: dict, model) -> CheckpointError:
    return CheckpointError(f"adapter {source} was made for a model with {made_for}; this model has {base_shape(model)}")


def _read_ours(model, path: str, config: dict):
    config_path = os.path.join(path, CONFIG_FILE)
    version = config.get("format_version", FORMAT_VERSION)
    if type(version) is not int or version != FORMAT_VERSION:  # a newer layout would be misread silently
        raise CheckpointError(
            f"{config_path}: format_version must be {FORMAT_VERSION}, got {version!r} (written by a "
            "newer llama-adapter?)"
        )
    made_for = config.get("base_model", {})
    if not isinstance(made_for, dict):
        raise CheckpointError(f"{config_path}: 'base_model' must be an object (the base model's shape)")
    ours = base_shape(model)
    if any(made_for.get(k) != v for k, v in ours.items()):
        raise _shape_error(path, made_for, model)
    if not isinstance(config.get("adapter"), dict):
        raise CheckpointError(f"{config_path} has no 'adapter' section (the AdapterConfig)")
    try:
        cfg = AdapterConfig.from_dict(config["adapter"])
    except ValueError as e:  # ConfigError: names the key
        raise CheckpointError(f"{config_path}: 'adapter': {e}") from None
    return cfg, read_tensor_file(os.path.join(path, WEIGHTS_FILE))


def _read_peft(model, path: str, config: dict):
    peft = read_peft(path, model.params.n_layers, model.params.dim, config)
    tensors = {}
    for i, prompt in peft.prompts.items():
        tensors[f"layers.{i}.attention.adapter_prompt"] = prompt
        tensors[f"layers.{i}.attention.adapter_gate"] = peft.gates[i]
    return peft.config(), tensors


def _read_official(model, path: str, adapter_len: int):
    raw = read_tensor_file(path)
    if "adapter_query.weight" not in raw:
        raise CheckpointError(f"{path} lacks 'adapter_query.weight': not an official LLaMA-Adapter v1 .pth")
    query = raw.pop("adapter_query.weight")  # (L*K, dim)
    p = model.params
    gates = {}
    for name, t in raw.items():
        m = _OFFICIAL_GATE.match(name)
        if m is None:
            raise CheckpointError(
                f"unexpected tensor {name!r} in {path}: an official adapter holds adapter_query.weight and "
                "layers.N.attention.gate only"
            )
        gates[int(m.group(1))] = t
    if query.dim() != 2 or query.shape[0] % adapter_len:
        raise CheckpointError(
            f"'adapter_query.weight' in {path} has shape {tuple(query.shape)}, not (L*{adapter_len}, dim)"
        )
    L = query.shape[0] // adapter_len
    sizes = {t.numel() for t in gates.values()}
    # The official code's first release had one scalar gate per layer (zeros(1)), later ones a gate per head
    # (zeros(1, H, 1, 1)): a file holds one kind or the other.
    gate = "scalar" if sizes == {1} and p.n_heads != 1 else "head"
    if len(sizes) > 1:
        raise CheckpointError(
            f"{path} mixes gate sizes {sorted(sizes)} across layers: an official adapter has either one scalar "
            "gate per layer (first release) or one per head"
        )
    source_layers = max(gates) + 1 if gates else 0
    if query.shape[1] != p.dim or sizes - {1, p.n_heads} or source_layers != p.n_layers or L > p.n_layers:
        made_for = dict(dim=query.shape[1], n_heads=sorted(sizes), n_layers=source_layers, adapter_layers=L)
        raise _shape_error(path, made_for, model)
    tensors = {}
    for j, prompt in enumerate(query.view(L, adapter_len, p.dim)):
        i = p.n_layers - L + j
        if i not in gates:
            raise CheckpointError(f"{path} lacks tensor 'layers.{i}.attention.gate' (layer {i} has a prompt)")
        tensors[f"layers.{i}.attention.adapter_prompt"] = prompt
        tensors[f"layers.{i}.attention.adapter_gate"] = gates[i].reshape(1 if gate == "scalar" else p.n_heads)
    return AdapterConfig(adapter_len=adapter_len, adapter_layers=L, gate=gate, gate_act="none"), tensors
