"""Ring-A-Bell (Tsai et al., ICLR 2024): black-box prompt search with the text encoder alone.

    c = mean_i [ E(p_i+) - E(p_i-) ]                 (the concept vector: pairs differing only by the concept)
    target(p) = E(p) + eta * c
    prompt*(p) = argmin_{K tokens} || target(p) - E([BOS, tokens, EOS ...]) ||^2     (a genetic search)

E is the text encoder's full last hidden state (77 x D). The genetic search (the paper's notebook): a population
of 200 candidates of K random tokens; each generation keeps the better half, adds children by single-point
crossover (probability 0.5, both children) and mutation (probability 0.25, one position to a random token).
Budget: generations (the paper's 3000). The attacked UNet is never touched: the attack needs only the text
encoder, which erasure methods that edit the UNet leave as it was. ASR: the attacked model generates each seed
prompt's found prompt at held-out seeds; the curve re-evaluates the best candidates at earlier generations.

Choices (docs/METHODS.md section 7.3): the seed prompts are the concept prompts (on ShapesWorld the benchmark's);
the pairs are, on ShapesWorld, each concept prompt against the same prompt with every other value of the
concept's attribute ("a red circle" - "a blue circle"), elsewhere "a photo of {concept}" against "a photo"; K = 16
and eta = 3 (the notebook's). The search runs over the tokens with distinct embedding rows (``distinct_vocabulary``:
equal rows encode identically).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from sdd.attacks.common import Target, concept_prompts, distinct_vocabulary, evaluate
from sdd.config import check
from sdd.files import to_json, write_text
from sdd.shapes import world

DEFAULT_BUDGET = 3000  # generations
DEFAULT_CURVE = (100, 1000)


@dataclass
class RingABellSettings:
    tokens: int = 16  # K
    eta: float = 3.0
    population: int = 200
    crossover: float = 0.5
    mutation: float = 0.25

    def __post_init__(self) -> None:
        check(self.tokens >= 1 and self.population >= 4, "ring_a_bell", "tokens >= 1 and population >= 4")


def concept_pairs(target: Target) -> list[tuple[str, str]]:
    if target.shapes:
        kind = world.concept_kind(target.concept)
        others = [v for v in (world.COLOURS if kind == "colour" else world.SHAPES) if v != target.concept]
        return [(p, p.replace(target.concept, o)) for p in concept_prompts(target) if p != target.concept
                for o in others]
    return [(f"a photo of {target.concept}", "a photo")]


@torch.no_grad()
def encode_ids(text_encoder, ids: torch.Tensor, batch: int = 256) -> torch.Tensor:
    return torch.cat([text_encoder(ids[i : i + batch])[0] for i in range(0, len(ids), batch)]).float()


def candidate_ids(tokens: torch.Tensor, bos: int, eos: int, length: int) -> torch.Tensor:
    """[BOS, K tokens, EOS, EOS, ...] (EOS pads, as the notebook)."""
    n, k = tokens.shape
    ids = torch.full((n, length), eos, dtype=torch.long)
    ids[:, 0] = bos
    ids[:, 1 : 1 + k] = tokens
    return ids


def search(text_encoder, target_hidden: torch.Tensor, vocab_ids: list[int], s: RingABellSettings, generations: int,
           rng: np.random.Generator, keep_at=()) -> tuple[list[int], dict[int, list[int]]]:
    """The genetic search for one target; returns the best tokens and the best at each generation of ``keep_at``."""
    cfg = text_encoder.config
    length = target_hidden.shape[0]
    vocab = np.asarray(vocab_ids)
    pop = vocab[rng.integers(len(vocab), size=(s.population, s.tokens))]

    def fitness(p: np.ndarray) -> np.ndarray:
        hidden = encode_ids(text_encoder, candidate_ids(torch.from_numpy(p), cfg.bos_token_id, cfg.eos_token_id,
                                                         length))
        return ((hidden - target_hidden[None]) ** 2).sum(dim=(1, 2)).numpy()

    kept: dict[int, list[int]] = {}
    scores = fitness(pop)
    for generation in range(1, generations + 1):
        order = np.argsort(scores, kind="stable")
        parents = pop[order[: s.population // 2]]
        children = []
        while len(parents) + len(children) < s.population:
            a, b = parents[rng.integers(len(parents), size=2)]
            if rng.random() < s.crossover:
                cut = rng.integers(1, s.tokens) if s.tokens > 1 else 0
                children += [np.concatenate([a[:cut], b[cut:]]), np.concatenate([b[:cut], a[cut:]])]
            else:
                children += [a.copy(), b.copy()]
        children = np.stack(children[: s.population - len(parents)])
        mutate = rng.random(len(children)) < s.mutation
        where = rng.integers(s.tokens, size=len(children))
        children[mutate, where[mutate]] = vocab[rng.integers(len(vocab), size=int(mutate.sum()))]
        pop = np.concatenate([parents, children])
        scores = np.concatenate([scores[order[: s.population // 2]], fitness(children)])
        if generation in keep_at:
            kept[generation] = pop[int(np.argmin(scores))].tolist()
    return pop[int(np.argmin(scores))].tolist(), kept


def attack(target: Target, cfg, out: str, points: list[int], progress) -> dict:
    from sdd.methods.common import embed, load_base

    s: RingABellSettings = cfg.ring_a_bell
    components = load_base(target.model, None, "cpu")
    text_encoder, tokenizer = components.text_encoder, components.tokenizer
    pairs = concept_pairs(target)
    vector = (embed(components, [p for p, _ in pairs]) - embed(components, [q for _, q in pairs])).mean(0).float()
    seeds = concept_prompts(target)
    vocab_ids, _ = distinct_vocabulary(text_encoder)
    record_path = os.path.join(out, "found.json")
    found = _read(record_path)
    for i, prompt in enumerate(seeds):
        if prompt in found:
            continue
        progress(f"ring-a-bell: searching for {prompt!r} ({points[-1]} generations)")
        target_hidden = embed(components, [prompt])[0].float() + s.eta * vector
        rng = np.random.default_rng([cfg.seed, i])
        best, kept = search(text_encoder, target_hidden, vocab_ids, s, points[-1], rng, keep_at=set(points))
        found[prompt] = {str(g): _text(tokenizer, kept.get(g, best)) for g in points} | {"tokens": best}
        write_text(record_path, to_json(found, indent=2) + "\n")
    curve = []
    for budget in points:
        prompts = [found[p][str(budget)] for p in seeds]
        result = evaluate(target, prompts, os.path.join(out, "images", f"generation-{budget:06d}"))
        curve.append({"budget": budget, **{k: v for k, v in result.items() if k != "flags"}})
    return {"curve": curve, "found": {"prompts": {p: found[p][str(points[-1])] for p in seeds},
                                      "concept_pairs": pairs, "eta": s.eta}}


def _text(tokenizer, ids: list[int]) -> str:
    """The tokens as the text a user types (CLIP's word ends become spaces)."""
    return " ".join(tokenizer.decode(ids, skip_special_tokens=True).split())


def _read(path: str) -> dict:
    import json

    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)
