"""sdd-bench drives only the Method protocol: it times a method defined here, reads only what the protocol names,
and gets the phases the method marks; the reference case runs as configuration."""

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator

from sdd import speed, timing
from sdd.config import TrainConfig
from sdd.loop import OPTIONAL_HOOKS


class LineFit:
    """A method that is nothing like SDD: fit y = x1 + x2 + x3 with a linear layer."""

    def __init__(self):
        torch.manual_seed(0)
        self.model = torch.nn.Linear(3, 1)

    def compute_loss(self, model, micro_step, generator):
        x = torch.randn(16, 3, generator=generator)
        with timing.region("targets"):
            y = x.sum(1, keepdim=True)
        return F.mse_loss(model(x), y), {}

    def export(self, output_dir):
        return {}


class ProtocolOnly:
    """Passes on what the Method protocol names and fails the test on anything else the benchmark reads."""

    ALLOWED = {"model", "compute_loss", "export", *OPTIONAL_HOOKS}

    def __init__(self, inner):
        object.__setattr__(self, "_inner", inner)

    def __getattr__(self, name):
        if name not in self.ALLOWED:
            raise AssertionError(f"the benchmark read {name!r}, which the Method protocol does not name")
        return getattr(object.__getattribute__(self, "_inner"), name)


@pytest.mark.parametrize("accumulation", [1, 2])
def test_a_method_defined_here_is_timed_through_the_protocol(accumulation):
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accumulation)
    train = TrainConfig(steps=20, lr=0.1, gradient_accumulation_steps=accumulation, max_grad_norm=None)
    method = LineFit()
    result = speed.time_steps(accelerator, ProtocolOnly(method), train, iters=12, warmup=1)
    assert len(result["step_times"]) == 12 and result["step_s"] > 0
    assert set(result["regions_s"]) == {"targets"} and 0 < result["regions_s"]["targets"] < result["step_s"]
    # the loop's optimizer really stepped: the fit approaches y = x1 + x2 + x3
    assert sum(result["losses"][-3:]) < 0.5 * sum(result["losses"][:3])
    assert result["trainable_params"] == 4


def test_regions_cost_nothing_outside_a_benchmark():
    with timing.region("sampling"):
        pass
    with timing.collect() as seconds:
        with timing.region("a"):
            with timing.collect() as inner:
                with timing.region("b"):
                    pass
    assert set(seconds) == {"a", "b"} and set(inner) == {"b"} and seconds["a"] >= seconds["b"]


def test_the_reference_case_is_configuration():
    cfg = speed.make_config(speed.Case(name="r", method="esd", reference=True, batch_size=3, ddim_steps=4))
    assert (cfg.train.batch_size, cfg.train.gradient_accumulation_steps) == (1, 3)  # B latents, B micro-steps
    assert cfg.perf.frozen_passes == "separate" and cfg.perf.cache_text_embeddings is False
    result = speed.run_case(speed.Case(name="r", reference=True, batch_size=2, ddim_steps=3), iters=1, warmup=0)
    assert result["sampling_s"] > 0 and result["student_s"] > 0 and len(result["losses"]) == 1


def test_the_sdxl_preset_is_sdxl_random_and_switches_can_be_named():
    from sdd.errors import UserError

    chosen = speed.cases("sdd", "sdxl", ("xattn", "lora"), (1,), ("bf16",),
                         switches="ours,ours+grad-checkpointing")
    assert [c.name for c in chosen] == ["ours xattn/B1/bf16", "ours+grad-checkpointing xattn/B1/bf16",
                                        "ours lora/B1/bf16", "ours+grad-checkpointing lora/B1/bf16"]
    cfg = speed.make_config(chosen[1])
    assert cfg.model.pretrained == "sdxl-random" and cfg.train.mixed_precision == "bf16"
    assert cfg.perf.gradient_checkpointing is True and cfg.finetune == "xattn"
    assert cfg.sdd.resolution is None  # the model's own: sdxl-random's 1024 px (tests/test_models.py)
    assert [c.name for c in speed.cases(switches="default")] == ["reference xattn/B1/fp32", "ours xattn/B1/fp32"]
    with pytest.raises(UserError, match="unknown ours\\+nothing"):
        speed.cases(switches="ours,ours+nothing")


def test_every_bench_line_of_the_performance_script_builds_its_configs():
    """scripts/performance.sh's sdd-bench calls (cpu and gpu, the SDXL rows included) parse, and every case they
    would run resolves to a config, without building a model."""
    import pathlib
    import shlex

    from sdd.cli.bench import parser

    script = (pathlib.Path(__file__).parents[1] / "scripts" / "performance.sh").read_text().replace("\\\n", " ")
    calls = [shlex.split(line.split("sdd-bench\"", 1)[1]) for line in script.splitlines() if "sdd-bench\"" in line]
    assert len(calls) == 8
    presets = set()
    for argv in calls:
        a = parser().parse_args(argv)
        chosen = speed.cases(a.method, a.preset, tuple(a.finetune.split(",")),
                             tuple(int(b) for b in a.batch_sizes.split(",")), tuple(a.precision.split(",")),
                             a.ddim_steps, a.switches, a.teacher_bf16, a.compile, a.processes)
        for case in chosen:
            assert speed.make_config(case).model.pretrained == speed.PRESETS[a.preset]
        presets.add(a.preset)
        if a.preset == "sdxl":
            assert {c.precision for c in chosen} == {"bf16"} and {c.batch_size for c in chosen} == {1}
    assert presets == {"tiny", "sd15", "sdxl"}


@pytest.mark.parametrize("method, finetune", [("sdd", "xattn"), ("sdd", "lora"), ("esd", "xattn")])
def test_sdxl_preset_cases_run_a_step(narrow_sdxl_random, method, finetune):
    """The SDXL rows' configuration (bf16, batch 1, gradient checkpointing) runs through the benchmark on
    sdxl-random's code, narrowed to 64 px: the model's default resolution sets the latents."""
    case = speed.Case(name="x", method=method, preset="sdxl", finetune=finetune, precision="bf16", ddim_steps=3,
                      perf={"gradient_checkpointing": True})
    result = speed.run_case(case, iters=1, warmup=0)
    assert len(result["losses"]) == 1 and torch.isfinite(torch.tensor(result["losses"])).all()
    assert result["trainable_params"] > 0 and result["sampling_s"] > 0
