"""UCE and RECE: the closed forms by hand, their normal equations on a real UNet, which parameters move, and the
whole run (sdd.loop.solve) writing, resuming and re-exporting like every other method."""

import shutil

import pytest
import torch
from conftest import ROOT, load_script
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from sdd import api
from sdd.config import load_config
from sdd.errors import UserError
from sdd.loop import describe
from sdd.methods.rece import RECEConfig, RECEMethod, adversarial_embedding
from sdd.methods.uce import UCEConfig, UCEMethod, paired_rows, token_rows, uce_edit
from sdd.models import build_tiny_sd

UCE_TINY = str(ROOT / "configs/uce/tiny.yaml")
RECE_TINY = str(ROOT / "configs/rece/tiny.yaml")
FAST = ["tracking.num_inference_steps=2"]


def test_uce_edit_by_hand():
    W = torch.eye(2)
    c = torch.tensor([[1.0, 0.0]])  # one erase key
    v = torch.tensor([[0.0, 2.0]])  # its target value
    none = torch.zeros((0, 2))
    # A = I + c c^T = diag(2, 1); B = I + v c^T = [[1, 0], [2, 1]]; W_new = B A^-1 = [[0.5, 0], [1, 1]]
    assert uce_edit(W, c, v, none, 1.0, 1.0, 1.0).tolist() == [[0.5, 0.0], [1.0, 1.0]]
    # W_new c = (0.5, 1): halfway from W_old c = (1, 0) to v* = (0, 2) when lambda = eta_e
    # a preserve key p = (1, 1), W_old p p^T = [[1, 1], [1, 1]]: A = [[3, 1], [1, 2]], B = [[2, 1], [3, 2]],
    # A^-1 = [[2, -1], [-1, 3]] / 5, W_new = B A^-1 = [[3, 1], [4, 3]] / 5
    p = torch.tensor([[1.0, 1.0]])
    assert uce_edit(W, c, v, p, 1.0, 1.0, 1.0) == pytest.approx(torch.tensor([[0.6, 0.2], [0.8, 0.6]]))
    # eta_p scales the preserve term: eta_p = 0 gives the first case back
    assert uce_edit(W, c, v, p, 1.0, 1.0, 0.0) == pytest.approx(torch.tensor([[0.5, 0.0], [1.0, 1.0]]))


def test_erase_keys_map_to_their_targets_as_lambda_and_eta_p_vanish():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(5, 4, generator=g, dtype=torch.float64)
    c = torch.randn(3, 4, generator=g, dtype=torch.float64)  # 3 keys in 4 dimensions: solvable exactly
    v = torch.randn(3, 5, generator=g, dtype=torch.float64)
    p = torch.randn(2, 4, generator=g, dtype=torch.float64)
    W_new = uce_edit(W, c, v, p, 1e-9, 1.0, 0.0)
    assert torch.allclose(c @ W_new.T, v, atol=1e-6)
    # and with lambda large the edit leaves W where it was
    assert torch.allclose(uce_edit(W, c, v, p, 1e9, 1.0, 1.0), W, atol=1e-6)


def test_token_rows_by_hand():
    # "red" = BOS red EOS (3 tokens) padded to 5 rows; "" = BOS EOS
    assert list(token_rows(3, "last", 5)) == [1]
    assert list(token_rows(3, "last-to-end", 5)) == [1, 2, 3, 4]
    assert list(token_rows(3, "all", 5)) == [0, 1, 2, 3, 4]
    assert list(token_rows(2, "last", 5)) == [0]  # the empty prompt's "last word" is BOS (the authors' script)
    a, b = torch.arange(5.0)[:, None], 10 + torch.arange(5.0)[:, None]
    # last-to-end of a 4-token prompt (rows 2..4) against the empty prompt (rows 0..4): truncated to 3 pairs
    x, y = paired_rows(a, 4, b, 2, "last-to-end")
    assert x.flatten().tolist() == [2, 3, 4] and y.flatten().tolist() == [10, 11, 12]


def test_rece_embedding_by_hand_and_its_normal_equations():
    W, W_o, c = torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.eye(2), torch.tensor([[1.0, 1.0]])
    # (W^T W + I) c'^T = W^T W^o c^T: diag(5, 2) c' = (2, 1) -> c' = (0.4, 0.5)
    assert adversarial_embedding([W], [W_o], c, 1.0) == pytest.approx(torch.tensor([[0.4, 0.5]]))
    g = torch.Generator().manual_seed(1)
    Ws = [torch.randn(6, 4, generator=g, dtype=torch.float64) for _ in range(3)]
    Wos = [torch.randn(6, 4, generator=g, dtype=torch.float64) for _ in range(3)]
    cs = torch.randn(7, 4, generator=g, dtype=torch.float64)
    x = adversarial_embedding(Ws, Wos, cs, 0.1)
    A = sum(w.T @ w for w in Ws) + 0.1 * torch.eye(4, dtype=torch.float64)
    M = sum(w.T @ wo for w, wo in zip(Ws, Wos))
    assert torch.allclose(A @ x.T, M @ cs.T, atol=1e-10)
    # unedited weights and no regulariser: the concept's own embedding
    assert torch.allclose(adversarial_embedding(Wos, Wos, cs, 0.0), cs, atol=1e-10)


def same_tensors(a, b) -> bool:
    """The same tensors under the same names (safetensors' header metadata has no fixed order, so not bytes)."""
    x, y = load_file(a), load_file(b)
    return set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in x)


def tiny_uce(tmp_path, *overrides):
    cfg = load_config(UCEConfig, UCE_TINY, [f"output_dir={tmp_path}", "uce.templates=['{}','a photo of {}']",
                                            "uce.preserve_prompts=['a photo of a dog', cat]", *overrides])
    return UCEMethod(cfg)


@pytest.mark.parametrize("rows", ["last", "last-to-end", "all"])
def test_edited_projections_satisfy_the_normal_equations_and_nothing_else_moves(tmp_path, rows):
    method = tiny_uce(tmp_path, f"uce.token_rows={rows}")
    before = {k: v.clone() for k, v in method.model.state_dict().items()}
    assert len(method.projections) == 8  # every attn2.to_k and attn2.to_v of the tiny UNet
    erase, guide, preserve = (x.double() for x in method.uce_keys(method.cfg.uce))
    method.solve_step(0)
    s = method.cfg.uce
    for name, module in method.projections.items():
        W_old, W_new = before[f"{name}.weight"].double(), module.weight.detach().double()
        v_star = guide @ W_old.T
        lhs = W_new @ (s.lam * torch.eye(W_old.shape[1], dtype=torch.float64) + s.erase_scale * erase.T @ erase
                       + s.preserve_scale * preserve.T @ preserve)
        rhs = s.lam * W_old + s.erase_scale * v_star.T @ erase + s.preserve_scale * (preserve @ W_old.T).T @ preserve
        assert torch.allclose(lhs, rhs, rtol=1e-4, atol=1e-4 * rhs.abs().max().item()), name
    for key, value in method.model.state_dict().items():
        edited = key.endswith(("attn2.to_k.weight", "attn2.to_v.weight"))
        assert torch.equal(value, before[key]) != edited, key


def test_uce_run_writes_what_an_sdd_run_writes_and_reexports_identically(tmp_path):
    out = tmp_path / "uce"
    result = api.train(UCE_TINY, f"output_dir={out}", *FAST)
    assert result.steps == 1 and result.exports["pipeline"] == str(out / "pipeline")
    assert describe(result, str(out)).startswith("solved 1 closed-form steps in ")  # not "trained": no optimizer
    for path in ["pipeline/model_index.json", "unet.safetensors", "config.yaml", "README.md", "train_summary.json",
                 "checkpoints/step-000001/model.safetensors", "samples/step-000001.png"]:
        assert (out / path).exists(), path
    assert "UCE (closed form, last-to-end token rows, lambda=0.5)" in (out / "README.md").read_text()
    original = build_tiny_sd().unet.state_dict()
    exported = load_file(out / "unet.safetensors")
    changed = {k for k in original if not torch.equal(original[k], exported[k])}
    assert changed == {k for k in original if k.endswith(("attn2.to_k.weight", "attn2.to_v.weight"))}
    pipe = StableDiffusionPipeline.from_pretrained(out / "pipeline")
    image = pipe("a photo of a cat", num_inference_steps=2, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (32, 32, 3)
    again = api.export(out, out=tmp_path / "again")
    assert same_tensors(tmp_path / "again/unet.safetensors", out / "unet.safetensors")
    assert set(again) == set(result.exports)


def test_rece_resumes_at_the_next_epoch_with_the_same_weights(tmp_path):
    full = tmp_path / "full"
    result = load_script("train_rece").main(["--config", RECE_TINY, f"output_dir={full}", *FAST])
    assert result.steps == 3  # the UCE start and two adversarial rounds, a checkpoint after each
    assert sorted(p.name for p in (full / "checkpoints").iterdir()) == ["step-000001", "step-000002", "step-000003"]
    rounds = result.summary["edits"][1:]
    assert all(r["recovery_after"] > r["recovery_before"] for r in rounds)  # each round undoes its attack
    cut = tmp_path / "cut"  # interrupted after the first round: its last checkpoint and the export are missing
    shutil.copytree(full, cut, ignore=shutil.ignore_patterns("step-000003", "pipeline", "unet.safetensors"))
    resumed = load_script("train_rece").main(["--config", RECE_TINY, f"output_dir={cut}", "--resume", *FAST])
    assert resumed.steps == 3 and resumed.summary["edits"] == result.summary["edits"]  # every round
    assert same_tensors(cut / "unet.safetensors", full / "unet.safetensors")


def test_rece_first_step_is_the_uce_edit(tmp_path):
    cfg = load_config(RECEConfig, RECE_TINY, [f"output_dir={tmp_path}"])
    rece = RECEMethod(cfg)
    uce = UCEMethod(load_config(UCEConfig, UCE_TINY, [f"output_dir={tmp_path}", "uce.preserve_prompts=[]"]))
    rece.solve_step(0)
    uce.solve_step(0)
    for name, module in rece.projections.items():
        assert torch.equal(module.weight, uce.projections[name].weight), name
        assert not torch.equal(module.weight, rece.original[name])


@pytest.mark.parametrize("override,message", [
    ("finetune=lora", "config error: finetune: a closed-form edit writes the cross-attention key/value"),
    ("uce.token_rows=first", "uce.token_rows"),
    ("uce.lam=0", "config error: uce.lam: must be > 0"),
    ("uce.guides=[a,b]", "config error: uce.guides: give one guide or one per concept (1), got 2"),
    ("uce.templates=['a photo']", "config error: uce.templates: every template must hold {}"),
])
def test_bad_settings_are_one_line(tmp_path, override, message):
    with pytest.raises(UserError) as err:
        api.train(UCE_TINY, f"output_dir={tmp_path / 'run'}", override)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()


def test_rece_bad_setting_and_sdd_bench_refusal(tmp_path):
    with pytest.raises(UserError, match="rece.reg: must be > 0"):
        api.train(RECE_TINY, f"output_dir={tmp_path / 'run'}", "rece.reg=0")
    from sdd.speed import Case, make_config

    with pytest.raises(UserError, match="uce is a closed-form method"):
        make_config(Case("uce", method="uce"))
