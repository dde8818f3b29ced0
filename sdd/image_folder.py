"""Image folders: the images of prompt rows for any model and method, as a resumable, sharded ``datasets`` folder.

What ``sdd-generate`` (``sdd.api.generate``) and ``sdd-eval`` write. Every image starts from an explicit initial
latent drawn from its own seed (row seed + image index), so the same row gives the same noise for every model and
method. The output folder is a `datasets` image folder: PNG images
and ``metadata.jsonl`` (one row per image: file_name, prompt, seed, method, settings, and the CSV's columns).
Re-running into the same folder skips images already written (resumable); with several processes
(``accelerate launch``) each generates its share of the rows, nothing twice.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
from dataclasses import dataclass, field
from typing import Any, Collection, Optional, Sequence

from sdd.errors import UserError
from sdd.files import atomic_path, check_writable_dir, reporting_write_failures, to_json, write_text
from sdd.generation import Request
from sdd.jobs import assign_units, distributed_state

METADATA = "metadata.jsonl"


@dataclass
class GenerateConfig:
    model: str = "shapes"  # 'tiny', 'shapes', a diffusers folder or hub id
    learned_embeds: Optional[str] = None
    method: str = "sd"  # sd, neg, sld, sld-weak/medium/strong/max, sega, safree
    sld_preset: Optional[str] = None  # with method=sld
    concept: Optional[str] = None  # the text a baseline steers away from (default: the method's own)
    method_settings: dict[str, Any] = field(default_factory=dict)  # override a preset's values
    prompts: Optional[str] = None  # a CSV file or a suite name (see sdd.prompts)
    prompt: list[str] = field(default_factory=list)  # prompts given directly
    seed: int = 0  # seed of rows that have none
    images_per_prompt: int = 1
    guidance_scale: float = 7.5  # for rows that have none
    num_inference_steps: int = 25
    height: Optional[int] = None
    width: Optional[int] = None
    batch_size: int = 4
    limit: Optional[int] = None  # first N rows only
    out: str = "outputs/images"


@dataclass(frozen=True)
class Job:
    index: int  # position of the image in the whole run
    file_name: str
    request: Request
    row: dict  # the prompt row's columns (written into the metadata)


def method_name(cfg: GenerateConfig) -> str:
    if cfg.method == "sld":
        if not cfg.sld_preset:
            raise UserError("method=sld needs a preset: --sld-preset weak|medium|strong|max")
        return f"sld-{cfg.sld_preset}"
    if cfg.sld_preset:
        raise UserError(f"--sld-preset is only for --method sld (got --method {cfg.method})")
    return cfg.method


def prompt_rows(cfg: GenerateConfig) -> list[dict]:
    """Rows of {prompt, seed, guidance_scale?, height?, width?, ...} from the CSV or the given prompts."""
    if cfg.prompts and cfg.prompt:
        raise UserError("give prompts either as a CSV (--prompts) or directly (--prompt), not both")
    if cfg.prompts:
        from sdd.prompts import load_suite

        rows = [
            {**r.extra, "prompt": r.prompt, "seed": r.seed, "guidance_scale": r.guidance, "height": r.height,
             "width": r.width, **({"categories": list(r.categories)} if r.categories else {})}
            for r in load_suite(cfg.prompts, limit=cfg.limit)
        ]
    elif cfg.prompt:
        rows = [{"prompt": p} for p in cfg.prompt]
    else:
        raise UserError("no prompts: give --prompts FILE.csv or --prompt TEXT")
    return rows[: cfg.limit] if cfg.limit is not None else rows


def jobs(cfg: GenerateConfig) -> list[Job]:
    return make_jobs(prompt_rows(cfg), cfg)


def make_jobs(rows: Sequence[dict], cfg: GenerateConfig) -> list[Job]:
    """One job per (row, image index): image j of row r is ``r:05d_j:02d.png`` with seed ``row seed + j``.

    A row without a seed gets ``cfg.seed + r``; without guidance/size, the config's.
    """
    out: list[Job] = []
    for r, row in enumerate(rows):
        seed = row.get("seed")
        seed = cfg.seed + r if seed is None else int(seed)
        guidance = row.get("guidance_scale")
        for j in range(cfg.images_per_prompt):
            req = Request(
                prompt=row["prompt"],
                seed=seed + j,
                guidance_scale=float(guidance) if guidance is not None else cfg.guidance_scale,
                height=int(row["height"]) if row.get("height") else cfg.height,
                width=int(row["width"]) if row.get("width") else cfg.width,
            )
            out.append(Job(len(out), f"{r:05d}_{j:02d}.png", req, {**row, "row": r, "image_index": j}))
    return out


def job_batches(all_jobs: Sequence[Job], batch_size: int) -> list[list[Job]]:
    """The batches ``sdd.generation.generate`` forms from the whole job list (consecutive jobs of one image size,
    at most ``batch_size``). An image's pixels depend slightly on the other images of its batch, so handing whole
    batches of this list to processes makes every image independent of the number of processes."""
    from sdd.generation import _batches

    return [list(all_jobs[first : first + len(chunk)])
            for first, chunk in _batches([j.request for j in all_jobs], batch_size)]


def read_metadata(out_dir: str) -> dict[str, dict]:
    """Records already written (all shards), by file name; a torn last line from a crash is ignored."""
    records: dict[str, dict] = {}
    if not os.path.isdir(out_dir):
        return records
    for name in sorted(os.listdir(out_dir)):
        if not (name == METADATA or (name.startswith("metadata.") and name.endswith(".jsonl"))):
            continue
        with open(os.path.join(out_dir, name), encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if os.path.isfile(os.path.join(out_dir, record["file_name"])):
                    records[record["file_name"]] = record
    return records


def _identity(cfg: GenerateConfig, job: Job, settings: dict) -> dict:
    """What must match for an image already on disk to count as this job's image."""
    r = job.request
    return {"prompt": r.prompt, "seed": r.seed, "guidance_scale": r.guidance_scale, "model": cfg.model,
            "method_settings": settings, "num_inference_steps": cfg.num_inference_steps}


def check_existing(cfg: GenerateConfig, all_jobs: Sequence[Job], done: dict[str, dict], settings: dict) -> None:
    for job in all_jobs:
        record = done.get(job.file_name)
        if record is None:
            continue
        want = _identity(cfg, job, settings)
        diff = [k for k, v in want.items() if record.get(k) != v]
        if diff:
            raise UserError(
                f"{cfg.out} already holds {job.file_name} from another generation run (its {diff[0]} differs: "
                f"{record.get(diff[0])!r} vs {want[diff[0]]!r}); choose another --out"
            )


def generate_jobs(model, todo: Sequence[Job], cfg: GenerateConfig, out_dir: str, shard_file: str,
                  progress: bool = True, skip: Collection[str] = ()) -> int:
    """Generate and write ``todo``; each image is renamed into place, then its metadata line appended.

    ``model`` is already loaded (and on its device). Images whose file name is in ``skip`` are generated (so the
    batch is the same as in an uninterrupted run) but not written.
    """
    from sdd.methods.inference import describe_method, generate_with_method

    method = method_name(cfg)
    settings = describe_method(method, cfg.concept, cfg.method_settings)
    shared = {"model": cfg.model, "method": method, "method_settings": settings,
              "num_inference_steps": cfg.num_inference_steps}

    def write(first: int, images) -> None:
        with open(shard_file, "a", encoding="utf-8") as meta:
            for job, image in zip(todo[first : first + len(images)], images):
                if job.file_name in skip:
                    continue
                path = os.path.join(out_dir, job.file_name)
                with reporting_write_failures(path, "image"), atomic_path(path) as tmp:
                    image.save(tmp, format="PNG")
                record = {"file_name": job.file_name, **{k: v for k, v in job.row.items() if k != "file_name"},
                          "prompt": job.request.prompt, "seed": job.request.seed,
                          "guidance_scale": job.request.guidance_scale, "height": image.height,
                          "width": image.width, **shared}
                meta.write(to_json(record, ensure_ascii=False) + "\n")
                meta.flush()

    generate_with_method(model, [j.request for j in todo], method, cfg.concept,
                         num_inference_steps=cfg.num_inference_steps, batch_size=cfg.batch_size,
                         progress=progress, settings=cfg.method_settings, on_batch=write)
    return sum(job.file_name not in skip for job in todo)


def merge_metadata(out_dir: str) -> int:
    """Fold the per-process metadata files into one ``metadata.jsonl`` in job order."""
    records = read_metadata(out_dir)
    ordered = sorted(records.values(), key=lambda r: r["file_name"])
    write_text(os.path.join(out_dir, METADATA), "".join(to_json(r, ensure_ascii=False) + "\n" for r in ordered))
    for name in os.listdir(out_dir):
        if name.startswith("metadata.") and name.endswith(".jsonl") and name != METADATA:
            os.remove(os.path.join(out_dir, name))
    return len(ordered)


def run(cfg: GenerateConfig, progress: bool = True) -> dict:
    from sdd.methods.common import load_base
    from sdd.methods.inference import describe_method

    settings = describe_method(method_name(cfg), cfg.concept, cfg.method_settings)
    all_jobs = jobs(cfg)
    state = distributed_state()
    check_writable_dir(cfg.out, "out")
    os.makedirs(cfg.out, exist_ok=True)
    done = read_metadata(cfg.out)
    check_existing(cfg, all_jobs, done, settings)
    # whole batches go to processes: an image's pixels depend (slightly) on its batch, so the same batches,
    # whatever the number of processes, give the same images; a batch with a missing image is redone whole
    batches = job_batches(all_jobs, cfg.batch_size)
    owners = assign_units([len(b) for b in batches], state.num_processes)
    todo = [j for b, owner in zip(batches, owners) if owner == state.process_index
            and any(j.file_name not in done for j in b) for j in b]
    if todo:
        model = load_base(cfg.model, None, state.device, cfg.learned_embeds)
        shard = os.path.join(cfg.out, f"metadata.rank{state.process_index}.jsonl")
        generate_jobs(model, todo, cfg, cfg.out, shard, progress=progress and state.is_main_process, skip=done)
    state.wait_for_everyone()
    summary = {"images": len(all_jobs), "generated": 0, "skipped": 0}
    if state.is_main_process:
        total = merge_metadata(cfg.out)
        skipped = sum(j.file_name in done for j in all_jobs)
        summary = {"images": total, "generated": len(all_jobs) - skipped, "skipped": skipped, "out": cfg.out,
                   "method": method_name(cfg), "model": cfg.model}
        run_info = {"config": dataclasses.asdict(cfg), "method": method_name(cfg), "processes": state.num_processes,
                    "python": platform.python_version()}
        write_text(os.path.join(cfg.out, "generation.json"), to_json(run_info, indent=2) + "\n")
    state.wait_for_everyone()
    return summary
