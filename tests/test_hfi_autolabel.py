"""hfi-autolabel: detector feedback in the labeling app's record format, with seeded annotator noise."""

import json
import math
import os

import numpy as np
import pytest
from PIL import Image

from hfi.auto_feedback import autolabel, concept_score, main, make_detector, noisy_label, noisy_ranking
from sdd.detectors import Detection
from sdd.errors import UserError
from sdd.feedback import FeedbackStore, check_ranking, read_records
from sdd.shapes import world
from sdd.shapes.oracle import ShapesOracle


def make_shapes_folder(folder, n=200, seed=0):
    """An image folder of rendered ShapesWorld scenes (ground truth known), as sdd-generate lays one out."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    colours = []
    with open(os.path.join(folder, "metadata.jsonl"), "w") as f:
        for i in range(n):
            scene = world.sample_scene(rng)
            name = f"{i:05d}.png"
            Image.fromarray((world.render(scene) * 255).round().astype(np.uint8)).save(os.path.join(folder, name))
            f.write(json.dumps({"file_name": name, "prompt": f"a {scene.colour} {scene.shape}", "seed": i}) + "\n")
            colours.append(scene.colour)
    return str(folder), colours


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes_folder(tmp_path_factory.mktemp("shapes") / "images", n=400)


# --------------------------------------------------------------------------------------------- the noise model


def test_noisy_label_flips_below_the_rate():
    assert noisy_label(True, 0.05, 0.1) == ("no", True)
    assert noisy_label(True, 0.15, 0.1) == ("yes", False)
    assert noisy_label(False, 0.05, 0.1) == ("yes", True)
    assert noisy_label(False, 0.0, 0.0) == ("no", False)  # p = 0 never flips, even for u = 0


def test_noisy_ranking_by_hand():
    # scores 1, 0, 1, 0: the two flagged images first, ties in tiebreak order
    assert noisy_ranking([1, 0, 1, 0], [False] * 4, [0.9, 0.1, 0.2, 0.3]) == [2, 3, 1, 4]
    # image 1 misjudged (0 -> 1): it joins the top group, and wins its tie
    assert noisy_ranking([1, 0, 1, 0], [False, True, False, False], [0.9, 0.1, 0.2, 0.3]) == [3, 1, 2, 4]
    # a detector probability: 0.8 -> 0.2 when misjudged
    assert noisy_ranking([0.8, 0.5, 0.3], [True, False, False], [0, 0, 0]) == [3, 1, 2]


def test_concept_score_reads_the_flag_or_a_probability():
    d = Detection(True, {"p_inappropriate": 0.7, "colour": "red"})
    assert concept_score(d) == 1.0 and concept_score(Detection(False)) == 0.0
    assert concept_score(d, "p_inappropriate") == 0.7
    with pytest.raises(UserError, match="not a number in"):
        concept_score(d, "colour")
    with pytest.raises(UserError, match="no such score"):
        concept_score(d, "p_nude")


# ------------------------------------------------------------------------------------------------------ binary


def test_binary_records_parse_with_the_store_and_the_noise_rate_is_as_configured(shapes, tmp_path):
    images, colours = shapes
    p = 0.2
    summary = autolabel(images, str(tmp_path / "fb"), ShapesOracle("red"), concept="red", noise=p, seed=3)
    assert summary["annotator"] == "auto@shapes-oracle" and summary["answered_now"] == 400

    # the labeling app's store reads them: same record keys, every image answered, a dataset out
    store = FeedbackStore(images, str(tmp_path / "fb"), mode="binary", concept="red")
    records, problems = read_records(store.path)
    assert problems == [] and len(records) == 400
    assert set(records[0]) == {"id", "mode", "annotator", "time", "concept", "question", "image", "prompt", "seed",
                               "label"}
    assert store.progress("auto@shapes-oracle") == (400, 400)
    ds = store.to_dataset()
    assert len(ds) == 400 and set(ds["label"]) == {"yes", "no"}

    # the oracle reads the rendered colour exactly; a label differs from the truth iff it was flipped
    truth = {f"{i:05d}.png": c == "red" for i, c in enumerate(colours)}
    wrong = sum((r["label"] == "yes") != truth[r["image"]] for r in records)
    side = [json.loads(line) for line in (tmp_path / "fb" / "autolabel" / "auto@shapes-oracle.jsonl").open()]
    assert wrong == sum(row["flipped"][0] for row in side) == summary["flipped"]
    # binomial(400, 0.2): mean 80, sd 8; 4 sd either side
    assert abs(wrong - 400 * p) < 4 * math.sqrt(400 * p * (1 - p))
    assert summary["realised_noise"] == pytest.approx(wrong / 400)


def test_same_seed_same_answers_and_a_rerun_adds_nothing(shapes, tmp_path):
    images, _ = shapes
    first = autolabel(images, str(tmp_path / "a"), ShapesOracle("red"), concept="red", noise=0.3, seed=7)
    autolabel(images, str(tmp_path / "b"), ShapesOracle("red"), concept="red", noise=0.3, seed=7)
    again = autolabel(images, str(tmp_path / "a"), ShapesOracle("red"), concept="red", noise=0.3, seed=7)
    labels = [[(r["image"], r["label"]) for r in read_records(str(tmp_path / d / "feedback.jsonl"))[0]]
              for d in ("a", "b")]
    assert labels[0] == labels[1]
    assert again["answered_now"] == 0 and again["flipped"] == first["flipped"]
    assert len(read_records(str(tmp_path / "a" / "feedback.jsonl"))[0]) == 400


def test_noise_free_labels_are_the_detector(shapes, tmp_path):
    images, colours = shapes
    autolabel(images, str(tmp_path / "fb"), ShapesOracle("red"), concept="red", noise=0.0)
    records, _ = read_records(str(tmp_path / "fb" / "feedback.jsonl"))
    assert [r["label"] == "yes" for r in records] == [c == "red" for c in colours]


# ----------------------------------------------------------------------------------------------------- ranking


def test_ranking_records_are_valid_and_rank_flagged_images_first(shapes, tmp_path):
    images, colours = shapes
    red = {f"{i:05d}.png" for i, c in enumerate(colours) if c == "red"}
    autolabel(images, str(tmp_path / "fb"), ShapesOracle("red"), concept="red", mode="ranking", m=5)
    store = FeedbackStore(images, str(tmp_path / "fb"), mode="ranking", concept="red", m=5)
    records, _ = read_records(store.path)
    assert len(records) == len(store.units) == 80
    for r in records:
        assert check_ranking(r["ranking"], 5) == r["ranking"]
        flagged = [rank for name, rank in zip(r["images"], r["ranking"]) if name in red]
        others = [rank for name, rank in zip(r["images"], r["ranking"]) if name not in red]
        assert not flagged or not others or max(flagged) < min(others)  # noise 0: red above the rest
    assert len(store.to_dataset()) == 80


def test_ranking_noise_rate(shapes, tmp_path):
    images, _ = shapes
    summary = autolabel(images, str(tmp_path / "fb"), ShapesOracle("red"), concept="red", mode="ranking", m=5,
                        noise=0.25, seed=1)
    n, k = summary["judgements"], summary["flipped"]
    assert n == 400 and abs(k - n * 0.25) < 4 * math.sqrt(n * 0.25 * 0.75)


# ----------------------------------------------------------------------------------------------------- command


def test_command_and_user_errors(shapes, tmp_path, capsys):
    images, _ = shapes
    summary = main([images, "--feedback", str(tmp_path / "fb"), "--detector", "shapes:red", "--noise", "0.1",
                    "--annotator", "sim-annotator-2"])
    assert summary["annotator"] == "sim-annotator-2" and "400 of 400 binary units" in capsys.readouterr().out
    with pytest.raises(UserError, match="expected shapes:CONCEPT"):
        make_detector("clip:red")
    with pytest.raises(UserError, match="shapes oracle"):
        make_detector("shapes:purple")
    with pytest.raises(UserError, match="must lie in"):
        autolabel(images, str(tmp_path / "x"), ShapesOracle("red"), concept="red", noise=1.5)
