"""The one training loop every method runs on (accelerate: one CPU to many GPUs).

A method is any object with the attributes of `Method`; the loop knows nothing else about it. It owns the
optimizer, LR schedule, gradient accumulation, mixed precision, clipping, checkpoints (save, rotate, resume),
tracking, sample grids and the final export.

Randomness: each micro-step draws from its own generator seeded by (seed, process, micro-step), so a resumed run
replays exactly the draws of an uninterrupted one and every process sees different data.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from sdd.config import TrackingConfig, TrainConfig
from sdd.errors import UserError
from sdd.files import write_text
from sdd.generation import image_grid
from sdd.tracking import Tracker, log_with

CHECKPOINT_RE = re.compile(r"^step-(\d+)$")
METHOD_STATE = "method_state.safetensors"
TRAINER_STATE = "trainer_state.json"


class Method(Protocol):
    model: nn.Module  # the module whose trainable parameters the optimizer updates

    def compute_loss(self, model: nn.Module, step: int, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        """Loss of micro-step ``step``; ``model`` is the prepared (possibly wrapped) ``self.model``."""
        ...

    def after_optimizer_step(self) -> None: ...

    def extra_state(self) -> dict[str, torch.Tensor]:
        """Tensors besides the trainable parameters that a checkpoint must hold (e.g. the EMA teacher)."""
        ...

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None: ...

    def validation_images(self) -> tuple[list, list[str]]:
        """Images of the fixed validation prompts (and the prompts), or ``([], [])``."""
        ...

    def export(self, output_dir: str) -> dict[str, str]: ...


@contextlib.contextmanager
def full_parameters(accelerator, model: nn.Module):
    """Inside, the method's parameters hold their full values on every process.

    A no-op except under FSDP, where parameters are sharded and must be gathered (a collective: every
    process enters together). Needs ``fsdp_use_orig_params: true`` so the method's parameter objects stay valid.
    """
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.FSDP:
        yield
        return
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.summon_full_params(model, writeback=False):
        yield


def step_generator(seed: int, process_index: int, micro_step: int) -> torch.Generator:
    state = np.random.SeedSequence([seed, process_index, micro_step]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator(device="cpu").manual_seed(int(state) & ((1 << 63) - 1))


def make_accelerator(train: TrainConfig, tracking: TrackingConfig, output_dir: str):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed

    accelerator = Accelerator(
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        mixed_precision=train.mixed_precision,
        log_with=log_with(tracking),
        project_config=ProjectConfiguration(project_dir=output_dir, logging_dir=os.path.join(output_dir, "logs")),
    )
    set_seed(train.seed)  # same initial weights (e.g. LoRA) on every process
    return accelerator


# --- checkpoints ---------------------------------------------------------------------------------------------


def list_checkpoints(output_dir: str) -> list[str]:
    root = os.path.join(output_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(root) if (m := CHECKPOINT_RE.match(name))]
    return [os.path.join(root, name) for _, name in sorted(found)]


def resolve_checkpoint(output_dir: str, resume: str) -> str | None:
    if resume == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    if not os.path.isfile(os.path.join(resume, TRAINER_STATE)):
        raise UserError(f"train.resume: {resume} is not a checkpoint folder (no {TRAINER_STATE})")
    return resume


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: nn.Module, path: str) -> None:
    """Load a checkpoint's trainable parameters into ``model``; the set of names must match exactly."""
    state = load_file(path)
    expected = set(trainable_state(model))
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise UserError(
            f"checkpoint {path} does not match this run's trainable parameters "
            f"({len(missing)} missing, e.g. {missing[:1]}; {len(extra)} unexpected, e.g. {extra[:1]}): "
            "was it written with another finetune set or model?"
        )
    _, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected


def load_method_checkpoint(method: Method, checkpoint_dir: str) -> None:
    """Weights of a checkpoint into a freshly built method (what ``sdd-export`` needs, no optimizer)."""
    load_trainable(method.model, os.path.join(checkpoint_dir, "model.safetensors"))
    state_path = os.path.join(checkpoint_dir, METHOD_STATE)
    if os.path.isfile(state_path):
        method.load_extra_state(load_file(state_path))


def _register_checkpoint_hooks(accelerator, method: Method) -> list:
    """Checkpoints hold only what changes: the trainable parameters and the method's extra state."""

    def save_hook(models, weights, output_dir):
        for i, model in enumerate(models[: len(weights)]):
            names = {n for n, p in model.named_parameters() if p.requires_grad}
            weights[i] = {k: v for k, v in weights[i].items() if k in names}
        if accelerator.is_main_process:
            extra = {k: v.detach().cpu().contiguous() for k, v in method.extra_state().items()}
            if extra:
                save_file(extra, os.path.join(output_dir, METHOD_STATE))

    def load_extra(input_dir):
        state_path = os.path.join(input_dir, METHOD_STATE)
        if os.path.isfile(state_path):
            method.load_extra_state(load_file(state_path))

    def load_hook(models, input_dir):
        for i, model in enumerate(list(models)):
            name = "model.safetensors" if i == 0 else f"model_{i}.safetensors"
            load_trainable(model, os.path.join(input_dir, name))
            models.remove(model)  # loaded here; accelerate must not load it again
        load_extra(input_dir)

    from accelerate.utils import DistributedType

    if accelerator.distributed_type in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        return [accelerator.register_save_state_pre_hook(save_hook),
                accelerator.register_load_state_pre_hook(load_hook)]
    # FSDP / DeepSpeed save sharded model weights themselves; keep only the method's extra state
    return [
        accelerator.register_save_state_pre_hook(lambda models, weights, d: save_hook([], [], d)),
        accelerator.register_load_state_pre_hook(lambda models, d: load_extra(d)),
    ]


def _save_checkpoint(accelerator, output_dir: str, step: int, micro_step: int, limit: int | None) -> str:
    root = os.path.join(output_dir, "checkpoints")
    final = os.path.join(root, f"step-{step:06d}")
    tmp = final + ".tmp"  # a crash mid-save leaves only a .tmp folder, which resume ignores
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(root, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(os.path.join(tmp, TRAINER_STATE), "w") as f:
            json.dump({"step": step, "micro_step": micro_step}, f)
        if os.path.isdir(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        if limit is not None:
            for old in list_checkpoints(output_dir)[:-limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


# --- the loop ------------------------------------------------------------------------------------------------


@dataclass
class FitResult:
    steps: int
    seconds: float
    final_loss: float
    exports: dict[str, str] = field(default_factory=dict)
    checksums: list[str] = field(default_factory=list)


def params_checksum(method: Method) -> str:
    digest = hashlib.sha256()
    tensors = {**{"model." + k: v for k, v in trainable_state(method.model).items()}, **method.extra_state()}
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _sample(accelerator, method: Method, tracker: Tracker, output_dir: str, step: int) -> str | None:
    path = None
    if accelerator.is_main_process:
        images, prompts = method.validation_images()
        if images:
            grid = image_grid(images, rows=1, cols=len(images))
            path = os.path.join(output_dir, "samples", f"step-{step:06d}.png")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            grid.save(path)
            tracker.log_images("samples", images, prompts, step)
    accelerator.wait_for_everyone()
    return path


def fit(
    accelerator,
    method: Method,
    train: TrainConfig,
    tracking: TrackingConfig,
    output_dir: str,
    config: dict,
    config_yaml: str,
) -> FitResult:
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    main = accelerator.is_main_process
    checkpoint = None
    if train.resume:
        checkpoint = resolve_checkpoint(output_dir, train.resume)
        if checkpoint is None and main:
            print(f"no checkpoint in {output_dir}/checkpoints; starting a new run", flush=True)
    elif list_checkpoints(output_dir):
        raise UserError(
            f"output_dir {output_dir} already holds checkpoints of a run: pass --resume to continue it, "
            "or choose another output_dir"
        )
    if main:
        os.makedirs(output_dir, exist_ok=True)
        write_text(os.path.join(output_dir, "config.yaml"), config_yaml)

    from sdd.perf import make_optimizer

    params = [p for p in method.model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, train)
    # accelerate steps a prepared scheduler once per process per optimizer step
    lr_scheduler = get_scheduler(
        train.lr_scheduler,
        optimizer,
        num_warmup_steps=train.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=train.steps * accelerator.num_processes,
    )
    model, optimizer, lr_scheduler = accelerator.prepare(method.model, optimizer, lr_scheduler)
    hooks = _register_checkpoint_hooks(accelerator, method)
    tracker = Tracker(accelerator, tracking, config, output_dir)

    step = 0
    if checkpoint is not None:
        accelerator.load_state(checkpoint)
        with open(os.path.join(checkpoint, TRAINER_STATE)) as f:
            step = json.load(f)["step"]
        if main:
            print(f"resumed from {checkpoint} at step {step}", flush=True)
    micro_step = step * train.gradient_accumulation_steps

    bar = tqdm(total=train.steps, initial=step, desc="training", unit="step", disable=not main, dynamic_ncols=True)
    window: list[torch.Tensor] = []
    last_loss = float("nan")
    started = time.perf_counter()
    first_step = step
    while step < train.steps:
        with accelerator.accumulate(model):
            generator = step_generator(train.seed, accelerator.process_index, micro_step)
            with accelerator.autocast():
                loss, logs = method.compute_loss(model, micro_step, generator)
            accelerator.backward(loss)
            if accelerator.sync_gradients and train.max_grad_norm:
                accelerator.clip_grad_norm_(params, train.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        micro_step += 1
        window.append(loss.detach().float())
        if not accelerator.sync_gradients:
            continue
        with full_parameters(accelerator, model):
            method.after_optimizer_step()
        step += 1
        bar.update(1)
        if step % train.log_every == 0 or step == train.steps:
            last_loss = accelerator.reduce(torch.stack(window).mean(), reduction="mean").item()
            window.clear()
            lr = lr_scheduler.get_last_lr()[0]
            bar.set_postfix(loss=f"{last_loss:.4g}", lr=f"{lr:.2g}")
            scalars = {"train/loss": last_loss, "train/lr": lr}
            scalars.update({f"train/{k}": float(v) for k, v in logs.items()})
            tracker.log_scalars(scalars, step)
        if train.checkpoint_every and step % train.checkpoint_every == 0 and step < train.steps:
            _save_checkpoint(accelerator, output_dir, step, micro_step, train.checkpoints_total_limit)
        if tracking.sample_every and step % tracking.sample_every == 0 and step < train.steps:
            with full_parameters(accelerator, model):
                _sample(accelerator, method, tracker, output_dir, step)
    bar.close()
    seconds = time.perf_counter() - started

    _save_checkpoint(accelerator, output_dir, step, micro_step, train.checkpoints_total_limit)
    from accelerate.utils import gather_object

    exports: dict[str, str] = {}
    with full_parameters(accelerator, model):
        sample_path = _sample(accelerator, method, tracker, output_dir, step)
        checksums = gather_object([params_checksum(method)])
        if len(set(checksums)) != 1:
            raise RuntimeError(f"parameters diverged across processes: {checksums}")
        if main:
            exports = method.export(output_dir)
        accelerator.wait_for_everyone()
        summary = {
            "steps": step,
            "steps_this_run": step - first_step,
            "seconds_this_run": round(seconds, 2),
            "steps_per_second": round((step - first_step) / seconds, 3) if seconds > 0 else None,
            "final_loss": last_loss,
            "num_processes": accelerator.num_processes,
            "param_checksums": checksums,
            "exports": exports,
            "samples": sample_path,
        }
        write_text(os.path.join(output_dir, "train_summary.json"), json.dumps(summary, indent=2) + "\n")
    accelerator.wait_for_everyone()
    tracker.finish()
    for hook in hooks:
        hook.remove()
    accelerator.free_memory()  # the script may train another stage with the same accelerator
    return FitResult(step, seconds, last_loss, exports, checksums)


def describe(result: FitResult, output_dir: str) -> str:
    lines = [
        f"trained {result.steps} steps in {result.seconds:.1f} s (final loss {result.final_loss:.4g})",
        f"processes: {len(result.checksums)}, parameters identical on all: {len(set(result.checksums)) == 1}",
    ]
    for key, path in result.exports.items():
        lines.append(f"  {key:9s} {path}")
    lines.append(f"  checkpoints {os.path.join(output_dir, 'checkpoints')}")
    return "\n".join(lines)


def train_main(schema, method_cls, argv, description: str, on_done=None) -> FitResult:
    """What every entry script of ``train/`` does: config -> accelerator -> method -> ``fit`` -> summary.

    ``on_done(cfg, method)`` runs on the main process after training (e.g. to report a method's own metrics).
    """
    from sdd.config import parse_args, to_dict, to_yaml

    cfg = parse_args(schema, argv, description=description)
    accelerator = make_accelerator(cfg.train, cfg.tracking, cfg.output_dir)
    method = method_cls(cfg, accelerator.device, accelerator.process_index, accelerator.num_processes)
    result = fit(accelerator, method, cfg.train, cfg.tracking, cfg.output_dir, to_dict(cfg), to_yaml(cfg))
    if accelerator.is_main_process:
        print(describe(result, cfg.output_dir))
        if on_done is not None:
            on_done(cfg, method)
    accelerator.end_training()
    return result
