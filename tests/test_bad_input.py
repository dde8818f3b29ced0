"""Bad input on purpose, as a new user gives it: every case exits non-zero with exactly one `error:` line and no
traceback, and leaves the run folder as the case says (nothing half-written, nothing written before the checks).

In-process through `run_main` (what the console scripts and `python train/*.py` run); one case through
`accelerate launch`. The disk-full cases mount small tmpfs file systems (skipped where mounting is not allowed);
the permission case runs as an unprivileged user when the suite runs as root.
"""

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile

import pytest
import torch
import yaml
from conftest import ROOT, run_command

from sdd.cli.export import main as export_main
from sdd.errors import run_main
from sdd.files import remove_stale_temporaries, to_json


def fails(main, argv, capsys) -> str:
    """Run a CLI main the way its console script does; return its one error line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_main(main, [str(a) for a in argv])
    err = capsys.readouterr().err
    assert exit_info.value.code not in (0, None), err
    assert "Traceback" not in err, err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def listing(folder) -> list[str]:
    """Every path under ``folder``, relative, sorted (hidden temporaries included)."""
    out = []
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            out.append(os.path.relpath(os.path.join(root, name), folder))
    return sorted(out)


# --- config, model and data input: refused before anything is written ----------------------------------------


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lrr=1", "unknown key 'train.lrr' (did you mean train.lr?)"),
        ("train.steps=abc", "train.steps"),
        ("concepts=[]", "concepts: name at least one concept"),
        ("finetune=xatn", "expected one of"),
        ("model.pretrained=/nonexistent/sd14", "no such model folder: /nonexistent/sd14"),
        ("train.skip_nonfinite_steps=-1", "train.skip_nonfinite_steps: must be >= 0"),
    ],
)
def test_bad_config_is_one_line_and_writes_nothing(train_sdd, tiny_args, tmp_path, capsys, override, message):
    line = fails(train_sdd.main, tiny_args(override), capsys)
    assert message in line
    assert not (tmp_path / "run").exists()


def test_pickled_weights_are_refused(train_sdd, tiny_args, tmp_path, capsys):
    from diffusers import StableDiffusionPipeline

    from sdd.models import build_tiny_sd

    tiny = build_tiny_sd()
    pipe = StableDiffusionPipeline(vae=tiny.vae, text_encoder=tiny.text_encoder, tokenizer=tiny.tokenizer,
                                   unet=tiny.unet, scheduler=tiny.scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(tmp_path / "pickled", safe_serialization=False)  # .bin files: pickles
    line = fails(train_sdd.main, tiny_args(f"model.pretrained={tmp_path / 'pickled'}"), capsys)
    assert "safetensors" in line
    assert not (tmp_path / "run").exists()


def test_truncated_prompt_csv(tmp_path, capsys):
    from sdd.cli.generate import main as generate_main

    csv = tmp_path / "prompts.csv"
    csv.write_text('prompt,evaluation_seed\n"a photo of a cat,1\n')  # the quote is never closed
    line = fails(generate_main, ["--model", "tiny", "--prompts", csv, "--out", tmp_path / "images"], capsys)
    assert str(csv) in line
    assert not (tmp_path / "images").exists() or listing(tmp_path / "images") == []


# --- the output folder: checked before a model is built --------------------------------------------------------


def test_output_dir_that_is_a_file(train_sdd, tiny_args, tmp_path, capsys):
    target = tmp_path / "run"
    target.write_text("not a folder")
    line = fails(train_sdd.main, tiny_args(), capsys)
    assert line == f"error: output_dir: {target} exists and is not a folder"
    assert target.read_text() == "not a folder"


def test_output_dir_under_a_file(train_sdd, tiny_args, tmp_path, capsys, monkeypatch):
    (tmp_path / "parent").write_text("a file")
    built = []
    monkeypatch.setattr("sdd.methods.sdd.SDDMethod.__init__", lambda *a, **k: built.append(1))
    line = fails(train_sdd.main, tiny_args(out=tmp_path / "parent" / "run"), capsys)
    parent = tmp_path / "parent"
    assert line == f"error: output_dir: cannot create {parent / 'run'}: {parent} is a file, not a folder"
    assert built == []  # refused before any model was built


def test_output_dir_without_write_permission(tmp_path, capsys):
    ro = tempfile.mkdtemp(prefix="sdd-ro-")
    try:
        os.chmod(ro, 0o555)
        args = ["--config", ROOT / "configs/sdd/tiny.yaml", f"output_dir={ro}/run", "tracking.tracker=none"]
        if os.geteuid() != 0:
            from conftest import load_script

            line = fails(load_script("train_sdd").main, args, capsys)
        else:  # root writes anywhere: run the script as an unprivileged user
            if shutil.which("setpriv") is None:
                pytest.skip("running as root and setpriv is missing")
            env = {**os.environ, "HOME": ro, "WANDB_MODE": "disabled"}
            nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable]
            probe, _, _ = run_command([*nobody, "-c", "import sdd"], env=env, timeout=120, cwd=ROOT)
            if probe != 0:  # e.g. a checkout under a mode-700 folder (mktemp -d): the user cannot reach the code
                pytest.skip(f"an unprivileged user cannot run this checkout's Python ({ROOT})")
            code, _, err = run_command([*nobody, ROOT / "train/train_sdd.py", *args], env=env, timeout=300)
            assert code == 2 and "Traceback" not in err, err
            [line] = [x for x in err.splitlines() if x.startswith("error:")]
        assert line == f"error: output_dir: cannot write in {ro}: Permission denied"
        assert os.listdir(ro) == []
    finally:
        os.chmod(ro, 0o755)
        shutil.rmtree(ro)


@pytest.fixture
def small_disk():
    """A tmpfs of the given size, unmounted afterwards (skips the test where mounting is not allowed)."""
    mounts = []

    def make(size: str) -> str:
        path = tempfile.mkdtemp(prefix="sdd-disk-")
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path], capture_output=True)
        if proc.returncode != 0:
            os.rmdir(path)
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
        mounts.append(path)
        return path

    yield make
    for path in mounts:
        subprocess.run(["umount", path], check=False)
        os.rmdir(path)


def test_disk_full_during_export(train_sdd, tiny_args, small_disk, capsys):
    out = os.path.join(small_disk("3m"), "run")  # room for the checkpoints, not for the pipeline
    line = fails(train_sdd.main, tiny_args("train.steps=2", "train.checkpoint_every=1", out=out), capsys)
    assert line.startswith(f"error: could not write {out}/pipeline: No space left on device")
    assert f"the trained weights are safe in {out}/checkpoints/step-000002" in line
    assert listing(out) == sorted(["checkpoints", "config.yaml", "samples", "samples/step-000002.png"]
                                  + [f"checkpoints/step-00000{i}{f}" for i in (1, 2) for f in CHECKPOINT_FILES])


CHECKPOINT_FILES = ["", "/config.yaml", "/method_state.safetensors", "/model.safetensors", "/optimizer.bin",
                    "/random_states_0.pkl", "/scheduler.bin", "/trainer_state.json"]


def test_disk_full_during_a_checkpoint(train_sdd, tiny_args, small_disk, capsys):
    out = os.path.join(small_disk("400k"), "run")  # torch's zip writer fails inside accelerate's save_state
    line = fails(train_sdd.main, tiny_args("train.steps=4", "train.checkpoint_every=2", out=out), capsys)
    assert line.startswith(f"error: checkpoint: could not write {out}/checkpoints/step-000002.tmp: No space left on "
                           "device")
    assert listing(out) == ["checkpoints", "config.yaml"]  # the partial checkpoint is gone


# --- divergence ------------------------------------------------------------------------------------------------


def test_diverging_run_stops_exports_nothing_and_keeps_the_last_good_checkpoint(train_sdd, tiny_args, tmp_path,
                                                                                 capsys):
    out = tmp_path / "run"
    train_sdd.main(tiny_args("train.steps=2", "train.checkpoint_every=1"))  # two good steps
    good = {f: (out / "checkpoints/step-000002" / f).read_bytes() for f in os.listdir(out / "checkpoints/step-000002")}
    shutil.rmtree(out / "pipeline")
    os.remove(out / "unet.safetensors")
    os.remove(out / "train_summary.json")

    # then a learning rate of 1e30: update 3 is finite but huge, so step 4's loss is not
    line = fails(train_sdd.main, [*tiny_args("train.lr=1e30", "train.steps=6", "train.checkpoint_every=1"),
                                  "--resume", "--allow-config-change"], capsys)
    assert "training stopped at step 4: non-finite loss" in line and "train.lr=1e+30 is likely too high" in line
    assert f"the last good checkpoint is {out}/checkpoints/step-000002" in line
    assert f"moved to {out}/checkpoints/step-000003.diverged" in line
    assert not (out / "pipeline").exists() and not (out / "unet.safetensors").exists()
    assert not (out / "train_summary.json").exists()
    assert sorted(os.listdir(out / "checkpoints")) == ["step-000001", "step-000002", "step-000003.diverged"]
    assert {f: (out / "checkpoints/step-000002" / f).read_bytes() for f in good} == good  # intact

    # loadable: the run continues from it (at a sane learning rate) and exports
    result = train_sdd.main([*tiny_args("train.steps=3", "train.checkpoint_every=1"), "--resume",
                             "--allow-config-change"])
    assert result.steps == 3 and math.isfinite(result.final_loss)
    assert json.loads((out / "train_summary.json").read_text())["steps"] == 3
    assert (out / "pipeline").is_dir()


def test_divergence_at_the_first_checkpoint_leaves_no_good_one(train_sdd, tiny_args, tmp_path, capsys):
    line = fails(train_sdd.main, tiny_args("train.lr=1e30", "train.steps=6", "train.checkpoint_every=1"), capsys)
    assert "training stopped at step 2: non-finite loss" in line and "no good checkpoint was written" in line
    assert sorted(os.listdir(tmp_path / "run")) == ["checkpoints", "config.yaml"]
    assert os.listdir(tmp_path / "run" / "checkpoints") == ["step-000001.diverged"]


def test_a_guidance_scale_that_overflows_is_named_at_the_first_step(train_sdd, tiny_args, capsys):
    line = fails(train_sdd.main, tiny_args("sdd.guidance_scale=1e30"), capsys)
    assert "training stopped at step 1: non-finite loss" in line and "before any update" in line


def test_skipping_a_bounded_number_of_bad_steps(train_sdd, tiny_args, tmp_path, monkeypatch):
    from sdd.methods.sdd import SDDMethod

    original = SDDMethod.compute_loss

    def nan_at_micro_step_1(self, model, step, generator):
        loss, logs = original(self, model, step, generator)
        return (loss * float("nan") if step == 1 else loss), logs

    monkeypatch.setattr(SDDMethod, "compute_loss", nan_at_micro_step_1)
    before = {}

    def snapshot(self):
        before[len(before)] = {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}

    monkeypatch.setattr(SDDMethod, "after_optimizer_step", lambda self: snapshot(self))
    result = train_sdd.main(tiny_args("train.steps=3", "train.skip_nonfinite_steps=1"))
    assert result.steps == 3
    # step 2's update was dropped: the weights after it equal those after step 1; steps 1 and 3 moved them
    assert all(torch.equal(before[0][n], before[1][n]) for n in before[0])
    assert any(not torch.equal(before[1][n], before[2][n]) for n in before[1])
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["skipped_steps"] == 1 and summary["final_loss"] is not None


def test_divergence_through_accelerate_launch(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "-q", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", ROOT / "train/train_sdd.py", "--config",
           ROOT / "configs/sdd/tiny.yaml", f"output_dir={out}", "train.lr=1e30"]
    code, stdout, stderr = run_command([str(c) for c in cmd], env={**os.environ, "WANDB_MODE": "disabled"},
                                       timeout=300)
    assert code != 0 and "Traceback" not in stderr
    lines = [line for line in stderr.replace("\r", "\n").splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "non-finite" in lines[0], stderr[-2000:]
    assert not (out / "pipeline").exists() and not (out / "unet.safetensors").exists()


# --- resume ------------------------------------------------------------------------------------------------------


def test_resume_with_a_changed_config_is_refused_unless_allowed(train_sdd, tiny_args, tmp_path, capsys):
    out = tmp_path / "run"
    train_sdd.main(tiny_args("train.steps=2", "train.checkpoint_every=1"))
    saved = (out / "config.yaml").read_text()

    line = fails(train_sdd.main, [*tiny_args("train.steps=3", "train.lr=5e-4", "concepts=[violence]"), "--resume"],
                 capsys)
    assert "--resume: this config differs from the one" in line
    assert "concepts (['nudity'] -> ['violence'])" in line and "train.lr (0.0001 -> 0.0005)" in line
    assert "train.steps" not in line  # running longer is what resume is for
    assert (out / "config.yaml").read_text() == saved and not (out / "config_changes.jsonl").exists()

    result = train_sdd.main([*tiny_args("train.steps=3", "train.lr=5e-4"), "--resume", "--allow-config-change"])
    assert result.steps == 3
    [record] = [json.loads(x) for x in (out / "config_changes.jsonl").read_text().splitlines()]
    assert record["changes"]["train.lr"] == [1e-4, 5e-4] and record["changes"]["train.steps"] == [2, 3]
    assert record["step"] == 2 and record["resumed_from"].endswith("step-000002")
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["lr"] == 5e-4
    # and the new rate is the one that trained (the checkpoint's optimizer state held the old one)
    assert json.loads((out / "train_summary.json").read_text())["final_lr"] == pytest.approx(5e-4)


def test_resume_into_another_parameter_set_leaves_the_run_as_it_was(train_sdd, tiny_args, tmp_path, capsys):
    out = tmp_path / "run"
    train_sdd.main(tiny_args("train.steps=2", "train.checkpoint_every=1"))
    before = {p: (out / p).read_bytes() for p in ["config.yaml", "train_summary.json"]}
    line = fails(train_sdd.main, [*tiny_args("finetune=selfattn"), "--resume", "--allow-config-change"], capsys)
    assert "does not match this run's trainable parameters" in line
    assert {p: (out / p).read_bytes() for p in before} == before  # no fresh config.yaml left behind
    assert not (out / "config_changes.jsonl").exists()


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_temporaries_of_killed_writers_are_removed(train_sdd, tiny_args, tmp_path):
    import socket

    out = tmp_path / "run"
    train_sdd.main(tiny_args("train.steps=2", "train.checkpoint_every=1"))
    host = "".join(c if c.isalnum() or c in "_." else "_" for c in socket.gethostname())
    gone = dead_pid()
    stale = [out / f".pipeline.tmp-{host}-{gone}-0123abcd", out / f".unet.safetensors.tmp-{host}-{gone}-4567abcd",
             out / f".pipeline.tmp-{gone}-89abcdef",  # an earlier version's name, without the host
             out / "checkpoints" / "step-000009.tmp"]
    alive = [out / f".pipeline.tmp-{host}-{os.getpid()}-fedcba98",  # a writer that is still running
             out / f".pipeline.tmp-otherhost-{gone}-76543210"]  # another machine's: cannot tell, keep
    for path in stale + alive:
        if "unet" in path.name:
            path.write_bytes(b"half a file")
        else:
            (path / "unet").mkdir(parents=True)

    export_main([str(out)])  # sdd-export on the run folder cleans up
    assert not any(p.exists() for p in stale[:3]) and all(p.exists() for p in alive)
    train_sdd.main([*tiny_args("train.steps=3", "train.checkpoint_every=1"), "--resume"])  # so does a resume
    assert not stale[3].exists() and all(p.exists() for p in alive)
    assert remove_stale_temporaries(str(out)) == []


# --- records ---------------------------------------------------------------------------------------------------


def test_json_is_strict():
    assert to_json({"loss": float("nan"), "x": [float("inf"), 1.5]}) == '{"loss": null, "x": [null, 1.5]}'
    json.loads(to_json(float("-inf")), parse_constant=lambda c: pytest.fail(f"invalid JSON token {c}"))


def test_every_json_write_goes_through_the_strict_writer():
    """``json.dump``/``json.dumps`` write NaN as the invalid token ``NaN``: the package calls ``sdd.files.to_json``."""
    import ast

    offenders = []
    for package in ("sdd", "hfi", "train"):
        for path in sorted((ROOT / package).rglob("*.py")):
            if path == ROOT / "sdd" / "files.py":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if (isinstance(node, ast.Attribute) and node.attr in ("dump", "dumps")
                        and isinstance(node.value, ast.Name) and node.value.id == "json"):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []
