"""sdd-generate: seeds provably reach the sampler, methods share initial latents, runs resume, metadata is complete."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from sdd.cli.generate import main
from sdd.errors import UserError
from sdd.generation import Request, initial_latent
from sdd.methods.inference import generate_with_method
from sdd.models import build_tiny_sd

BASE = ["--model", "tiny", "--steps", "3", "--batch-size", "3"]


def pixels(path):
    return np.asarray(Image.open(path))


def write_csv(path, rows):
    lines = ["prompt,evaluation_seed,evaluation_guidance,categories"]
    lines += [f'"{p}",{s},{g},"{c}"' for p, s, g, c in rows]
    path.write_text("\n".join(lines) + "\n")


def test_same_row_and_seed_give_the_same_image_across_runs(tmp_path):
    csv = tmp_path / "p.csv"
    write_csv(csv, [("a red circle", 11, 5.0, "x"), ("Null", 12, 7.5, "sexual, violence")])
    main([*BASE, "--prompts", str(csv), "--out", str(tmp_path / "a")])
    main([*BASE, "--prompts", str(csv), "--out", str(tmp_path / "b")])
    for name in ("00000_00.png", "00001_00.png"):
        assert np.array_equal(pixels(tmp_path / "a" / name), pixels(tmp_path / "b" / name))
    records = [json.loads(line) for line in (tmp_path / "a" / "metadata.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in records] == ["a red circle", "Null"]  # the I2P `Null` stays a prompt
    assert [r["seed"] for r in records] == [11, 12] and [r["guidance_scale"] for r in records] == [5.0, 7.5]
    assert records[1]["categories"] == ["sexual", "violence"] and records[0]["method"] == "sd"
    assert not np.array_equal(pixels(tmp_path / "a" / "00000_00.png"), pixels(tmp_path / "a" / "00001_00.png"))


def test_row_seed_reaches_the_sampler(tmp_path):
    csv = tmp_path / "p.csv"
    write_csv(csv, [("a cat", 5, 7.5, "")])
    main([*BASE, "--prompts", str(csv), "--out", str(tmp_path / "a")])
    direct = generate_with_method(build_tiny_sd(), [Request("a cat", seed=5)], "sd", None, num_inference_steps=3)[0]
    other = generate_with_method(build_tiny_sd(), [Request("a cat", seed=6)], "sd", None, num_inference_steps=3)[0]
    assert np.array_equal(pixels(tmp_path / "a" / "00000_00.png"), np.asarray(direct))
    assert not np.array_equal(np.asarray(direct), np.asarray(other))


def test_every_method_starts_from_the_same_latent_for_a_seed(monkeypatch):
    tiny = build_tiny_sd()
    first_inputs = {}
    forward = tiny.unet.forward

    def spy(sample, t, *args, **kwargs):
        first_inputs.setdefault(spy.method, sample[:1].clone())  # branch 0 of step 0 = the initial latent
        return forward(sample, t, *args, **kwargs)

    monkeypatch.setattr(tiny.unet, "forward", spy)
    for method in ("sd", "neg", "sld-max", "sega"):
        spy.method = method
        generate_with_method(tiny, [Request("a cat", seed=9)], method, "cat", num_inference_steps=2)
    expected = initial_latent(9, (4, 16, 16))
    for method, latent in first_inputs.items():
        torch.testing.assert_close(latent, expected, rtol=0, atol=0, msg=method)


def test_sld_with_zero_safety_scale_is_plain_sd(tmp_path):
    main([*BASE, "--prompt", "a cat", "--out", str(tmp_path / "sd")])
    main([*BASE, "--prompt", "a cat", "--method", "sld", "--sld-preset", "max", "--out", str(tmp_path / "sld0"),
          "method_settings={sld_guidance_scale: 0}"])
    main([*BASE, "--prompt", "a cat", "--method", "sld", "--sld-preset", "max", "--out", str(tmp_path / "sld")])
    sd, sld0, sld = (pixels(tmp_path / d / "00000_00.png") for d in ("sd", "sld0", "sld"))
    assert np.array_equal(sd, sld0)
    assert not np.array_equal(sd, sld)
    meta = json.loads((tmp_path / "sld" / "metadata.jsonl").read_text().splitlines()[0])
    assert meta["method"] == "sld-max" and meta["method_settings"]["sld_guidance_scale"] == 5000.0


def test_rerun_skips_what_exists_and_refuses_another_run(tmp_path, capsys):
    out = tmp_path / "o"
    args = [*BASE, "--prompt", "a", "--prompt", "b", "--images-per-prompt", "2", "--out", str(out)]
    first = main(args)
    assert (first["generated"], first["skipped"]) == (4, 0)
    before = (out / "00001_01.png").read_bytes()
    (out / "00000_01.png").unlink()  # lost, e.g. the run was killed while writing it
    second = main(args)
    assert (second["generated"], second["skipped"]) == (1, 3)
    assert (out / "00001_01.png").read_bytes() == before
    assert len((out / "metadata.jsonl").read_text().splitlines()) == 4
    with pytest.raises(UserError, match="from another generation run"):
        main([*BASE, "--prompt", "c", "--out", str(out)])


def test_output_folder_is_a_datasets_imagefolder(tmp_path):
    import datasets

    main([*BASE, "--prompt", "a dog", "--images-per-prompt", "2", "--out", str(tmp_path / "o")])
    ds = datasets.load_dataset("imagefolder", data_dir=str(tmp_path / "o"), split="train")
    assert len(ds) == 2 and ds[0]["prompt"] == "a dog" and ds[1]["seed"] == 1
    assert ds[0]["image"].size == (32, 32)


def test_bad_input_is_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="needs a preset"):
        main([*BASE, "--prompt", "x", "--method", "sld", "--out", str(tmp_path / "o")])
    with pytest.raises(UserError, match="unknown generation method"):
        main([*BASE, "--prompt", "x", "--method", "sdl", "--out", str(tmp_path / "o")])
    with pytest.raises(UserError, match="no prompts"):
        main([*BASE, "--out", str(tmp_path / "o")])
    with pytest.raises(UserError, match="prompt suite"):
        main([*BASE, "--prompts", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "o")])
