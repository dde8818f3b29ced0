"""RECE: Reliable and Efficient Concept Erasure (Gong et al., ECCV 2024): UCE, then closed-form adversarial
embeddings that bring the concept back under the edited weights join the erase set, iterated.

    W <- UCE(W^o)                                                    (the start point: ``uce`` settings)
    repeat epochs times:
        for every erase prompt c (all its token rows, ``rece.token_rows``):
            c' = argmin_x sum_l ||W_l x - W^o_l c||^2 + reg ||x||^2
               = (sum_l W_l^T W_l + reg I)^-1 sum_l W_l^T W^o_l c        (l: every attn2.to_k and attn2.to_v)
        W <- UCE(W; erase keys c', values W e(guide), preserve keys e(p) for p in rece.preserve_prompts)

c' is the embedding under which the edited model's keys and values best reproduce what the original model made
of the concept: the strongest closed-form "attack" on the current weights; each epoch maps it to the guide. The edit
is ``sdd.methods.uce.uce_edit`` (one piece of code for both methods), from the current weights.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal, Sequence

import torch

from sdd.config import check
from sdd.methods import uce

# --- the math (pure) -----------------------------------------------------------------------------------------


def adversarial_embedding(W_now: Sequence[torch.Tensor], W_orig: Sequence[torch.Tensor], c: torch.Tensor,
                          reg: float) -> torch.Tensor:
    """c' = (sum_l W_l^T W_l + reg I)^-1 sum_l W_l^T W^o_l c, for the rows of ``c`` (N, in); W_l, W^o_l (out_l, in).
    Solved in float64; returned in c's dtype."""
    d = c.shape[1]
    A = reg * torch.eye(d, dtype=torch.float64, device=c.device)
    M = torch.zeros((d, d), dtype=torch.float64, device=c.device)
    for W, W_o in zip(W_now, W_orig):
        W, W_o = W.double().to(c.device), W_o.double().to(c.device)
        A = A + W.T @ W
        M = M + W.T @ W_o
    return torch.linalg.solve(A, M @ c.double().T).T.to(c.dtype)


def recovery(W_now: Sequence[torch.Tensor], W_orig: Sequence[torch.Tensor], x: torch.Tensor, c: torch.Tensor
             ) -> float:
    """sum_l ||W_l x - W^o_l c||^2 / sum_l ||W^o_l c||^2: how far the keys and values of ``x`` under the current
    weights are from the original model's of the concept ``c`` (0: the concept fully regenerated)."""
    num = sum(float(((x.double() @ W.double().T) - (c.double() @ W_o.double().T)).pow(2).sum())
              for W, W_o in zip(W_now, W_orig))
    den = sum(float((c.double() @ W_o.double().T).pow(2).sum()) for W_o in W_orig)
    return num / max(den, 1e-30)


# --- configuration -------------------------------------------------------------------------------------------


@dataclass
class RECESettings:
    epochs: int = 3  # adversarial rounds after the UCE start (the README: nudity 3, I2P 2, styles/objects 1)
    reg: float = 0.1  # the regulariser of c' (the README: 0.1; 1e-3 for styles and hard objects)
    guide: str = ""  # what c' is mapped to (the code's " ", which encodes as the empty prompt)
    preserve_prompts: list[str] = field(default_factory=lambda: [""])
    lam: float = 0.1  # the edit's lambda (the README's lambda_1 = lambda_2 = 0.1)
    erase_scale: float = 1.0
    preserve_scale: float = 0.1
    token_rows: uce.TokenRows = "all"  # RECE uses all 77 rows

    def __post_init__(self) -> None:
        check(self.epochs >= 0, "rece.epochs", f"must be >= 0, got {self.epochs}")
        check(self.reg > 0, "rece.reg", f"must be > 0, got {self.reg}")
        check(self.lam > 0, "rece.lam", f"must be > 0 (the system is singular without it), got {self.lam}")
        check(self.erase_scale > 0, "rece.erase_scale", f"must be > 0, got {self.erase_scale}")
        check(self.preserve_scale >= 0, "rece.preserve_scale", f"must be >= 0, got {self.preserve_scale}")


@dataclass
class RECEConfig(uce.UCEConfig):
    method: Literal["rece"] = "rece"
    output_dir: str = "outputs/rece"
    rece: RECESettings = field(default_factory=RECESettings)


# --- the method ----------------------------------------------------------------------------------------------


class RECEMethod(uce.UCEMethod):
    """Iteration 0 is the UCE edit (``uce`` settings); iterations 1..epochs the adversarial rounds."""

    def __init__(self, cfg: RECEConfig, device: torch.device | str = "cpu", process_index: int = 0,
                 num_processes: int = 1):
        super().__init__(cfg, device, process_index, num_processes)
        r = cfg.rece
        self.iterations = 1 + r.epochs
        # the original projections (W^o): taken before any edit (a resumed run loads its checkpoint after this)
        self.original = {name: m.weight.detach().clone() for name, m in self.projections.items()}
        self.rece_prompts = uce.PromptRows(self.base, [e for e, _ in self.pairs] + [r.guide, *r.preserve_prompts])

    def solve_step(self, iteration: int) -> dict[str, float]:
        if iteration == 0:
            return super().solve_step(iteration)
        r = self.cfg.rece
        W_orig = list(self.original.values())
        W_now = [m.weight.detach() for m in self.projections.values()]
        adv, guide, before = [], [], []
        for erase_prompt, _ in self.pairs:
            c, g = self.rece_prompts.pair(erase_prompt, r.guide, r.token_rows)
            c = c.to(W_now[0].device)
            x = adversarial_embedding(W_now, W_orig, c, r.reg)
            before.append(recovery(W_now, W_orig, x, c))
            adv.append(x)
            guide.append(g)
        preserve = [self.rece_prompts.keys(p, r.token_rows) for p in r.preserve_prompts]
        adv_keys = torch.cat(adv)
        preserve_keys = torch.cat(preserve) if preserve else adv_keys.new_zeros((0, adv_keys.shape[1]))
        logs = uce.edit_all(self.projections, adv_keys, torch.cat(guide), preserve_keys, r.lam, r.erase_scale,
                            r.preserve_scale)
        W_now = [m.weight.detach() for m in self.projections.values()]
        after = [recovery(W_now, W_orig, x, self.rece_prompts.pair(e, r.guide, r.token_rows)[0].to(x.device))
                 for x, (e, _) in zip(adv, self.pairs)]
        logs.update(recovery_before=sum(before) / len(before), recovery_after=sum(after) / len(after))
        self.history.append({"iteration": iteration, **logs})
        return {"loss": logs["erase_residual"], **logs}

    def card(self):
        card = super().card()
        r = self.cfg.rece
        card.method = f"RECE (UCE + {r.epochs} closed-form adversarial rounds, reg={r.reg:g})"
        card.hyperparameters = {**card.hyperparameters, **{f"rece.{k}": v for k, v in dataclasses.asdict(r).items()}}
        return card
