"""``sdd-bench``: the training step's speed and memory, any method, against the reference loop, in one table.

    sdd-bench --preset tiny --method sdd --batch-sizes 1,8 --iters 20 --out PERF.json
    sdd-bench --preset sd15 --finetune xattn,full,lora --precision fp32,bf16       # on a GPU
    sdd-bench --preset sdxl --finetune xattn,lora --precision bf16 --switches ours,ours+grad-checkpointing

The benchmark drives only the ``sdd.loop.Method`` protocol, through the loop's own step (``sdd.loop.Stepper``): it
builds a method from the registry (or takes any object with the protocol), times whole optimizer steps, and reads
the phases a method marks with ``sdd.timing.region`` (SDD and ESD mark their partial ``sampling``); a new method
is benchmarked with no benchmark code. Each case runs in a fresh subprocess (so peak memory is its own: CUDA max
allocated, or the process's peak RSS on a CPU) with the same seeds, hence the same z_T, k and concepts for every
case.

The **reference** case is the official implementation's per-iteration work, as configuration: prompts re-encoded
every step, one latent per micro-step (B latents = B micro-steps of gradient accumulation), batched CFG at fp32, a
full second UNet and (SDD) an EMA as a Python loop over every UNet parameter, (ESD) the frozen model's two
predictions as two passes. Every other case is this framework's step with some ``perf`` switches; ratios are
against the reference at the same batch size. ``--processes 2`` runs a case data-parallel under
``accelerate launch`` (CPU: gloo).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from sdd import timing
from sdd.files import to_json

# preset -> model.pretrained; each trains at its model's default resolution (the UNet's sample_size x the VAE factor):
# tiny 32 px, sd15 512 px (64 x 64 latents), sdxl 1024 px (128 x 128 latents)
PRESETS = {"tiny": "tiny", "sd15": "sd15-random", "sdxl": "sdxl-random"}
# the official code's choices, as perf switches (see the module docstring)
REFERENCE_PERF = {"cache_text_embeddings": False, "ema": "loop", "share_frozen": False, "student_passes": "separate",
                  "frozen_passes": "separate"}


@dataclass
class Case:
    name: str
    method: str = "sdd"  # a method of sdd.methods.registry
    preset: str = "tiny"  # tiny | sd15 | sdxl (PRESETS)
    finetune: str = "xattn"
    batch_size: int = 1  # latents per optimizer step and process
    precision: str = "fp32"  # fp32 | bf16 | fp16: the run's mixed precision
    perf: dict = field(default_factory=dict)  # PerfConfig overrides
    reference: bool = False
    ddim_steps: int = 50
    processes: int = 1
    overrides: list = field(default_factory=list)  # any further config overrides (key=value)


# --- building a method for a case ----------------------------------------------------------------------------


def make_config(case: Case):
    """The run config of ``case``: the method's schema with the case's settings."""
    from sdd.config import load_config
    from sdd.errors import UserError
    from sdd.loop import fit
    from sdd.methods.registry import entry

    if entry(case.method).runner is not fit:
        raise UserError(f"sdd-bench times optimizer steps, and {case.method} is a closed-form method (no optimizer): "
                        "its run's train_summary.json gives the edit's seconds (seconds_this_run)")
    perf = dict(case.perf)
    batch, accumulation = case.batch_size, 1
    if case.reference:  # B latents as B micro-steps of one latent, and the original code's choices
        perf.update(REFERENCE_PERF)
        batch, accumulation = 1, case.batch_size
    overrides = [
        f"model.pretrained={PRESETS[case.preset]}",
        f"finetune={case.finetune}",
        f"train.batch_size={batch}",
        f"train.gradient_accumulation_steps={accumulation}",
        f"train.mixed_precision={'no' if case.precision == 'fp32' else case.precision}",
        f"{case.method}.ddim_steps={case.ddim_steps}",
        "concepts=[nudity]",
        "tracking.tracker=none",
        "output_dir=/nonexistent-bench",
        *[f"perf.{k}={to_json(v)}" for k, v in perf.items()],
        *case.overrides,
    ]
    return load_config(entry(case.method).schema, None, overrides)


# --- timing the loop's step ----------------------------------------------------------------------------------


def time_steps(accelerator, method, train, iters: int, warmup: int, seed: int = 0) -> dict:
    """Time ``warmup + iters`` optimizer steps of ``method`` (anything with the ``sdd.loop.Method`` protocol) through
    the loop's own step, with ``train``'s batch, accumulation, clipping and optimizer. Returns the mean seconds of
    a step, of each region the method marked (``sdd.timing``), and the losses, over the last ``iters`` steps."""
    from sdd.loop import Stepper, step_generator

    stepper = Stepper(accelerator, method, train)
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    accumulation = train.gradient_accumulation_steps
    step_times, losses = [], []
    region_times: dict[str, list[float]] = {}
    for i in range(warmup + iters):
        sync()
        start = time.perf_counter()
        with timing.collect() as regions:
            total = 0.0
            for m in range(accumulation):
                micro = i * accumulation + m
                out = stepper(micro, step_generator(seed, accelerator.process_index, micro),
                              on_nonfinite=lambda *_: None)
                total += float(out.loss.detach()) / accumulation
        sync()
        elapsed = time.perf_counter() - start
        if i >= warmup:
            step_times.append(elapsed)
            losses.append(total)
            for name, seconds in regions.items():
                region_times.setdefault(name, []).append(seconds)
    return {
        "step_s": _mean(step_times),
        "step_times": step_times,
        "regions_s": {name: _mean(v) for name, v in sorted(region_times.items())},
        "losses": losses,
        "trainable_params": sum(p.numel() for p in stepper.params),
    }


# --- one case, in this process -------------------------------------------------------------------------------


def run_case(case: Case, iters: int, warmup: int, seed: int = 0) -> dict:
    from accelerate import Accelerator

    from sdd.methods.registry import entry

    cfg = make_config(case)
    accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision,
                              gradient_accumulation_steps=cfg.train.gradient_accumulation_steps)
    build_start = time.perf_counter()
    method = entry(case.method).method(cfg, accelerator.device, accelerator.process_index,
                                       accelerator.num_processes)
    build_seconds = time.perf_counter() - build_start
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    timed = time_steps(accelerator, method, cfg.train, iters, warmup, seed)
    if cuda:
        peak, peak_kind = torch.cuda.max_memory_allocated(), "cuda_max_allocated"
    else:
        peak, peak_kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process_peak_rss"
    sampling = timed["regions_s"].get("sampling", 0.0)
    return {
        "case": dataclasses.asdict(case),
        "process_index": accelerator.process_index,
        "num_processes": accelerator.num_processes,
        "build_seconds": round(build_seconds, 2),
        "sampling_s": sampling,
        "student_s": timed["step_s"] - sampling,  # the loss, backward, clip, optimizer and EMA
        **timed,
        "peak_bytes": peak,
        "peak_kind": peak_kind,
    }


def _mean(values: list[float]) -> float:
    """Every case runs the same draws (same k), so means over them compare like with like."""
    return sum(values) / len(values) if values else float("nan")


# --- the command ---------------------------------------------------------------------------------------------


def _worker(payload: str) -> None:
    spec = json.loads(payload)
    result = run_case(Case(**spec["case"]), spec["iters"], spec["warmup"], spec["seed"])
    from accelerate.utils import gather_object

    results = gather_object([result])
    if result["process_index"] == 0:
        print("BENCH-RESULT " + to_json(results), flush=True)


def run_in_subprocess(case: Case, iters: int, warmup: int, seed: int, threads: Optional[int]) -> list[dict]:
    payload = to_json({"case": dataclasses.asdict(case), "iters": iters, "warmup": warmup, "seed": seed})
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    if case.processes > 1:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
               str(case.processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(port), "-m", "sdd.speed", payload]
        if not torch.cuda.is_available():
            env.update(ACCELERATE_USE_CPU="true", GLOO_SOCKET_IFNAME=env.get("GLOO_SOCKET_IFNAME", "lo"))
    else:
        cmd = [sys.executable, "-m", "sdd.speed", payload]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH-RESULT "):
            return json.loads(line[len("BENCH-RESULT "):])
    raise RuntimeError(f"benchmark case {case.name} failed:\n{proc.stderr[-3000:]}")


def summarise(results: list[list[dict]]) -> list[dict]:
    rows = []
    for per_process in results:
        r = per_process[0]
        case = r["case"]
        step = max(p["step_s"] for p in per_process)  # data parallel: the slowest process sets the pace
        rows.append({
            "name": case["name"], "method": case["method"], "preset": case["preset"],
            "finetune": case["finetune"], "batch_size": case["batch_size"], "precision": case["precision"],
            "processes": r["num_processes"], "reference": case["reference"], "perf": case["perf"],
            "sampling_ms": 1000 * r["sampling_s"], "student_ms": 1000 * r["student_s"], "step_ms": 1000 * step,
            "it_per_s": 1.0 / step, "latents_per_s": case["batch_size"] * r["num_processes"] / step,
            "peak_gib": max(p["peak_bytes"] for p in per_process) / 2**30, "peak_kind": r["peak_kind"],
            "trainable_params": r["trainable_params"], "loss_first": r["losses"][0] if r["losses"] else None,
        })
    for row in rows:
        ref = next((x for x in rows if x["reference"] and x["batch_size"] == row["batch_size"]
                    and x["finetune"] == row["finetune"] and x["preset"] == row["preset"]
                    and x["method"] == row["method"] and x["processes"] == 1), None)
        row["x_reference"] = row["it_per_s"] / ref["it_per_s"] if ref else None
        single = next((x for x in rows if not x["reference"] and x["processes"] == 1
                       and x["perf"] == row["perf"] and x["batch_size"] == row["batch_size"]
                       and x["finetune"] == row["finetune"] and x["precision"] == row["precision"]), None)
        row["x_one_process"] = (row["latents_per_s"] / single["latents_per_s"]
                                if single and row["processes"] > 1 else None)
    return rows


def format_rows(rows: list[dict]) -> str:
    head = ["case", "B", "prec", "procs", "sampling ms", "student ms", "it/s", "latents/s", "x ref", "x 1 proc",
            "peak GiB"]
    lines = [head]
    for r in rows:
        lines.append([
            r["name"], str(r["batch_size"]), r["precision"], str(r["processes"]), f"{r['sampling_ms']:.1f}",
            f"{r['student_ms']:.1f}", f"{r['it_per_s']:.2f}", f"{r['latents_per_s']:.2f}",
            f"{r['x_reference']:.2f}" if r["x_reference"] else "-",
            f"{r['x_one_process']:.2f}" if r["x_one_process"] else "-", f"{r['peak_gib']:.2f}",
        ])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = ["| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |" for line in lines]
    out.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


EXACT_SWITCHES = {  # name -> perf overrides, each exact (same loss and gradients as the reference step)
    "ours": {},
    "ours+batched-student": {"student_passes": "batched"},
    "ours+channels-last": {"channels_last": True},
    "ours+grad-checkpointing": {"gradient_checkpointing": True},
    "ours+eager-attention": {"attention": "eager"},
}


def switch_cases(switches: str) -> dict:
    """``all``: every exact switch; ``default``: this framework's defaults only (``ours``); or a comma-separated
    list of ``EXACT_SWITCHES`` names (``ours,ours+grad-checkpointing``)."""
    from sdd.errors import UserError

    if switches == "all":
        return dict(EXACT_SWITCHES)
    if switches == "default":
        return {"ours": EXACT_SWITCHES["ours"]}
    names = [n.strip() for n in switches.split(",") if n.strip()]
    unknown = [n for n in names if n not in EXACT_SWITCHES]
    if unknown or not names:
        raise UserError(f"--switches: unknown {', '.join(unknown) or 'empty list'} (all, default, or a comma-separated "
                        f"list of: {', '.join(EXACT_SWITCHES)})")
    return {n: EXACT_SWITCHES[n] for n in names}


def cases(method: str = "sdd", preset: str = "tiny", finetunes=("xattn",), batch_sizes=(1,), precisions=("fp32",),
          ddim_steps: int = 50, switches: str = "all", teacher_bf16: bool = False, compile: bool = False,
          processes: int = 1) -> list[Case]:
    """The cases of one table: per parameter set, batch size and precision, the reference (fp32), this
    framework's step with each exact switch (``switches="all"``), its defaults only (``"default"``) or the switches
    named (``switch_cases``), and the options asked for."""
    chosen = switch_cases(switches)
    out: list[Case] = []
    for finetune in finetunes:
        for batch in batch_sizes:
            for precision in precisions:
                base = dict(method=method, preset=preset, finetune=finetune, batch_size=batch, precision=precision,
                            ddim_steps=ddim_steps)
                tag = f"{finetune}/B{batch}/{precision}"
                if precision == "fp32":
                    out.append(Case(name=f"reference {tag}", reference=True, **base))
                for name, perf in chosen.items():
                    out.append(Case(name=f"{name} {tag}", perf=perf, **base))
                if teacher_bf16:
                    out.append(Case(name=f"ours+teacher-bf16 {tag}", perf={"teacher_precision": "bf16"}, **base))
                if compile:
                    out.append(Case(name=f"ours+compile {tag}", perf={"compile": True}, **base))
                if processes > 1:
                    out.append(Case(name=f"ours {tag} x{processes} procs", processes=processes, **base))
    return out


def machine() -> dict:
    info = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        import diffusers

        info["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    return info


def run(case_list: list[Case], iters: int = 10, warmup: int = 2, seed: int = 0, threads: Optional[int] = None,
        out: Optional[str] = None, command: str = "", progress: bool = True) -> dict:
    """Every case in its own subprocess, then the table: ``{"rows": [...], "table": str, "raw": [...], ...}``."""
    from sdd.errors import UserError
    from sdd.files import write_text

    if iters < 1 or warmup < 0:
        raise UserError("--iters must be >= 1 and --warmup >= 0")
    results = []
    for case in case_list:
        if progress:
            print(f"... {case.name}", file=sys.stderr, flush=True)
        case_threads = threads
        if case.processes > 1 and not torch.cuda.is_available():
            case_threads = threads or max(1, (os.cpu_count() or 2) // case.processes)
        results.append(run_in_subprocess(case, iters, warmup, seed, case_threads))
    rows = summarise(results)
    report = {"command": command, "machine": machine(), "iters": iters, "warmup": warmup, "rows": rows,
              "table": format_rows(rows), "raw": results}
    if out:
        write_text(out, to_json(report, indent=2) + "\n")
    return report


if __name__ == "__main__":  # a case's subprocess: python -m sdd.speed PAYLOAD
    _worker(sys.argv[1])
