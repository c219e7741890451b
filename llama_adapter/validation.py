"""One set of rules for every number and choice a user hands in: config fields, JSON keys, command-line flags.

A rule (`Number`, `Choice`, `Flag`) knows a value's type and range. The same rule object checks
- a config dataclass's fields at construction (`check_fields`: ModelArgs, AdapterConfig, TrainConfig),
- a config file's keys before anything is built from them (`check_values`, with the file's own key names: the
  loaders wrap its ConfigError into a CheckpointError naming the file),
- a command-line flag (the rule is the argparse `type=`, so argparse names the flag in its error).
Python API arguments that are no config field (temperature, eos_id, ...) use `check_arg`.

`require_device` turns a device the installed torch cannot serve into one sentence saying what is missing.
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass


class ConfigError(ValueError):
    """A value of the wrong type or out of range; `field` is the name it was checked under."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Number:
    """An int (kind=int: 64 only, not 64.0, "64" or True) or a real number (kind=float: finite; ints are
    widened), optionally bounded: min/max inclusive unless min_open/max_open; None allowed if optional."""

    kind: type = int
    min: float | None = None
    max: float | None = None
    min_open: bool = False
    max_open: bool = False
    optional: bool = False

    def describe(self) -> str:
        what = "an int" if self.kind is int else "a number"
        lo = None if self.min is None else ("> " if self.min_open else ">= ") + f"{self.min:g}"
        hi = None if self.max is None else ("< " if self.max_open else "<= ") + f"{self.max:g}"
        if lo and hi:
            what += f" in {'(' if self.min_open else '['}{self.min:g}, {self.max:g}{')' if self.max_open else ']'}"
        elif lo or hi:
            what += " " + (lo or hi)
        return what + (" or None" if self.optional else "")

    def check(self, name: str, value):
        """`value` as the rule's type (ints widened to float for kind=float); ConfigError naming `name` if not."""
        if value is None and self.optional:
            return None
        good_type = _is_int(value) if self.kind is int else _is_int(value) or isinstance(value, float)
        if not good_type or (self.kind is float and not math.isfinite(value)):
            raise ConfigError(name, f"{name} must be {self.describe()}, got {value!r} ({type(value).__name__})")
        value = self.kind(value)
        too_low = self.min is not None and (value <= self.min if self.min_open else value < self.min)
        too_high = self.max is not None and (value >= self.max if self.max_open else value > self.max)
        if too_low or too_high:
            raise ConfigError(name, f"{name} must be {self.describe()}, got {value!r}")
        return value

    def __call__(self, text: str):
        """argparse `type=`: parse a flag's text and check it (argparse prefixes the flag's name)."""
        try:
            return self.check("value", self.kind(text))
        except ValueError:  # ConfigError too
            raise argparse.ArgumentTypeError(f"must be {self.describe()}, got {text!r}") from None


@dataclass(frozen=True)
class Choice:
    options: tuple

    def describe(self) -> str:
        return "one of " + ", ".join(map(repr, self.options))

    def check(self, name: str, value):
        if not any(type(value) is type(o) and value == o for o in self.options):  # True is not 1 here
            raise ConfigError(name, f"{name} must be {self.describe()}, got {value!r}")
        return value


@dataclass(frozen=True)
class Flag:
    def describe(self) -> str:
        return "true or false"

    def check(self, name: str, value):
        if not isinstance(value, bool):
            raise ConfigError(name, f"{name} must be true or false, got {value!r} ({type(value).__name__})")
        return value


@dataclass(frozen=True)
class Table:
    """A dict with exactly these keys, each checked by its rule (e.g. ModelArgs.rope_scaling)."""

    rules: tuple  # ((key, rule), ...)
    optional: bool = False

    def describe(self) -> str:
        return "an object with keys " + ", ".join(k for k, _ in self.rules) + (" or None" if self.optional else "")

    def check(self, name: str, value):
        if value is None and self.optional:
            return None
        if not isinstance(value, dict):
            raise ConfigError(name, f"{name} must be {self.describe()}, got {value!r} ({type(value).__name__})")
        missing = [k for k, _ in self.rules if k not in value]
        if missing:
            raise ConfigError(name, f"{name} lacks keys {missing} (needs {[k for k, _ in self.rules]})")
        return {**value, **{k: rule.check(f"{name}[{k!r}]", value[k]) for k, rule in self.rules}}


POSITIVE_INT = Number(int, min=1)
NON_NEGATIVE_INT = Number(int, min=0)
ANY_INT = Number(int)
POSITIVE = Number(float, min=0, min_open=True)
NON_NEGATIVE = Number(float, min=0)


def check_fields(obj, rules: dict) -> None:
    """Check (and normalise: ints widened to float) the dataclass fields named in `rules`; ConfigError if bad."""
    for name, rule in rules.items():
        setattr(obj, name, rule.check(name, getattr(obj, name)))


def check_values(values: dict, rules: dict, names: dict | None = None) -> dict:
    """The keys of `values` that have a rule, checked and normalised; `names` maps a key to the name it has in
    its source (a config file's key) for the error message."""
    names = names or {}
    return {k: rules[k].check(names.get(k, k), v) if k in rules else v for k, v in values.items()}


def check_arg(name: str, value, rule):
    """A Python API argument checked by `rule`: ValueError (a ConfigError) naming `name`."""
    return rule.check(name, value)


def require_device(device, what: str = "device") -> None:
    """Raise ValueError in one sentence if this torch cannot run on `device` (e.g. cuda on a CPU-only build)."""
    import torch

    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"{what} {device!r} is not a device torch knows (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda":
        if torch.version.cuda is None:
            raise ValueError(f"{what} {str(device)!r} needs CUDA, but torch {torch.__version__} is a CPU-only build")
        if not torch.cuda.is_available():
            raise ValueError(
                f"{what} {str(device)!r} needs a CUDA GPU, but torch sees none (check the driver and "
                "CUDA_VISIBLE_DEVICES)"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{what} {str(device)!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")


def require_triton_device(device, what: str = "--backend triton") -> None:
    """The Triton kernels run on CUDA tensors, or anywhere under TRITON_INTERPRET=1 (set before import)."""
    import torch

    if torch.device(device).type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"{what} needs a CUDA device (or TRITON_INTERPRET=1 for the CPU interpreter), but the "
            f"model runs on {str(device)!r}"
        )
