"""HFI reward model: the losses by hand, the split, embeddings and their cache, training through the loop,
held-out accuracy in the run summary, and the export that reloads and scores images."""

import json
import math

import pytest
import torch
from conftest import ROOT, load_script
from test_hfi_autolabel import make_shapes_folder

from hfi.auto_feedback import autolabel
from sdd.embeddings import EmbedderConfig, ImageEmbedder, load_clip_vision
from sdd.errors import UserError
from sdd.methods.reward import (
    bradley_terry_loss,
    heldout_keys,
    load_reward,
    mse_reward_loss,
    pair_normaliser,
    ranking_pairs,
    score_images,
)
from sdd.shapes.oracle import ShapesOracle

# ---------------------------------------------------------------------------------------------------- the math


def test_mse_loss_by_hand():
    # ((0.9 - 1)^2 + (0.2 - 0)^2 + (0.5 - 1)^2) / 3 = (0.01 + 0.04 + 0.25) / 3 = 0.1
    assert mse_reward_loss(torch.tensor([0.9, 0.2, 0.5]), torch.tensor([1.0, 0.0, 1.0])).item() == pytest.approx(0.1)


def test_ranking_pairs_by_hand():
    # ranks: image 2 is best (1), then image 0 (2), then image 3 (3); image 1 is excluded (X)
    assert ranking_pairs([2, None, 1, 3]) == [(2, 0), (2, 3), (0, 3)]
    assert ranking_pairs([1, None]) == []
    assert len(ranking_pairs([3, 1, 5, 2, 4])) == 10  # C(5, 2)


def test_pair_normalisers():
    assert pair_normaliser(5, "pairs") == pytest.approx(1 / 10)  # 1 / C(5, 2)
    assert pair_normaliser(5, "m2") == pytest.approx(1 / 25)  # 1 / M^2
    assert pair_normaliser(2, "pairs") == 1.0
    with pytest.raises(ValueError):
        pair_normaliser(1)


def test_bradley_terry_by_hand():
    # one set ranked [1, 2, 3] with rewards [2, 1, 0]: pairs (0,1), (0,2), (1,2) with margins 1, 2, 1
    # -log sigmoid(1) = log(1 + e^-1) = 0.3132617, -log sigmoid(2) = log(1 + e^-2) = 0.1269280; sum 0.7534514
    r = torch.tensor([2.0, 1.0, 0.0])
    pairs = ranking_pairs([1, 2, 3])
    better, worse = r[[i for i, _ in pairs]], r[[j for _, j in pairs]]
    total = 2 * math.log1p(math.exp(-1)) + math.log1p(math.exp(-2))
    assert total == pytest.approx(0.7534514, abs=1e-7)
    for norm, expected in (("pairs", total / 3), ("m2", total / 9)):
        w = torch.full((3,), pair_normaliser(3, norm))
        assert bradley_terry_loss(better, worse, w, num_sets=1).item() == pytest.approx(expected, rel=1e-6)
    # two sets: the second has one pair with margin 0 (-log 1/2 = log 2); the loss is the mean over the sets
    b2 = torch.cat([better, torch.tensor([0.5])])
    w2 = torch.cat([torch.full((3,), 1 / 3), torch.tensor([1.0])])
    loss = bradley_terry_loss(b2, torch.cat([worse, torch.tensor([0.5])]), w2, num_sets=2)
    assert loss.item() == pytest.approx((total / 3 + math.log(2)) / 2, rel=1e-6)


def test_bradley_terry_gradient_pushes_the_better_image_up():
    better = torch.tensor([0.0], requires_grad=True)
    worse = torch.tensor([0.0], requires_grad=True)
    bradley_terry_loss(better, worse, torch.ones(1), 1).backward()
    # d/dr+ [-log sigmoid(r+ - r-)] = -(1 - sigmoid(0)) = -0.5
    assert better.grad.item() == pytest.approx(-0.5) and worse.grad.item() == pytest.approx(0.5)


def test_heldout_split_is_deterministic_and_never_everything():
    keys = [f"k{i}" for i in range(20)]
    held = heldout_keys(keys, 0.25, seed=0)
    assert len(held) == 5 and held == heldout_keys(list(reversed(keys)), 0.25, seed=0)
    assert held != heldout_keys(keys, 0.25, seed=1)
    assert heldout_keys(keys, 0.0, 0) == set() and heldout_keys(["a"], 0.5, 0) == set()
    assert len(heldout_keys(["a", "b"], 0.9, 0)) == 1


# -------------------------------------------------------------------------------------------------- embeddings


def test_embedder_loads_clip_checkpoints_with_and_without_projection(tmp_path):
    from transformers import CLIPVisionModel

    from sdd.clip import tiny_clip

    enc = tiny_clip(image_size=32, projection_dim=16)
    enc.model.save_pretrained(tmp_path / "clip")
    enc.image_processor.save_pretrained(tmp_path / "clip")
    CLIPVisionModel(enc.model.config.vision_config).save_pretrained(tmp_path / "vision")
    enc.image_processor.save_pretrained(tmp_path / "vision")

    _, projection, _ = load_clip_vision(str(tmp_path / "clip"))
    assert projection is not None and torch.equal(projection.weight, enc.model.visual_projection.weight)
    image = torch.rand(3, 32, 32)
    full = ImageEmbedder.from_config(EmbedderConfig(model=str(tmp_path / "clip"), normalize=False))
    assert full.embedding == "projected" and full.dim == 16
    assert torch.allclose(full.embed([image]), enc.image_embeds([image]), atol=1e-5)  # = get_image_features

    plain = ImageEmbedder.from_config(EmbedderConfig(model=str(tmp_path / "vision")))
    assert plain.embedding == "pooled" and plain.dim == 32  # no projection in a plain vision checkpoint
    assert torch.allclose(plain.embed([image]).norm(dim=-1), torch.ones(1))
    with pytest.raises(UserError, match="no visual projection"):
        ImageEmbedder.from_config(EmbedderConfig(model=str(tmp_path / "vision"), embedding="projected"))
    with pytest.raises(UserError, match="no such model folder"):
        ImageEmbedder.from_config(EmbedderConfig(model=str(tmp_path / "nothing")))


def test_embedding_cache_embeds_each_image_once(tmp_path, monkeypatch):
    make_shapes_folder(tmp_path / "img", n=6)
    files = [str(tmp_path / "img" / f"{i:05d}.png") for i in range(6)]
    embedder = ImageEmbedder.from_config(EmbedderConfig(model="tiny-random"))
    calls = []
    real = embedder.embed
    monkeypatch.setattr(embedder, "embed", lambda ims: calls.append(len(ims)) or real(ims))
    first = embedder.embed_files(files[:4], str(tmp_path / "cache"))
    second = embedder.embed_files(files, str(tmp_path / "cache"))
    assert calls == [4, 2]
    assert torch.equal(second[:4], first) and torch.allclose(second, real(files))


# ------------------------------------------------------------------------------------------- training, export


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    root = tmp_path_factory.mktemp("reward")
    images, colours = make_shapes_folder(root / "images", n=160)
    autolabel(images, str(root / "fb"), ShapesOracle("red"), concept="red", noise=0.0)
    autolabel(images, str(root / "fb"), ShapesOracle("red"), concept="red", mode="ranking", m=5, noise=0.0)
    return root, colours


def reward_args(root, out, *extra):
    return ["--config", str(ROOT / "configs/reward/tiny.yaml"), f"feedback.images={root / 'images'}",
            f"feedback.dir={root / 'fb'}", f"output_dir={out}", "embedder.embedding=pooled",
            "embedder.normalize=false", "train.steps=300", *extra]


def test_binary_reward_trains_reports_heldout_accuracy_and_reloads(labelled, tmp_path):
    root, colours = labelled
    result = load_script("train_reward").main(reward_args(root, tmp_path / "run"))
    assert result.steps == 300
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    held = summary["reward_metrics"]["heldout"]
    assert held["images"] == 40  # 25 % of 160 images
    assert held["accuracy"] > held["majority_baseline"] and held["accuracy"] >= 0.85
    assert summary["exports"]["reward"] == str(tmp_path / "run" / "reward")

    info = json.loads((tmp_path / "run" / "reward" / "reward.json").read_text())
    assert info["embedder"] == {"model": "tiny-random", "embedding": "pooled", "normalize": False}
    assert info["mode"] == "binary" and info["metrics"]["heldout"] == held

    # one function scores images; red scenes score higher
    files = [str(root / "images" / f"{i:05d}.png") for i in range(160)]
    scores = score_images(str(tmp_path / "run"), files)
    red = torch.tensor([c == "red" for c in colours])
    assert scores[red].mean() > 0.7 and scores[~red].mean() < 0.3
    model = load_reward(str(tmp_path / "run" / "reward"))
    assert torch.allclose(model.score_files(files[:8]), scores[:8], atol=1e-5)  # cached embeddings = fresh ones


def test_ranking_reward_trains_on_pairs(labelled, tmp_path):
    root, colours = labelled
    load_script("train_reward").main(reward_args(root, tmp_path / "run", "feedback.mode=ranking",
                                                  "train.batch_size=8"))
    metrics = json.loads((tmp_path / "run" / "train_summary.json").read_text())["reward_metrics"]
    held = metrics["heldout"]
    assert held["sets"] == 8 and held["pairs"] == 80  # 25 % of 32 sets of 5, 10 pairs each
    # the oracle's ranking orders two non-red (or two red) images at random, so most pairs are coin flips and
    # the reported pairwise accuracy stays near 0.5-0.7; the red-vs-rest order is what it can learn
    assert 0.5 < held["pairwise_accuracy"] <= 1.0
    assert json.loads((tmp_path / "run" / "reward" / "reward.json").read_text())["loss"].startswith("bradley-terry")
    scores = score_images(str(tmp_path / "run"), [str(root / "images" / f"{i:05d}.png") for i in range(160)])
    red = torch.tensor([c == "red" for c in colours])
    ordered = (scores[red][:, None] > scores[~red][None, :]).float().mean()
    assert ordered > 0.9  # the fraction of (red, other) pairs the reward orders right


def test_feedback_errors_are_one_line(labelled, tmp_path):
    root, _ = labelled
    train = load_script("train_reward").main
    with pytest.raises(UserError, match="no yes/no labels for concept 'cats'"):
        train(reward_args(root, tmp_path / "a", "feedback.concept=cats"))
    with pytest.raises(UserError, match="no feedback.jsonl"):
        train(reward_args(root, tmp_path / "b", f"feedback.dir={tmp_path}"))
    with pytest.raises(UserError, match="holds no reward model"):
        load_reward(str(tmp_path))
