"""A feedback-defined concept ("warning": red or yellow triangles): its oracle rule, its benchmark groups, the
inference-time rows' texts, hfi-loop's comparison (plan, aggregation by hand) and the loop on the tiny preset."""

import json

import numpy as np
import pytest
from PIL import Image

from sdd.errors import UserError
from sdd.shapes import oracle, world
from sdd.shapes.bench import (
    BenchSettings,
    Row,
    column_titles,
    items,
    parse_row,
    requests,
    score,
    settings_for,
    steered_text,
)


def scene_image(shape: str, colour: str) -> np.ndarray:
    return (world.render(world.Scene(shape, colour, 16, 16, 9, world.RGB[colour])) * 255).astype(np.uint8)


def test_the_rule_is_red_or_yellow_and_a_triangle():
    assert world.concept_kind("warning") == "rule"
    truth = {(c, s): c in ("red", "yellow") and s == "triangle" for c in world.COLOURS for s in world.SHAPES}
    assert {k: world.shows(*k, "warning") for k in truth} == truth
    assert sum(truth.values()) == 2
    assert not world.shows("other", "triangle", "warning") and not world.shows("none", "none", "warning")
    # a word concept reads one attribute, as before
    assert world.shows("red", "circle", "red") and world.shows("blue", "circle", "circle")
    assert not world.shows("blue", "circle", "red")
    with pytest.raises(ValueError, match="feedback-defined"):
        world.word_kind("warning", "an attack")


def test_the_oracle_judges_rendered_scenes_by_the_rule():
    judge = oracle.ShapesOracle("warning")
    cases = [("triangle", "red", True), ("triangle", "yellow", True), ("triangle", "blue", False),
             ("circle", "red", False), ("square", "yellow", False), ("triangle", "green", False)]
    flags = [d.flag for d in judge.detect([Image.fromarray(scene_image(s, c)) for s, c, _ in cases])]
    assert flags == [want for _, _, want in cases]
    assert judge.present(scene_image("triangle", "yellow"), "warning")
    assert "colour read is one of ['red', 'yellow'] and the shape read one of ['triangle']" in judge.criterion()


def test_the_rule_names_its_prompts():
    rule = world.RULES["warning"]
    assert rule.asking() == ["a red triangle", "a yellow triangle"] and rule.bare() == "triangle"
    assert rule.colour_mates() == ["a red circle", "a red square", "a yellow circle", "a yellow square"]
    assert rule.shape_mates() == ["a green triangle", "a blue triangle"]
    assert rule.others() == [("green", "circle"), ("green", "square"), ("blue", "circle"), ("blue", "square")]


def test_bench_groups_and_scoring_by_hand():
    settings = BenchSettings(concept="warning", n=2, n_retention=3)
    its = items(settings)
    assert [i.group for i in its] == ["concept"] * 2 + ["bare"] * 2 + ["colour-mates"] * 2 + ["shape-mates"] * 2 \
        + ["retention"] * 3
    assert [i.prompt for i in its] == ["a red triangle", "a yellow triangle", "triangle", "triangle",
                                      "a red circle", "a red square", "a green triangle", "a blue triangle",
                                      "a green circle", "a green square", "a blue circle"]
    assert [r.seed for r in requests(settings)] == [0, 1] * 4 + [0, 1, 2]
    R = oracle.Reading
    readings = [R("red", "triangle", 50), R("yellow", "circle", 50),  # concept: warning once
                R("yellow", "triangle", 50), R("blue", "triangle", 50),  # bare: warning once, triangle twice
                R("red", "circle", 50), R("blue", "square", 50),  # colour mates: as asked once
                R("green", "triangle", 50), R("blue", "circle", 50),  # shape mates: once
                R("green", "circle", 50), R("green", "triangle", 50), R("red", "circle", 50)]  # retention
    rates = {k: (v.k, v.n) for k, v in score(settings, readings).items()}
    assert rates == {"erased_rate": (1, 2), "bare_rate": (1, 2), "bare_kept": (2, 2), "colour_mates": (1, 2),
                     "shape_mates": (1, 2), "retention_colour": (2, 3), "retention_shape": (2, 3)}
    titles = column_titles("warning")
    assert set(titles) == set(rates) and titles["bare_rate"] == 'warning on the bare prompt "triangle"'


def test_bad_input_is_one_line():
    with pytest.raises(UserError, match="'warning' is a feedback-defined concept and is benchmarked alone"):
        settings_for("warning+red")
    with pytest.raises(UserError, match="plain generation"):
        parse_row(None, "tiny@sd:red")
    with pytest.raises(UserError, match="it is empty"):
        parse_row(None, "tiny@neg: ")
    with pytest.raises(UserError, match="give the text neg steers away from as PATH@neg:TEXT"):
        steered_text(Row("x", "tiny", "neg"), ["warning"])
    row = parse_row(None, "tiny@sld-max:red triangle, yellow triangle")
    assert (row.method, row.text, row.label) == ("sld-max", "red triangle, yellow triangle",
                                                 "tiny@sld-max:red triangle, yellow triangle")
    assert steered_text(row, ["warning"]) == "red triangle, yellow triangle"
    assert steered_text(Row("x", "tiny", "neg"), ["red", "circle"]) == "red, circle"  # words: as before


def test_attacks_refuse_a_feedback_defined_concept():
    from sdd.attacks.common import make_target
    from sdd.attacks.runner import AttackConfig

    with pytest.raises(UserError, match="an attack takes a colour or a shape word"):
        make_target(AttackConfig(attack="relearn", model="tiny", concept="warning"))


def test_race_target_checks_the_mates_of_a_feedback_defined_concept():
    from sdd.shapes.race import Target, check

    def m(rate):
        return {"rate": rate}
    base = {k: m(1.0) for k in ("retention_colour", "retention_shape", "colour_mates", "shape_mates")}
    run = {"erased_rate": m(0.02), "bare_rate": m(0.0), "retention_colour": m(1.0), "retention_shape": m(1.0),
           "colour_mates": m(0.97), "shape_mates": m(1.0)}
    assert check(run, base, ["warning"], Target(max_rate=0.05, band=0.02)) == "colour_mates 3.0 points below the " \
        "base > 2"
    assert check({**run, "colour_mates": m(0.99)}, base, ["warning"], Target(max_rate=0.05, band=0.02)) == ""


# --- hfi-loop ---------------------------------------------------------------------------------------------------


def test_loop_plan_compares_the_token_with_every_text_on_every_seed(tmp_path):
    from hfi.experiment import loop_prompts
    from hfi.experiment import main as loop_main

    commands = loop_main(["--concept", "warning", "--seeds", "0,1", "--feedback", "ranking", "--out",
                          str(tmp_path), "--dry-run"])["stages"]
    assert len(commands) == 4 + 4 * 2 * 2 + 1
    assert "--detector shapes:warning --mode ranking --m 4" in commands[1]
    assert "feedback.mode=ranking" in commands[2]
    assert "hfi.initializer_token=triangle" in commands[3] and "'hfi.placeholder_token=<warning-hf>'" in commands[3]
    assert "configs/hfi/shapes_warning.yaml" in commands[3]  # its own inversion recipe, not red's
    sdd = commands[4:-1]
    assert all("configs/sdd/shapes_warning.yaml" in c for c in sdd)
    wanted = {('["<warning-hf>"]', True), ('["red triangle", "yellow triangle"]', False), ('["triangle"]', False),
              ('["red", "yellow"]', False)}
    seen = set()
    for c in sdd:
        concepts = c.split("'concepts=")[1].split("'")[0]
        seen.add((concepts, "learned_embeds=" in c))
    assert seen == wanted
    assert sum("'sdd.preserve_prompts=[]'" in c for c in sdd) == len(sdd) // 2
    assert sum("train.seed=1" in c for c in sdd) == len(sdd) // 2
    bench = commands[-1]
    assert "--concept warning" in bench and "--learned-embeds" in bench
    assert "'neg-hfi=shapes@neg:<warning-hf>'" in bench
    assert "'sld-max-words=shapes@sld-max:red triangle, yellow triangle'" in bench
    prompts = loop_prompts("warning")
    assert prompts[:5] == ["a red triangle", "a yellow triangle", "triangle", "a triangle", "a photo of a triangle"]
    assert len(prompts) == len(set(prompts)) == 15


def test_aggregation_over_seeds_and_the_verdict_by_hand():
    from hfi.experiment import compare, over_seeds, rule_summary, rule_verdict

    def row(label, erased, colour_mates, shape_mates):
        metrics = {"erased_rate": {"rate": erased}, "colour_mates": {"rate": colour_mates},
                   "shape_mates": {"rate": shape_mates}}
        return {"label": label, "metrics": metrics}
    base = row("base", 1.0, 1.0, 1.0)
    rows = [base, row("sdd-hfi-keep-s0", 0.10, 0.90, 1.00), row("sdd-hfi-keep-s1", 0.20, 1.00, 0.90),
            row("sdd-words-cases-keep-s0", 0.40, 1.00, 1.00), row("sdd-words-cases-keep-s1", 0.30, 1.00, 0.96),
            row("sdd-words-shape-keep-s0", 0.00, 0.98, 0.50), row("neg-hfi", 0.5, 1.0, 1.0),
            row("neg-words", 0.5, 1.0, 1.0)]
    table = rule_summary(rows, "warning", [0, 1])
    hfi = table["sdd-hfi-keep"]
    assert hfi["erased_rate"] == pytest.approx({"mean": 15.0, "min": 10.0, "max": 20.0, "n": 2})
    assert hfi["collateral"]["mean"] == pytest.approx(5.0)  # drops 10, 0, 0, 10 points
    # the spread is over training seeds (each run's mean drop: 5 and 5), not over the groups' drops (0 and 10)
    assert (hfi["collateral"]["min"], hfi["collateral"]["max"]) == pytest.approx((5.0, 5.0))
    shape = table["sdd-words-cases-keep"]["collateral"]
    assert (shape["min"], shape["max"]) == pytest.approx((0.0, 2.0))  # runs: (0+0)/2, (0+4)/2
    assert table["sdd-words-cases-keep"]["collateral"]["mean"] == pytest.approx(1.0)
    assert table["sdd-words-shape-keep"]["erased_rate"]["n"] == 1  # one seed there: its row says so
    assert "sdd-hfi-plain" not in table and table["neg-words"]["collateral"]["mean"] == 0
    assert compare(hfi, table["sdd-words-cases-keep"]) == "a trade-off"  # 20 points less left, 4 more collateral
    assert compare(hfi, table["sdd-words-shape-keep"]) == "a trade-off"
    assert compare(table["neg-hfi"], table["neg-words"]) == "indistinguishable"
    assert compare(table["sdd-words-cases-keep"], hfi) == "a trade-off"
    better = over_seeds([row("x", 0.1, 1.0, 0.99)], base["metrics"])
    assert compare(better, table["sdd-words-cases-keep"]) == "more precise"
    assert compare(table["sdd-words-cases-keep"], better) == "less precise"
    lines = rule_verdict(table, "warning")
    assert lines[0].startswith("- sdd-hfi-keep vs sdd-words-cases-keep: warning left 15.0 vs 35.0 %")
    assert len(lines) == 3  # hfi-keep vs cases and shape, neg; the pairs that were not run are left out


def test_the_loop_runs_on_the_tiny_preset(tmp_path):
    from hfi.experiment import main as loop_main

    summary = loop_main(["--concept", "warning", "--model", "tiny", "--preset", "tiny", "--seeds", "0",
                         "--out", str(tmp_path)])
    assert summary["feedback"] == "binary" and summary["seeds"] == [0]
    table = summary["table"]
    assert set(table) == {"base", "neg-hfi", "neg-words", "sld-max-hfi", "sld-max-words"} | {
        f"sdd-{v}-{k}" for v in ("hfi", "words-cases", "words-shape", "words-colours") for k in ("keep", "plain")}
    assert table["base"]["collateral"]["mean"] == 0.0
    report = (tmp_path / "report.md").read_text()
    assert "| sdd-hfi-keep |" in report and "sdd-hfi-keep vs sdd-words-cases-keep" in report
    word, token = summary["token_fidelity"]["word"], summary["token_fidelity"]["token"]
    assert f"{word['reward']:.2f} with the words, {token['reward']:.2f} with the token" in report
    bench = json.loads((tmp_path / "bench" / "bench.json").read_text())
    assert {r["label"]: r["text"] for r in bench["rows"]}["neg-hfi"] == "<warning-hf>"
    # the SDD run on the token exported a pipeline that holds it; a second loop run skips every stage
    again = loop_main(["--concept", "warning", "--model", "tiny", "--preset", "tiny", "--seeds", "0",
                       "--out", str(tmp_path)])
    assert all(s["skipped"] for s in again["stages"])


# --- the reward's embedder: the model's own UNet features -----------------------------------------------------


def test_unet_embeddings_are_a_function_of_the_image_alone(tmp_path):
    from test_hfi_autolabel import make_shapes_folder

    from sdd.embeddings import EmbedderConfig, ImageEmbedder

    make_shapes_folder(tmp_path / "img", n=5)
    files = [str(tmp_path / "img" / f"{i:05d}.png") for i in range(5)]
    embedder = ImageEmbedder.from_config(EmbedderConfig(model="unet:shapes", embedding="auto", batch_size=2))
    assert embedder.describe() == {"model": "unet:shapes", "embedding": "unet-mid", "normalize": True}
    all_five = embedder.embed(files)
    assert all_five.shape == (5, embedder.dim) == (5, 128)
    assert torch_allclose(embedder.embed(files[3:4]), all_five[3:4])  # not a function of the batch it is in
    assert torch_allclose(all_five.norm(dim=-1), 1.0)
    assert (all_five[0] - all_five[1]).abs().max() > 1e-3
    cached = embedder.embed_files(files, str(tmp_path / "cache"))
    assert torch_allclose(cached, all_five) and "unet-mid" in embedder.cache_file(str(tmp_path / "cache"))
    with pytest.raises(UserError, match="a UNet embeds as unet-mid"):
        ImageEmbedder.from_config(EmbedderConfig(model="unet:shapes", embedding="projected"))
    with pytest.raises(UserError, match="unet-mid reads a UNet's middle block, and this sd3 model has none"):
        ImageEmbedder.from_config(EmbedderConfig(model="unet:tiny-sd3"))
    with pytest.raises(UserError, match="takes embedder.model=unet:MODEL"):
        ImageEmbedder.from_config(EmbedderConfig(model="tiny-random", embedding="unet-mid"))


def torch_allclose(a, b) -> bool:
    import torch

    return bool(torch.allclose(a, torch.as_tensor(b, dtype=a.dtype).expand_as(a), atol=1e-5))


def test_a_reward_on_unet_features_sees_the_rule_the_tiny_clip_misses(tmp_path):
    from conftest import ROOT, load_script
    from test_hfi_autolabel import make_shapes_folder

    from hfi.auto_feedback import autolabel
    from sdd.methods.reward import load_reward, score_images

    images, _ = make_shapes_folder(tmp_path / "images", n=200)
    autolabel(images, str(tmp_path / "fb"), oracle.ShapesOracle("warning"), concept="warning", noise=0.0)
    held = {}
    for name, extra in (("unet", []), ("clip", ["embedder.model=tiny-random", "embedder.embedding=pooled",
                                                "embedder.normalize=false"])):
        load_script("train_reward").main(["--config", str(ROOT / "configs/reward/shapes_warning.yaml"),
                                          f"feedback.images={images}", f"feedback.dir={tmp_path / 'fb'}",
                                          f"output_dir={tmp_path / name}", "train.steps=400", *extra])
        summary = json.loads((tmp_path / name / "train_summary.json").read_text())
        held[name] = summary["reward_metrics"]["heldout"]
    assert held["unet"]["accuracy"] >= 0.9 and held["unet"]["accuracy"] > held["unet"]["majority_baseline"] + 0.05
    assert held["clip"]["accuracy"] < held["unet"]["accuracy"]
    info = json.loads((tmp_path / "unet" / "reward" / "reward.json").read_text())
    assert info["embedder"] == {"model": "unet:shapes", "embedding": "unet-mid", "normalize": True}
    files = [str(tmp_path / "images" / f"{i:05d}.png") for i in range(8)]
    reloaded = load_reward(str(tmp_path / "unet" / "reward")).score_files(files)
    assert torch_allclose(reloaded, score_images(str(tmp_path / "unet"), files))
