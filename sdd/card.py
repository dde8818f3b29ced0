"""The evidence on an export's model card: what the benchmark, ``sdd-eval`` and ``sdd-attack`` measured on it.

An export's ``README.md`` (``sdd.export``) says what was trained. Each measurement of that export adds a record
to ``OUT/evaluation.json`` (keyed, so running it again replaces it) and the card is rewritten from all records:
an "Evaluation" section (the numbers with their intervals, the criteria, the command, the versions) and the
Hub's ``model-index`` metadata in the card's front matter, so a published erased model carries its own
robustness numbers.
"""

from __future__ import annotations

import datetime
import json
import os
from typing import Optional

import yaml

from sdd.files import to_json, write_text

EVALUATION = "evaluation.json"
BEGIN, END = "<!-- evaluation -->", "<!-- /evaluation -->"


def run_folder(model: str) -> Optional[str]:
    """The folder of an export's card: a run folder, or the run folder of its ``pipeline/``; else None."""
    path = os.path.abspath(os.fspath(model))
    for folder in (path, os.path.dirname(path) if os.path.basename(path) == "pipeline" else None):
        if folder and os.path.isfile(os.path.join(folder, "README.md")) and \
                os.path.isfile(os.path.join(folder, "config.yaml")):
            return folder
    return None


def versions() -> dict[str, str]:
    import diffusers
    import torch

    import sdd

    return {"sdd-erasure": sdd.__version__, "torch": torch.__version__, "diffusers": diffusers.__version__}


def record(model: str, key: str, evaluation: dict) -> Optional[str]:
    """Add ``evaluation`` under ``key`` to the card of ``model`` (if it is an export); return the card's path.

    ``evaluation``: ``{"title", "dataset", "metrics": [{"type", "name", "value", "ci95"?, "n"?}], "criterion",
    "command"}``; the date and the package versions are added here.
    """
    folder = run_folder(model)
    if folder is None:
        return None
    path = os.path.join(folder, EVALUATION)
    records = {}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            records = json.load(f)
    records[key] = {**evaluation, "date": datetime.date.today().isoformat(), "versions": versions()}
    text = to_json(records, indent=2)  # strict: a value that could not be measured (NaN) is null
    records = json.loads(text)
    write_text(path, text + "\n")
    card = os.path.join(folder, "README.md")
    with open(card, encoding="utf-8") as f:
        text = f.read()
    write_text(card, render(text, records, os.path.basename(folder)))
    return card


def render(card: str, records: dict, name: str) -> str:
    """The card with its evaluation section and ``model-index`` metadata made from ``records``."""
    front, body = _split(card)
    front["model-index"] = [{"name": name, "results": [
        {"task": {"type": "text-to-image"}, "dataset": r["dataset"],
         "metrics": [{"type": m["type"], "name": m["name"], "value": m["value"]} for m in r["metrics"]
                     if m["value"] is not None]}
        for r in records.values()]}]
    if BEGIN in body:
        body = body[: body.index(BEGIN)].rstrip() + "\n" + body[body.index(END) + len(END):].lstrip("\n")
    lines = ["", BEGIN, "## Evaluation", "",
             "Measured on this export (every number and its settings: `evaluation.json`).", ""]
    for r in records.values():
        lines += [f"### {r['title']}", "", "| metric | value | 95 % interval | n |", "|---|---|---|---|"]
        for m in r["metrics"]:
            interval = f"[{m['ci95'][0]:.3f}, {m['ci95'][1]:.3f}]" if m.get("ci95") else ""
            value = "n/a" if m["value"] is None else f"{m['value']:.3f}"
            lines.append(f"| {m['name']} | {value} | {interval} | {m.get('n', '')} |")
        lines += ["", f"- criterion: {r['criterion']}", f"- command: `{r['command']}`",
                  f"- {r['date']}, " + ", ".join(f"{k} {v}" for k, v in r["versions"].items()), ""]
    lines.append(END)
    return "---\n" + yaml.safe_dump(front, sort_keys=False) + "---\n" + body.rstrip() + "\n" + "\n".join(lines) + "\n"


def _split(card: str) -> tuple[dict, str]:
    if card.startswith("---\n") and "\n---\n" in card[4:]:
        end = card.index("\n---\n", 4)
        return yaml.safe_load(card[4:end]) or {}, card[end + 5:]
    return {}, card


# --- what each measurement records ---------------------------------------------------------------------------


def attack_evaluation(r: dict) -> dict:
    """The card record of an ``sdd-attack`` result."""
    budget_metrics = [{"type": "asr", "name": f"ASR at budget {p['budget']}", "value": p["asr"], "ci95": p["ci95"],
                       "n": p["n"]} for p in r["curve"]]
    return {"title": f"Attack: {r['attack']} ({r['concept']}, {r['method']})",
            "dataset": {"name": f"{r['attack']} attack on '{r['concept']}' (budget {r['budget']})",
                        "type": f"attack/{r['attack']}"},
            "metrics": budget_metrics, "criterion": r["criterion"],
            "command": f"sdd-attack --model {r['model']} --concept {r['concept']} --attack {r['attack']} "
                       f"--budget {r['budget']} --seed {r['seed']} method={r['method']} n={r['n']} "
                       f"eval_seed={r['eval_seed']}"}


def bench_evaluation(report: dict, row: dict, command: str) -> dict:
    """The card record of one ``sdd-shapes bench`` row."""
    settings = report["settings"]
    return {"title": f"ShapesWorld benchmark: {settings['concept']}",
            "dataset": {"name": f"ShapesWorld benchmark ({settings['concept']})", "type": "shapesworld"},
            "metrics": [{"type": key, "name": report["columns"][key], "value": m["rate"], "ci95": [m["lo"], m["hi"]],
                         "n": m["n"]} for key, m in row["metrics"].items()],
            "criterion": report["oracle"], "command": command}
