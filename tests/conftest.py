import os

# Everything offline and untracked, before any library reads its environment.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import importlib.util  # noqa: E402
import pathlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
torch.set_num_threads(min(2, os.cpu_count() or 1))


def load_script(name: str):
    """Import an entry script of train/ as a module (they are files, not package modules)."""
    path = ROOT / "train" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"train_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def train_sdd():
    return load_script("train_sdd")


@pytest.fixture
def tiny_args(tmp_path):
    """Arguments of a fast SDD run on the tiny model, into a fresh output folder."""

    def make(*overrides, out=None):
        out = out or tmp_path / "run"
        return [
            "--config",
            str(ROOT / "configs" / "sdd" / "tiny.yaml"),
            f"output_dir={out}",
            "train.steps=2",
            "train.checkpoint_every=0",
            "sdd.ddim_steps=4",
            "tracking.tracker=none",
            "tracking.num_inference_steps=2",
            *overrides,
        ]

    return make


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each in-process run builds its own Accelerator; accelerate keeps process-wide state between them."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    PartialState._reset_state()


def run_command(cmd, *, env=None, timeout=600, cwd=None):
    """Run a command line to its end and return (returncode, stdout, stderr).

    The child gets its own session, so on timeout the whole process group (accelerate launch and the workers it
    started, which hold the output pipes) is killed and the test fails with the output so far, instead of waiting
    forever on pipes that a surviving grandchild keeps open.
    """
    import signal
    import subprocess

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"timed out after {timeout} s: {' '.join(map(str, cmd))}\n{out[-2000:]}\n{err[-3000:]}")
    return proc.returncode, out, err


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory):
    """Four random "real" images: the reference folder of the COCO suite's FID in the harness tests."""
    import numpy as np
    from PIL import Image

    path = tmp_path_factory.mktemp("coco-ref")
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(path / f"{i:012d}.jpg")
    return str(path)


@pytest.fixture
def narrow_sdxl_random(monkeypatch):
    """``sdxl-random`` (``sdd.models.build_sdxl_random``, the same code and the same layer structure: three UNet
    levels, text_time conditioning, two encoders, the 4-level VAE) at a width a CPU test can build and run: 64 px."""
    from sdd import models

    unet = dict(sample_size=8, block_out_channels=(32, 64, 64), attention_head_dim=(2, 4, 4),
                transformer_layers_per_block=(1, 1, 1), cross_attention_dim=32 + 48, addition_time_embed_dim=8,
                projection_class_embeddings_input_dim=6 * 8 + 48)
    text = dict(intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    for config, values in ((models.SDXL_UNET_CONFIG, unet),
                           (models.SDXL_TEXT_ENCODER_CONFIG, dict(text, hidden_size=32, projection_dim=32)),
                           (models.SDXL_TEXT_ENCODER_2_CONFIG, dict(text, hidden_size=48, projection_dim=48)),
                           (models.SDXL_VAE_CONFIG, dict(block_out_channels=(32, 32, 32, 32), sample_size=64))):
        for key, value in values.items():
            monkeypatch.setitem(config, key, value)
    return models.build_sdxl_random
