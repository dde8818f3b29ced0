"""Every method the training loop runs, by the name a config's ``method`` field gives it.

    name -> (config schema, method class, stages, runner)

``stages(cfg)`` lists the (config, method class) pairs a run trains in order (one for most methods; the ShapesWorld
base model trains its VAE first). ``sdd.api.train`` runs them, ``sdd.api.export`` rebuilds the last one from a
checkpoint. ``runner`` is what runs a built stage: ``fit`` (the training loop; the default) or ``solve`` (a
closed-form method: UCE, RECE). A new method adds its line here and nothing anywhere else.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

from sdd.config import to_yaml
from sdd.errors import UserError
from sdd.loop import FitResult, fit, list_checkpoints, load_method_checkpoint, make_accelerator, plan_run, solve
from sdd.methods import esd, finetune, hfi, rece, reward, salun, sdd, shapes_base, uce


class Entry(NamedTuple):
    schema: type
    method: type
    stages: Callable[[object], list[tuple[object, type]]]
    runner: Callable = fit  # fit(accelerator, method, cfg) -> FitResult, or solve (closed-form methods)


def _one(method: type) -> Callable[[object], list[tuple[object, type]]]:
    return lambda cfg: [(cfg, method)]


METHODS: dict[str, Entry] = {
    "sdd": Entry(sdd.SDDConfig, sdd.SDDMethod, _one(sdd.SDDMethod)),
    "esd": Entry(esd.ESDConfig, esd.ESDMethod, _one(esd.ESDMethod)),
    "hfi": Entry(hfi.HFIConfig, hfi.HFIMethod, _one(hfi.HFIMethod)),
    "hfi-reward": Entry(reward.RewardConfig, reward.RewardMethod, _one(reward.RewardMethod)),
    "shapes-base": Entry(shapes_base.ShapesBaseConfig, shapes_base.ShapesDiffusionMethod, shapes_base.stages),
    "finetune": Entry(finetune.FinetuneConfig, finetune.FinetuneMethod, _one(finetune.FinetuneMethod)),
    "salun": Entry(salun.SalUnConfig, salun.SalUnMethod, _one(salun.SalUnMethod)),
    "uce": Entry(uce.UCEConfig, uce.UCEMethod, _one(uce.UCEMethod), solve),
    "rece": Entry(rece.RECEConfig, rece.RECEMethod, _one(rece.RECEMethod), solve),
}


def entry(name: str | None, where: str = "method") -> Entry:
    if name not in METHODS:
        raise UserError(f"{where}: unknown method {name!r}, expected one of {sorted(METHODS)}")
    return METHODS[name]


def train(cfg) -> FitResult:
    """Train the run config ``cfg`` (its ``method`` names the entry): every stage's checks before a model is
    built, one accelerator for the stages, the last stage's result. What ``sdd.api.train`` and the attacks run."""
    found = entry(cfg.method)
    stages = found.stages(cfg)
    for stage_cfg, _ in stages:
        plan_run(stage_cfg.output_dir, stage_cfg.train, to_yaml(stage_cfg))
    accelerator = make_accelerator(cfg.train, cfg.tracking, cfg.output_dir)
    result = None
    for stage_cfg, method_cls in stages:
        built = method_cls(stage_cfg, accelerator.device, accelerator.process_index, accelerator.num_processes)
        result = found.runner(accelerator, built, stage_cfg)
    accelerator.end_training()
    _release(accelerator)
    return result


def checkpoint_folder(run_dir: str, checkpoint: str = "latest") -> str:
    """The folder of a run's checkpoint: ``latest``, a ``step-NNNNNN`` name, or a folder."""
    import os

    if checkpoint == "latest":
        found = list_checkpoints(run_dir)
        if not found:
            raise UserError(f"{run_dir}/checkpoints holds no checkpoint")
        return found[-1]
    if os.path.isdir(checkpoint):
        return checkpoint
    folder = os.path.join(run_dir, "checkpoints", checkpoint)
    if not os.path.isdir(folder):
        raise UserError(f"--checkpoint: no such checkpoint: {folder}")
    return folder


def export_checkpoint(cfg, run_dir: str, checkpoint: str, out: str) -> dict[str, str]:
    """Export ``checkpoint`` (see :func:`checkpoint_folder`) of the run in ``run_dir`` trained with ``cfg`` (its
    last stage rebuilt, the checkpoint loaded) into ``out``; kind -> path. What ``sdd.api.export`` and the
    time-to-target race run."""
    from sdd.files import check_writable_dir, remove_stale_temporaries, reporting_write_failures

    folder = checkpoint_folder(run_dir, checkpoint)
    check_writable_dir(out, "--out")
    built = entry(cfg.method).stages(cfg)[-1][1](cfg)
    load_method_checkpoint(built, folder)
    for where in {run_dir, out}:  # what killed exports left behind
        remove_stale_temporaries(where)
    with reporting_write_failures(out, "export"):
        return built.export(out)


def _release(accelerator) -> None:
    """Forget accelerate's process-wide settings after a one-process run, so the next run in the same Python
    session may choose others (mixed precision, accumulation); a launched run keeps its process group."""
    if accelerator.num_processes == 1:
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state()
        GradientState._reset_state()
