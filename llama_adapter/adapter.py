"""The adapter itself: its configuration, its math and its files, apart from any model that carries it.

LLaMA-Adapter adds to the top L attention layers a learnable prompt P (K, dim) and a zero-init gate g:

    o = softmax(s q k^T) v + gate_value(g) * softmax(s q ak^T) av,    ak, av = project_prompt(wk, wv, P)

(V2 adds bias and scale tuning of the block linears, norm tuning, and image-conditioned prompts through a
small projector.) Every carrier uses these definitions and keeps only its own naming: our `model.Transformer`
(Meta's names, `adapter_prompt` / `adapter_gate`), `hf` (transformers models, PEFT's `adaption_prompt` /
`adaption_gate`), `zero_init` (encoders), `multi_adapter` (several adapters in one batch), `adapter_io` and the
trainer (files). `is_adapter_param` is the one rule for what trains and what is saved; `copy_in` the one
shape-checked copy of tensors into parameters; `read_peft` the one reader of PEFT AdaptionPrompt directories.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, fields
from typing import ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from llama_adapter.files import CheckpointError, read_json_object, read_tensor_file
from llama_adapter.validation import (
    NON_NEGATIVE_INT,
    POSITIVE_INT,
    Choice,
    ConfigError,
    Flag,
    Number,
    check_fields,
    check_values,
)


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
        adapter_len=POSITIVE_INT,
        adapter_layers=POSITIVE_INT,
        gate=Choice(("head", "scalar")),
        gate_act=Choice(("tanh", "none")),
        bias_tuning=Flag(),
        norm_tuning=Flag(),
        visual_dim=Number(int, min=1, optional=True),
        visual_hidden=POSITIVE_INT,
        early_fusion=NON_NEGATIVE_INT,
    )

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


def fit_adapter_layers(requested: int, n_layers: int, name: str = "adapter_layers") -> tuple[int, str | None]:
    """The adapted layer count for a model of n_layers, and a note when `requested` had to be clamped to it.
    One rule for AdapterConfig on a model and for `finetune --adapter-layers` (name: how the caller spells it)."""
    if requested > n_layers:
        return n_layers, f"{name} {requested} > the model's {n_layers} layers; adapting all {n_layers}"
    return requested, None


def param_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """Adapter parameters of a model in `weight_dtype`: float32, or float64 for a float64 model."""
    return torch.promote_types(weight_dtype, torch.float32)


# ----------------------------------------------------------------------------- the math
def gate_value(gate: torch.Tensor, gate_act: str) -> torch.Tensor:
    """What the attention multiplies the prompt's output by: tanh(gate) or the gate itself (AdapterConfig.gate_act)."""
    return torch.tanh(gate) if gate_act == "tanh" else gate


def project_prompt(wk: nn.Module, wv: nn.Module, prompt: torch.Tensor, n_kv_heads: int, head_dim: int):
    """Prompt keys and values (..., Hkv, K, D) of prompts (..., K, dim) through the layer's frozen key and value
    projections: no RoPE (the prompt has no position), no norm, Hkv heads for GQA."""
    ak = wk(prompt).unflatten(-1, (n_kv_heads, head_dim)).transpose(-3, -2)  # (..., Hkv, K, D)
    av = wv(prompt).unflatten(-1, (n_kv_heads, head_dim)).transpose(-3, -2)
    return ak, av


# ----------------------------------------------------------------------------- what trains
PROMPT_NAMES = ("adapter_prompt", "adapter_gate")  # ours (Meta-style names)
PEFT_NAMES = ("adaption_prompt", "adaption_gate")  # PEFT's AdaptionPrompt on transformers models
_V2_NAMES = ("bias", "scale")  # BiasScaleLinear's (our base has no biases)


def is_adapter_param(name: str, cfg: AdapterConfig | None = None, naming: str = "ours") -> bool:
    """The single source of truth for what trains and what an adapter file holds.

    naming="ours" (`model.Transformer`): prompts, gates, the image projector and V2's biases and scales, which
    exist only when the adapter adds them; the norm weights belong to the base and count only under
    cfg.norm_tuning. naming="peft" (a transformers model, whose own biases are frozen base weights): PEFT's rule,
    the last name is adaption_prompt or adaption_gate."""
    last = name.rsplit(".", 1)[-1]
    if naming == "peft":
        return last in PEFT_NAMES
    if naming != "ours":
        raise ValueError(f"naming must be 'ours' or 'peft', got {naming!r}")
    if last in PROMPT_NAMES + _V2_NAMES or name.startswith("visual_proj."):
        return True
    return cfg is not None and cfg.norm_tuning and name.endswith("norm.weight")


# ----------------------------------------------------------------------------- V2 and images
class BiasScaleLinear(nn.Linear):
    """V2's bias and scale tuning of a frozen linear layer: y = scale * (W x + bias), bias 0 and scale 1 at init.

    Shares the wrapped layer's weight, so the state-dict names stay `...wq.weight` (plus `.bias`, `.scale`).
    """

    def __init__(self, linear: nn.Linear):
        nn.Module.__init__(self)
        self.in_features, self.out_features, self.weight = linear.in_features, linear.out_features, linear.weight
        w = linear.weight
        self.bias = nn.Parameter(torch.zeros(self.out_features, device=w.device, dtype=param_dtype(w.dtype)))
        self.scale = nn.Parameter(torch.ones(self.out_features, device=w.device, dtype=param_dtype(w.dtype)))

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias.to(self.weight.dtype))
        return y * self.scale.to(y.dtype)

    def plain(self) -> nn.Linear:
        linear = nn.Linear(self.in_features, self.out_features, bias=False, device="meta")
        linear.weight = self.weight
        return linear


def set_bias_scale(module: nn.Module, paths: tuple[str, ...], enabled: bool) -> None:
    """Wrap (fresh bias 0, scale 1) or unwrap the linear layers of `module` at `paths` ("parent.name")."""
    for path in paths:
        parent_name, name = path.split(".")
        parent = getattr(module, parent_name)
        linear = getattr(parent, name)
        if isinstance(linear, BiasScaleLinear):
            linear = linear.plain()
        setattr(parent, name, BiasScaleLinear(linear) if enabled else linear)


class VisualProjector(nn.Module):
    """Concatenated multi-scale features (B, M*C) or (B, M, C) -> prompt offset (B, K, dim) (v1 Eqs. 9-10).

    Part of the adapter: its parameters train and are saved with the prompts (`visual_proj.*`)."""

    def __init__(self, in_dim: int, dim: int, adapter_len: int, hidden: int = 512, *, device=None, dtype=None):
        super().__init__()
        self.in_dim, self.adapter_len = in_dim, adapter_len
        self.fc1 = nn.Linear(in_dim, hidden, device=device, dtype=dtype)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim, device=device, dtype=dtype)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if not isinstance(features, torch.Tensor) or features.dim() not in (2, 3):
            got = getattr(features, "shape", type(features).__name__)
            raise ValueError(f"image_features must be a tensor (B, {self.in_dim}) or (B, M, C), got {got}")
        x = features.flatten(1)
        if x.shape[1] != self.in_dim:
            raise ValueError(
                f"image_features have {x.shape[1]} values per image (shape {tuple(features.shape)}), the projector "
                f"expects {self.in_dim} (AdapterConfig.visual_dim)"
            )
        x = x.to(self.fc1.weight.dtype)
        return self.fc2(self.act(self.fc1(x))).unsqueeze(1).expand(-1, self.adapter_len, -1)  # (B, K, dim)


# ----------------------------------------------------------------------------- copy-in
def check_tensors(expected: dict[str, tuple], tensors: dict[str, torch.Tensor], source: str) -> None:
    """CheckpointError naming `source` and the tensor unless `tensors` has exactly the names and shapes expected."""
    for name, shape in expected.items():
        if name not in tensors:
            raise CheckpointError(f"{source} lacks tensor {name!r}")
        if tuple(tensors[name].shape) != tuple(shape):
            raise CheckpointError(
                f"tensor {name!r} in {source} has shape {tuple(tensors[name].shape)}, the model expects {tuple(shape)}"
            )
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise CheckpointError(f"unexpected tensor {extra[0]!r} in {source} ({len(extra)} unexpected)")


def copy_in(params: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy `tensors` into the parameters of the same names, all checked (`check_tensors`) before any is written."""
    check_tensors({name: p.shape for name, p in params.items()}, tensors, source)
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name])


# ----------------------------------------------------------------------------- PEFT's files
# An adapter directory's two files: PEFT's names, which our own format (adapter_io) uses too.
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PEFT_NAME = re.compile(r"(?:^|\.)layers\.(\d+)\.self_attn\.adaption_(prompt|gate)$")


@dataclass(frozen=True)
class PeftAdapter:
    """A PEFT AdaptionPrompt directory, read and checked: one scalar gate per layer, used as is (no tanh)."""

    adapter_len: int
    adapter_layers: int
    prompts: dict[int, torch.Tensor]  # layer -> (K, dim)
    gates: dict[int, torch.Tensor]  # layer -> (1,)

    def config(self) -> AdapterConfig:
        return AdapterConfig(self.adapter_len, self.adapter_layers, gate="scalar", gate_act="none")


def peft_sizes(config_path: str, config: dict) -> tuple[int, int]:
    """(adapter_len, adapter_layers) of a PEFT adapter_config.json read as `config`, checked by AdapterConfig's
    rules: CheckpointError naming the file and the key."""
    if config.get("peft_type") != "ADAPTION_PROMPT":
        raise CheckpointError(f"{config_path}: peft_type must be 'ADAPTION_PROMPT', got {config.get('peft_type')!r}")
    if config.get("target_modules", "self_attn") not in (None, "self_attn"):
        raise CheckpointError(
            f"{config_path}: PEFT target_modules {config['target_modules']!r} is not LLaMA's 'self_attn'"
        )
    try:
        sizes = {k: config.get(k) for k in ("adapter_len", "adapter_layers")}
        K, L = check_values(sizes, AdapterConfig.RULES).values()
    except ConfigError as e:
        raise CheckpointError(f"{config_path}: {e}") from None
    return K, L


def peft_weights_path(directory: str) -> str:
    """adapter_model.safetensors, or PEFT's older adapter_model.bin when only that one is there."""
    weights = os.path.join(directory, WEIGHTS_FILE)
    legacy = os.path.join(directory, "adapter_model.bin")
    return legacy if not os.path.isfile(weights) and os.path.isfile(legacy) else weights


def read_peft(directory, n_layers: int, dim: int, config: dict | None = None) -> PeftAdapter:
    """A PEFT AdaptionPrompt directory for a model of n_layers and width dim: prompts on its top adapter_layers
    layers. `config`: adapter_config.json when the caller has read it already. Nothing is installed."""
    directory = os.fspath(directory)
    config_path = os.path.join(directory, CONFIG_FILE)
    K, L = peft_sizes(config_path, read_json_object(config_path) if config is None else config)
    if L > n_layers:  # unlike a fresh adapter, trained prompts cannot be moved to other layers
        raise CheckpointError(
            f"{config_path}: adapter_layers {L} > the model's {n_layers} layers: the adapter was made for another model"
        )
    weights = peft_weights_path(directory)
    raw = read_tensor_file(weights)
    found: dict[int, dict[str, torch.Tensor]] = {}
    for name, t in raw.items():
        m = _PEFT_NAME.search(name)
        if m is None:
            raise CheckpointError(f"unexpected tensor {name!r} in {weights} (not an adaption prompt or gate)")
        found.setdefault(int(m.group(1)), {})[m.group(2)] = t
    layers = sorted(found)
    if layers != list(range(n_layers - L, n_layers)) or any(t.shape[-1] != dim for t in raw.values() if t.dim() == 3):
        prompt = next((t for t in raw.values() if t.dim() == 3), None)
        made_for = dict(dim=None if prompt is None else prompt.shape[-1], adapted_layers=f"{layers[:1]}..{layers[-1:]}")
        raise CheckpointError(
            f"PEFT adapter {directory} was made for a model with {made_for} (the top {L} layers); this model has "
            f"dim={dim}, n_layers={n_layers} (top {L} layers: {n_layers - L}..{n_layers - 1})"
        )
    for i, parts in found.items():
        if set(parts) != {"prompt", "gate"}:
            needs = "needs both adaption_prompt and adaption_gate"
            raise CheckpointError(f"{weights}: layer {i} has {sorted(parts)}, {needs}")
        if parts["prompt"].shape != (1, K, dim) or parts["gate"].shape != (1,):
            raise CheckpointError(
                f"{weights}: layer {i} adaption_prompt {tuple(parts['prompt'].shape)} / adaption_gate "
                f"{tuple(parts['gate'].shape)}, expected (1, {K}, {dim}) / (1,)"
            )
    return PeftAdapter(K, L, {i: p["prompt"][0] for i, p in found.items()}, {i: p["gate"] for i, p in found.items()})
