"""``sdd-bench``: time SDD / ESD iterations against the reference loop, split into sampling and student step.

    sdd-bench --preset tiny --method sdd --batch-sizes 1,8 --iters 20 --out PERF.json
    sdd-bench --preset sd15 --finetune xattn,full,lora --precision fp32,bf16       # on a GPU

Each case runs in a fresh subprocess (so peak memory is its own: CUDA max allocated, or the process's peak RSS on
a CPU) with the same seeds, hence the same z_T, k and concepts for every case. The **reference** case does the
original implementation's per-iteration work: prompts re-encoded every step, one latent per micro-step (B latents =
B micro-steps of gradient accumulation), batched CFG at fp32, and (SDD) a Python EMA loop over every UNet
parameter, frozen ones included, with a full second UNet; (ESD) the frozen model's two predictions as two passes.
Every other case is this framework's step with some ``perf`` switches; ratios are against the reference at the
same batch size. ``--processes 2`` runs a case data-parallel under ``accelerate launch`` (CPU: gloo).
"""

from __future__ import annotations

import argparse
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

from sdd.errors import UserError, run_main
from sdd.files import to_json

PRESETS = {"tiny": "tiny", "sd15": "sd15-random"}


@dataclass
class Case:
    name: str
    method: str = "sdd"  # sdd | esd
    preset: str = "tiny"  # tiny | sd15
    finetune: str = "xattn"
    batch_size: int = 1
    precision: str = "fp32"  # fp32 | bf16 | fp16: the run's mixed precision
    perf: dict = field(default_factory=dict)  # PerfConfig overrides
    reference: bool = False
    ddim_steps: int = 50
    processes: int = 1


# --- building a method for a case ----------------------------------------------------------------------------


def make_config(case: Case):
    from sdd.config import load_config
    from sdd.methods.esd import ESDConfig
    from sdd.methods.sdd import SDDConfig

    overrides = [
        f"model.pretrained={PRESETS[case.preset]}",
        f"finetune={case.finetune}",
        f"train.batch_size={case.batch_size}",
        f"train.mixed_precision={'no' if case.precision == 'fp32' else case.precision}",
        f"{case.method}.ddim_steps={case.ddim_steps}",
        "concepts=[nudity]",
        "tracking.tracker=none",
        "output_dir=/nonexistent-bench",
    ]
    perf = dict(case.perf)
    if case.reference:  # the original code holds a full second UNet and re-encodes prompts
        perf.update(cache_text_embeddings=False, ema="loop", share_frozen=False, student_passes="separate")
    overrides += [f"perf.{k}={to_json(v)}" for k, v in perf.items()]
    schema = SDDConfig if case.method == "sdd" else ESDConfig
    return load_config(schema, None, overrides)


# --- the reference step (the original code's per-iteration work) ---------------------------------------------


@torch.no_grad()
def _reference_sample(unet, scheduler, z, c_uncond, c, scale: float, k: int) -> torch.Tensor:
    """The original sampling loop: one latent, CFG batched as [uncond, cond], stopped after k steps."""
    from sdd.sampling import cfg as guide

    for t in scheduler.timesteps[:k]:
        eps = unet(torch.cat([z, z]), t, encoder_hidden_states=torch.cat([c_uncond, c])).sample
        z = scheduler.step(guide(eps[:1], eps[1:], scale), t, z).prev_sample
    return z


def reference_micro_step(method, model, z_T, k, idx, scale: float, sync) -> tuple[torch.Tensor, float]:
    """One latent as the original train_sdd.py / ESD script handle it: (its loss, backpropagated; the seconds
    its sampling took, prompt encoding included)."""
    import torch.nn.functional as F

    start = time.perf_counter()
    if method.cfg.method == "sdd":
        c_uncond, c_p, c_s = method.conditioning(idx)  # re-encoded every call: the reference has no cache
        z = _reference_sample(method.teacher, method.scheduler, z_T.to(c_uncond.device), c_uncond, c_p,
                              method.cfg.sdd.guidance_scale, int(k[0]))
    else:
        embeds = method.texts.get()
        c_uncond, c_s = embeds[:1], embeds[1:][idx]
        z = _reference_sample(model, method.scheduler, z_T.to(c_uncond.device), c_uncond, c_s,
                              method.cfg.esd.start_guidance, int(k[0]))
    sync()
    sampling = time.perf_counter() - start
    t = method.scheduler.timesteps[k].to(z.device)
    with torch.no_grad():
        if method.cfg.method == "sdd":
            target = model(z, t, encoder_hidden_states=c_uncond).sample
        else:
            from sdd.methods.esd import esd_target

            e_0 = method.frozen(z, t, encoder_hidden_states=c_uncond).sample
            e_p = method.frozen(z, t, encoder_hidden_states=c_s).sample
            target = esd_target(e_0, e_p, method.cfg.esd.negative_guidance)
    eps = model(z, t, encoder_hidden_states=c_s).sample
    loss = F.mse_loss(eps.float(), target.float()) * scale
    loss.backward()
    return loss.detach(), sampling


def step_parts(method, model, draws, reference: bool):
    """(sampling seconds, student seconds up to the backward, loss) of one step on ``draws``."""
    z_T, k, idx = draws
    sync = _synchronizer(z_T)
    batch = z_T.shape[0]
    if reference:  # B latents = B micro-steps of one latent
        sampling, total, start = 0.0, torch.zeros(()), time.perf_counter()
        for b in range(batch):
            loss, seconds = reference_micro_step(method, model, z_T[b : b + 1], k[b : b + 1], idx[b : b + 1],
                                                 1.0 / batch, sync)
            sampling += seconds
            total = total + loss.cpu()
        sync()
        return sampling, time.perf_counter() - start - sampling, total
    start = time.perf_counter()
    if method.cfg.method == "sdd":
        z_t, t, c_uncond, c_s = method.sample_latents(z_T, k, idx)
        sync()
        sampled = time.perf_counter()
        loss = method.student_loss(model, z_t, t, c_uncond, c_s)
    else:
        z_t, t, c, target = method.sample_latents(model, z_T, k, idx)
        sync()
        sampled = time.perf_counter()
        from sdd.methods.esd import esd_loss

        loss = esd_loss(model(z_t, t, encoder_hidden_states=c).sample, target)
    loss.backward()
    sync()
    return sampled - start, time.perf_counter() - sampled, loss.detach().cpu()


def _synchronizer(tensor):
    if tensor.is_cuda or torch.cuda.is_available():
        return torch.cuda.synchronize
    return lambda: None


# --- one case, in this process -------------------------------------------------------------------------------


def run_case(case: Case, iters: int, warmup: int, seed: int = 0) -> dict:
    from accelerate import Accelerator

    from sdd.loop import step_generator
    from sdd.methods.esd import ESDMethod
    from sdd.methods.sdd import SDDMethod
    from sdd.perf import make_optimizer

    cfg = make_config(case)
    accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision)
    build_start = time.perf_counter()
    method_cls = SDDMethod if case.method == "sdd" else ESDMethod
    method = method_cls(cfg, accelerator.device, accelerator.process_index, accelerator.num_processes)
    params = [p for p in method.model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg.train)
    model, optimizer = accelerator.prepare(method.model, optimizer)
    build_seconds = time.perf_counter() - build_start
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    sampling_times, student_times, step_times, losses = [], [], [], []
    for i in range(warmup + iters):
        draws = method.draw(i, step_generator(seed, accelerator.process_index, i))
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        start = time.perf_counter()
        with accelerator.autocast():
            sampling, _, loss = step_parts(method, model, draws, reference=case.reference)
        if cfg.train.max_grad_norm:
            accelerator.clip_grad_norm_(params, cfg.train.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        method.after_optimizer_step()
        sync()
        elapsed = time.perf_counter() - start
        if i >= warmup:
            step_times.append(elapsed)
            sampling_times.append(sampling)
            student_times.append(elapsed - sampling)  # student passes, backward, clip, optimizer, EMA
            losses.append(float(loss))
    if cuda:
        peak = torch.cuda.max_memory_allocated()
        peak_kind = "cuda_max_allocated"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        peak_kind = "process_peak_rss"
    return {
        "case": dataclasses.asdict(case),
        "process_index": accelerator.process_index,
        "num_processes": accelerator.num_processes,
        "build_seconds": round(build_seconds, 2),
        "sampling_s": _mean(sampling_times),
        "student_s": _mean(student_times),
        "step_s": _mean(step_times),
        "step_times": step_times,
        "losses": losses,
        "peak_bytes": peak,
        "peak_kind": peak_kind,
        "trainable_params": sum(p.numel() for p in params),
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
               "--main_process_port", str(port), "-m", "sdd.bench", "--worker", payload]
        if not torch.cuda.is_available():
            env.update(ACCELERATE_USE_CPU="true", GLOO_SOCKET_IFNAME=env.get("GLOO_SOCKET_IFNAME", "lo"))
    else:
        cmd = [sys.executable, "-m", "sdd.bench", "--worker", payload]
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


def default_cases(args) -> list[Case]:
    cases: list[Case] = []
    for finetune in args.finetune.split(","):
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            for precision in args.precision.split(","):
                base = dict(method=args.method, preset=args.preset, finetune=finetune, batch_size=batch,
                            precision=precision, ddim_steps=args.ddim_steps)
                tag = f"{finetune}/B{batch}/{precision}"
                if precision == "fp32":
                    cases.append(Case(name=f"reference {tag}", reference=True, **base))
                switches = EXACT_SWITCHES if args.switches == "all" else {"ours": {}}
                for name, perf in switches.items():
                    cases.append(Case(name=f"{name} {tag}", perf=perf, **base))
                if args.teacher_bf16:
                    cases.append(Case(name=f"ours+teacher-bf16 {tag}", perf={"teacher_precision": "bf16"}, **base))
                if args.compile:
                    cases.append(Case(name=f"ours+compile {tag}", perf={"compile": True}, **base))
                if args.processes > 1:
                    cases.append(Case(name=f"ours {tag} x{args.processes} procs", processes=args.processes, **base))
    return cases


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


def main(argv=None):
    parser = argparse.ArgumentParser(prog="sdd-bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--method", default="sdd", choices=["sdd", "esd"])
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--finetune", default="xattn", help="comma-separated parameter sets")
    parser.add_argument("--batch-sizes", default="1", help="comma-separated batch sizes (latents per step)")
    parser.add_argument("--precision", default="fp32", help="comma-separated: fp32, bf16, fp16")
    parser.add_argument("--ddim-steps", type=int, default=50)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--switches", default="all", choices=["all", "default"],
                        help="time every exact switch, or only the default configuration")
    parser.add_argument("--teacher-bf16", action="store_true", help="also time bf16 autocast for the sampling")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    parser.add_argument("--processes", type=int, default=1, help="also time the default case data-parallel")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of each process")
    parser.add_argument("--out", default=None, help="JSON file for the results")
    args = parser.parse_args(argv)
    if args.worker:
        return _worker(args.worker)
    if args.iters < 1 or args.warmup < 0:
        raise UserError("--iters must be >= 1 and --warmup >= 0")
    cases = default_cases(args)
    results = []
    for case in cases:
        print(f"... {case.name}", file=sys.stderr, flush=True)
        threads = args.threads
        if case.processes > 1 and not torch.cuda.is_available():
            threads = threads or max(1, (os.cpu_count() or 2) // case.processes)
        results.append(run_in_subprocess(case, args.iters, args.warmup, args.seed, threads))
    rows = summarise(results)
    table = format_rows(rows)
    print(table)
    report = {"command": "sdd-bench " + " ".join(argv if argv is not None else sys.argv[1:]), "machine": machine(),
              "iters": args.iters, "warmup": args.warmup, "rows": rows, "raw": results}
    if args.out:
        from sdd.files import write_text

        write_text(args.out, to_json(report, indent=2) + "\n")
        print(f"results: {args.out}")
    return report


def cli() -> None:
    run_main(main)


if __name__ == "__main__":
    cli()
