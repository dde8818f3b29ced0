"""Export: atomic writes (a failure mid-export leaves the previous files intact and nothing half-written)."""

import errno
import os

import pytest
import torch
from safetensors.torch import load_file

from sdd import export as export_mod
from sdd.errors import UserError
from sdd.export import ModelCard, export_model
from sdd.files import atomic_path
from sdd.models import build_tiny_sd

CARD = ModelCard(base_model="tiny", method="SDD (test)", concepts=["red"], steps=1, finetune="xattn")


def test_atomic_path_replaces_files_and_folders(tmp_path):
    target = tmp_path / "f.txt"
    with atomic_path(str(target)) as tmp:
        open(tmp, "w").write("one")
    with atomic_path(str(target)) as tmp:
        open(tmp, "w").write("two")
    assert target.read_text() == "two"
    folder = tmp_path / "d"
    for text in ("one", "two"):
        with atomic_path(str(folder)) as tmp:
            os.makedirs(tmp)
            open(os.path.join(tmp, "x"), "w").write(text)
    assert (folder / "x").read_text() == "two"
    assert sorted(os.listdir(tmp_path)) == ["d", "f.txt"]  # no temporaries left


def test_a_failing_write_leaves_the_old_file(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(str(target)) as tmp:
            open(tmp, "w").write("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["f.txt"]


def test_disk_full_mid_export_leaves_the_previous_export_in_place(tmp_path, monkeypatch):
    tiny = build_tiny_sd()
    export_model(str(tmp_path), tiny, tiny.unet, config_yaml="a: 1\n", card=CARD)
    before = (tmp_path / "unet.safetensors").read_bytes()
    pipeline_before = (tmp_path / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()

    with torch.no_grad():
        for p in tiny.unet.parameters():
            p.add_(1.0)  # a different model, so a half-written file would show

    def disk_full(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"\0" * 1000)  # some bytes reach the disk, then the device is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export_mod, "save_file", disk_full)
    with pytest.raises(UserError, match="No space left on device") as info:
        export_model(str(tmp_path), tiny, tiny.unet, config_yaml="a: 2\n", card=CARD)
    assert "\n" not in str(info.value)
    assert (tmp_path / "unet.safetensors").read_bytes() == before
    # the pipeline folder had been replaced by the new one before the single file failed: it is complete
    new_pipeline = (tmp_path / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert new_pipeline != pipeline_before
    load_file(tmp_path / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
    assert (tmp_path / "config.yaml").read_text() == "a: 1\n"  # not reached
    leftovers = [n for n in os.listdir(tmp_path) if n.startswith(".")]
    assert leftovers == []


def test_fp16_export_leaves_the_callers_modules_in_fp32(tmp_path):
    tiny = build_tiny_sd()
    export_model(str(tmp_path), tiny, tiny.unet, config_yaml="", card=CARD, dtype="fp16")
    weights = load_file(tmp_path / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(v.dtype == torch.float16 for v in weights.values())
    assert all(v.dtype == torch.float16 for v in load_file(tmp_path / "unet.safetensors").values())
    assert all(p.dtype == torch.float32 for p in tiny.unet.parameters())
    assert all(p.dtype == torch.float32 for p in tiny.vae.parameters())
