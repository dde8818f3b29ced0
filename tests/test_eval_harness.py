"""sdd-eval: the whole command on the tiny model, resumability, two processes = one, ShapesWorld = sdd-shapes bench.

Every run here is small (2 DDIM steps, 2-3 prompts per suite) and offline: the tiny SD model and the tiny-random
metric models are built in code; NudeNet's detector ships in its wheel.
"""

import copy
import json
import math
import os

import numpy as np
import pytest
import torch
from conftest import ROOT, run_command
from PIL import Image

from sdd.cli.eval import main
from sdd.errors import run_main
from sdd.eval import aggregate as agg
from sdd.eval.suites import EntryImages, aggregate_coco, aggregate_i2p, aggregate_nudity
from sdd.stats import bootstrap_ci

TINY = str(ROOT / "configs" / "eval" / "tiny.yaml")
ENTRIES = ("entries=[{label: SD, model: tiny}, {label: SDD, model: '${paths.sdd}'}, "
           "{label: SLD-max, model: tiny, method: sld-max, concept: nudity}]")


# ------------------------------------------------------------------------------------- aggregation by hand


def test_rates_and_means_bootstrap_over_prompts_by_hand():
    boot = agg.Bootstrap(n_resamples=200, seed=3, confidence=0.9)
    # prompt 0: 2 of 2 flagged, prompt 1: 0 of 2, prompt 2: 1 of 2 -> 3 of 6 = 0.5
    flags = [1, 1, 0, 0, 1, 0]
    rows = [0, 0, 1, 1, 2, 2]
    assert agg.cluster_means(flags, rows).tolist() == [1.0, 0.0, 0.5]
    s = agg.summarize(flags, rows, "rate", boot)
    assert (s["value"], s["k"], s["n"], s["prompts"]) == (0.5, 3, 6, 3)
    ci = bootstrap_ci([1.0, 0.0, 0.5], n_resamples=200, seed=3, confidence=0.9)  # resampled: the 3 prompts
    assert (s["lo"], s["hi"]) == (ci.lo, ci.hi)
    m = agg.summarize([0.2, 0.4, 0.9], [5, 5, 7], "mean", boot)
    assert m["value"] == pytest.approx(0.5) and "k" not in m and m["prompts"] == 2
    empty = agg.summarize([], [], "rate", boot)
    assert empty["n"] == 0 and math.isnan(empty["value"]) and agg.format_summary(empty) == "n/a"
    assert agg.format_summary({"kind": "rate", "value": 0.125, "lo": 0.05, "hi": 0.2, "n": 8}) == \
        "12.50 [5.00, 20.00]"
    assert agg.format_summary({"kind": "value", "value": 21.3481, "n": 10}) == "21.348"


def test_work_goes_to_the_least_loaded_process():
    from sdd.jobs import assign_units

    # folders of 20 images in batches of 16: unit mod 2 would give process 0 all the 16s
    assert assign_units([16, 4, 16, 4, 16, 4], 2) == [0, 1, 1, 0, 0, 1]
    assert assign_units([4, 4, 4], 1) == [0, 0, 0]
    assert assign_units([2, 2, 2, 2, 1], 3) == [0, 1, 2, 0, 1]


def test_per_category_rates_by_hand():
    boot = agg.Bootstrap(n_resamples=50)
    # a prompt may carry several categories; each category sees only its prompts' images
    flags = [1, 0, 1, 1]
    rows = [0, 1, 2, 3]
    cats = [["sexual"], ["violence", "sexual"], ["violence"], []]
    out = agg.by_category(flags, rows, cats, "rate", boot, order=["sexual", "violence", "hate"])
    assert list(out) == ["sexual", "violence", "hate"]
    assert (out["sexual"]["k"], out["sexual"]["n"]) == (1, 2)
    assert (out["violence"]["k"], out["violence"]["n"]) == (1, 2)
    assert out["hate"]["n"] == 0


def test_markdown_table_by_hand():
    from sdd.eval.report import results_table

    results = {"SD": {"nude": {"kind": "rate", "value": 0.5, "lo": 0.25, "hi": 0.75, "n": 4},
                      "lpips": {"kind": "mean", "value": math.nan, "n": 0, "base": True}},
               "SDD": {"nude": {"kind": "rate", "value": 0.0, "lo": 0.0, "hi": 0.0, "n": 4},
                       "lpips": {"kind": "mean", "value": 0.123456, "lo": 0.1, "hi": 0.15, "n": 4}}}
    assert results_table(["SD", "SDD"], {"nude": "% nude", "lpips": "LPIPS vs SD"}, results) == "\n".join([
        "| entry | % nude               | LPIPS vs SD             |",
        "|-------|----------------------|-------------------------|",
        "| SD    | 50.00 [25.00, 75.00] | base                    |",
        "| SDD   | 0.00 [0.00, 0.00]    | 0.1235 [0.1000, 0.1500] |",
    ])


def _images(label, flags, parts=None, rows=None, cats=None):
    rows = rows or list(range(len(flags)))
    records = [{"file_name": f"{i:05d}_00.png", "row": r, "categories": (cats or [[]] * len(flags))[i]}
               for i, r in enumerate(rows)]
    parts = parts or [(f, False) for f in flags]
    i2p = {rec["file_name"]: {"flag": bool(f), "parts": {"q16": bool(q), "nudenet": bool(n)}, "scores": {}}
           for rec, f, (q, n) in zip(records, flags, parts)}
    nude = {rec["file_name"]: {"flag": bool(n), "scores": {}} for rec, (_, n) in zip(records, parts)}
    return EntryImages(label, records, {"i2p": i2p, "nudenet": nude})


def test_suite_tables_by_hand():
    boot = agg.Bootstrap(n_resamples=20)
    a = _images("A", [1, 1, 0, 1], parts=[(1, 0), (0, 1), (0, 0), (1, 1)],
                cats=[["sexual"], ["sexual", "hate"], ["hate"], ["violence"]])
    b = _images("B", [0, 0, 0, 1], parts=[(0, 0), (0, 0), (0, 0), (0, 1)],
                cats=[["sexual"], ["sexual", "hate"], ["hate"], ["violence"]])
    table = aggregate_i2p([a, b], boot)
    assert table["results"]["A"]["inappropriate"]["k"] == 3 and table["results"]["A"]["q16"]["k"] == 2
    assert table["results"]["A"]["nudenet"]["k"] == 2 and table["results"]["B"]["inappropriate"]["k"] == 1
    by_cat = table["tables"][0]
    assert list(by_cat["columns"]) == ["hate", "violence", "sexual"]  # I2P's order, those present
    assert by_cat["results"]["A"]["hate"]["k"] == 1 and by_cat["results"]["A"]["hate"]["n"] == 2
    assert by_cat["results"]["B"]["violence"]["value"] == 1.0
    nude = aggregate_nudity([a, b], boot)
    assert nude["results"]["A"]["nude"]["k"] == 2 and nude["results"]["B"]["nude"]["value"] == 0.25

    # COCO: CLIP score mean, FID against the reference features, LPIPS except for the base entry
    recs = [{"file_name": f"{i}.png", "row": i} for i in range(3)]
    points = np.array([[0.0, 0.0], [1.0, 2.0], [2.0, 1.0]])
    feats = {f"{i}.png": points[i] for i in range(3)}
    base = EntryImages("SD", recs, {"clip": {f"{i}.png": {"clip_score": 0.1 * i} for i in range(3)}},
                       {"clip": feats})
    other = EntryImages("X", recs, {"clip": {f"{i}.png": {"clip_score": 0.3} for i in range(3)},
                                    "lpips": {f"{i}.png": {"lpips": v} for i, v in enumerate([0.1, 0.2, 0.6])}},
                        {"clip": {k: v + np.array([1.0, 0.0]) for k, v in feats.items()}})
    coco = aggregate_coco([base, other], boot, points, "SD")
    assert coco["results"]["SD"]["clip_score"]["value"] == pytest.approx(0.1)
    assert coco["results"]["SD"]["fid"]["value"] == pytest.approx(0.0, abs=1e-9)  # identical sets
    # shifted by 1 along x: FID = ||mu1 - mu2||^2 = 1 (same covariance)
    assert coco["results"]["X"]["fid"]["value"] == pytest.approx(1.0, abs=1e-6)
    assert coco["results"]["X"]["lpips"]["value"] == pytest.approx(0.3)
    assert coco["results"]["SD"]["lpips"].get("base") and coco["columns"]["lpips"] == "LPIPS vs SD"


# ------------------------------------------------------------------------------------------- whole runs


@pytest.fixture(scope="module")
def sdd_export(tmp_path_factory):
    """A diffusers folder standing in for an SDD export (the tiny model with other weights)."""
    from diffusers import StableDiffusionPipeline

    from sdd.models import build_tiny_sd

    m = build_tiny_sd(seed=1)
    path = tmp_path_factory.mktemp("sdd") / "pipeline"
    StableDiffusionPipeline(vae=m.vae, text_encoder=m.text_encoder, tokenizer=m.tokenizer, unet=m.unet,
                            scheduler=m.scheduler, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(str(path), safe_serialization=True)
    return str(path)


def tiny_args(out, sdd_export, reference_dir, *extra):
    return ["--config", TINY, f"out={out}", f"paths.sdd={sdd_export}", ENTRIES, "generation.num_inference_steps=2",
            "generation.batch_size=2", "nudity.limit=2", "i2p.limit=3", "i2p.images_per_prompt=2", "coco.limit=3",
            f"coco.reference_dir={reference_dir}", "metrics.batch_size=3", "stats.n_resamples=100",
            "report.grid_prompts=2", *extra]


@pytest.fixture
def one_thread():
    """Both the 1-process and the 2-process runs use one thread per process, so their numbers may be compared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Spy:
    """Records every generation call (as JSON lines in a file, so forked processes report too)."""

    def __init__(self, path, monkeypatch):
        import sdd.methods.inference

        self.path = path
        real = sdd.methods.inference.generate_with_method

        def spy(model, requests, method, concept, **kwargs):
            with open(path, "a") as f:
                for r in requests:
                    f.write(json.dumps({"pid": os.getpid(), "model": model.source, "method": method,
                                        "prompt": r.prompt, "seed": r.seed}) + "\n")
            return real(model, requests, method, concept, **kwargs)

        monkeypatch.setattr(sdd.methods.inference, "generate_with_method", spy)

    def calls(self):
        if not os.path.exists(self.path):
            return []
        return [json.loads(line) for line in open(self.path)]


def comparable(report):
    """A report without what legitimately differs between runs: timings, machine, process count, folder."""
    out = copy.deepcopy(report)
    out.pop("run")
    out["config"].pop("out")
    return json.dumps(out, sort_keys=True)  # as JSON text (the LPIPS of the base entry has no value: null)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, sdd_export, reference_dir):
    """The whole command once (1 process), shared by the tests that compare with it."""
    out = tmp_path_factory.mktemp("eval") / "out"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        report = main(tiny_args(out, sdd_export, reference_dir))
    finally:
        torch.set_num_threads(threads)
        from accelerate.state import PartialState

        PartialState._reset_state()
    return out, report


def test_whole_command_writes_the_report(first_run, sdd_export):
    out, report = first_run
    assert set(report["suites"]) == {"nudity", "i2p", "coco"}
    assert [e["label"] for e in report["entries"]] == ["SD", "SDD", "SLD-max"]
    assert report["entries"][1]["model"] == sdd_export  # ${paths.sdd}
    assert report["entries"][2]["method_settings"]["sld_guidance_scale"] == 5000.0
    # images: nudity 2 x 1, i2p 3 x 2, coco 3 x 1, for 3 entries
    assert report["run"]["images_generated"] == 3 * (2 + 6 + 3) and report["run"]["images_already_there"] == 0
    for label in ("SD", "SDD", "SLD-max"):
        i2p = report["suites"]["i2p"]["results"][label]
        assert set(i2p) == {"inappropriate", "q16", "nudenet"} and i2p["inappropriate"]["n"] == 6
        assert i2p["inappropriate"]["prompts"] == 3
        assert report["suites"]["nudity"]["results"][label]["nude"]["n"] == 2
        coco = report["suites"]["coco"]["results"][label]
        assert coco["clip_score"]["n"] == 3 and coco["fid"]["n_reference"] == 4
    assert report["suites"]["coco"]["results"]["SD"]["lpips"]["base"]
    assert report["suites"]["coco"]["results"]["SDD"]["lpips"]["n"] == 3
    cats = report["suites"]["i2p"]["tables"][0]
    assert cats["name"] == "by_category" and set(cats["columns"]) == {"violence", "self-harm"}  # rows 0-2 of I2P
    # the exact criteria of the detectors and metrics
    from sdd.detectors import NudeNet

    assert NudeNet("i2p").criterion() in report["suites"]["nudity"]["criteria"].values()
    i2p_rule = next(iter(report["suites"]["i2p"]["criteria"].values()))
    assert i2p_rule.startswith("[q16: Q16 (Schramowski") and "OR [nudenet-i2p: NudeNet" in i2p_rule
    assert set(report["suites"]["coco"]["criteria"]) == {"CLIP score", "FID-CLIP", "LPIPS"}
    assert report["smoke"] and "tiny-random" in report["smoke"][-1]
    assert report["generation"]["num_inference_steps"] == 2
    assert {"torch", "diffusers", "transformers", "nudenet", "sdd"} <= set(report["versions"])
    # files
    assert json.loads((out / "report.json").read_text())["suites"]["i2p"]["results"] == \
        json.loads(json.dumps(report["suites"]["i2p"]["results"]))
    md = (out / "report.md").read_text()
    assert md.startswith("# Smoke run") and "**Smoke run: the numbers below mean nothing.**" in md
    for header in ("| entry   | % nude (NudeNet)", "| entry   | % inappropriate (Q16 OR NudeNet) | % Q16",
                   "### % inappropriate by I2P category", "| entry   | CLIP score", "FID-CLIP (vs reference)",
                   "LPIPS vs SD", "## Generation", "## Versions", "## Run"):
        assert header in md, header
    for suite in ("nudity", "i2p", "coco"):
        assert f"![{suite}: the same prompts and seeds for every entry](grids/{suite}.png)" in md
        assert Image.open(out / "grids" / f"{suite}.png").size[0] > 0
    folder = out / "images" / "SDD" / "i2p"
    assert len((folder / "metadata.jsonl").read_text().splitlines()) == 6
    assert len((folder / "scores.jsonl").read_text().splitlines()) == 6
    assert not [n for n in os.listdir(folder) if ".rank" in n]  # per-process files merged


def test_rerun_generates_and_scores_nothing_and_gives_the_same_numbers(first_run, sdd_export, reference_dir,
                                                                       monkeypatch, tmp_path, one_thread):
    import sdd.eval.suites as suites

    out, report = first_run
    spy = Spy(tmp_path / "calls.jsonl", monkeypatch)

    def forbidden(*args, **kwargs):
        raise AssertionError("a cached image was scored again")

    for cls in (suites.DetectorScorer, suites.ClipScorer, suites.LpipsScorer):
        monkeypatch.setattr(cls, "score", forbidden)
    monkeypatch.setattr(suites.ClipScorer, "features", forbidden)
    again = main(tiny_args(out, sdd_export, reference_dir))
    assert spy.calls() == []
    assert again["run"]["images_generated"] == 0 and again["run"]["images_scored"] == 0
    assert again["run"]["images_already_there"] == report["run"]["images_generated"]
    assert comparable(again) == comparable(report)


def test_tracking_gets_the_tables_numbers_and_grids(first_run, sdd_export, reference_dir, tmp_path, monkeypatch):
    import shutil

    import sdd.tracking

    out, report = first_run
    shutil.copytree(out, tmp_path / "copy")
    logged = {"scalars": {}, "images": []}

    class FakeTracker:  # what sdd.tracking.Tracker is asked to log
        def __init__(self, accelerator, cfg, config, output_dir):
            assert cfg.tracker == "wandb" and "versions" in config

        def log_scalars(self, values, step):
            logged["scalars"].update(values)

        def log_images(self, key, images, captions, step):
            logged["images"].append(key)

        def finish(self):
            logged["finished"] = True

    monkeypatch.setattr(sdd.tracking, "Tracker", FakeTracker)
    main(tiny_args(tmp_path / "copy", sdd_export, reference_dir, "tracking.tracker=wandb"))
    scalars = logged["scalars"]
    assert scalars["nudity/nude/SDD"] == report["suites"]["nudity"]["results"]["SDD"]["nude"]["value"]
    assert scalars["i2p/by_category/violence/SD"] == \
        report["suites"]["i2p"]["tables"][0]["results"]["SD"]["violence"]["value"]
    assert "coco/lpips/SDD" in scalars and "coco/lpips/SD" not in scalars  # the base entry has no LPIPS
    assert logged["images"] == ["nudity/grid", "nudity/tradeoff", "i2p/grid", "i2p/tradeoff", "coco/grid"]
    assert logged["finished"]


def test_wandb_offline_run_is_written(first_run, sdd_export, reference_dir, tmp_path, monkeypatch):
    import shutil

    out, _ = first_run
    shutil.copytree(out, tmp_path / "copy")
    monkeypatch.setenv("WANDB_MODE", "offline")
    main(tiny_args(tmp_path / "copy", sdd_export, reference_dir, "tracking.tracker=wandb"))
    assert len(list((tmp_path / "copy" / "wandb").glob("offline-run-*"))) == 1


def test_a_lost_image_is_regenerated_bit_for_bit(first_run, sdd_export, reference_dir, tmp_path, one_thread):
    import shutil

    out, report = first_run
    copy_out = tmp_path / "copy"
    shutil.copytree(out, copy_out)
    lost = copy_out / "images" / "SLD-max" / "i2p" / "00001_00.png"
    before = lost.read_bytes()
    lost.unlink()
    again = main(tiny_args(copy_out, sdd_export, reference_dir))
    assert again["run"]["images_generated"] == 1
    assert lost.read_bytes() == before  # its batch was generated again whole, so the same pixels
    assert comparable(again) == comparable(report)


# ------------------------------------------------------------------------------------------------- shapes


def test_shapes_suite_equals_sdd_shapes_bench(tmp_path, one_thread):
    from sdd.shapes import bench, oracle

    settings = bench.BenchSettings(concept="red", n=3, n_retention=3, num_inference_steps=2, guidance_scale=5.0,
                                   seed=4, batch_size=4)
    rows = [bench.Row("SD", "tiny", "sd"), bench.Row("NEG", "tiny", "neg")]
    bench_report = bench.run(rows, settings, str(tmp_path / "bench"), progress=False)
    report = main(["--config", str(ROOT / "configs/eval/shapes.yaml"), f"out={tmp_path / 'eval'}",
                   "entries=[{label: SD, model: tiny}, {label: NEG, model: tiny, method: neg, concept: red}]",
                   "shapes.n=3", "shapes.n_retention=3", "shapes.seed=4", "generation.num_inference_steps=2",
                   "generation.batch_size=4"])
    table = report["suites"]["shapes"]
    assert table["columns"] == bench_report["columns"]
    for row in bench_report["rows"]:
        got = table["results"][row["label"]]
        assert {k: (v["k"], v["n"], v["lo"], v["hi"]) for k, v in got.items()} == \
            {k: (v["k"], v["n"], v["lo"], v["hi"]) for k, v in row["metrics"].items()}
    # not only the rates: the very pixels and the oracle's reading of every image
    for row in rows:
        folder = tmp_path / "eval" / "images" / row.label / "shapes"
        scores = {json.loads(x)["file_name"]: json.loads(x)["result"]["scores"]
                  for x in (folder / "scores.jsonl").read_text().splitlines()}
        for i, image in enumerate(row.images):
            name = f"{i:05d}_00.png"
            assert np.array_equal(np.asarray(Image.open(folder / name)), np.asarray(image))
            r = oracle.read(image)
            assert (scores[name]["colour"], scores[name]["shape"], scores[name]["pixels"]) == \
                (r.colour, r.shape, r.pixels)
    assert (tmp_path / "eval" / "grids" / "shapes.png").exists()


# ------------------------------------------------------------------------------------------- bad configs

BAD = [
    (["entries=[{label: SD, concep: x}]"], "error: config error: unknown key 'concep' (did you mean concept?)"),
    (["suite=[i2p]"], "error: config error: unknown key 'suite' (did you mean suites?)"),
    (["suites=[i2p, faces]"],
     "error: config error: suites[1]: unknown suite 'faces', expected one of ['i2p', 'nudity', 'coco', 'shapes']"),
    (["entries=[{label: SD, method: sdl}]"], "error: config error: entries[0].method: 'sdl' (SD): expected one of "
     "['sd', 'neg', 'sld-weak', 'sld-medium', 'sld-strong', 'sld-max', 'sega', 'safree']"),
    (["entries=[{label: A}, {label: A}]"], "error: config error: entries: labels must be unique, 'A' is repeated"),
    (["entries=[{label: 'S D'}]"], "error: config error: entries[0].label: 'S D' must be a folder name: letters, "
     "digits and . _ + - (no spaces or slashes)"),
    (["entries[1].model=tiny"], "error: config error: override 'entries[1].model=tiny': one item of a list cannot "
     "be set; give the whole list (entries='[...]'), or name model paths in paths.NAME and set paths.NAME=..."),
    (["paths.sdd=/no/such/pipeline"], "error: entries[1] (SDD).model: no such model folder: /no/such/pipeline"),
    (["metrics.q16_prompts=null"], "error: metrics.q16_prompts: the i2p suite needs Q16's prompt embeddings (.npy "
     "or .safetensors, see sdd/detectors.py), or tiny-random for a smoke run"),
    (["generation.batch_size=0"], "error: config error: generation.batch_size: must be >= 1"),
    (["i2p.categories=[sexal]"], "error: i2p.categories: 'sexal' is not a category of i2p (harassment, hate, "
     "illegal activity, self-harm, sexual, shocking, violence)"),
    (["coco.lpips_base=XX"], "error: config error: coco.lpips_base: 'XX' is not an entry label (SD, SDD, SLD-max)"),
    (["entries=[{label: N, method: neg, method_settings: {x: 1}}]"],
     "error: entries[0] (N): method 'neg' takes no settings, got ['x']"),
    (["metrics.nudenet_threshold=0.1"], "error: nudenet threshold 0.1: must be in [0.25, 1] (NudeNet reports no box "
     "scoring 0.25 or less)"),
]


@pytest.mark.parametrize("overrides,line", BAD, ids=[b[0][0][:40] for b in BAD])
def test_bad_config_is_one_line_and_writes_nothing(tmp_path, capsys, sdd_export, overrides, line):
    argv = ["--config", TINY, f"out={tmp_path / 'o'}", f"paths.sdd={sdd_export}", *overrides]
    with pytest.raises(SystemExit) as exit_info:
        run_main(main, argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == line and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_every_eval_config_loads():
    from sdd.config import load_config
    from sdd.eval.schema import EvalConfig

    for path in sorted((ROOT / "configs" / "eval").glob("*.yaml")):
        cfg = load_config(EvalConfig, str(path))
        assert cfg.entries and cfg.suites, path
    nudity = load_config(EvalConfig, str(ROOT / "configs/eval/sdd_nudity_sd14.yaml"))
    assert nudity.nudity.images_per_prompt * 50 == 5000 and nudity.generation.num_inference_steps == 25
    assert [e.label for e in nudity.entries] == ["SD-1.4", "SD+NEG", "SLD-medium", "SLD-max", "SEGA", "ESD-u-3",
                                                 "ESD-x-3", "SDD"]
    i2p = load_config(EvalConfig, str(ROOT / "configs/eval/sdd_i2p_coco_sd14.yaml"), ["paths.sdd=x/y/z"])
    assert i2p.i2p.images_per_prompt == 10 and i2p.entries[-1].model == "x/y/z" and i2p.coco.lpips_base == "SD-1.4"


def test_every_config_key_is_documented():
    import dataclasses

    import sdd.eval.schema as schema

    def keys(cls, prefix=""):
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if dataclasses.is_dataclass(default):
                yield from keys(type(default), f"{prefix}{f.name}.")
            else:
                yield f"{prefix}{f.name}"
        if cls is schema.EvalConfig:
            yield from keys(schema.EntryConfig, "entries[].")

    missing = [k for k in keys(schema.EvalConfig) if f"`{k}`" not in schema.__doc__]
    assert missing == []


def test_the_module_reports_a_user_error_without_traceback(tmp_path):
    import sys

    code, _, stderr = run_command([sys.executable, "-m", "sdd.eval.harness", "--config", TINY, f"out={tmp_path}/o",
                                   "generation.num_inference_stepz=2"], timeout=120,
                                  env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert code == 2
    assert stderr.strip() == ("error: config error: unknown key 'generation.num_inference_stepz' "
                              "(did you mean generation.num_inference_steps?)")


@pytest.mark.slow
def test_accelerate_launch_with_two_processes_gives_the_same_report(first_run, sdd_export, reference_dir, tmp_path):
    """The real command line: `accelerate launch` with two CPU processes (gloo), as in the README."""
    import socket
    import sys

    from sdd.files import to_json

    report = json.loads(to_json(first_run[1]))  # as the file holds it (strict JSON), as the other run's is read
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "launch"
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(port), "-m", "sdd.eval.harness", *tiny_args(out, sdd_export, reference_dir)]
    code, stdout, stderr = run_command(cmd, env=env, timeout=600)
    assert code == 0, stderr[-3000:]
    two = json.loads((out / "report.json").read_text())
    assert two["run"]["machine"]["processes"] == 2 and len(two["run"]["per_process"]) == 2
    assert all(p["generated"] > 0 and p["scored"] > 0 for p in two["run"]["per_process"])  # both worked
    # each image generated once: the shares add up to the one-process count, and every file is there once
    assert sum(p["generated"] for p in two["run"]["per_process"]) == report["run"]["images_generated"]
    for label in ("SD", "SDD", "SLD-max"):
        lines = (out / "images" / label / "i2p" / "metadata.jsonl").read_text().splitlines()
        assert sorted(json.loads(x)["file_name"] for x in lines) == \
            [f"{r:05d}_{j:02d}.png" for r in range(3) for j in range(2)]
    assert comparable(two) == comparable(report)
    assert stdout.count("report: ") == 1  # printed by the main process only
