"""Two real processes through `accelerate launch` on the CPU: the parameters stay identical on both."""

import json
import os
import socket
import sys

import pytest
from conftest import ROOT, run_command


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_keep_identical_parameters(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()),
        str(ROOT / "train/train_sdd.py"), "--config", str(ROOT / "configs/sdd/tiny.yaml"), f"output_dir={out}",
        "train.steps=4", "train.checkpoint_every=2", "sdd.ddim_steps=4", "tracking.num_inference_steps=2",
    ]
    code, stdout, stderr = run_command(cmd, env=env, timeout=300)
    assert code == 0, stderr[-3000:]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["num_processes"] == 2
    assert len(summary["param_checksums"]) == 2
    assert summary["param_checksums"][0] == summary["param_checksums"][1]
    assert "parameters identical on all: True" in stdout
    # the run record is the main process's: it lists the exports (rank 1 used to overwrite it with none)
    assert set(summary["exports"]) == {"pipeline", "unet", "config", "card"}
    assert summary["samples"] == str(out / "samples" / "step-000004.png")
    # both processes wrote their RNG state into each checkpoint
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= set(os.listdir(out / "checkpoints" / "step-000004"))
