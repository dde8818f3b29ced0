"""HFI reward model: a small MLP on frozen CLIP image embeddings, trained on human (or automatic) feedback.

    binary  (yes = 1, no = 0, skip dropped):   L_MSE(psi) = mean_i (r_psi(x_i) - y_i)^2
    ranking (Bradley-Terry on every (better, worse) pair of each ranked set s with M_s ranked images):
        L_BT(psi) = -(1/S) sum_s nu(M_s) sum_{(i, j) in P_s} log sigmoid(r_psi(x_i) - r_psi(x_j))
        nu(M) = 1 / C(M, 2) ("pairs", default: the mean over a set's pairs, so every set weighs the same
        whatever it excluded) or 1 / M^2 ("m2", the form the review of the paper gives)

(Kim et al., ECCV 2024, arXiv 2407.21032; docs/METHODS.md section 2.1, step 3.) Rank 1 = shows the concept most,
so a higher reward means "more of the concept"; images marked "X" take part in no pair.

The embeddings are computed once (``sdd.embeddings``, cached on disk) and the MLP trains through the shared
loop (``sdd.loop.fit``). A deterministic held-out split (whole images for binary feedback, whole ranked sets
for rankings) gives the accuracy reported in ``train_summary.json``. The export ``OUT/reward/`` holds
``model.safetensors`` and ``reward.json`` (the embedding model, the MLP's shape, the mode and the metrics);
``load_reward(OUT)`` rebuilds it and ``score_images(OUT, images)`` scores images in one call.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Literal, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sdd.config import TrackingConfig, TrainConfig, check
from sdd.embeddings import EmbedderConfig, ImageEmbedder
from sdd.errors import UserError
from sdd.files import to_json

REWARD_FORMAT = "hfi-reward"
REWARD_VERSION = 1
LABEL_VALUES = {"yes": 1.0, "no": 0.0}  # "skip" is dropped

# --- the math (pure) -----------------------------------------------------------------------------------------


def mse_reward_loss(rewards: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """mean_i (r_i - y_i)^2 over N labelled images; rewards, labels (N,), labels in {0, 1}. In fp32."""
    return F.mse_loss(rewards.float(), labels.float())


def ranking_pairs(ranking: Sequence[Optional[int]]) -> list[tuple[int, int]]:
    """Every (better, worse) pair of positions in one ranked set: rank 1 is best, ``None`` (X) takes no part.

    >>> ranking_pairs([2, None, 1, 3])
    [(2, 0), (2, 3), (0, 3)]
    """
    ranked = sorted((r, i) for i, r in enumerate(ranking) if r is not None)
    return [(ranked[a][1], ranked[b][1]) for a in range(len(ranked)) for b in range(a + 1, len(ranked))]


def pair_normaliser(m: int, normaliser: str = "pairs") -> float:
    """nu(M): 1 / C(M, 2) (``pairs``) or 1 / M^2 (``m2``) for a set of M ranked images."""
    if m < 2:
        raise ValueError(f"a ranked set needs at least 2 ranked images, got {m}")
    if normaliser == "pairs":
        return 1.0 / math.comb(m, 2)
    if normaliser == "m2":
        return 1.0 / (m * m)
    raise ValueError(f"unknown normaliser {normaliser!r}")


def bradley_terry_loss(r_better: torch.Tensor, r_worse: torch.Tensor, pair_weights: torch.Tensor,
                       num_sets: int) -> torch.Tensor:
    """-(1/S) sum_p w_p log sigmoid(r_better_p - r_worse_p); all (P,), w_p = nu(M_s) of the pair's set s.

    Bradley-Terry: P(i ranked above j) = sigmoid(r_i - r_j); the loss is its negative log-likelihood over the
    pairs of S sets. In fp32.
    """
    margin = r_better.float() - r_worse.float()
    return -(pair_weights.float() * F.logsigmoid(margin)).sum() / num_sets


# --- configuration -------------------------------------------------------------------------------------------


@dataclass
class FeedbackConfig:
    images: str = "???"  # the image folder that was labelled (metadata.jsonl + images)
    dir: str = "???"  # the feedback folder (feedback.jsonl), as hfi-label / hfi-autolabel write it
    mode: Literal["binary", "ranking"] = "binary"
    concept: Optional[str] = None  # only records of this concept (default: every record of the mode)
    annotators: Optional[list[str]] = None  # only these annotators (default: all)


@dataclass
class RewardSettings:
    hidden: list[int] = field(default_factory=lambda: [256])  # hidden widths of the MLP
    dropout: float = 0.1
    heldout_fraction: float = 0.2  # of the images (binary) or ranked sets (ranking), for the reported accuracy
    split_seed: int = 0
    bt_normaliser: Literal["pairs", "m2"] = "pairs"  # nu(M) of the Bradley-Terry loss

    def __post_init__(self) -> None:
        check(all(h >= 1 for h in self.hidden), "reward.hidden", "widths must be >= 1")
        check(0.0 <= self.dropout < 1.0, "reward.dropout", "must lie in [0, 1)")
        check(0.0 <= self.heldout_fraction < 1.0, "reward.heldout_fraction", "must lie in [0, 1)")


@dataclass
class RewardConfig:
    method: Literal["hfi-reward"] = "hfi-reward"
    feedback: FeedbackConfig = field(default_factory=FeedbackConfig)
    embedder: EmbedderConfig = field(default_factory=EmbedderConfig)
    reward: RewardSettings = field(default_factory=RewardSettings)
    output_dir: str = "outputs/hfi-reward"
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(steps=500, batch_size=64, lr=1e-3, weight_decay=1e-2,
                                            max_grad_norm=None, checkpoint_every=0, log_every=50)
    )
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(tracker="none", sample_every=0))


# --- the model -----------------------------------------------------------------------------------------------


class RewardMLP(nn.Module):
    """r_psi(e): Linear -> GELU -> Dropout per hidden width, then Linear to one scalar. (N, D) -> (N,)."""

    def __init__(self, in_dim: int, hidden: Sequence[int] = (256,), dropout: float = 0.1):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.GELU(), nn.Dropout(dropout)]
            width = h
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)
        self.shape = {"in_dim": in_dim, "hidden": list(hidden), "dropout": dropout}

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.net(embeddings).squeeze(-1)


# --- the feedback as training data ---------------------------------------------------------------------------


@dataclass
class FeedbackData:
    """What the feedback says, over a list of unique image files (indices into ``files``)."""

    mode: str
    files: list[str]  # absolute paths
    names: list[str]  # file names relative to the image folder
    labels: list[tuple[int, float]] = field(default_factory=list)  # binary: (file index, 0/1)
    sets: list[list[Optional[int]]] = field(default_factory=list)  # ranking: file index per shown image
    rankings: list[list[Optional[int]]] = field(default_factory=list)  # ranking: rank per image or None (X)


def load_feedback(cfg: FeedbackConfig) -> FeedbackData:
    """The feedback records of ``cfg`` as training data: binary labels or ranked sets, over unique image files.

    binary: an annotator's last answer per image counts; ``skip`` is dropped; several annotators' answers of
    one image are separate examples. ranking: every record is one set; sets with fewer than 2 ranked images
    (no pair) are dropped.
    """
    from sdd.feedback import FeedbackStore

    if not os.path.isdir(cfg.images):
        raise UserError(f"feedback.images: no such folder: {cfg.images}")
    if not os.path.isfile(os.path.join(cfg.dir, "feedback.jsonl")):
        raise UserError(f"feedback.dir: no feedback.jsonl in {cfg.dir}")
    store = FeedbackStore(cfg.images, cfg.dir, mode=cfg.mode, concept=cfg.concept)
    ds = store.to_dataset(cfg.mode, cfg.annotators)
    if cfg.concept is not None:
        ds = ds.filter(lambda c: c == store.concept, input_columns="concept")
    data = FeedbackData(cfg.mode, [], [])
    index: dict[str, int] = {}

    def file_index(path: str, name: str) -> int:
        if path not in index:
            index[path] = len(data.files)
            data.files.append(path)
            data.names.append(name)
        return index[path]

    if cfg.mode == "binary":
        last: dict[tuple[str, str], str] = {}
        paths: dict[str, str] = {}
        for row in ds:
            last[(row["annotator"], row["file_name"])] = row["label"]
            paths[row["file_name"]] = row["image"]
        for (_, name), label in last.items():
            if label in LABEL_VALUES:
                data.labels.append((file_index(paths[name], name), LABEL_VALUES[label]))
        if not data.labels:
            raise UserError(f"{cfg.dir}: no yes/no labels{_for(cfg)}")
    else:
        for row in ds:
            if sum(r is not None for r in row["ranking"]) < 2:
                continue
            data.sets.append([file_index(p, n) for p, n in zip(row["images"], row["file_names"])])
            data.rankings.append(list(row["ranking"]))
        if not data.sets:
            raise UserError(f"{cfg.dir}: no ranking with at least 2 ranked images{_for(cfg)}")
    return data


def _for(cfg: FeedbackConfig) -> str:
    parts = [f" for concept {cfg.concept!r}" if cfg.concept else "",
             f" by annotators {cfg.annotators}" if cfg.annotators else ""]
    return "".join(parts)


def heldout_keys(keys: Sequence, fraction: float, seed: int) -> set:
    """A deterministic held-out subset of the unique ``keys``: round(fraction * n) of them (at least 1 when
    fraction > 0 and n >= 2, never all), chosen by a permutation seeded with ``seed`` over the sorted keys."""
    unique = sorted(set(keys))
    n = len(unique)
    if fraction <= 0 or n < 2:
        return set()
    k = min(max(1, round(fraction * n)), n - 1)
    order = np.random.default_rng(seed).permutation(n)[:k]
    return {unique[i] for i in order}


# --- the method ----------------------------------------------------------------------------------------------


class RewardMethod:
    """Trains the reward MLP on cached embeddings; the loop sees only the MLP."""

    def __init__(self, cfg: RewardConfig, device: torch.device | str = "cpu", process_index: int = 0,
                 num_processes: int = 1):
        self.cfg = cfg
        self.device = device
        self.data = load_feedback(cfg.feedback)
        self.cache_dir = os.path.abspath(cfg.embedder.cache_dir or os.path.join(cfg.feedback.dir, "embed-cache"))
        embedder = ImageEmbedder.from_config(cfg.embedder, device)
        self.embedder_info = embedder.describe()
        self.embeddings = embedder.embed_files(self.data.files, self.cache_dir).to(device)
        del embedder  # the CLIP tower is not needed while the MLP trains
        s = cfg.reward
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.train.seed)
            self.model = RewardMLP(self.embeddings.shape[1], s.hidden, s.dropout).to(device)
        self.model.train()
        d = self.data
        if d.mode == "binary":
            held = heldout_keys([d.names[i] for i, _ in d.labels], s.heldout_fraction, s.split_seed)
            is_held = [d.names[i] in held for i, _ in d.labels]
            self.train_examples = [e for e, h in zip(d.labels, is_held) if not h]
            self.heldout_examples = [e for e, h in zip(d.labels, is_held) if h]
        else:
            keys = [tuple(sorted(d.names[i] for i in files)) for files in d.sets]
            held = heldout_keys(keys, s.heldout_fraction, s.split_seed)
            sets = list(zip(d.sets, d.rankings))
            self.train_examples = [e for e, k in zip(sets, keys) if k not in held]
            self.heldout_examples = [e for e, k in zip(sets, keys) if k in held]
        self._train = self._tensors(self.train_examples)
        self._heldout = self._tensors(self.heldout_examples)
        if d.mode == "ranking":  # the pairs of each training set, to gather a batch of sets quickly
            self._set_rows = [(self._train["set"] == s).nonzero().flatten() for s in range(len(self.train_examples))]

    def _tensors(self, examples) -> dict[str, torch.Tensor]:
        """binary: file index and label per example; ranking: per pair the better/worse file, set and nu(M)."""
        if self.data.mode == "binary":
            return {"file": torch.tensor([i for i, _ in examples], dtype=torch.long),
                    "label": torch.tensor([y for _, y in examples], dtype=torch.float32)}
        better, worse, set_of, weight = [], [], [], []
        for s, (files, ranking) in enumerate(examples):
            pairs = ranking_pairs(ranking)
            nu = pair_normaliser(sum(r is not None for r in ranking), self.cfg.reward.bt_normaliser)
            for i, j in pairs:
                better.append(files[i])
                worse.append(files[j])
                set_of.append(s)
                weight.append(nu)
        return {"better": torch.tensor(better, dtype=torch.long), "worse": torch.tensor(worse, dtype=torch.long),
                "set": torch.tensor(set_of, dtype=torch.long), "weight": torch.tensor(weight),
                "num_sets": torch.tensor(len(examples))}

    # the loop's interface

    def compute_loss(self, model, micro_step: int, generator: torch.Generator):
        batch = self.cfg.train.batch_size
        e = self.embeddings
        t = self._train
        if self.data.mode == "binary":
            pick = torch.randint(0, len(t["file"]), (batch,), generator=generator)
            rewards = model(e[t["file"][pick].to(e.device)])
            loss = mse_reward_loss(rewards, t["label"][pick].to(rewards.device))
        else:
            sets = torch.randint(0, int(t["num_sets"]), (batch,), generator=generator)
            rows = torch.cat([self._set_rows[s] for s in sets.tolist()])  # a set drawn twice counts twice
            r = model(e[torch.cat([t["better"][rows], t["worse"][rows]]).to(e.device)])
            loss = bradley_terry_loss(r[: len(rows)], r[len(rows):], t["weight"][rows].to(r.device), batch)
        return loss, {}

    @torch.no_grad()
    def metrics(self) -> dict:
        """Accuracy on the training and held-out parts: binary = (r >= 0.5) == label; ranking = fraction of
        (better, worse) pairs with r(better) > r(worse). 95 % Wilson intervals (pairs of one set are not
        independent, so the ranking interval is optimistic)."""
        from sdd.stats import wilson

        was_training = self.model.training
        self.model.eval()
        r = self.model(self.embeddings).float().cpu()
        self.model.train(was_training)
        out: dict = {"mode": self.data.mode}
        for part, t in (("train", self._train), ("heldout", self._heldout)):
            if self.data.mode == "binary":
                n = len(t["file"])
                if not n:
                    out[part] = None
                    continue
                pred = r[t["file"]]
                correct = int(((pred >= 0.5).float() == t["label"]).sum())
                rate = wilson(correct, n)
                positives = float(t["label"].mean())
                out[part] = {"images": n, "accuracy": rate.value, "ci95": [rate.lo, rate.hi],
                             "mse": float(((pred - t["label"]) ** 2).mean()), "positive_rate": positives,
                             "majority_baseline": max(positives, 1.0 - positives)}
            else:
                n = len(t["better"])
                if not n:
                    out[part] = None
                    continue
                correct = int((r[t["better"]] > r[t["worse"]]).sum())
                rate = wilson(correct, n)
                out[part] = {"sets": int(t["num_sets"]), "pairs": n, "pairwise_accuracy": rate.value,
                             "ci95": [rate.lo, rate.hi]}
        return out

    def summary(self) -> dict:
        """The held-out accuracy, for ``train_summary.json``."""
        return {"reward_metrics": self.metrics()}

    def reward_info(self) -> dict:
        cfg = self.cfg
        return {
            "format": REWARD_FORMAT,
            "version": REWARD_VERSION,
            "mode": self.data.mode,
            "loss": "mse (yes=1, no=0)" if self.data.mode == "binary" else
                    f"bradley-terry, nu(M) = {'1/C(M,2)' if cfg.reward.bt_normaliser == 'pairs' else '1/M^2'}",
            "concept": cfg.feedback.concept,
            "embedder": self.embedder_info,
            "embed_cache": self.cache_dir,
            "mlp": self.model.shape,
            "feedback": {"images": os.path.abspath(cfg.feedback.images), "dir": os.path.abspath(cfg.feedback.dir),
                         "annotators": cfg.feedback.annotators, "images_labelled": len(self.data.files)},
            "train_steps": cfg.train.steps,
        }

    def export(self, output_dir: str) -> dict[str, str]:
        path = os.path.join(output_dir, "reward")
        save_reward(path, self.model, {**self.reward_info(), "metrics": self.metrics()})
        return {"reward": path}


# --- saving, loading, scoring --------------------------------------------------------------------------------


def save_reward(path: str, mlp: RewardMLP, info: dict) -> None:
    """``path/model.safetensors`` (the MLP) and ``path/reward.json`` (everything needed to rebuild it)."""
    from safetensors.torch import save_file

    from sdd.files import atomic_path

    with atomic_path(path) as tmp:
        os.makedirs(tmp)
        state = {k: v.detach().float().cpu().contiguous() for k, v in mlp.state_dict().items()}
        save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": REWARD_FORMAT})
        with open(os.path.join(tmp, "reward.json"), "w") as f:
            f.write(to_json(info, indent=2) + "\n")


class RewardModel:
    """A trained reward model: ``score(images)`` -> (N,) rewards (higher = more of the concept)."""

    def __init__(self, mlp: RewardMLP, info: dict, device="cpu"):
        self.mlp = mlp.eval().requires_grad_(False)
        self.info = info
        self.device = device
        self._embedder: Optional[ImageEmbedder] = None

    @property
    def mode(self) -> str:
        return self.info["mode"]

    @property
    def embedder(self) -> ImageEmbedder:
        if self._embedder is None:
            e = self.info["embedder"]
            cfg = EmbedderConfig(model=e["model"], embedding=e["embedding"], normalize=e["normalize"])
            self._embedder = ImageEmbedder.from_config(cfg, self.device)
        return self._embedder

    def free_embedder(self) -> None:
        """Drop the CLIP tower (it is loaded again when needed)."""
        self._embedder = None

    @torch.no_grad()
    def score_embeddings(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.mlp(embeddings.to(self.device)).float().cpu()

    def score(self, images: Sequence) -> torch.Tensor:
        """Rewards of PIL images, arrays or file paths."""
        return self.score_embeddings(self.embedder.embed(list(images)))

    def score_files(self, paths: Sequence[str], cache_dir: Optional[str] = None) -> torch.Tensor:
        """Rewards of image files, through the embedding cache (default: the one the reward was trained with)."""
        cache_dir = cache_dir or self.info.get("embed_cache")
        if cache_dir and not _writable(cache_dir):
            cache_dir = None
        return self.score_embeddings(self.embedder.embed_files(list(paths), cache_dir))


def _writable(folder: str) -> bool:
    probe = folder if os.path.isdir(folder) else os.path.dirname(os.path.abspath(folder))
    return os.path.isdir(probe) and os.access(probe, os.W_OK)


def reward_dir(path: str) -> str:
    """A reward run folder or its ``reward/`` export -> the folder holding reward.json."""
    for candidate in (path, os.path.join(path, "reward")):
        if os.path.isfile(os.path.join(candidate, "reward.json")):
            return candidate
    raise UserError(f"reward: {path} holds no reward model (no reward.json in it or in its reward/ folder)")


def load_reward(path: str, device="cpu") -> RewardModel:
    """Rebuild a reward model from a reward run folder or its ``reward/`` export."""
    from safetensors.torch import load_file

    folder = reward_dir(path)
    with open(os.path.join(folder, "reward.json")) as f:
        info = json.load(f)
    if info.get("format") != REWARD_FORMAT:
        raise UserError(f"reward: {folder}/reward.json is not an HFI reward model (format {info.get('format')!r})")
    shape = info["mlp"]
    mlp = RewardMLP(shape["in_dim"], shape["hidden"], shape["dropout"])
    mlp.load_state_dict(load_file(os.path.join(folder, "model.safetensors")))
    return RewardModel(mlp.to(device), info, device)


def score_images(path: str, images: Sequence, device="cpu") -> torch.Tensor:
    """Rewards (N,) of images (PIL, arrays or file paths) under the reward model saved at ``path``."""
    return load_reward(path, device).score(images)
