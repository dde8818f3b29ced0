"""The one training loop every method runs on (accelerate: one CPU to many GPUs).

A method is any object with the attributes of `Method`; the loop knows nothing else about it. It owns the
optimizer, LR schedule, gradient accumulation, mixed precision, clipping, checkpoints (save, rotate, resume),
tracking, sample grids and the final export.

Randomness: each micro-step draws from its own generator seeded by (seed, process, micro-step), so a resumed run
replays exactly the draws of an uninterrupted one and every process sees different data.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from sdd.config import TrackingConfig, TrainConfig
from sdd.errors import UserError
from sdd.files import (
    atomic_path,
    check_writable_dir,
    remove_stale_temporaries,
    reporting_write_failures,
    to_json,
    write_failure,
    write_json,
    write_text,
)
from sdd.generation import image_grid
from sdd.tracking import Tracker, log_with

CHECKPOINT_RE = re.compile(r"^step-(\d+)$")
METHOD_STATE = "method_state.safetensors"
TRAINER_STATE = "trainer_state.json"
CONFIG_CHANGES = "config_changes.jsonl"

# keys a resumed run may change without --allow-config-change: how long, how often it saves and logs, where it
# writes, what it exports, and the exact speed switches; nothing that changes what a step computes
RESUME_MAY_CHANGE = ("train.steps", "train.resume", "train.allow_config_change", "train.checkpoint_every",
                     "train.checkpoints_total_limit", "train.log_every", "output_dir", "tracking.", "export.",
                     "perf.")
RESUME_MUST_KEEP = ("perf.teacher_precision",)  # a precision switch: changes the numbers


class TrainingDiverged(UserError):
    """A step's loss or gradients were not finite (more often than ``train.skip_nonfinite_steps`` allows)."""


class Method(Protocol):
    """What the loop needs of a method: the module to train, a loss, an export. Nothing else is required.

    Optional hooks, each with the default the loop uses when a method has none (``hook``):

    - ``after_optimizer_step()``: after each optimizer step (SDD: the EMA teacher; HFI: restore frozen rows);
      default nothing;
    - ``extra_state() -> dict[str, Tensor]`` / ``load_extra_state(state)``: tensors besides the trainable
      parameters that a checkpoint must hold (the EMA teacher); default none;
    - ``validation_images() -> (images, prompts)``: the sample grid; default none;
    - ``summary() -> dict``: the method's own results, added to ``train_summary.json`` (the reward model's
      held-out accuracy); default none.

    Every method class is built as ``cls(cfg, device, process_index, num_processes)``.
    """

    model: nn.Module  # the module whose trainable parameters the optimizer updates

    def compute_loss(self, model: nn.Module, micro_step: int, generator: torch.Generator
                     ) -> tuple[torch.Tensor, dict]:
        """Loss of micro-step ``micro_step`` (counted over the whole run, accumulation included); ``model`` is the
        prepared (possibly wrapped) ``self.model``; ``generator`` the step's own seeded generator."""
        ...

    def export(self, output_dir: str) -> dict[str, str]:
        """Write what the run produced into ``output_dir``; return {kind: path}."""
        ...


OPTIONAL_HOOKS = {
    "after_optimizer_step": lambda: None,
    "extra_state": dict,
    "load_extra_state": lambda state: None,
    "validation_images": lambda: ([], []),
    "summary": dict,
}


def hook(method, name: str):
    """``method``'s optional hook ``name``, or the loop's default for it."""
    found = getattr(method, name, None)
    return found if found is not None else OPTIONAL_HOOKS[name]


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
        hook(method, "load_extra_state")(load_file(state_path))


def _register_checkpoint_hooks(accelerator, method: Method) -> list:
    """Checkpoints hold only what changes: the trainable parameters and the method's extra state."""

    def save_hook(models, weights, output_dir):
        for i, model in enumerate(models[: len(weights)]):
            names = {n for n, p in model.named_parameters() if p.requires_grad}
            weights[i] = {k: v for k, v in weights[i].items() if k in names}
        if accelerator.is_main_process:
            extra = {k: v.detach().cpu().contiguous() for k, v in hook(method, "extra_state")().items()}
            if extra:
                save_file(extra, os.path.join(output_dir, METHOD_STATE))

    def load_extra(input_dir):
        state_path = os.path.join(input_dir, METHOD_STATE)
        if os.path.isfile(state_path):
            hook(method, "load_extra_state")(load_file(state_path))

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


def _save_checkpoint(accelerator, output_dir: str, state: dict, config_yaml: str, limit: int | None) -> str:
    """Write checkpoint ``step-NNNNNN`` (``state``: the trainer state, ``step`` among it) under a temporary name
    and rename it into place. A failed write (disk full, ...) on any process removes the temporary folder and
    raises one ``UserError`` on every process; the earlier checkpoints stay as they were."""
    root = os.path.join(output_dir, "checkpoints")
    final = os.path.join(root, f"step-{state['step']:06d}")
    tmp = final + ".tmp"  # a crash mid-save leaves only a .tmp folder, which resume ignores and removes
    reason = None
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            os.makedirs(root, exist_ok=True)
        except OSError as err:
            reason = write_failure(err, root)
    reason = _agree(accelerator, reason)
    if reason is None:
        try:
            accelerator.save_state(tmp)
            if accelerator.is_main_process:
                write_text(os.path.join(tmp, "config.yaml"), config_yaml)  # what the checkpoint was trained with
                write_text(os.path.join(tmp, TRAINER_STATE), to_json(state))
        except UserError as err:  # atomic writes report their own failures
            reason = str(err)
        except Exception as err:
            reason = write_failure(err, tmp)
            if reason is None:
                raise
        reason = _agree(accelerator, reason)
    if reason is not None:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"checkpoint: could not write {tmp}: {reason} (removed it; the earlier checkpoints are "
                        "intact)")
    if accelerator.is_main_process:
        if os.path.isdir(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        if limit is not None:
            for old in list_checkpoints(output_dir)[:-limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _agree(accelerator, reason: str | None) -> str | None:
    """Every process learns whether any of them failed (so none waits forever for one that raised)."""
    if accelerator.num_processes == 1:
        return reason
    from accelerate.utils import gather_object

    failed = [r for r in gather_object([reason]) if r]
    return failed[0] if failed else None


# --- the run's checks, before anything is built or written ---------------------------------------------------


def _flatten(tree, prefix: str = "") -> dict:
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree}
    out: dict = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def config_changes(saved: dict, now: dict) -> dict[str, list]:
    """``{dotted key: [saved value, value now]}`` for every key whose value differs (or exists in one only)."""
    a, b = _flatten(saved), _flatten(now)
    missing = "(absent)"
    return {k: [a.get(k, missing), b.get(k, missing)] for k in sorted(set(a) | set(b)) if a.get(k, missing)
            != b.get(k, missing)}


def may_change_on_resume(key: str) -> bool:
    return key not in RESUME_MUST_KEEP and any(key == p or (p.endswith(".") and key.startswith(p))
                                               for p in RESUME_MAY_CHANGE)


@dataclass
class RunPlan:
    """What the checks before a run decided: the checkpoint to resume (or None) and the config's changes."""

    checkpoint: str | None
    changes: dict[str, list] = field(default_factory=dict)


def plan_run(output_dir: str, train: TrainConfig, config_yaml: str) -> RunPlan:
    """Every check a run makes before a model is built or a file written; raises one ``UserError`` line.

    The output folder must be creatable and writable; a folder that holds checkpoints is resumed only with
    ``--resume``; a resumed run must have the checkpoint's config, but for the keys of ``RESUME_MAY_CHANGE``,
    unless ``train.allow_config_change`` (``--allow-config-change``) says the change is meant.
    """
    import yaml

    check_writable_dir(output_dir)
    if not train.resume:
        if list_checkpoints(output_dir):
            raise UserError(
                f"output_dir {output_dir} already holds checkpoints of a run: pass --resume to continue it, "
                "or choose another output_dir"
            )
        return RunPlan(None)
    checkpoint = resolve_checkpoint(output_dir, train.resume)
    if checkpoint is None:
        return RunPlan(None)
    saved_path = next((p for p in (os.path.join(checkpoint, "config.yaml"), os.path.join(output_dir, "config.yaml"))
                       if os.path.isfile(p)), None)
    if saved_path is None:
        return RunPlan(checkpoint)
    with open(saved_path, encoding="utf-8") as f:
        saved = yaml.safe_load(f) or {}
    changes = config_changes(saved, yaml.safe_load(config_yaml) or {})
    refused = [k for k in changes if not may_change_on_resume(k)]
    if refused and not train.allow_config_change:
        listed = ", ".join(f"{k} ({changes[k][0]!r} -> {changes[k][1]!r})" for k in refused[:4])
        more = f" and {len(refused) - 4} more" if len(refused) > 4 else ""
        raise UserError(
            f"--resume: this config differs from the one {checkpoint} was trained with ({saved_path}) in "
            f"{listed}{more}: resume with the same settings, or pass --allow-config-change to continue with the "
            f"new ones (the change is recorded in {os.path.join(output_dir, CONFIG_CHANGES)})"
        )
    return RunPlan(checkpoint, changes)


def _start_run_folder(output_dir: str, config_yaml: str, plan: RunPlan, step: int) -> None:
    """The run's own files, written once its checks passed and its checkpoint loaded (main process)."""
    with reporting_write_failures(output_dir, "output_dir"):
        os.makedirs(output_dir, exist_ok=True)
        removed = remove_stale_temporaries(output_dir)
        root = os.path.join(output_dir, "checkpoints")
        if os.path.isdir(root):  # checkpoints a killed run was writing
            for name in sorted(os.listdir(root)):
                if name.endswith(".tmp") and CHECKPOINT_RE.match(name[: -len(".tmp")]):
                    shutil.rmtree(os.path.join(root, name), ignore_errors=True)
                    removed.append(os.path.join(root, name))
        if removed:
            print(f"removed {len(removed)} temporary file(s) of interrupted writes: "
                  f"{', '.join(os.path.basename(r) for r in removed[:3])}{' ...' if len(removed) > 3 else ''}",
                  flush=True)
        write_text(os.path.join(output_dir, "config.yaml"), config_yaml)
        if plan.changes:
            record = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                      "resumed_from": plan.checkpoint, "step": step, "changes": plan.changes}
            with open(os.path.join(output_dir, CONFIG_CHANGES), "a", encoding="utf-8") as f:
                f.write(to_json(record) + "\n")


# --- the loop ------------------------------------------------------------------------------------------------


@dataclass
class FitResult:
    steps: int
    seconds: float
    final_loss: float
    exports: dict[str, str] = field(default_factory=dict)
    checksums: list[str] = field(default_factory=list)
    output_dir: str = ""
    summary: dict = field(default_factory=dict)  # the method's own results (its ``summary`` hook)
    main_process: bool = True  # whether this process is the one that reports
    closed_form: bool = False  # ``solve``'s run: closed-form steps, no optimizer


@dataclass
class StepOutput:
    loss: torch.Tensor
    logs: dict
    synced: bool  # the micro-step ended an accumulation window: an optimizer step was taken (or dropped)
    dropped: bool = False  # the optimizer step was dropped (non-finite loss or gradients)


class Stepper:
    """The prepared optimizer, schedule and model of a run, and one micro-step over them: the method's loss,
    backward and, at the end of an accumulation window, clipping, the non-finite check, the optimizer step and the
    method's ``after_optimizer_step``. ``fit`` runs it in its loop; ``sdd-bench`` times it: both run this code.

    ``on_nonfinite(bad_loss, bad_grad, loss)`` decides what a non-finite window does: raise (the run stops) or
    return (the update is dropped). The check reads one flag per optimizer step (one device sync), agreed over
    processes; under fp16 the gradient scaler handles gradient overflow itself, so only the loss is checked.
    """

    def __init__(self, accelerator, method: Method, train: TrainConfig):
        from diffusers.optimization import get_scheduler

        from sdd.perf import make_optimizer

        self.accelerator, self.method, self.train = accelerator, method, train
        self.params = [p for p in method.model.parameters() if p.requires_grad]
        optimizer = make_optimizer(self.params, train)
        # accelerate steps a prepared scheduler once per process per optimizer step
        lr_scheduler = get_scheduler(
            train.lr_scheduler,
            optimizer,
            num_warmup_steps=train.lr_warmup_steps * accelerator.num_processes,
            num_training_steps=train.steps * accelerator.num_processes,
        )
        self.model, self.optimizer, self.lr_scheduler = accelerator.prepare(method.model, optimizer, lr_scheduler)
        self._nonfinite = torch.zeros(2, dtype=torch.bool, device=accelerator.device)
        self._after_step = hook(method, "after_optimizer_step")

    def __call__(self, micro_step: int, generator: torch.Generator, on_nonfinite) -> StepOutput:
        accelerator, train = self.accelerator, self.train
        dropped = False
        with accelerator.accumulate(self.model):
            with accelerator.autocast():
                loss, logs = self.method.compute_loss(self.model, micro_step, generator)
            accelerator.backward(loss)
            self._nonfinite[0] |= ~torch.isfinite(loss.detach()).all()
            if accelerator.sync_gradients:
                # the norm before clipping (no clipping when max_grad_norm is null: the factor is 1)
                norm = accelerator.clip_grad_norm_(self.params, train.max_grad_norm or math.inf)
                if norm is not None and accelerator.scaler is None:
                    self._nonfinite[1] |= ~torch.isfinite(torch.as_tensor(norm, device=accelerator.device)).all()
                bad_loss, bad_grad = _nonfinite_everywhere(accelerator, self._nonfinite)
                self._nonfinite.zero_()
                if bad_loss or bad_grad:
                    on_nonfinite(bad_loss, bad_grad, loss)
                    dropped = True
            if not dropped:
                self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        synced = accelerator.sync_gradients
        if synced:
            with full_parameters(accelerator, self.model):
                self._after_step()
        return StepOutput(loss, logs, synced, dropped)

    def lr(self) -> float:
        return self.lr_scheduler.get_last_lr()[0]


def params_checksum(method: Method) -> str:
    digest = hashlib.sha256()
    tensors = {**{"model." + k: v for k, v in trainable_state(method.model).items()}, **hook(method, "extra_state")()}
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _sample(accelerator, method: Method, tracker: Tracker, output_dir: str, step: int) -> str | None:
    path, failure = None, None
    if accelerator.is_main_process:
        images, prompts = hook(method, "validation_images")()
        if images:
            grid = image_grid(images, rows=1, cols=len(images))
            path = os.path.join(output_dir, "samples", f"step-{step:06d}.png")
            try:
                with atomic_path(path) as tmp:
                    grid.save(tmp, format="PNG")
            except UserError as err:
                failure = f"sample grid: {err}"
            tracker.log_images("samples", images, prompts, step)
    _raise_on_all(accelerator, failure)
    return path


def _raise_on_all(accelerator, failure: str | None) -> None:
    """Raise ``failure`` (one process's ``UserError`` text) on every process, or wait for all when none failed."""
    failure = _agree(accelerator, failure)
    if failure is not None:
        raise UserError(failure)
    accelerator.wait_for_everyone()


def _plan(accelerator, cfg) -> tuple[str, RunPlan]:
    """The start of every run (``fit``, ``solve``): the config as saved, and the checks and checkpoint of
    ``plan_run``; says so when ``train.resume`` finds nothing to resume."""
    from sdd.config import to_yaml

    config_yaml = to_yaml(cfg)
    plan = plan_run(cfg.output_dir, cfg.train, config_yaml)
    if cfg.train.resume and plan.checkpoint is None and accelerator.is_main_process:
        print(f"no checkpoint in {cfg.output_dir}/checkpoints; starting a new run", flush=True)
    return config_yaml, plan


def _resume_state(accelerator, plan: RunPlan) -> dict:
    """Load the plan's checkpoint into the prepared objects; its trainer state (``step``, ...)."""
    accelerator.load_state(plan.checkpoint)
    with open(os.path.join(plan.checkpoint, TRAINER_STATE)) as f:
        state = json.load(f)
    if accelerator.is_main_process:
        print(f"resumed from {plan.checkpoint} at step {state['step']}", flush=True)
    return state


def fit(accelerator, method: Method, cfg) -> FitResult:
    """Train ``method`` with the run config ``cfg`` (any config with ``train``, ``tracking`` and ``output_dir``):
    checks, resume, the steps, checkpoints, sample grids, the export and ``train_summary.json``."""
    from tqdm.auto import tqdm

    from sdd.config import to_dict

    train, tracking, output_dir = cfg.train, cfg.tracking, cfg.output_dir
    main = accelerator.is_main_process
    config_yaml, plan = _plan(accelerator, cfg)

    stepper = Stepper(accelerator, method, train)
    hooks = _register_checkpoint_hooks(accelerator, method)

    step, skipped = 0, 0
    seconds_before = 0.0  # training seconds of the earlier runs a resumed run continues
    saved_step = None  # the step of the last checkpoint this run wrote
    if plan.checkpoint is not None:
        state = _resume_state(accelerator, plan)
        step, skipped = state["step"], state.get("skipped_steps", 0)
        seconds_before = state.get("seconds", 0.0)
        if any(k.startswith(("train.lr", "train.weight_decay", "train.adam_")) for k in plan.changes):
            # the checkpoint restored the old ones
            _apply_optimizer_settings(stepper.optimizer, stepper.lr_scheduler, train)
    if main:  # the checks passed and the checkpoint loaded: only now does the run write its files
        _start_run_folder(output_dir, config_yaml, plan, step)
    accelerator.wait_for_everyone()
    tracker = Tracker(accelerator, tracking, to_dict(cfg), output_dir)
    micro_step = step * train.gradient_accumulation_steps

    def trainer_state() -> dict:
        # seconds: wall time of the training steps up to here, over every run of this folder (time to a target
        # erasure reads it from each checkpoint; sdd.shapes.race)
        return {"step": step, "micro_step": micro_step, "skipped_steps": skipped,
                "seconds": round(seconds_before + time.perf_counter() - started, 3)}

    def on_nonfinite(bad_loss: bool, bad_grad: bool, loss: torch.Tensor) -> None:
        nonlocal skipped
        skipped += 1
        if skipped > train.skip_nonfinite_steps:
            suspect = _set_aside(accelerator, output_dir, step) if saved_step == step else None
            raise TrainingDiverged(_divergence_message(step + 1, bad_loss, loss, train, output_dir, suspect))
        if main:
            bar.write(f"step {step + 1}: non-finite {'loss' if bad_loss else 'gradients'}, update skipped "
                      f"({skipped} of train.skip_nonfinite_steps={train.skip_nonfinite_steps})", file=sys.stderr)

    bar = tqdm(total=train.steps, initial=step, desc="training", unit="step", disable=not main, dynamic_ncols=True)
    window: list[torch.Tensor] = []
    last_loss = float("nan")
    started = time.perf_counter()
    first_step = step
    try:
        while step < train.steps:
            generator = step_generator(train.seed, accelerator.process_index, micro_step)
            out = stepper(micro_step, generator, on_nonfinite)
            micro_step += 1
            window.append(out.loss.detach().float())
            if not out.synced:
                continue
            step += 1
            bar.update(1)
            if step % train.log_every == 0 or step == train.steps:
                finite = [x for x in window if torch.isfinite(x)] or window  # a skipped step's loss is not averaged
                last_loss = accelerator.reduce(torch.stack(finite).mean(), reduction="mean").item()
                window.clear()
                lr = stepper.lr()
                bar.set_postfix(loss=f"{last_loss:.4g}", lr=f"{lr:.2g}")
                scalars = {"train/loss": last_loss, "train/lr": lr}
                if train.skip_nonfinite_steps:
                    scalars["train/skipped_steps"] = skipped
                scalars.update({f"train/{k}": float(v) for k, v in out.logs.items()})
                tracker.log_scalars(scalars, step)
            if train.checkpoint_every and step % train.checkpoint_every == 0 and step < train.steps:
                _save_checkpoint(accelerator, output_dir, trainer_state(), config_yaml,
                                 train.checkpoints_total_limit)
                saved_step = step
            if tracking.sample_every and step % tracking.sample_every == 0 and step < train.steps:
                with full_parameters(accelerator, stepper.model):
                    _sample(accelerator, method, tracker, output_dir, step)
    except BaseException:  # diverged, a checkpoint write failed, interrupted: end the bar, so the error stands alone
        bar.close()
        with contextlib.suppress(Exception):
            tracker.finish()
        for h in hooks:
            h.remove()
        raise
    bar.close()
    seconds = time.perf_counter() - started

    final = _save_checkpoint(accelerator, output_dir, trainer_state(), config_yaml, train.checkpoints_total_limit)
    return _finish(accelerator, method, stepper.model, tracker, hooks, output_dir, final, step, seconds, last_loss,
                   {"steps_this_run": step - first_step,
                    "seconds_this_run": round(seconds, 2),
                    "steps_per_second": round((step - first_step) / seconds, 3) if seconds > 0 else None,
                    "final_loss": last_loss,
                    "final_lr": stepper.lr(),
                    "skipped_steps": skipped})


def _finish(accelerator, method, model: nn.Module, tracker: Tracker, hooks: list, output_dir: str, final: str,
            step: int, seconds: float, last_loss: float, run_stats: dict) -> FitResult:
    """What ends a run, once its final checkpoint ``final`` is written: the sample grid, the processes' checksums,
    the export (a failure names the checkpoint and ``sdd-export``), ``train_summary.json`` ("steps", then
    ``run_stats``, then the processes, checksums, exports, samples and the method's own summary)."""
    from accelerate.utils import gather_object

    main = accelerator.is_main_process
    exports: dict[str, str] = {}
    method_summary: dict = {}
    with full_parameters(accelerator, model):
        sample_path = _sample(accelerator, method, tracker, output_dir, step)
        checksums = gather_object([params_checksum(method)])
        if len(set(checksums)) != 1:
            raise RuntimeError(f"parameters diverged across processes: {checksums}")
        failure = None
        if main:
            try:
                with reporting_write_failures(output_dir, "export"):
                    exports = method.export(output_dir)
            except UserError as err:
                failure = (f"{err}; the trained weights are safe in {final}: make room and run "
                           f"`sdd-export {output_dir}` to write the export")
        _raise_on_all(accelerator, failure)
        if main:
            method_summary = hook(method, "summary")()
            summary = {
                "steps": step,
                **run_stats,
                "num_processes": accelerator.num_processes,
                "param_checksums": checksums,
                "exports": exports,
                "samples": sample_path,
                **method_summary,
            }
            write_json(os.path.join(output_dir, "train_summary.json"), summary)
        accelerator.wait_for_everyone()
    tracker.finish()
    for h in hooks:
        h.remove()
    accelerator.free_memory()  # the script may train another stage with the same accelerator
    return FitResult(step, seconds, last_loss, exports, checksums, output_dir, method_summary, main)


class ClosedForm(Protocol):
    """What ``solve`` needs of a closed-form method (no loss, no optimizer): ``model``, whose parameters that
    require grad are the ones it writes (what a checkpoint holds), ``iterations`` closed-form steps, and
    ``solve_step(i)``, which runs step ``i`` in place and returns its numbers (``loss``: the one reported as the
    final loss). The optional hooks are fit's (``summary``, ``validation_images``, ``extra_state``)."""

    model: nn.Module
    iterations: int

    def solve_step(self, iteration: int) -> dict[str, float]:
        ...

    def export(self, output_dir: str) -> dict[str, str]:
        ...


def solve(accelerator, method: ClosedForm, cfg) -> FitResult:
    """Run a closed-form method with the run config ``cfg``: fit's checks and run folder, a checkpoint of the
    written parameters after every step (an interrupted run resumes at the next step; ``sdd-export`` re-exports
    any), the sample grid, the export and ``train_summary.json``. ``train`` gives only ``resume``,
    ``allow_config_change`` and ``checkpoints_total_limit``: there is no optimizer."""
    from sdd.config import to_dict

    train, tracking, output_dir = cfg.train, cfg.tracking, cfg.output_dir
    main = accelerator.is_main_process
    config_yaml, plan = _plan(accelerator, cfg)
    model = accelerator.prepare(method.model)
    hooks = _register_checkpoint_hooks(accelerator, method)
    step = 0
    if plan.checkpoint is not None:
        step = _resume_state(accelerator, plan)["step"]
    if main:
        _start_run_folder(output_dir, config_yaml, plan, step)
    accelerator.wait_for_everyone()
    tracker = Tracker(accelerator, tracking, to_dict(cfg), output_dir)
    first_step, last_loss, logs = step, float("nan"), {}
    started = time.perf_counter()
    try:
        while step < method.iterations:
            with torch.no_grad(), full_parameters(accelerator, model):
                logs = method.solve_step(step)
            step += 1
            last_loss = float(logs.get("loss", float("nan")))
            if main:
                print(f"step {step}/{method.iterations}: " + ", ".join(f"{k} {v:.4g}" for k, v in logs.items()),
                      flush=True)
            tracker.log_scalars({f"solve/{k}": float(v) for k, v in logs.items()}, step)
            if step < method.iterations:
                _save_checkpoint(accelerator, output_dir, {"step": step}, config_yaml, train.checkpoints_total_limit)
    except BaseException:
        with contextlib.suppress(Exception):
            tracker.finish()
        for h in hooks:
            h.remove()
        raise
    seconds = time.perf_counter() - started
    final = _save_checkpoint(accelerator, output_dir, {"step": step}, config_yaml, train.checkpoints_total_limit)
    result = _finish(accelerator, method, model, tracker, hooks, output_dir, final, step, seconds, last_loss,
                     {"steps_this_run": step - first_step, "seconds_this_run": round(seconds, 2),
                      "final_loss": last_loss})
    return dataclasses.replace(result, closed_form=True)


def _apply_optimizer_settings(optimizer, lr_scheduler, train: TrainConfig) -> None:
    """The config's learning rate, weight decay and Adam settings over the ones a loaded checkpoint restored
    (a resume with ``--allow-config-change``); the schedule keeps its position."""
    inner = getattr(lr_scheduler, "scheduler", lr_scheduler)
    groups = getattr(optimizer, "optimizer", optimizer).param_groups
    inner.base_lrs = [train.lr] * len(groups)
    lambdas = getattr(inner, "lr_lambdas", [lambda _: 1.0] * len(groups))
    for group, factor in zip(groups, lambdas):
        group.update(initial_lr=train.lr, lr=train.lr * factor(inner.last_epoch), weight_decay=train.weight_decay,
                     betas=(train.adam_beta1, train.adam_beta2), eps=train.adam_eps)
    inner._last_lr = [group["lr"] for group in groups]


def _nonfinite_everywhere(accelerator, flags: torch.Tensor) -> tuple[bool, bool]:
    """(loss, gradients) non-finite on any process: every process takes the same decision."""
    if accelerator.num_processes > 1:
        flags = accelerator.reduce(flags.float(), reduction="sum") > 0
    bad_loss, bad_grad = flags.tolist()
    return bool(bad_loss), bool(bad_grad)


def _set_aside(accelerator, output_dir: str, step: int) -> str:
    """Rename the checkpoint of ``step`` to ``step-NNNNNN.diverged``: its weights gave the non-finite loss, and
    resuming from it would replay the same draws into the same loss. Resume and export no longer see it."""
    path = os.path.join(output_dir, "checkpoints", f"step-{step:06d}")
    aside = path + ".diverged"
    if accelerator.is_main_process and os.path.isdir(path):
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(path, aside)
    accelerator.wait_for_everyone()
    return aside


def _divergence_message(step: int, bad_loss: bool, loss: torch.Tensor, train: TrainConfig,
                        output_dir: str, suspect: str | None) -> str:
    what = f"non-finite loss ({loss.detach().float().item():g})" if bad_loss else "non-finite gradients"
    if bad_loss and step == 1:
        cause = ("before any update, so a setting overflows the forward pass (e.g. a guidance scale far too "
                 "large) or the model's weights are not finite")
    elif bad_loss:
        cause = f"the updates diverged: train.lr={train.lr:g} is likely too high for this model"
    else:
        cause = (f"the gradients overflow: lower train.lr (now {train.lr:g}), set train.max_grad_norm, or train "
                 "in bf16 rather than fp16")
    found = list_checkpoints(output_dir)
    kept = f"the last good checkpoint is {found[-1]}" if found else "no good checkpoint was written"
    if suspect:
        kept += f"; the one of step {step - 1}, whose weights gave this loss, was moved to {suspect}"
    return (f"training stopped at step {step}: {what}; {cause}. Nothing was exported; {kept} "
            f"(train.skip_nonfinite_steps=N skips up to N such steps instead)")


def describe(result: FitResult, output_dir: str) -> str:
    lines = [
        (f"solved {result.steps} closed-form steps in {result.seconds:.1f} s (final loss {result.final_loss:.4g})"
         if result.closed_form else
         f"trained {result.steps} steps in {result.seconds:.1f} s (final loss {result.final_loss:.4g})"),
        f"processes: {len(result.checksums)}, parameters identical on all: {len(set(result.checksums)) == 1}",
    ]
    for key, path in result.exports.items():
        lines.append(f"  {key:9s} {path}")
    lines.append(f"  checkpoints {os.path.join(output_dir, 'checkpoints')}")
    return "\n".join(lines)
