"""Every shipped YAML loads; bad keys, values and files end in one clear line and exit status 2."""

import os
import subprocess
import sys

import pytest
from conftest import ROOT
from omegaconf import OmegaConf

from sdd.config import load_config
from sdd.errors import run_main
from sdd.eval.schema import EvalConfig
from sdd.image_folder import GenerateConfig
from sdd.methods.esd import ESDConfig
from sdd.methods.registry import METHODS
from sdd.methods.sdd import SDDConfig

SCHEMAS = {"eval": EvalConfig, "generate": GenerateConfig}  # the folders of configs that are not training runs
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))


def schema_for(path):
    """A training config names its method (the registry's schema); eval and generate configs go by folder (an old
    path that links to a new one, by the folder it links to)."""
    folder = path.resolve().relative_to((ROOT / "configs").resolve()).parts[0]
    if folder in SCHEMAS:
        return SCHEMAS[folder]
    return METHODS[OmegaConf.load(path)["method"]].schema


def test_every_training_config_names_its_method_and_sits_in_its_folder():
    """configs/<method>/ holds the runs of one method (and its name is the file's ``method`` key); the old
    configs/hfi/<stage>_*.yaml paths are links to the new places, kept for one release."""
    for path in CONFIGS:
        if path.is_symlink():
            assert path.resolve().is_file(), f"{path} links to nothing"
            continue
        folder = path.relative_to(ROOT / "configs").parts[0]
        if folder in SCHEMAS:
            continue
        method = OmegaConf.load(path).get("method")
        assert method in METHODS, f"{path}: no method key"
        expected = {"reward": "hfi-reward", "shapes": "shapes-base"}.get(folder, folder)
        assert method == expected, f"{path}: method {method} in configs/{folder}/"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_every_config_loads(path):
    schema = schema_for(path)
    cfg = load_config(schema, str(path))
    assert isinstance(cfg, schema)


def test_overrides_win_over_the_file():
    cfg = load_config(SDDConfig, str(ROOT / "configs/sdd/nudity_sd14.yaml"), ["train.lr=2e-5", "concepts=[a, b c]"])
    assert cfg.train.lr == 2e-5 and cfg.concepts == ["a", "b c"]
    assert cfg.sdd.ema_decay == 0.999 and cfg.train.steps == 1500  # the paper's settings stay


BAD = [
    (["train.lrr=1"], "error: config error: unknown key 'train.lrr' (did you mean train.lr?)"),
    (["train.lr=abc"], "error: config error: train.lr: Value 'abc' of type 'str' could not be converted to Float"),
    (["finetune=xatn"], "error: config error: finetune: Invalid value 'xatn', expected one of "
                        "['xattn', 'noxattn', 'selfattn', 'full', 'lora']"),
    (["sdd.ema_decay=1.5"], "error: config error: sdd.ema_decay: must lie in [0, 1), got 1.5"),
    (["concepts=nudity"], "error: config error: concepts: expected a list, e.g. concepts='[a, b]'"),
    (["concepts=[]"], "error: config error: concepts: name at least one concept, e.g. concepts='[nudity]'"),
    (["train.steps"], "error: config error: override 'train.steps' is not of the form key=value"),
    (["model.pretrained=/no/such/model"], "error: model.pretrained: no such model folder: /no/such/model"),
]


@pytest.mark.parametrize("overrides,line", BAD, ids=[b[0][0] for b in BAD])
def test_bad_input_is_one_line(train_sdd, tmp_path, capsys, overrides, line):
    argv = ["--config", str(ROOT / "configs/sdd/tiny.yaml"), f"output_dir={tmp_path}/o", *overrides]
    with pytest.raises(SystemExit) as exit_info:
        run_main(train_sdd.main, argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == line
    assert "Traceback" not in err
    assert not (tmp_path / "o").exists()  # nothing written


def test_missing_config_file_and_bad_yaml(train_sdd, tmp_path, capsys):
    for argv, line in [
        (["--config", str(tmp_path / "nope.yaml")],
         f"error: config error: --config: no such file: {tmp_path}/nope.yaml"),
    ]:
        with pytest.raises(SystemExit):
            run_main(train_sdd.main, argv)
        assert capsys.readouterr().err.splitlines()[-1] == line
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {lr: [1, 2\n")
    with pytest.raises(SystemExit):
        run_main(train_sdd.main, ["--config", str(bad)])
    assert capsys.readouterr().err.strip().startswith(f"error: config error: {bad}: not valid YAML")


def test_the_real_command_prints_one_line_and_exits_2(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train/train_sdd.py"), "--config", str(ROOT / "configs/sdd/tiny.yaml"),
         f"output_dir={tmp_path}", "train.lrr=1"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: config error: unknown key 'train.lrr' (did you mean train.lr?)"
    assert proc.stdout == ""


def _keys(schema, prefix=""):
    import dataclasses

    for f in dataclasses.fields(schema):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            yield from _keys(type(default), f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}"


@pytest.mark.parametrize("schema", [SDDConfig, ESDConfig], ids=lambda s: s.__name__)
def test_readme_documents_every_key(schema):
    readme = (ROOT / "README.md").read_text()
    missing = [k for k in _keys(schema) if f"`{k}`" not in readme]
    assert missing == []


def test_yaml_no_means_the_choice_no(tmp_path):
    # YAML 1.1 reads `no` as False; mixed_precision lists 'no' as a choice, so that is what the user meant
    assert load_config(SDDConfig, None, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  mixed_precision: no\n")
    assert load_config(SDDConfig, str(path)).train.mixed_precision == "no"


def test_resume_followed_by_an_override_resumes_latest_and_applies_the_override():
    from sdd.config import parse_args

    cfg = parse_args(SDDConfig, ["--config", str(ROOT / "configs/sdd/tiny.yaml"), "--resume", "train.steps=7"], "t")
    assert cfg.train.resume == "latest" and cfg.train.steps == 7
    cfg = parse_args(SDDConfig, ["--config", str(ROOT / "configs/sdd/tiny.yaml"), "--resume", "/some/ckpt"], "t")
    assert cfg.train.resume == "/some/ckpt"
