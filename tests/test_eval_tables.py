"""The seed papers' tables as sdd-eval configs: SLD's expected maximum inappropriateness (exact, by hand, and its
bootstrap), paper-layout tables whose every cell holds a number or says why, trade-off plots and grids, and cells
that equal what a run of the entry alone (or `sdd-shapes bench`) gives for the same seeds.

Runs are tiny (2 DDIM steps, 1-3 prompts per suite) and offline, as in test_eval_harness.py.
"""

import itertools
import json
import math
import re

import numpy as np
import pytest
import torch
from conftest import ROOT
from PIL import Image

from sdd.cli.eval import main
from sdd.errors import run_main
from sdd.eval import aggregate as agg
from sdd.eval.suites import EntryImages, ExpectedMax, aggregate_i2p

CONFIGS = ROOT / "configs" / "eval"
SLD_TINY = str(CONFIGS / "table_sld_i2p_tiny.yaml")
NUDITY_TINY = str(CONFIGS / "table_sdd_nudity_tiny.yaml")
I2P_TINY = str(CONFIGS / "table_sdd_i2p_tiny.yaml")
SHAPES = str(CONFIGS / "table_shapes.yaml")
SMALL = ["generation.num_inference_steps=2", "stats.n_resamples=50", "report.grid_prompts=2", "report.grid_seeds=2"]


# ---------------------------------------------------------------------------------- expected max, by hand


def brute_force(values, n):
    """Mean and population std of the max over every n-subset (each equally likely)."""
    maxima = [max(c) for c in itertools.combinations(values, n)]
    return float(np.mean(maxima)), float(np.std(maxima))


def test_expected_max_by_hand():
    # N = 5 per-prompt rates, draws of n = 2: P(max = v_i) = C(i-1, 1) / C(5, 2) = (i-1)/10 for i = 2..5, so
    # the max is 0.1, 0.2, 0.5, 1.0 with probabilities 0.1, 0.2, 0.3, 0.4 (v_1 = 0 is never the max of two).
    # mean = 0.01 + 0.04 + 0.15 + 0.4 = 0.6; E[max^2] = 0.001 + 0.008 + 0.075 + 0.4 = 0.484;
    # var = 0.484 - 0.36 = 0.124
    mean, std, used = agg.expected_max([0.5, 0.0, 1.0, 0.2, 0.1], 2)  # order does not matter
    assert (mean, used) == (pytest.approx(0.6), 2) and std == pytest.approx(math.sqrt(0.124))
    assert (mean, std) == pytest.approx(brute_force([0.0, 0.1, 0.2, 0.5, 1.0], 2))
    # ties: [0, 0, 1, 1], n = 2: of the 6 pairs only (0, 0) has max 0 -> mean 5/6, std sqrt(5/6 * 1/6)
    mean, std, _ = agg.expected_max([1, 0, 1, 0], 2)
    assert mean == pytest.approx(5 / 6) and std == pytest.approx(math.sqrt(5 / 36))
    # n = 1: the max of one draw is a uniformly drawn value: the mean and population std of the values
    assert agg.expected_max([0.1, 0.4, 0.7], 1)[:2] == pytest.approx((0.4, float(np.std([0.1, 0.4, 0.7]))))
    # fewer values than a draw takes: all of them are drawn, the max is certain
    assert agg.expected_max([0.3, 0.9, 0.5], 25) == (pytest.approx(0.9), 0.0, 3)
    assert math.isnan(agg.expected_max([], 25)[0]) and agg.expected_max([], 25)[2] == 0
    with pytest.raises(ValueError):
        agg.expected_max([0.1], 0)
    # against every subset on a random sample, and I2P-sized inputs stay finite (C(4703, 25) ~ 1e66)
    rng = np.random.default_rng(1)
    values = list(rng.integers(0, 11, 12) / 10)
    for n in (3, 5, 11):
        assert agg.expected_max(values, n)[:2] == pytest.approx(brute_force(values, n))
    big = agg.expected_max(rng.integers(0, 11, 4703) / 10, 25)
    assert 0.0 <= big[0] <= 1.0 and big[1] >= 0.0 and big[2] == 25


def test_seeded_bootstrap_converges_to_the_exact_value():
    rng = np.random.default_rng(7)
    per_prompt = rng.integers(0, 11, 60) / 10  # 60 prompts of 10 images each
    mean, std, _ = agg.expected_max(per_prompt, 25)
    b_mean, b_std = agg.expected_max_bootstrap(per_prompt, 25, draws=20000, seed=3)
    assert abs(b_mean - mean) < 4 * std / math.sqrt(20000)  # 4 standard errors of a 20,000-draw mean
    assert b_std == pytest.approx(std, rel=0.05)
    assert agg.expected_max_bootstrap(per_prompt, 25, draws=500, seed=3) == \
        agg.expected_max_bootstrap(per_prompt, 25, draws=500, seed=3)  # seeded
    assert agg.expected_max_bootstrap([0.2, 0.7], 25, draws=10, seed=0) == (0.7, 0.0)  # all drawn


def test_expected_max_groups_images_by_prompt_by_hand():
    # prompt a: 1 of 2 flagged (0.5), b: 2 of 2 (1.0), c: 0 of 2 (0.0); a's images need not be adjacent
    flags = [1, 1, 0, 0, 1, 0]
    prompts = ["a", "b", "a", "c", "b", "c"]
    s = agg.summarize_expected_max(flags, prompts, n=2, bootstrap_draws=100, seed=0)
    # pairs of {0.5, 1.0, 0.0}: max 1.0, 1.0, 0.5 -> mean 5/6
    assert s["value"] == pytest.approx(5 / 6) and (s["prompts"], s["sample"], s["n"]) == (3, 2, 6)
    assert s["std"] == pytest.approx(float(np.std([1.0, 1.0, 0.5])))
    assert s["bootstrap"]["draws"] == 100 and abs(s["bootstrap"]["value"] - 5 / 6) < 0.1
    assert agg.format_summary(s).startswith("83.33 ± 23.57 (bootstrap ")
    few = agg.summarize_expected_max(flags, prompts, n=25)
    assert agg.format_summary(few) == "100.00 ± 0.00 (all 3)"


def test_i2p_suite_reports_expected_max_overall_and_per_category():
    recs = [{"file_name": f"{i}.png", "row": i // 2, "prompt": f"p{i // 2}", "categories": cats}
            for i, cats in enumerate([["sexual"], ["sexual"], ["sexual", "hate"], ["sexual", "hate"],
                                      ["violence"], ["violence"]])]
    flags = [1, 0, 1, 1, 0, 0]  # per prompt: p0 0.5, p1 1.0, p2 0.0
    e = EntryImages("A", recs, {"i2p": {r["file_name"]: {"flag": bool(f), "parts": {"q16": bool(f),
                                                                                      "nudenet": False}}
                                        for r, f in zip(recs, flags)}})
    out = aggregate_i2p([e], agg.Bootstrap(n_resamples=20), expmax=ExpectedMax(prompts=2))
    table = next(t for t in out["tables"] if t["name"] == "expected_max")
    assert table["metric"] == "expected_max" and list(table["columns"]) == ["overall", "hate", "violence", "sexual"]
    row = table["results"]["A"]
    assert row["overall"]["value"] == pytest.approx(5 / 6)  # as the hand example above
    assert row["sexual"]["value"] == 1.0 and row["sexual"]["std"] == 0.0  # p0, p1: the pair always holds 1.0
    assert (row["hate"]["value"], row["hate"]["sample"]) == (1.0, 1)  # one prompt: all of it
    assert row["violence"]["value"] == 0.0
    crit = out["criteria"]["Expected max. inappropriateness"]
    assert "C(i-1, 1) / C(N, 2)" in crit and "fewer than 2 prompts draws all N of them" in crit


# ------------------------------------------------------------------------------------- tables, pure


def _rate(k, n):
    return {"kind": "rate", "value": k / n, "lo": 0.0, "hi": 1.0, "n": n, "k": k}


def test_table_cells_hold_the_suite_numbers_or_say_why():
    from sdd.eval.report import paper_table
    from sdd.eval.tables import build_table

    suites = {
        "i2p": {"results": {"SD": {"inappropriate": _rate(3, 4)}, "SLD": {"inappropriate": _rate(1, 4)}},
                "tables": [{"name": "by_category", "metric": "inappropriate", "columns": {"sexual": "sexual"},
                            "results": {"SD": {"sexual": _rate(2, 2)}, "SLD": {"sexual": _rate(0, 2)}}},
                           {"name": "expected_max", "metric": "expected_max",
                            "columns": {"overall": "overall", "sexual": "sexual"},
                            "results": {"SD": {"overall": {"kind": "expected_max", "value": 0.9, "std": 0.1,
                                                           "n": 4, "sample": 2, "sample_requested": 2},
                                               "sexual": {"kind": "expected_max", "value": 1.0, "std": 0.0,
                                                          "n": 2, "sample": 1, "sample_requested": 2}},
                                        "SLD": {"overall": {"kind": "expected_max", "value": 0.5, "std": 0.5,
                                                            "n": 4, "sample": 2, "sample_requested": 2},
                                                "sexual": {"kind": "expected_max", "value": 0.0, "std": 0.0,
                                                           "n": 2, "sample": 1, "sample_requested": 2}}}}]},
        "coco": {"results": {"SD": {"clip_score": {"kind": "mean", "value": 0.27714, "lo": 0.2, "hi": 0.3, "n": 3},
                                    "lpips": {"kind": "mean", "value": math.nan, "n": 0, "base": True}},
                             "SLD": {"clip_score": {"kind": "mean", "value": 0.25, "lo": 0.2, "hi": 0.3, "n": 3},
                                     "lpips": {"kind": "mean", "value": 0.1797, "lo": 0.1, "hi": 0.2, "n": 3}}}},
    }
    table = {"name": "t", "title": "T", "rows": [], "categories": ["sexual", "hate", "overall"],
             "columns": [{"suite": "i2p", "metric": "inappropriate", "header": "IP"},
                         {"suite": "i2p", "metric": "expected_max", "header": None}]}
    out = build_table(table, suites, ["SD", "SLD", "HFI"], {"HFI": "not run: no model given for HFI"}, {})
    assert [c["key"] for c in out["columns"]][:3] == ["i2p.inappropriate@sexual", "i2p.inappropriate@hate",
                                                      "i2p.inappropriate@overall"]
    cells = out["cells"]
    assert cells["SD"]["i2p.inappropriate@sexual"]["summary"] is suites["i2p"]["tables"][0]["results"]["SD"]["sexual"]
    assert cells["SD"]["i2p.inappropriate@overall"]["text"] == "75.00"
    assert cells["SD"]["i2p.expected_max@overall"]["text"] == "90.00 ± 10.00"
    assert cells["SD"]["i2p.expected_max@sexual"]["text"] == "100.00 ± 0.00 (all 1)"
    assert cells["SD"]["i2p.inappropriate@hate"]["text"] == \
        "– (no prompt of category 'hate' among the evaluated rows)"
    assert cells["HFI"]["i2p.expected_max@sexual"]["text"] == "– (not run: no model given for HFI)"
    assert all(c["text"] for line in cells.values() for c in line.values())  # nothing blank
    md = paper_table(out)
    assert "**IP**" in md and "**Exp. max. inappropriateness (%)**" in md
    assert "| method | sexual | hate | overall |" in re.sub(" +", " ", md)

    plain = {"name": "s", "rows": ["SLD", "SD"], "categories": [],
             "columns": [{"suite": "nudity", "metric": "nude", "header": "% nude"},
                         {"suite": "coco", "metric": "fid", "header": "FID"},
                         {"suite": "coco", "metric": "lpips", "header": "LPIPS"},
                         {"suite": "coco", "metric": "clip_score", "header": "CLIP"}]}
    out = build_table(plain, suites, ["SD", "SLD"], {}, {("coco", "fid"): "not computed: no reference"})
    assert out["rows"] == ["SLD", "SD"]
    texts = {label: [c["text"] for c in line.values()] for label, line in out["cells"].items()}
    assert texts["SLD"] == ["– (not computed: suite nudity is not in suites)", "– (not computed: no reference)",
                            "0.1797", "0.2500"]
    assert texts["SD"][2] == "– (N/A: the LPIPS base (the others are measured against it))"
    assert texts["SD"][3] == "0.2771"


def test_plot_panels_by_hand(tmp_path):
    from sdd.eval import plots

    suites = {"nudity": {"columns": {"nude": "% nude (NudeNet)"},
                         "results": {"A": {"nude": {"kind": "rate", "value": 0.5, "lo": 0.25, "hi": 0.75, "n": 4}},
                                     "B": {"nude": {"kind": "rate", "value": 0.0, "lo": 0.0, "hi": 0.0, "n": 4}}}},
              "coco": {"columns": {"clip_score": "CLIP score", "lpips": "LPIPS vs A"},
                       "results": {"A": {"clip_score": {"kind": "mean", "value": 0.3, "lo": 0.2, "hi": 0.35, "n": 4},
                                         "lpips": {"kind": "mean", "value": math.nan, "n": 0, "base": True}},
                                   "B": {"clip_score": {"kind": "mean", "value": 0.2, "lo": 0.1, "hi": 0.3, "n": 4},
                                         "lpips": {"kind": "mean", "value": 0.4, "lo": 0.3, "hi": 0.5, "n": 4}}}}}
    panels = plots.panels("nudity", suites, ["A", "B"])
    assert [(p["x"], p["y"]) for p in panels] == [("nudity.nude", "coco.clip_score"), ("nudity.nude", "coco.lpips")]
    assert panels[0]["points"][0] == ("A", (50.0, 25.0, 25.0), pytest.approx((0.3, 0.1, 0.05)))
    assert [p[0] for p in panels[1]["points"]] == ["B"]  # the LPIPS base has no point
    assert panels[0]["xlabel"] == "nude (NudeNet) (%)" and panels[0]["ylabel"] == "CLIP score"
    alone = plots.panels("nudity", {"nudity": suites["nudity"]}, ["A", "B"])  # nothing retained: a dot plot
    assert len(alone) == 1 and alone[0]["y"] is None and [p[0] for p in alone[0]["points"]] == ["A", "B"]
    assert plots.panels("coco", suites, ["A", "B"]) == []
    plots.draw(panels, "t", str(tmp_path / "p.png"), ["A", "B"])
    with Image.open(tmp_path / "p.png") as im:
        assert im.format == "PNG" and im.size[0] > im.size[1] > 100


# ---------------------------------------------------------------------------------------- configs


def test_table_configs_load_and_tiny_versions_match_the_paper_ones():
    from sdd.config import load_config
    from sdd.eval.schema import EvalConfig

    def shape(path, *overrides):
        cfg = load_config(EvalConfig, str(CONFIGS / path), list(overrides))
        return cfg, ([(e.label, e.method, e.concept) for e in cfg.entries], [t for t in cfg.tables])

    for paper, tiny in [("table_sld_i2p_sd14.yaml", "table_sld_i2p_tiny.yaml"),
                        ("table_sdd_nudity_sd14.yaml", "table_sdd_nudity_tiny.yaml"),
                        ("table_sdd_i2p_sd14.yaml", "table_sdd_i2p_tiny.yaml")]:
        assert shape(paper)[1] == shape(tiny)[1], tiny
    sld, _ = shape("table_sld_i2p_sd14.yaml")
    assert [e.label for e in sld.entries] == ["SD", "SD+NEG", "SLD-weak", "SLD-medium", "SLD-strong", "SLD-max"]
    assert all(e.concept is None for e in sld.entries)  # SLD's 20-concept safety text
    assert sld.i2p.images_per_prompt == 10 and sld.i2p.expected_max_prompts == 25
    assert sld.i2p.expected_max_bootstrap == 10000 and sld.generation.num_inference_steps == 50
    assert sld.tables[0].categories[-1] == "overall" and len(sld.tables[0].categories) == 8
    rows = ["SD", "SD+NEG", "SLD-medium", "SLD-max", "SEGA", "SAFREE", "ESD-u", "ESD-x", "SDD", "UCE", "RECE", "SalUn",
            "HFI+SDD"]
    given = ["paths.sdd=a/b/sdd", "paths.esd_u=a/b/u", "paths.esd_x=a/b/x", "paths.uce=a/b/uce", "paths.rece=a/b/rece",
             "paths.salun=a/b/salun", "paths.hfi_sdd=a/b/h"]
    for name, concept, columns in [("table_sdd_nudity_sd14.yaml", "nudity", ["nude", "fid", "lpips", "clip_score"]),
                                   ("table_sdd_i2p_sd14.yaml", None,
                                    ["nude", "inappropriate", "fid", "lpips", "clip_score"])]:
        cfg, _ = shape(name, *given)
        assert [e.label for e in cfg.entries] == rows
        assert [e.model for e in cfg.entries][-7:] == ["a/b/u", "a/b/x", "a/b/sdd", "a/b/uce", "a/b/rece", "a/b/salun",
                                                       "a/b/h"]  # "for given checkpoints"
        assert {e.concept for e in cfg.entries if e.method != "sd"} == {concept}
        assert [c.metric for c in cfg.tables[0].columns] == columns
        assert shape(name)[0].entries[-1].model is None  # HFI+SDD: not given by default
    shapes, _ = shape("table_shapes.yaml")
    assert [e.label for e in shapes.entries] == ["SD", "SD+NEG", "SLD-weak", "SLD-medium", "SLD-strong", "SLD-max",
                                                  "SEGA", "SAFREE", "ESD", "SDD", "SDD+keep", "SDD-robust", "UCE",
                                                  "RECE", "SalUn", "HFI+SDD"]
    assert shapes.attacks.run == ["concept-inversion", "prompt-search", "ring-a-bell", "relearn"]
    assert [c.metric for c in shapes.tables[0].columns if c.suite == "attacks"] == shapes.attacks.run


BAD = [
    (["tables=[{name: t, columns: [{suite: i2p, metric: harm}]}]"], "error: config error: tables[0].columns[0].metric: "
     "'harm' is not a metric of i2p, expected one of ['inappropriate', 'expected_max', 'q16', 'nudenet']"),
    (["tables=[{name: t, rows: [XX], columns: [{suite: i2p, metric: inappropriate}]}]"],
     "error: config error: tables[0].rows[0]: 'XX' is not an entry label (SD, SD+NEG, SLD-weak, SLD-medium, "
     "SLD-strong, SLD-max)"),
    (["tables=[{name: t, categories: [hate], columns: [{suite: nudity, metric: nude}]}]"],
     "error: config error: tables[0].columns[0].suite: a table split by categories takes i2p columns only, got nudity"),
    (["tables=[{name: t, categories: [sexy], columns: [{suite: i2p, metric: inappropriate}]}]"],
     "error: config error: tables[0].categories[0]: unknown category 'sexy', expected one of ['hate', 'harassment', "
     "'violence', 'self-harm', 'sexual', 'shocking', 'illegal activity', 'overall']"),
    (["i2p.per_category=0"], "error: config error: i2p.per_category: must be >= 1 or null, got 0"),
    (["paths.sd=null"], "error: config error: entries: every entry's model is null (not given): give at least one "
     "model"),
]


@pytest.mark.parametrize("overrides,line", BAD, ids=[b[0][0][:40] for b in BAD])
def test_bad_table_config_is_one_line_and_writes_nothing(tmp_path, capsys, overrides, line):
    with pytest.raises(SystemExit) as exit_info:
        run_main(main, ["--config", SLD_TINY, f"out={tmp_path / 'o'}", *overrides])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == line and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_every_table_key_is_documented():
    import dataclasses

    import sdd.eval.schema as schema

    for cls, prefix in [(schema.TableConfig, "tables[]."), (schema.TableColumnConfig, "tables[].columns[].")]:
        for f in dataclasses.fields(cls):
            assert f"`{prefix}{f.name}`" in schema.__doc__, f.name


# ------------------------------------------------------------------------------------------- whole runs


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Diffusers folders standing in for the ESD-u, ESD-x, SDD and HFI+SDD exports (the tiny model, other weights)."""
    from diffusers import StableDiffusionPipeline

    from sdd.models import build_tiny_sd

    out = {}
    for seed, name in enumerate(["sdd", "esd_u", "esd_x", "hfi_sdd"], start=1):
        m = build_tiny_sd(seed=seed)
        path = tmp_path_factory.mktemp(name) / "pipeline"
        StableDiffusionPipeline(vae=m.vae, text_encoder=m.text_encoder, tokenizer=m.tokenizer, unet=m.unet,
                                scheduler=m.scheduler, safety_checker=None, feature_extractor=None,
                                requires_safety_checker=False).save_pretrained(str(path), safe_serialization=True)
        out[name] = str(path)
    return out


def _run(args):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main(args)
    finally:
        torch.set_num_threads(threads)
        from accelerate.state import PartialState

        PartialState._reset_state()


def sld_args(out, *extra):
    return ["--config", SLD_TINY, f"out={out}", *SMALL, "i2p.per_category=1", "i2p.images_per_prompt=2",
            "i2p.expected_max_prompts=3", "i2p.expected_max_bootstrap=200", "metrics.batch_size=8", *extra]


def paths_args(exports, *names):
    """paths.NAME=export for each name; the closed-form and SalUn rows stand in with the SDD and ESD exports (their
    own exports are tested in tests/test_uce.py and tests/test_salun.py)."""
    stand_in = {"uce": "sdd", "rece": "esd_x", "salun": "sdd"}
    return [f"paths.{n}={exports[stand_in.get(n, n)]}" for n in names]


@pytest.fixture(scope="module")
def sld_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sld") / "out"
    return out, _run(sld_args(out))


@pytest.fixture(scope="module")
def nudity_run(tmp_path_factory, exports, reference_dir):
    """The NSFW table with every checkpoint given (HFI+SDD too) and reference images for FID."""
    out = tmp_path_factory.mktemp("nudity") / "out"
    args = ["--config", NUDITY_TINY, f"out={out}", *SMALL,
            *paths_args(exports, "sdd", "esd_u", "esd_x", "uce", "rece", "salun", "hfi_sdd"),
            "nudity.limit=2", "nudity.images_per_prompt=1", "coco.limit=3", f"coco.reference_dir={reference_dir}",
            "metrics.batch_size=8"]
    return out, _run(args), args


def cells(report, name):
    return next(t for t in report["tables"] if t["name"] == name)


def assert_files_referenced(out, report, suites):
    md = (out / "report.md").read_text()
    for suite in suites:
        for kind in ("grids", "plots"):
            rel = f"{kind}/{suite}.png"
            assert f"]({rel})" in md, rel
            with Image.open(out / rel) as im:
                assert im.format == "PNG" and min(im.size) > 16
    return md


def test_sld_table_every_cell_filled_and_equal_to_the_suite_and_the_images(sld_run):
    out, report = sld_run
    table = cells(report, "sld_i2p")
    assert table["rows"] == ["SD", "SD+NEG", "SLD-weak", "SLD-medium", "SLD-strong", "SLD-max"]
    assert len(table["columns"]) == 2 * 8  # 2 paper columns x (7 categories + overall)
    i2p = report["suites"]["i2p"]
    by_cat = next(t for t in i2p["tables"] if t["name"] == "by_category")["results"]
    expected = next(t for t in i2p["tables"] if t["name"] == "expected_max")["results"]
    for label in table["rows"]:
        for col in table["columns"]:
            cell = table["cells"][label][col["key"]]
            assert cell["summary"] is not None and cell["reason"] is None, (label, col["key"])  # a number
            cat = col["category"]
            if col["metric"] == "expected_max":
                assert cell["summary"] == expected[label][cat]
            else:
                assert cell["summary"] == (i2p["results"][label]["inappropriate"] if cat == "overall"
                                           else by_cat[label][cat])
    # the expected max recomputed from the cached per-image flags, grouped by prompt
    folder = out / "images" / "SLD-max" / "i2p"
    meta = {json.loads(x)["file_name"]: json.loads(x) for x in (folder / "metadata.jsonl").read_text().splitlines()}
    flags = {json.loads(x)["file_name"]: json.loads(x)["result"]["flag"]
             for x in (folder / "scores.jsonl").read_text().splitlines()}
    per_prompt: dict[str, list] = {}
    for name, record in meta.items():
        per_prompt.setdefault(record["prompt"], []).append(float(flags[name]))
    rates = [np.mean(v) for v in per_prompt.values()]
    overall = table["cells"]["SLD-max"]["i2p.expected_max@overall"]["summary"]
    assert len(rates) > 3  # more prompts than a draw takes: a real draw, not "all"
    assert (overall["value"], overall["std"]) == pytest.approx(agg.expected_max(rates, 3)[:2])
    assert overall["bootstrap"]["draws"] == 200 and overall["sample"] == 3
    md = assert_files_referenced(out, report, ["i2p"])
    assert "### SLD paper, Table 2" in md and "**Inappropriate probability (%)**" in md
    assert "**Exp. max. inappropriateness (%)**" in md and "| SLD-strong |" in md
    assert "C(i-1, 2) / C(N, 3)" in i2p["criteria"]["Expected max. inappropriateness"]


def test_sld_cell_equals_a_run_of_that_entry_alone(sld_run, tmp_path):
    out, report = sld_run
    alone = _run(sld_args(tmp_path / "alone", "entries=[{label: SLD-max, model: tiny, method: sld-max}]"))
    one, full = cells(alone, "sld_i2p"), cells(report, "sld_i2p")
    assert one["rows"] == ["SLD-max"]
    for col in full["columns"]:
        assert one["cells"]["SLD-max"][col["key"]] == full["cells"]["SLD-max"][col["key"]], col["key"]


def test_nudity_table_every_cell_filled_with_given_checkpoints(nudity_run, exports):
    out, report, _ = nudity_run
    table = cells(report, "sdd_nudity")
    assert table["rows"] == ["SD", "SD+NEG", "SLD-medium", "SLD-max", "SEGA", "SAFREE", "ESD-u", "ESD-x", "SDD", "UCE",
                             "RECE", "SalUn", "HFI+SDD"]
    assert [c["header"] for c in table["columns"]] == ["% nude", "FID", "LPIPS", "CLIP"]
    assert {e["label"]: e["model"] for e in report["entries"]}["HFI+SDD"] == exports["hfi_sdd"]
    for label in table["rows"]:
        for col in table["columns"]:
            cell = table["cells"][label][col["key"]]
            if (label, col["metric"]) == ("SD", "lpips"):  # the paper's "N/A": LPIPS is measured against SD
                assert cell["summary"] is None and cell["text"].startswith("– (N/A: the LPIPS base")
            else:
                assert cell["summary"] is not None, (label, col["key"])
                assert cell["summary"] == report["suites"][col["suite"]]["results"][label][col["metric"]]
    md = assert_files_referenced(out, report, ["nudity"])
    assert "### SDD paper, NSFW removal" in md and (out / "grids" / "coco.png").exists()


def test_nudity_cells_equal_a_run_of_one_entry_alone(nudity_run, tmp_path):
    out, report, args = nudity_run
    alone = _run([*args, f"out={tmp_path / 'alone'}", "entries=[{label: SDD, model: '${paths.sdd}'}]",
                  "coco.lpips_base=null"])
    one, full = cells(alone, "sdd_nudity"), cells(report, "sdd_nudity")
    for key in ("nudity.nude", "coco.fid", "coco.clip_score"):
        assert one["cells"]["SDD"][key] == full["cells"]["SDD"][key], key
    assert one["cells"]["SDD"]["coco.lpips"]["summary"] is None  # alone, SDD is its own LPIPS base


def test_i2p_table_without_hfi_or_reference_images_says_why(tmp_path, exports):
    out = tmp_path / "out"
    report = _run(["--config", I2P_TINY, f"out={out}", *SMALL,
                   *paths_args(exports, "sdd", "esd_u", "esd_x", "uce", "rece", "salun"),
                   "nudity.limit=1", "nudity.images_per_prompt=1", "i2p.per_category=1", "i2p.images_per_prompt=1",
                   "i2p.limit=3", "coco.limit=2", "metrics.batch_size=8"])
    table = cells(report, "sdd_i2p")
    assert [c["header"] for c in table["columns"]] == ["% nude", "% harm", "FID", "LPIPS", "CLIP"]
    hfi = table["cells"]["HFI+SDD"]
    assert {c["text"] for c in hfi.values()} == {"– (not run: no model given for HFI+SDD; set paths.hfi_sdd)"}
    for label in table["rows"][:-1]:
        line = table["cells"][label]
        assert line["coco.fid"]["text"] == \
            "– (not computed: coco.reference_dir is not set (real images for FID))"
        assert all(line[k]["summary"] is not None for k in ("nudity.nude", "i2p.inappropriate", "coco.clip_score"))
        assert (line["coco.lpips"]["summary"] is None) == (label == "SD")
    assert not (out / "images" / "HFI+SDD").exists()  # listed, not run
    md = assert_files_referenced(out, report, ["nudity", "i2p"])
    assert re.search(r"\| HFI\+SDD +\| not run: no model given for HFI\+SDD; set paths.hfi_sdd +\|", md)
    assert "SD+NEG" in report["suites"]["i2p"]["results"] and "HFI+SDD" not in report["suites"]["i2p"]["results"]


def test_shapes_table_equals_sdd_shapes_bench(tmp_path, exports):
    from sdd.cli.shapes import main as shapes_main

    common = ["shapes.n=3", "shapes.n_retention=3", "shapes.seed=2", "generation.num_inference_steps=2",
              "generation.batch_size=8"]
    report = _run(["--config", SHAPES, f"out={tmp_path / 'eval'}", "paths.base=tiny", f"paths.esd={exports['esd_x']}",
                   f"paths.sdd={exports['sdd']}", f"paths.sdd_keep={exports['sdd']}",
                   f"paths.sdd_robust={exports['sdd']}", *paths_args(exports, "uce", "rece", "salun"), "attacks.run=[]",
                   *common])
    table = cells(report, "shapes")
    assert table["rows"][-1] == "HFI+SDD" and table["cells"]["HFI+SDD"]["shapes.erased_rate"]["summary"] is None
    models = ["SD=tiny", "SD+NEG=tiny@neg", "SLD-weak=tiny@sld-weak", "SLD-medium=tiny@sld-medium",
              "SLD-strong=tiny@sld-strong", "SLD-max=tiny@sld-max", "SEGA=tiny@sega", "SAFREE=tiny@safree",
              f"ESD={exports['esd_x']}", f"SDD={exports['sdd']}", f"SDD+keep={exports['sdd']}",
              f"SDD-robust={exports['sdd']}", f"UCE={exports['sdd']}", f"RECE={exports['esd_x']}",
              f"SalUn={exports['sdd']}"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        bench = shapes_main(["bench", *[x for m in models for x in ("--model", m)], "--concept", "red", "--n", "3",
                             "--n-retention", "3", "--seed", "2", "--steps", "2", "--batch-size", "8", "--quiet"])
    finally:
        torch.set_num_threads(threads)
    assert [r["label"] for r in bench["rows"]] == table["rows"][:-1]
    for row in bench["rows"]:
        for key, m in row["metrics"].items():
            got = table["cells"][row["label"]][f"shapes.{key}"]["summary"]
            assert (got["k"], got["n"], got["lo"], got["hi"]) == (m["k"], m["n"], m["lo"], m["hi"]), (row["label"], key)
    assert_files_referenced(tmp_path / "eval", report, ["shapes"])


def test_tables_and_plots_go_to_the_tracker(nudity_run, exports, reference_dir, tmp_path, monkeypatch):
    import shutil

    import sdd.tracking

    out, report, args = nudity_run
    shutil.copytree(out, tmp_path / "copy")
    logged = {"scalars": {}, "images": []}

    class FakeTracker:  # what sdd.tracking.Tracker is asked to log
        def __init__(self, accelerator, cfg, config, output_dir):
            pass

        def log_scalars(self, values, step):
            logged["scalars"].update(values)

        def log_images(self, key, images, captions, step):
            logged["images"].append(key)

        def finish(self):
            pass

    monkeypatch.setattr(sdd.tracking, "Tracker", FakeTracker)
    _run([*args, f"out={tmp_path / 'copy'}", "tracking.tracker=wandb"])
    table = cells(report, "sdd_nudity")
    assert logged["scalars"]["tables/sdd_nudity/coco.clip_score/SDD"] == \
        table["cells"]["SDD"]["coco.clip_score"]["summary"]["value"]
    assert "tables/sdd_nudity/coco.lpips/SD" not in logged["scalars"]  # N/A cells log nothing
    assert logged["images"] == ["nudity/grid", "nudity/tradeoff", "coco/grid"]


def test_wandb_offline_run_logs_the_plots(sld_run, tmp_path, monkeypatch):
    import shutil

    out, _ = sld_run
    shutil.copytree(out, tmp_path / "copy")
    monkeypatch.setenv("WANDB_MODE", "offline")
    _run(sld_args(tmp_path / "copy", "tracking.tracker=wandb"))
    runs = list((tmp_path / "copy" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    media = [str(p.relative_to(runs[0])) for p in runs[0].rglob("*.png")]
    assert any("tradeoff" in name for name in media) and any("grid" in name for name in media), media
