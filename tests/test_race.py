"""Time to a target erasure (``sdd-shapes race``): the target check by hand, and a race on the tiny model that
trains, judges checkpoints in order, stops at the first that meets the target, resumes without retraining."""

import json
import os

import pytest

from sdd.errors import UserError
from sdd.shapes import race as racing
from sdd.shapes.bench import settings_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rate(k, n):
    return {"rate": k / n, "k": k, "n": n, "lo": 0.0, "hi": 1.0}


BASE = {"retention_colour": rate(191, 192), "retention_shape": rate(190, 192)}


def metrics(red, colour, shape, kept=96):
    return {"erased_rate": rate(red, 96), "kept": rate(kept, 96), "bare_rate": rate(0, 96),
            "retention_colour": rate(colour, 192), "retention_shape": rate(shape, 192)}


def test_the_target_by_hand():
    t = racing.Target(max_rate=0.05, band=0.01)
    assert racing.check(metrics(4, 190, 189), BASE, ["red"], t) == ""  # 4/96 = 4.2 %; 0.52 points each
    # 5/96 = 5.2 % misses; 189/192 is 1.04 points below 191/192, past a 1-point band
    why = racing.check(metrics(5, 189, 190), BASE, ["red"], t)
    assert "red 0.052 > 0.05" in why and "retention_colour 1.0 points below the base > 1" in why
    assert "retention_shape" not in why
    assert racing.check(metrics(0, 189, 190), BASE, ["red"], racing.Target(band=0.02)) == ""
    assert "kept 0.938 < 0.95" in racing.check(metrics(0, 191, 190, kept=90), BASE, ["red"],
                                                racing.Target(min_kept=0.95))
    several = {"erased_rate:red": rate(0, 96), "kept:red": rate(96, 96), "erased_rate:circle": rate(6, 96),
               "kept:circle": rate(96, 96), "retention_colour": rate(191, 192), "retention_shape": rate(190, 192)}
    assert racing.check(several, BASE, ["red", "circle"], racing.Target()) == "circle 0.062 > 0.05"


@pytest.fixture
def tiny_configs():
    from sdd.api import run_config

    def make(steps):
        return run_config(os.path.join(ROOT, "configs", "sdd", "tiny.yaml"),
                          [f"train.steps={steps}", "sdd.ddim_steps=4", "concepts=[red]"])
    return [("slow", make(4)), ("fast", make(2))]


def small_settings():
    return settings_for("red", n=2, n_retention=2, num_inference_steps=2, guidance_scale=3.0, seed=0, batch_size=8)


def test_a_race_on_the_tiny_model_stops_at_the_target_and_resumes(tiny_configs, tmp_path, monkeypatch):
    out = str(tmp_path / "race")
    everything = racing.Target(max_rate=1.0, band=1.0)  # met by the first checkpoint
    report = racing.race(tiny_configs, "red", [0], everything, 2, small_settings(), out, progress=False,
                         log=lambda _: None)
    slow, fast = report["rows"]
    assert [s["steps"] for s in slow["seeds"]] == [2] and [s["steps"] for s in fast["seeds"]] == [2]
    for row in report["rows"]:  # the seconds are the checkpoint's own
        seed = row["seeds"][0]
        state = json.load(open(os.path.join(seed["run"], "checkpoints", "step-000002", "trainer_state.json")))
        assert seed["seconds"] == state["seconds"] > 0
        cached = json.load(open(os.path.join(seed["run"], "race.json")))["points"]
        assert list(cached) == ["step-000002"]  # judged up to the first that met the target, not step 4
    assert slow["ratio"] == 1.0 and slow["run_ratio"] == 1.0
    slow_run = json.load(open(os.path.join(slow["seeds"][0]["run"], "checkpoints", "step-000004",
                                           "trainer_state.json")))["seconds"]
    assert slow["seeds"][0]["run_seconds"] == slow_run > slow["seeds"][0]["seconds"]  # the whole run: 4 steps
    assert fast["run_ratio"] == round(slow_run / fast["seeds"][0]["run_seconds"], 2)
    assert fast["ratio"] == round(slow["seeds"][0]["seconds"] / fast["seeds"][0]["seconds"], 2)
    with open(os.path.join(out, "race.md")) as f:
        assert "| fast | 0 | 2 |" in f.read()

    # again, with an unreachable target: nothing is trained again, step 2 is not judged again, the rest is
    def no_training(cfg):
        raise AssertionError("trained again")

    judged = []
    real_judge = racing._judge
    monkeypatch.setattr(racing.registry, "train", no_training)
    monkeypatch.setattr(racing, "_judge", lambda cfg, run, folder, *a: judged.append(os.path.basename(folder))
                        or real_judge(cfg, run, folder, *a))
    never = racing.Target(max_rate=-1.0)
    report = racing.race(tiny_configs, "red", [0], never, 2, small_settings(), out, progress=False, log=lambda _: None)
    assert judged == ["step-000004"]  # slow's last; fast has only step 2
    slow, fast = report["rows"]
    assert slow["seeds"][0]["steps"] is None and slow["ratio"] is None and fast["ratio"] is None
    assert slow["seeds"][0]["point"]["step"] == 4 and "red" in slow["seeds"][0]["point"]["why_not"]
    assert "not reached" in racing.format_report(report)


def test_race_refuses_what_it_cannot_race(tiny_configs, tmp_path):
    with pytest.raises(UserError, match="two or more"):
        racing.race(tiny_configs[:1], "red", [0], racing.Target(), 2, small_settings(), str(tmp_path))
    with pytest.raises(UserError, match="share the label"):
        racing.race([tiny_configs[0], tiny_configs[0]], "red", [0], racing.Target(), 2, small_settings(),
                    str(tmp_path))
    from sdd.api import run_config

    uce = run_config(os.path.join(ROOT, "configs", "uce", "shapes_red.yaml"))
    with pytest.raises(UserError, match="closed-form"):
        racing.race([tiny_configs[0], ("uce", uce)], "red", [0], racing.Target(), 2, small_settings(), str(tmp_path))


def test_a_checkpoint_that_misses_on_the_concept_is_not_judged_on_retention(tiny_configs, tmp_path, monkeypatch):
    """The judge runs in two stages: the concept's groups, then retention only where those meet the target; the two
    stages together are the full benchmark (the same seeds per group, so the same rates). A checkpoint judged in the
    first stage only is completed when a later target or a curve needs its retention."""
    from sdd.shapes import bench

    runs = []
    real_run = bench.run
    monkeypatch.setattr(racing.bench, "run", lambda rows, settings, *a, **k: runs.append((settings.n,
                        settings.n_retention)) or real_run(rows, settings, *a, **k))
    settings = small_settings()
    base = {"retention_colour": rate(1, 2), "retention_shape": rate(1, 2)}
    cfg = tiny_configs[1][1]

    def lane(label, target, curve=False):
        runs.clear()
        return racing.run_lane(cfg, label, 0, base, settings, target, 2, str(tmp_path), curve=curve, progress=False,
                               log=lambda _: None)

    never, everything = racing.Target(max_rate=-1.0), racing.Target(max_rate=1.0, band=1.0)
    missed = lane("a", never)
    assert runs == [(2, 0)]  # the concept's groups only
    point = missed.points[0]
    assert not point.met and "red" in point.why_not and "retention_colour" not in point.metrics
    assert point.metrics["erased_rate"]["n"] == 2 and point.metrics["bare_rate"]["n"] == 2
    from dataclasses import replace

    report = racing.summarise([missed, replace(missed, label="b")], ["a", "b"], [0], base, settings, never, 2)
    row = next(line for line in racing.format_report(report).splitlines() if line.startswith("| a | 0 |"))
    assert row.endswith("/2 | – | – |")  # its rate on the prompts asking, and empty retention columns
    assert not lane("a", never).points[0].met and runs == []  # judged before: not again
    completed = lane("a", everything)
    assert runs == [(0, 2)] and completed.points[0].met  # the first stage meets this target: retention is added
    cached = json.load(open(os.path.join(completed.run_dir, "race.json")))["points"]["step-000002"]
    assert cached == completed.points[0].metrics and cached["retention_colour"]["n"] == 2

    lane("b", never)
    curve = lane("b", never, curve=True)
    assert runs == [(0, 2)] and "retention_colour" in curve.points[0].metrics  # a curve shows every column

    staged = lane("c", everything)
    assert runs == [(2, 0), (0, 2)] and staged.points[0].met
    folder = os.path.join(staged.run_dir, "checkpoints", "step-000002")
    full = racing._judge(cfg, staged.run_dir, folder, settings, False)  # one stage: every group in one benchmark
    assert {k: v["k"] for k, v in full.items()} == {k: v["k"] for k, v in staged.points[0].metrics.items()}
