"""Typed configuration: dataclass schema <- YAML file <- command-line dotlist, validated.

Each method defines one top-level dataclass built from the shared sections below. `load_config` merges
`schema <- --config FILE <- key=value overrides` with OmegaConf and returns the dataclass instance; every
mistake becomes a `ConfigError` naming the key (`train.lrr`), the value or the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Sequence, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import (
    ConfigKeyError,
    MissingMandatoryValue,
    OmegaConfBaseException,
    ValidationError,
)

from sdd.errors import ConfigError

FinetuneSet = Literal["xattn", "noxattn", "selfattn", "full", "lora"]


@dataclass
class ModelConfig:
    # 'tiny' (built in code), 'shapes' (the shipped ShapesWorld model), a diffusers folder, a hub id, or a
    # single-file .safetensors checkpoint in the original (A1111/ComfyUI) layout
    pretrained: str = "tiny"
    revision: Optional[str] = None
    # single files only: a diffusers folder or a shipped name (sd15, sd21, sd21-base) that describes the file;
    # default: the configs the file carries (sdd-export writes them), else the shipped one its keys show
    single_file_config: Optional[str] = None

    def __post_init__(self) -> None:
        _check(self.single_file_config is None or self.pretrained.lower().endswith(".safetensors"),
               "model.single_file_config", f"describes a single .safetensors file; model.pretrained is "
               f"{self.pretrained!r}")


@dataclass
class LoraConfig:
    rank: int = 4
    alpha: float = 4.0
    # PEFT matches a module whose name equals or ends with ".<entry>"; the default mirrors `xattn`
    target_modules: list[str] = field(
        default_factory=lambda: ["attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"]
    )

    def __post_init__(self) -> None:
        _check(self.rank >= 1, "lora.rank", f"must be >= 1, got {self.rank}")
        _check(self.alpha > 0, "lora.alpha", f"must be > 0, got {self.alpha}")
        _check(len(self.target_modules) > 0, "lora.target_modules", "must name at least one module")


@dataclass
class TrainConfig:
    steps: int = 1500  # optimizer steps
    batch_size: int = 1  # per process and micro-step
    gradient_accumulation_steps: int = 1
    lr: float = 1e-5
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"  # adamw8bit: bitsandbytes, GPU only
    weight_decay: float = 1e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant"
    lr_warmup_steps: int = 0
    max_grad_norm: Optional[float] = 1.0  # null disables clipping
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    seed: int = 0
    checkpoint_every: int = 500  # 0: only the final checkpoint
    checkpoints_total_limit: Optional[int] = 3  # null keeps all
    log_every: int = 10
    resume: Optional[str] = None  # 'latest' or a checkpoint folder; the --resume flag sets it
    # resume although the config differs from the checkpoint's (--allow-config-change); recorded in the run folder
    allow_config_change: bool = False
    # optimizer steps with a non-finite loss or gradients that may be skipped (update dropped) before the run
    # stops; 0: stop at the first
    skip_nonfinite_steps: int = 0

    def __post_init__(self) -> None:
        for key in ("steps", "batch_size", "gradient_accumulation_steps", "log_every"):
            _check(getattr(self, key) >= 1, f"train.{key}", f"must be >= 1, got {getattr(self, key)}")
        _check(self.lr > 0, "train.lr", f"must be > 0, got {self.lr}")
        _check(self.weight_decay >= 0, "train.weight_decay", f"must be >= 0, got {self.weight_decay}")
        _check(self.lr_warmup_steps >= 0, "train.lr_warmup_steps", "must be >= 0")
        _check(self.checkpoint_every >= 0, "train.checkpoint_every", "must be >= 0")
        _check(self.skip_nonfinite_steps >= 0, "train.skip_nonfinite_steps", "must be >= 0")
        _check(
            self.max_grad_norm is None or self.max_grad_norm > 0,
            "train.max_grad_norm",
            f"must be > 0 or null, got {self.max_grad_norm}",
        )
        _check(
            self.checkpoints_total_limit is None or self.checkpoints_total_limit >= 1,
            "train.checkpoints_total_limit",
            "must be >= 1 or null",
        )


@dataclass
class TrackingConfig:
    tracker: Literal["wandb", "tensorboard", "none"] = "wandb"
    project: str = "concept-erasure"
    run_name: Optional[str] = None
    sample_every: int = 500  # optimizer steps between sample grids; 0: only at the end
    # fixed prompts for the sample grid: put erased and unrelated ones here; empty = the concepts + two others
    validation_prompts: list[str] = field(default_factory=list)
    num_inference_steps: int = 25
    guidance_scale: float = 7.5
    seed: int = 42

    def __post_init__(self) -> None:
        _check(self.sample_every >= 0, "tracking.sample_every", "must be >= 0")
        _check(self.num_inference_steps >= 1, "tracking.num_inference_steps", "must be >= 1")


@dataclass
class ExportConfig:
    merge_lora: bool = True  # LoRA runs: also write the merged pipeline and UNet
    dtype: Literal["fp32", "fp16", "bf16"] = "fp32"  # dtype of the exported weights
    # diffusers: pipeline/ and unet.safetensors; single-file: model.safetensors in the original (A1111/ComfyUI)
    # layout and model-config/ (the local config diffusers' from_single_file reads); both: all of them
    format: Literal["diffusers", "single-file", "both"] = "diffusers"


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config error: {key}: {message}")


def check(ok: bool, key: str, message: str) -> None:
    """Validation helper for method configs' ``__post_init__``."""
    _check(ok, key, message)


T = TypeVar("T")


def _first_line(err: OmegaConfBaseException) -> str:
    msg = getattr(err, "msg", None) or str(err)
    return msg.strip().splitlines()[0]


def _yaml_booleans_to_choices(schema: type, layer) -> None:
    """YAML 1.1 reads ``no`` / ``yes`` as booleans: give them back to choice fields that list them
    (``train.mixed_precision=no`` must mean the choice ``'no'``, not ``False``)."""
    import typing

    from omegaconf import DictConfig

    if not isinstance(layer, DictConfig) or not dataclasses.is_dataclass(schema):
        return
    hints = typing.get_type_hints(schema)
    for key in list(layer.keys()):
        hint = hints.get(key)
        if hint is None:
            continue
        args = typing.get_args(hint)
        if typing.get_origin(hint) is typing.Union:  # Optional[Literal[...]]
            inner = [a for a in args if a is not type(None)]
            hint, args = (inner[0], typing.get_args(inner[0])) if len(inner) == 1 else (hint, args)
        value = layer._get_node(key)._value() if layer._get_node(key) is not None else None
        if dataclasses.is_dataclass(hint):
            _yaml_booleans_to_choices(hint, layer[key])
        elif typing.get_origin(hint) is Literal and isinstance(value, bool):
            word = "yes" if value else "no"
            if word in args:
                layer[key] = word


def load_config(schema: type[T], config_path: str | None = None, overrides: Sequence[str] = (),
                base: str | None = None) -> T:
    """Merge ``schema <- base (YAML text) <- YAML file <- overrides`` and return a validated instance of ``schema``."""
    layers = [OmegaConf.structured(schema)]
    if base is not None:
        layers.append(OmegaConf.create(base))
    if config_path is not None:
        if not os.path.isfile(config_path):
            raise ConfigError(f"config error: --config: no such file: {config_path}")
        try:
            layers.append(OmegaConf.load(config_path))
        except Exception as err:  # YAML syntax errors come from several libraries
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError(f"config error: {config_path}: not valid YAML ({first})") from None
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"config error: override '{item}' is not of the form key=value")
    try:
        layers.append(OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as err:
        raise ConfigError(f"config error: overrides: {_first_line(err)}") from None
    for layer in layers[1:]:
        _yaml_booleans_to_choices(schema, layer)
    try:
        merged = OmegaConf.merge(*layers)
        return OmegaConf.to_object(merged)  # runs the dataclasses' __post_init__ checks
    except ConfigKeyError as err:
        import re

        key = err.full_key or "?"
        hint = _first_line(err)
        # OmegaConf: "... Did you mean: 'lr'?" or "... Did you mean one of: 'model', 'method'?"
        suggestions = re.findall(r"'([^']+)'", hint.split("Did you mean", 1)[1]) if "Did you mean" in hint else []
        msg = f"config error: unknown key '{key}'"
        if suggestions:
            parent = key.rsplit(".", 1)[0] + "." if "." in key else ""
            msg += f" (did you mean {' or '.join(parent + s for s in suggestions)}?)"
        raise ConfigError(msg) from None
    except MissingMandatoryValue as err:
        raise ConfigError(f"config error: {err.full_key}: a value is required") from None
    except ValidationError as err:
        msg = _first_line(err)
        if "is not a ListConfig" in msg or "ListConfig" in msg:
            msg = f"expected a list, e.g. {err.full_key}='[a, b]'"
        raise ConfigError(f"config error: {err.full_key}: {msg}") from None
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        raise ConfigError(f"config error: {key + ': ' if key else ''}{_first_line(err)}") from None


def merge_overrides(cfg: T, overrides: Sequence[str] = ()) -> T:
    """A config object with ``key=value`` overrides applied, validated as ``load_config`` validates a file."""
    return load_config(type(cfg), None, overrides, base=to_yaml(cfg)) if overrides else cfg


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def parse_args(schema: type[T], argv: Sequence[str] | None, description: str) -> T:
    """``--config FILE [--resume [latest|DIR]] key=value ...`` -> validated config instance."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", help="YAML file with settings (see configs/)")
    parser.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        help="resume from the latest checkpoint in output_dir, or from the given checkpoint folder",
    )
    parser.add_argument(
        "--allow-config-change",
        action="store_true",
        help="with --resume: continue although the config differs from the checkpoint's (recorded in the run "
        "folder's config_changes.jsonl)",
    )
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.lr=2e-5 concepts='[nudity]'")
    args = parser.parse_intermixed_args(argv)
    overrides = list(args.overrides)
    if args.resume is not None and "=" in args.resume and not os.path.isdir(args.resume):
        # `--resume train.steps=6000`: argparse hands the override to --resume; it is an override, resume latest
        overrides.append(args.resume)
        args.resume = "latest"
    if args.resume is not None:
        overrides.append(f"train.resume={args.resume}")
    if args.allow_config_change:
        overrides.append("train.allow_config_change=true")
    return load_config(schema, args.config, overrides)
