"""Per-image results kept beside the images, so that an evaluation is resumable and a re-run recomputes nothing.

In an image folder (``OUT/images/<entry>/<suite>/``):

- ``scores.jsonl``: one line per (image, scorer): ``{"file_name", "scorer", "key", "result": {...}}``. ``key`` is
  a hash of everything that decides the result (model ids, weight files' SHA-256, thresholds): a line is reused
  only under the same key, so changing a threshold recomputes that scorer and nothing else.
- ``features-<scorer>-<key>.npz``: vectors per image (CLIP image embeddings for FID): ``names`` and ``features``.

While processes score, each appends to its own ``scores.rank<R>.jsonl`` and writes one
``features-...rank<R>-<unit>.npz`` per batch; the main process folds them into the two files above afterwards
(``merge``). Readers take every file, so results of a run that crashed before merging are reused as well.
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Optional

import numpy as np

from sdd.files import atomic_path, to_json, write_text

SCORES = "scores.jsonl"


def _score_files(folder: str) -> list[str]:
    if not os.path.isdir(folder):
        return []
    names = os.listdir(folder)
    return sorted(n for n in names if n == SCORES or (n.startswith("scores.rank") and n.endswith(".jsonl")))


def read_scores(folder: str, scorer: str, key: str) -> dict[str, dict]:
    """file_name -> result of ``scorer`` under ``key`` (a torn last line from a crash is ignored)."""
    out: dict[str, dict] = {}
    for name in _score_files(folder):
        with open(os.path.join(folder, name), encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if record.get("scorer") == scorer and record.get("key") == key:
                    out[record["file_name"]] = record["result"]
    return out


def append_scores(folder: str, rank: int, scorer: str, key: str, results: Iterable[tuple[str, dict]]) -> None:
    with open(os.path.join(folder, f"scores.rank{rank}.jsonl"), "a", encoding="utf-8") as f:
        for file_name, result in results:
            f.write(to_json({"file_name": file_name, "scorer": scorer, "key": key, "result": result}) + "\n")
        f.flush()


def _features_prefix(scorer: str, key: str) -> str:
    return f"features-{scorer}-{key}"


def read_features(folder: str, scorer: str, key: str) -> dict[str, np.ndarray]:
    prefix = _features_prefix(scorer, key)
    out: dict[str, np.ndarray] = {}
    if not os.path.isdir(folder):
        return out
    for name in sorted(os.listdir(folder)):
        if name.startswith(prefix) and name.endswith(".npz"):
            with np.load(os.path.join(folder, name), allow_pickle=False) as data:
                out.update(zip((str(n) for n in data["names"]), data["features"]))
    return out


def read_feature_names(folder: str, scorer: str, key: str) -> set[str]:
    """The file names that have features, without reading the vectors."""
    prefix = _features_prefix(scorer, key)
    out: set[str] = set()
    if not os.path.isdir(folder):
        return out
    for name in os.listdir(folder):
        if name.startswith(prefix) and name.endswith(".npz"):
            with np.load(os.path.join(folder, name), allow_pickle=False) as data:
                out.update(str(n) for n in data["names"])
    return out


def _save_npz(path: str, names: list[str], features: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a bare name
            np.savez(f, names=np.array(names, dtype=str), features=np.asarray(features, dtype=np.float32))


def write_features(folder: str, rank: int, unit: int, scorer: str, key: str, names: list[str],
                   features: np.ndarray) -> None:
    _save_npz(os.path.join(folder, f"{_features_prefix(scorer, key)}.rank{rank}-{unit:06d}.npz"), names, features)


def merge(folder: str) -> None:
    """Fold the per-process files into ``scores.jsonl`` and one ``features-<scorer>-<key>.npz`` per key."""
    if not os.path.isdir(folder):
        return
    shards = [n for n in _score_files(folder) if n != SCORES]
    if shards:
        records: dict[tuple, str] = {}
        for name in _score_files(folder):  # scores.jsonl first (sorted), then the shards: later lines win
            with open(os.path.join(folder, name), encoding="utf-8") as f:
                for line in f:
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    records[(record["scorer"], record["key"], record["file_name"])] = to_json(record) + "\n"
        write_text(os.path.join(folder, SCORES), "".join(records[k] for k in sorted(records)))
        for name in shards:
            os.remove(os.path.join(folder, name))
    partial = [n for n in os.listdir(folder) if n.startswith("features-") and ".rank" in n and n.endswith(".npz")]
    for prefix in sorted({n.split(".rank")[0] for n in partial}):
        scorer_key = prefix[len("features-"):]
        scorer, _, key = scorer_key.rpartition("-")
        features = read_features(folder, scorer, key)
        names = sorted(features)
        _save_npz(os.path.join(folder, prefix + ".npz"), names, np.stack([features[n] for n in names]))
        for name in partial:
            if name.startswith(prefix + ".rank"):
                os.remove(os.path.join(folder, name))


def read_json(path: str) -> Optional[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def write_json(path: str, data) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_text(path, to_json(data, indent=2, ensure_ascii=False) + "\n")
