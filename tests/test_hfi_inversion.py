"""HFI inversion: reward weights and loss by hand; only the new token's row changes (every other row
bit-identical); the token file loads into diffusers and into SDD / ESD / SLD / negative prompt; exact resume."""

import json

import pytest
import torch
import yaml
from conftest import ROOT, load_script
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file
from test_hfi_autolabel import make_shapes_folder

from hfi.auto_feedback import autolabel
from sdd.config import load_config
from sdd.errors import UserError
from sdd.methods.hfi import (
    HFIConfig,
    HFIMethod,
    restore_frozen_rows_,
    reward_weights,
    weighted_denoising_loss,
)
from sdd.models import build_tiny_sd
from sdd.shapes.oracle import ShapesOracle

TOKEN = "<red-hf>"

# ---------------------------------------------------------------------------------------------------- the math


def test_reward_weights_by_hand():
    r = torch.tensor([0.2, 1.5, -0.3, 0.6])
    # clip: [0.2, 1, 0, 0.6]; the three positive weights have mean 0.6
    assert reward_weights(r, "clip").tolist() == pytest.approx([0.2 / 0.6, 1 / 0.6, 0.0, 1.0])
    # minmax: (r + 0.3) / 1.8 = [5/18, 1, 0, 1/2]; the positive ones have mean 16/27
    assert reward_weights(r, "minmax").tolist() == pytest.approx([0.46875, 1.6875, 0.0, 0.84375])
    # softmax (tau 1): exp(r - max) normalised to mean 1; shift-invariant
    e = torch.exp(r - 1.5)
    assert reward_weights(r, "softmax").tolist() == pytest.approx((e / e.mean()).tolist())
    assert reward_weights(r + 7.0, "softmax").tolist() == pytest.approx((e / e.mean()).tolist())
    assert reward_weights(r, "softmax", temperature=2.0).tolist() == pytest.approx(
        (torch.exp((r - 1.5) / 2) / torch.exp((r - 1.5) / 2).mean()).tolist())
    assert reward_weights(r, "none").tolist() == [1.0] * 4
    # top-2 keeps 1.5 and 0.6; clip -> [1, 0.6], mean over the kept 0.8
    assert reward_weights(r, "clip", top_k=2).tolist() == pytest.approx([0.0, 1.25, 0.0, 0.75])
    assert reward_weights(torch.tensor([1.0, 1.0]), "minmax").tolist() == [1.0, 1.0]
    with pytest.raises(UserError, match="every image has weight 0"):
        reward_weights(torch.tensor([-0.2, -1.0]), "clip")


def test_weighted_denoising_loss_by_hand():
    eps_pred = torch.zeros(2, 1, 1, 2)
    target = torch.tensor([[[[1.0, 1.0]]], [[[2.0, 0.0]]]])  # per-image mean squared error: 1 and 2
    assert weighted_denoising_loss(eps_pred, target, torch.tensor([1.0, 0.5])).item() == pytest.approx(1.0)
    assert weighted_denoising_loss(eps_pred, target, torch.ones(2)).item() == pytest.approx(1.5)


def test_restore_frozen_rows_keeps_only_the_trained_rows():
    original = torch.arange(12.0).reshape(4, 3)
    weight = original + 100.0
    restore_frozen_rows_(weight, original, [2])
    assert torch.equal(weight[[0, 1, 3]], original[[0, 1, 3]]) and torch.equal(weight[2], original[2] + 100.0)


# ----------------------------------------------------------------------------------------- a tiny inversion run


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """24 rendered ShapesWorld images, oracle feedback, and a reward model trained on it (tiny CLIP)."""
    root = tmp_path_factory.mktemp("hfi")
    images, _ = make_shapes_folder(root / "images", n=24)
    autolabel(images, str(root / "fb"), ShapesOracle("red"), concept="red", noise=0.0)
    load_script("train_reward").main([
        "--config", str(ROOT / "configs/reward/tiny.yaml"), f"feedback.images={images}",
        f"feedback.dir={root / 'fb'}", f"output_dir={root / 'reward'}", "train.steps=30",
    ])
    return root


def hfi_args(data, out, *extra):
    return ["--config", str(ROOT / "configs/hfi/tiny.yaml"), f"images={data / 'images'}",
            f"reward={data / 'reward'}", f"output_dir={out}", "train.steps=3", "train.lr=0.1", "train.batch_size=2",
            "tracking.num_inference_steps=1", *extra]


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "hfi"
    load_script("train_hfi").main(hfi_args(data, out, "hfi.weighting=minmax"))
    return out


def initial_table():
    """The tiny model's embedding table with the new row as HFI starts it (the mean of "red"'s token rows)."""
    base = build_tiny_sd()
    table = base.text_encoder.get_input_embeddings().weight.detach()
    ids = base.tokenizer("red", add_special_tokens=False).input_ids
    return table, table[ids].mean(0)


def test_only_the_new_row_changes_every_other_row_is_bit_identical(trained):
    table, init = initial_table()
    learned = load_file(trained / "learned_embeds.safetensors")
    assert list(learned) == [TOKEN] and learned[TOKEN].shape == (32,)
    assert not torch.allclose(learned[TOKEN], init)  # the new row was trained
    # the checkpoint holds the whole trained table: rows 0..V-1 exactly the base model's
    final = load_file(trained / "checkpoints" / "step-000003" / "model.safetensors")
    [name] = [k for k in final if k.endswith("token_embedding.weight")]
    assert final[name].shape == (table.shape[0] + 1, 32)
    assert torch.equal(final[name][:-1], table)
    assert torch.equal(final[name][-1], learned[TOKEN])
    assert len(final) == 1  # nothing else of the text encoder is trainable


def test_gradients_reach_only_the_new_row(data, tmp_path):
    cfg = load_config(HFIConfig, str(ROOT / "configs/hfi/tiny.yaml"),
                      [f"images={data / 'images'}", f"reward={data / 'reward'}", f"output_dir={tmp_path}"])
    method = HFIMethod(cfg)
    loss, _ = method.compute_loss(method.model, 0, torch.Generator().manual_seed(0))
    loss.backward()
    grad = method.table.grad
    assert grad[method.token_id].abs().sum() > 0
    assert grad.abs().sum(1).nonzero().flatten().tolist() == [method.token_id]
    assert [n for n, p in method.model.named_parameters() if p.requires_grad] == [
        n for n, _ in method.model.named_parameters() if n.endswith("token_embedding.weight")]


def test_without_the_restore_weight_decay_would_move_the_other_rows(data, tmp_path, monkeypatch):
    # the negative control of the test above: the restore in after_optimizer_step is what keeps the rows
    monkeypatch.setattr(HFIMethod, "after_optimizer_step", lambda self: None)
    with pytest.raises(RuntimeError, match="row other than the new token's changed"):  # the export checks too
        load_script("train_hfi").main(hfi_args(data, tmp_path / "run", "train.steps=1", "train.weight_decay=0.5"))
    final = load_file(tmp_path / "run" / "checkpoints" / "step-000001" / "model.safetensors")
    table, _ = initial_table()
    assert not torch.equal(next(iter(final.values()))[:-1], table)


def test_resume_gives_the_same_token(data, tmp_path):
    train = load_script("train_hfi").main
    train(hfi_args(data, tmp_path / "straight", "train.steps=2"))
    train(hfi_args(data, tmp_path / "resumed", "train.steps=1"))
    train(hfi_args(data, tmp_path / "resumed", "train.steps=2", "--resume"))
    a = load_file(tmp_path / "straight" / "learned_embeds.safetensors")[TOKEN]
    b = load_file(tmp_path / "resumed" / "learned_embeds.safetensors")[TOKEN]
    assert torch.equal(a, b)


def test_export_lists_every_image_with_its_reward_and_weight(trained, data):
    rows = [json.loads(line) for line in (trained / "image_weights.jsonl").read_text().splitlines()]
    assert len(rows) == 24 and {"file_name", "reward", "weight"} <= set(rows[0])
    kept = [r["weight"] for r in rows if r["weight"] > 0]
    assert sum(kept) / len(kept) == pytest.approx(1.0, rel=1e-5)  # mean 1 over the images trained on
    assert TOKEN in (trained / "README.md").read_text()


def test_reward_is_required_unless_plain_textual_inversion():
    with pytest.raises(UserError, match="give a reward model"):
        load_config(HFIConfig, None, ["images=x"])
    assert load_config(HFIConfig, None, ["images=x", "hfi.weighting=none"]).reward is None
    with pytest.raises(UserError, match="lower case"):
        load_config(HFIConfig, None, ["images=x", "reward=r", "hfi.placeholder_token=<Red-HF>"])
    with pytest.raises(UserError, match=r"contain \{\} once"):
        load_config(HFIConfig, None, ["images=x", "reward=r", "hfi.templates=[a photo]"])


# --------------------------------------------------------------------------------------- the token, plugged in


def tiny_pipe():
    b = build_tiny_sd()
    return StableDiffusionPipeline(vae=b.vae, text_encoder=b.text_encoder, tokenizer=b.tokenizer, unet=b.unet,
                                   scheduler=b.scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def test_token_loads_into_a_diffusers_pipeline_and_changes_its_output(trained):
    from sdd.generation import Request, generate
    from sdd.textual_inversion import load_learned_embeds

    pipe = tiny_pipe()
    pipe.load_textual_inversion(str(trained / "learned_embeds.safetensors"))
    token_id = pipe.tokenizer.convert_tokens_to_ids(TOKEN)
    learned = load_file(trained / "learned_embeds.safetensors")[TOKEN]
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[token_id], learned)

    def image(prompt):
        g = torch.Generator().manual_seed(0)
        return pipe(prompt, num_inference_steps=3, generator=g, output_type="pt").images[0]

    with_token, with_word = image(f"a photo of a {TOKEN}"), image("a photo of a red")
    assert (with_token - with_word).abs().max() > 1e-3  # the learned token is not the word it started from

    # this package's loader gives the same table, and its sampler the same image for the same seed
    base = build_tiny_sd()
    assert load_learned_embeds(base, str(trained / "learned_embeds.safetensors")) == [TOKEN]
    assert torch.equal(base.text_encoder.get_input_embeddings().weight, pipe.text_encoder.get_input_embeddings().weight)
    ours = generate(base, [Request(f"a photo of a {TOKEN}", seed=0)], num_inference_steps=3, output_type="pt")[0]
    assert torch.allclose((ours.clamp(-1, 1) + 1) / 2, with_token, atol=1e-4)  # pipe's images are clamped


@pytest.mark.parametrize("script,config",
                         [("train_sdd", "configs/sdd/tiny.yaml"), ("train_esd", "configs/esd/tiny.yaml")])
def test_sdd_and_esd_erase_the_token(trained, tmp_path, script, config):
    prefix = "sdd" if script == "train_sdd" else "esd"
    args = ["--config", str(ROOT / config), f"output_dir={tmp_path / 'run'}", "train.steps=1",
            "train.checkpoint_every=0", f"{prefix}.ddim_steps=3", "tracking.num_inference_steps=1",
            f"concepts=['{TOKEN}']", f"learned_embeds={trained / 'learned_embeds.safetensors'}"]
    result = load_script(script).main(args)
    assert result.steps == 1
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "run" / "pipeline")
    assert pipe.tokenizer.convert_tokens_to_ids(TOKEN) == 49408  # the erased model knows the token
    # without the token's file, the concept is refused instead of being split into '<', 'red', '-', 'hf', '>'
    with pytest.raises(UserError, match="learned_embeds=PATH"):
        load_script(script).main([a for a in args if not a.startswith("learned_embeds")]
                                 + [f"output_dir={tmp_path / 'other'}"])


def test_negative_prompt_and_sld_steer_away_from_the_token(trained, tmp_path):
    import numpy as np
    from PIL import Image

    from sdd.cli.generate import main as generate_main

    common = ["--model", "tiny", "--prompt", "a red circle", "--steps", "3", "--seed", "0"]
    generate_main([*common, "--out", str(tmp_path / "sd")])
    plain = np.asarray(Image.open(tmp_path / "sd" / "00000_00.png"), dtype=np.float32)
    for name, method in (("neg", ["--method", "neg"]), ("sld", ["--method", "sld", "--sld-preset", "max"])):
        generate_main([*common, *method, "--concept", TOKEN, "--learned-embeds",
                       str(trained / "learned_embeds.safetensors"), "--out", str(tmp_path / name)])
        meta = json.loads((tmp_path / name / "metadata.jsonl").read_text().splitlines()[0])
        assert TOKEN in json.dumps(meta["method_settings"])
        image = np.asarray(Image.open(tmp_path / name / meta["file_name"]), dtype=np.float32)
        assert np.abs(image - plain).max() > 0  # the token changed the sampling


# ---------------------------------------------------------------------------------------------------- configs


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "hfi").glob("*.yaml")), ids=lambda p: p.name)
def test_hfi_generation_configs_use_the_learned_token(path):
    # that every config loads is tests/test_configs.py's; here: the sdd-generate ones plug the token in
    cfg = yaml.safe_load(path.read_text())
    if cfg.get("method") in ("neg", "sld"):
        assert cfg["concept"] == TOKEN and cfg["learned_embeds"]


def test_loop_plan_is_the_documented_commands(tmp_path):
    from hfi.experiment import loop_prompts
    from hfi.experiment import main as loop_main

    commands = loop_main(["--model", "tiny", "--preset", "tiny", "--out", str(tmp_path), "--dry-run"])["stages"]
    assert [c.split()[1:3] for c in commands][:2] == [["-m", "sdd.cli.generate"], ["-m", "hfi.auto_feedback"]]
    assert "train_reward.py" in commands[2] and "train_hfi.py" in commands[3]
    assert "'concepts=[red]'" in commands[4] and "learned_embeds=" in commands[5] and "bench" in commands[6]
    assert "configs/sdd/shapes_red.yaml" in commands[4]  # the word's baseline is the shipped SDD red config
    assert loop_prompts("red")[:3] == ["a red circle", "a red square", "a red triangle"]
    assert not (tmp_path / "images").exists()  # a dry run runs nothing
