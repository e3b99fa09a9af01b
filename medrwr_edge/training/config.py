"""Training configs: plain dataclasses, loaded from YAML or JSON with type checks.

`RunConfig` holds what every stage shares (model, output dir, optimiser, schedule, precision, distribution).
Each stage subclasses it with its own fields (`SFTConfig`, `DPOConfig` here; `GRPOConfig` in grpo.py), so one
flat YAML file describes one run:

    model: /models/qwen25vl-3b          # a local Hugging Face checkpoint directory
    output_dir: runs/sft-1
    train_file: data/sft.jsonl
    max_steps: 1000
    learning_rate: 1.0e-5

An unknown key, a wrong type or a missing required field is one `InputError` line naming the key and the file.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, TypeVar, Union

from ..errors import InputError

DISTRIBUTED_STRATEGIES = ("auto", "none", "ddp", "fsdp")


@dataclass(kw_only=True)
class RunConfig:
    """What every training stage shares. Paths are as written in the file (relative to the working directory)."""

    model: str  # local HF checkpoint dir (Qwen2.5-VL or a causal LM); never a hub id
    output_dir: str  # checkpoints/, metrics.jsonl, final/ go here
    seed: int = 0
    max_steps: int = 100  # optimiser steps (each = batch_size x grad_accumulation x world_size examples)
    learning_rate: float = 1e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0  # linear warm-up, then constant
    batch_size: int = 1  # examples per process per micro-step
    grad_accumulation: int = 1  # micro-steps per optimiser step
    max_grad_norm: float = 1.0  # 0 = no clipping (the norm is still measured and logged)
    max_length: int = 2048  # tokens per example (prompt + response); longer examples are truncated on the right
    save_every: int = 0  # optimiser steps between checkpoints; 0 = only at the end
    keep_checkpoints: int = 2  # older step-* checkpoints are deleted; final/ is always kept
    log_every: int = 1
    bf16: bool = True  # bf16 autocast on GPU; CPU always trains in fp32
    gradient_checkpointing: bool = False
    distributed: Literal["auto", "none", "ddp", "fsdp"] = "auto"  # auto: fsdp when launched on >1 GPU process
    tensorboard: bool = False  # also write TensorBoard events (needs the `tensorboard` package)

    def data_files(self) -> list[str]:
        """The data files whose sha256 is stored beside each checkpoint (resume refuses if one changed)."""
        return []

    def validate(self) -> None:
        positive = ("max_steps", "batch_size", "grad_accumulation", "max_length", "log_every", "keep_checkpoints")
        for name in positive:
            if getattr(self, name) < 1:
                raise InputError(f"config: {name} must be >= 1 (got {getattr(self, name)})")
        for name in ("learning_rate", "weight_decay", "max_grad_norm", "warmup_steps", "save_every"):
            if getattr(self, name) < 0:
                raise InputError(f"config: {name} must be >= 0 (got {getattr(self, name)})")


@dataclass(kw_only=True)
class SFTConfig(RunConfig):
    """Supervised fine-tuning on reasoning traces: the loss covers assistant tokens only."""

    train_file: str  # JSONL: {"messages": [...]} or {"prompt", "response"}, optional "image" (relative to the file)
    mask_retrieved: bool = True  # no loss on <retrieve>...</retrieve> blocks: the search engine wrote them

    def data_files(self) -> list[str]:
        return [self.train_file]


@dataclass(kw_only=True)
class DPOConfig(RunConfig):
    """Direct preference optimisation against a frozen copy of the starting model."""

    train_file: str  # JSONL: {"prompt", "chosen", "rejected"}, optional "image" (relative to the file)
    mask_retrieved: bool = True
    beta: float = 0.1  # strength of the KL-style pull towards the reference
    reference_model: Optional[str] = None  # default: the starting model itself
    sft_weight: float = 0.0  # optional NLL on the chosen response (RPO-style), 0 = pure DPO

    def data_files(self) -> list[str]:
        return [self.train_file]

    def validate(self) -> None:
        super().validate()
        if self.beta <= 0:
            raise InputError(f"config: beta must be > 0 (got {self.beta})")


C = TypeVar("C", bound=RunConfig)


def load_config(path: str | Path, cls: type[C], overrides: Optional[dict] = None) -> C:
    """Read a YAML (.yaml/.yml) or JSON file into `cls`, checking every key and type. `overrides` win."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"config file not found: {path}")
    text = path.read_text("utf-8")
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            raw = yaml.safe_load(text)
        else:
            raw = json.loads(text)
    except Exception as e:  # a parse error is the user's input, not a bug
        raise InputError(f"{path}: not valid {'YAML' if path.suffix.lower() in ('.yaml', '.yml') else 'JSON'}: "
                         f"{str(e).splitlines()[0]}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise InputError(f"{path}: the config must be a mapping of keys to values")
    raw.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return config_from_dict(raw, cls, source=str(path))


def renamed_keys(raw: dict, cls: type, source: str = "config") -> dict:
    """`raw` with keys renamed since they were written (cls.RENAMED: old -> new) under their current names, so that
    config files and checkpoints written before a rename still load and resume."""
    out = dict(raw)
    for old, new in getattr(cls, "RENAMED", {}).items():
        if old in out:
            if new in out:
                raise InputError(f"{source}: {old!r} is the old name of {new!r}: give one of them")
            out[new] = out.pop(old)
    return out


def config_from_dict(raw: dict, cls: type[C], source: str = "config") -> C:
    raw = renamed_keys(raw, cls, source)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key).replace("-", "_"), list(fields), n=1, cutoff=0.75)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise InputError(f"{source}: unknown key {key!r} for a {cls.__name__}{hint}")
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for name, f in fields.items():
        if name in raw:
            values[name] = _check(raw[name], hints[name], f"{source}: {name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise InputError(f"{source}: missing required key {name!r}")
    config = cls(**values)
    if hasattr(config, "validate"):
        config.validate()
    return config


def config_to_dict(config: RunConfig) -> dict:
    return dataclasses.asdict(config)


def _check(value: Any, hint: Any, where: str) -> Any:
    """`value` if it fits the type hint (ints are accepted for floats), else one InputError line."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _check(value, arg, where)
            except InputError:
                continue
        raise InputError(f"{where}: expected {_name(hint)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise InputError(f"{where}: expected one of {', '.join(map(str, args))}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise InputError(f"{where}: expected a list, got {value!r}")
        item = args[0] if args else Any
        return [_check(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise InputError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise InputError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise InputError(f"{where}: expected a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise InputError(f"{where}: expected a mapping, got {value!r}")
        return config_from_dict(value, hint, source=where)
    return value


def _name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
