"""``hfi-autolabel``: feedback from a detector instead of people, in the labeling app's exact record format.

    hfi-autolabel IMAGE_DIR --feedback DIR --detector shapes:red [--noise 0.1] [--mode binary|ranking] [--seed 0]
    hfi-autolabel IMAGE_DIR --feedback DIR --detector nudenet:i2p --mode ranking --m 5 --noise 0.2
    hfi-autolabel IMAGE_DIR --feedback DIR --detector q16:q16_prompts.npy --clip openai/clip-vit-large-patch14

Detectors (any of the evaluation harness): ``shapes:CONCEPT`` (the ShapesWorld oracle), ``nudenet[:PRESET]``,
``q16:PROMPTS_FILE`` and ``i2p:PROMPTS_FILE`` (Q16 OR NudeNet). The answers go through
``sdd.feedback.FeedbackStore`` into ``DIR/feedback.jsonl`` under the annotator ``auto@<detector>`` (``--annotator``
to simulate several), so everything downstream (reward model, dataset export) cannot tell them from people's.

Simulated annotator noise, rate p (``--noise``): every judgement of an image is wrong with probability p.

- binary: the detector's yes/no is flipped with probability p;
- ranking: each image of a set gets a score s in [0, 1] (the detector's flag as 0/1, or ``--score-key`` for a
  detector's own probability); with probability p the annotator misjudges it, s -> 1 - s; the set is ranked by
  s, highest = rank 1 (shows the concept most), ties broken uniformly at random. No image is excluded (X).

Every draw comes from ``numpy.random.default_rng([seed, unit index])``, so a run, a re-run and a run resumed after
an interruption (already answered units are skipped) give the same answers. What the detector said and which
judgements were flipped is kept beside the feedback, in ``DIR/autolabel/<annotator>.jsonl`` (one line per
record, by record id) and ``DIR/autolabel/<annotator>.json`` (detector criterion, noise, seed, realised rate).
"""

from __future__ import annotations

import argparse
import json
import os
import re
from typing import Optional, Sequence

import numpy as np

from sdd.errors import UserError, run_main
from sdd.files import to_json
from sdd.judges import detector_for

# --- the noise model (pure) ----------------------------------------------------------------------------------


def noisy_label(flag: bool, u: float, noise: float) -> tuple[str, bool]:
    """("yes" | "no", flipped): the detector's flag, flipped when the uniform draw u < noise."""
    flipped = u < noise
    return ("yes" if flag != flipped else "no"), flipped


def noisy_ranking(scores: Sequence[float], flipped: Sequence[bool], tiebreak: Sequence[float]) -> list[int]:
    """Ranks 1..M (1 = shows the concept most) of M images with scores s in [0, 1].

    A misjudged image (``flipped``) is ranked as if its score were 1 - s. Order: score descending, then
    ``tiebreak`` (uniform draws) ascending, so equal scores are ordered at random.
    """
    seen = [1.0 - s if f else s for s, f in zip(scores, flipped)]
    order = sorted(range(len(seen)), key=lambda i: (-seen[i], tiebreak[i]))
    ranks = [0] * len(seen)
    for rank, i in enumerate(order, 1):
        ranks[i] = rank
    return ranks


def concept_score(detection, key: Optional[str] = None) -> float:
    """s in [0, 1]: the detector's flag as 0/1, or its score ``key`` (which must be a number in [0, 1])."""
    if key is None:
        return float(bool(detection.flag))
    if key not in detection.scores:
        raise UserError(f"--score-key {key}: the detector reports no such score (it has {sorted(detection.scores)})")
    value = detection.scores[key]
    if isinstance(value, str) or not 0.0 <= float(value) <= 1.0:
        raise UserError(f"--score-key {key}: value {value!r} is not a number in [0, 1]")
    return float(value)


def unit_rng(seed: int, unit_index: int) -> np.random.Generator:
    return np.random.default_rng([seed, unit_index])


# --- detectors -----------------------------------------------------------------------------------------------


def make_detector(spec: str, clip: Optional[str] = None, device: str = "cpu"):
    """(detector, default concept text) for ``shapes:CONCEPT``, ``nudenet[:PRESET]``, ``q16:FILE``, ``i2p:FILE``."""
    return detector_for(spec, clip, device)


# --- labeling ------------------------------------------------------------------------------------------------


def _slug(annotator: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.@+-]+", "_", annotator)


def autolabel(
    image_dir: str,
    feedback_dir: str,
    detector,
    *,
    concept: Optional[str],
    mode: str = "binary",
    m: int = 5,
    noise: float = 0.0,
    seed: int = 0,
    annotator: Optional[str] = None,
    score_key: Optional[str] = None,
    batch_size: int = 64,
) -> dict:
    """Answer every unit of IMAGE_DIR not yet answered by ``annotator``; returns the run's summary."""
    from sdd.feedback import FeedbackStore, append_record, unit_key, validate_annotator
    from sdd.files import write_text

    if not 0.0 <= noise <= 1.0:
        raise UserError(f"--noise {noise}: must lie in [0, 1]")
    if score_key is not None and mode != "ranking":
        raise UserError("--score-key is for --mode ranking (binary labels are the detector's flag)")
    annotator = validate_annotator(annotator or f"auto@{detector.name}")
    store = FeedbackStore(image_dir, feedback_dir, mode=mode, concept=concept, m=m)
    done = store.answered(annotator)
    todo = [(i, unit) for i, unit in enumerate(store.units) if unit_key(unit) not in done]
    needed = sorted({item.file_name: item for _, unit in todo for item in unit}.items())
    detections = {}
    for start in range(0, len(needed), batch_size):
        chunk = needed[start : start + batch_size]
        for (name, _), d in zip(chunk, detector.detect([item.path for _, item in chunk])):
            detections[name] = d

    side_dir = os.path.join(store.feedback_dir, "autolabel")
    os.makedirs(side_dir, exist_ok=True)
    side_log = os.path.join(side_dir, f"{_slug(annotator)}.jsonl")
    for index, unit in todo:
        rng = unit_rng(seed, index)
        names = [item.file_name for item in unit]
        if mode == "binary":
            flag = bool(detections[names[0]].flag)
            label, flipped = noisy_label(flag, float(rng.random()), noise)
            record = store.answer_binary(annotator, names[0], label)
            side = {"detector_flag": [flag], "flipped": [flipped]}
        else:
            scores = [concept_score(detections[n], score_key) for n in names]
            flipped = [bool(f) for f in rng.random(len(names)) < noise]
            ranks = noisy_ranking(scores, flipped, rng.random(len(names)).tolist())
            record = store.answer_ranking(annotator, names, ranks)
            side = {"detector_flag": [bool(detections[n].flag) for n in names], "score": scores, "flipped": flipped}
        append_record(side_log, {"id": record["id"], "mode": mode, "annotator": annotator, "unit_index": index,
                                 "images": names, **side})

    flips = judgements = 0
    if os.path.isfile(side_log):
        with open(side_log) as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if row.get("mode") == mode:
                    flips += sum(row["flipped"])
                    judgements += len(row["flipped"])
    summary = {
        "annotator": annotator, "mode": mode, "concept": store.concept, "detector": detector.name,
        "criterion": detector.criterion(), "noise": noise, "seed": seed, "score_key": score_key,
        "m": store.m if mode == "ranking" else None, "units": len(store.units), "answered_now": len(todo),
        "judgements": judgements, "flipped": flips, "realised_noise": flips / judgements if judgements else None,
        "feedback": store.path,
    }
    write_text(os.path.join(side_dir, f"{_slug(annotator)}.json"), to_json(summary, indent=2) + "\n")
    return summary


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="hfi-autolabel", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("image_dir", help="a generated image folder (metadata.jsonl + images)")
    parser.add_argument("--feedback", required=True, help="the feedback folder (feedback.jsonl is appended)")
    parser.add_argument("--detector", required=True,
                        help="shapes:CONCEPT, nudenet[:PRESET], q16:PROMPTS_FILE or i2p:PROMPTS_FILE")
    parser.add_argument("--concept", default=None, help="the concept text of the records (default: the detector's)")
    parser.add_argument("--mode", choices=["binary", "ranking"], default="binary")
    parser.add_argument("--m", type=int, default=5, help="images per ranked set (ranking)")
    parser.add_argument("--noise", type=float, default=0.0, help="probability that a judgement is wrong")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--annotator", default=None, help="annotator name (default auto@<detector>)")
    parser.add_argument("--score-key", default=None, help="ranking: the detector score in [0, 1] to rank by")
    parser.add_argument("--clip", default=None, help="q16/i2p: CLIP folder or hub id (default ViT-L/14)")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    detector, default_concept = make_detector(args.detector, args.clip)
    summary = autolabel(args.image_dir, args.feedback, detector, concept=args.concept or default_concept,
                        mode=args.mode, m=args.m, noise=args.noise, seed=args.seed, annotator=args.annotator,
                        score_key=args.score_key, batch_size=args.batch_size)
    rate = summary["realised_noise"]
    print(f"{summary['answered_now']} of {summary['units']} {args.mode} units answered now by {summary['annotator']} "
          f"({summary['judgements']} judgements in all, {summary['flipped']} flipped"
          f"{f', realised noise {rate:.3f}' if rate is not None else ''}); feedback in {summary['feedback']}")
    return summary


def cli() -> None:
    run_main(main)


if __name__ == "__main__":
    cli()
