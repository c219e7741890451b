"""Several adapters in one batch: each row of a forward or a `generate` call runs its own fine-tuned adapter.

The fused op takes one prompt and gate per sample (adapter_k/v (B, Hkv, K, D), gate (B, Hq)). An `AdapterBank`
holds the adapters of one base model, each loaded once, and turns a list of per-row choices into the model's
per-layer `adapter_kv` with one gather and one projection per layer, never a loop over rows. A row whose choice
is None runs the base model: its slot has a zero prompt and a zero gate, so the prompt adds exactly nothing.

    bank = AdapterBank(model, {"poet": "adapters/poet", "coder": Adapter.from_model(model)})
    model.generate(prompts, 64, adapters=["poet", "coder", None], adapter_bank=bank)
    model.generate(prompts, 64, adapters=["adapters/poet", "adapters/coder"])  # a bank for this call only
    logits = model(tokens, adapter_kv=bank.adapter_kv(["poet", None]))

The adapters of a bank share adapter_len and their adapted layers (adapter_layers, early_fusion): the op has one
prompt length, and every row must adapt the same layers. Their gate forms may differ ("head" or "scalar", tanh
or not): the bank keeps each as effective per-head values. Rows differ in prompts and gates only, so adapters
that also tune biases, scales or norms (V2) or take images are refused. Prompt keys/values come from the base's
current wk, wv at every `adapter_kv` call and are never kept, like the model's own (`Transformer.adapter_kv`).
On an FSDP-sharded model that projection gathers each adapted layer's weights, a collective: every rank must hold
the same adapters (add them up front) and make the same `adapter_kv` calls.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from llama_adapter.adapter import AdapterConfig, gate_value, param_dtype
from llama_adapter.adapter_io import check_adapter_tensors, read_adapter
from llama_adapter.model import whole_layers


@dataclass(frozen=True, eq=False)  # eq=False: hashed by identity, so a bank can key rows by the object itself
class Adapter:
    """An adapter's weights apart from any model: its config and {state-dict name: tensor}, as in
    `LLaMA.adapter_state_dict()` (layers.{i}.attention.adapter_prompt (K, dim) and .adapter_gate)."""

    config: AdapterConfig
    tensors: Mapping[str, torch.Tensor]

    def __post_init__(self):
        if not isinstance(self.config, AdapterConfig):
            raise TypeError(f"Adapter config must be an AdapterConfig, got {type(self.config).__name__}")
        if not isinstance(self.tensors, Mapping) or not all(isinstance(t, torch.Tensor) for t in self.tensors.values()):
            raise TypeError("Adapter tensors must be a mapping {state-dict name: tensor} (LLaMA.adapter_state_dict())")

    @classmethod
    def from_model(cls, model) -> Adapter:
        """A snapshot of the model's current adapter (copies: later training of the model does not change it)."""
        if model.adapter_config is None:
            raise ValueError("the model has no adapter to take (attach_adapter or load_adapter first)")
        tensors = {name: t.detach().clone() for name, t in model.adapter_state_dict().items()}
        return cls(model.adapter_config, tensors)

    @classmethod
    def load(cls, model, path, *, adapter_len: int | None = None) -> Adapter:
        """Read any format `LLaMA.load_adapter` reads (ours, PEFT's, the official .pth), checked against `model`,
        without touching the model's own adapter."""
        return cls(*read_adapter(model, path, adapter_len=adapter_len))


class AdapterBank:
    """The adapters that rows of a batch may choose, for one base model. Row choices (`adapter_kv(rows)`):
    None (the base model), a name given to `add`, an `Adapter`, or a path (loaded on first use, then kept)."""

    def __init__(self, model, adapters: Mapping[str, Adapter | str | os.PathLike] | None = None):
        self.model = model
        self._slots: dict[object, int] = {}  # name, path or Adapter -> slot; slot 0 is the base model
        self._prompts: list[list[torch.Tensor]] = []  # per adapter: (K, dim) per adapted layer
        self._gates: list[list[torch.Tensor]] = []  # per adapter: effective (n_heads,) per adapted layer
        self._stacked = None  # (prompts (L, 1 + A, K, dim), gates (L, 1 + A, n_heads)), built on first use
        self.config: AdapterConfig | None = None  # of the first adapter: its layout (_LAYOUT) holds for all
        for name, adapter in (adapters or {}).items():
            self.add(adapter, name)

    def __len__(self) -> int:
        return len(self._prompts)

    def __contains__(self, key) -> bool:
        return _key(key) in self._slots

    def add(self, adapter: Adapter | str | os.PathLike, name: str | None = None):
        """Register an adapter (an `Adapter` or a path) under `name` (default: the path, or the Adapter itself);
        returns the key rows can use. An Adapter or path already in the bank is not loaded again."""
        if name is not None and not isinstance(name, str):
            raise TypeError(f"adapter name must be a str, got {type(name).__name__}")
        key = _key(adapter)
        if key in self._slots:
            slot = self._slots[key]
        else:
            slot = self._install(Adapter.load(self.model, key) if isinstance(key, str) else _as_adapter(adapter), key)
            self._slots[key] = slot
        if name is not None:
            if name in self._slots and self._slots[name] != slot:
                raise ValueError(f"adapter name {name!r} is already taken in this AdapterBank")
            self._slots[name] = slot
        return key if name is None else name

    def _install(self, adapter: Adapter, source) -> int:
        cfg = adapter.config
        where = source if isinstance(source, str) else "given as an Adapter"
        if cfg.bias_tuning or cfg.norm_tuning or cfg.visual_dim is not None:
            raise ValueError(
                f"adapter {where} tunes more than prompts and gates (bias_tuning={cfg.bias_tuning}, norm_tuning="
                f"{cfg.norm_tuning}, visual_dim={cfg.visual_dim}): rows of one batch may differ in prompts and "
                "gates only"
            )
        if self.config is not None and _layout(cfg) != _layout(self.config):
            theirs = ", ".join(f"{k}={v}" for k, v in zip(_LAYOUT, _layout(cfg)))
            first = ", ".join(f"{k}={v}" for k, v in zip(_LAYOUT, _layout(self.config)))
            raise ValueError(f"adapter {where} has {theirs}; adapters in one batch must share the first's: {first}")
        check_adapter_tensors(self.model, cfg, dict(adapter.tensors), where)
        self.config = self.config or cfg
        w = self.model.tok_embeddings.weight
        dtype = param_dtype(w.dtype)  # as the model's own adapter params
        n_heads = self.model.params.n_heads
        prompts, gates = [], []
        for i in self._adapted_layers():
            prompt = adapter.tensors[f"layers.{i}.attention.adapter_prompt"]
            gate = adapter.tensors[f"layers.{i}.attention.adapter_gate"].to(device=w.device, dtype=dtype)
            prompts.append(prompt.detach().to(device=w.device, dtype=dtype).clone())
            gates.append(gate_value(gate.detach(), cfg.gate_act).expand(n_heads).clone())
        self._prompts.append(prompts)
        self._gates.append(gates)
        self._stacked = None
        return len(self._prompts)

    def _adapted_layers(self) -> list[int]:
        return self.model.adapted_layers(self.config)

    def slots(self, rows: Sequence) -> list[int]:
        """The bank slot of each row's choice (0 for None), adding adapters and paths seen for the first time."""
        if isinstance(rows, (str, os.PathLike, Adapter)) or not isinstance(rows, Sequence):
            raise TypeError(f"rows must be a list with one adapter choice per row, got {type(rows).__name__}")
        slots = []
        for b, choice in enumerate(rows):
            if choice is None:
                slots.append(0)
                continue
            if not isinstance(choice, (str, os.PathLike, Adapter)):
                raise TypeError(
                    f"adapters[{b}] must be None, an adapter name or path, or an Adapter, got {type(choice).__name__}"
                    + (" (wrap a state dict as Adapter(config, state_dict))" if isinstance(choice, Mapping) else "")
                )
            key = _key(choice)
            if key not in self._slots:
                self.add(choice)
            slots.append(self._slots[key])
        return slots

    def adapter_kv(self, rows: Sequence) -> list:
        """The model's `adapter_kv` for a batch whose row b runs rows[b]: per layer None, or
        (prompt keys (B, Hkv, K, D), prompt values (B, Hkv, K, D), effective gates (B, n_heads))."""
        slots = self.slots(rows)
        n_layers = self.model.params.n_layers
        if self.config is None:  # an empty bank: every row is the base model
            return [None] * n_layers
        w = self.model.tok_embeddings.weight
        if self._stacked is None or self._stacked[0].device != w.device:
            prompts = torch.stack([torch.stack(p) for p in zip(*self._prompts)]).to(w.device)  # (L, A, K, dim)
            gates = torch.stack([torch.stack(g) for g in zip(*self._gates)]).to(w.device)  # (L, A, n_heads)
            base = (prompts.new_zeros(prompts[:, :1].shape), gates.new_zeros(gates[:, :1].shape))
            self._stacked = (torch.cat((base[0], prompts), 1), torch.cat((base[1], gates), 1))
        index = torch.tensor(slots, dtype=torch.long, device=w.device)
        prompts, gates = (t.index_select(1, index) for t in self._stacked)  # (L, B, K, dim), (L, B, n_heads)
        out = [None] * n_layers
        # FSDP: each layer's wk, wv whole for its projection
        for j, i in enumerate(whole_layers(self.model, self._adapted_layers())):
            ak, av = self.model.layers[i].attention.project_prompt(prompts[j])  # (B, Hkv, K, D)
            out[i] = (ak, av, gates[j])
        return out


_LAYOUT = ("adapter_len", "adapter_layers", "early_fusion")  # what every row of a batch must share


def _layout(cfg: AdapterConfig) -> tuple:
    return tuple(getattr(cfg, name) for name in _LAYOUT)


def _key(adapter):
    """How the bank knows an adapter: a path or name by its string, an Adapter by identity."""
    return os.fspath(adapter) if isinstance(adapter, os.PathLike) else adapter


def _as_adapter(adapter) -> Adapter:
    if not isinstance(adapter, Adapter):
        raise TypeError(f"adapter must be an Adapter or a path, got {type(adapter).__name__}")
    return adapter
