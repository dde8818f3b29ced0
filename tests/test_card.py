"""The model card carries the evidence: each measurement of an export adds its record (replaced when run again),
the card's front matter holds the Hub's model-index, and what was there before survives."""

import json
import shutil

import yaml

from sdd import api, card

CARD = "---\nlicense: apache-2.0\ntags:\n- sdd\n---\n# Erased model\n\nTrained with SDD.\n"


def run_folder(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(card.os.path.join(card.os.path.dirname(card.__file__), "assets", "shapes-base"), run / "pipeline")
    (run / "README.md").write_text(CARD)
    (run / "config.yaml").write_text("method: sdd\nmodel:\n  pretrained: shapes\n")
    return run


def evaluation(value):
    return {"title": "Attack: relearn", "dataset": {"name": "relearn on red", "type": "attack/relearn"},
            "metrics": [{"type": "asr", "name": "ASR at budget 2", "value": value, "ci95": [0.1, 0.9], "n": 8}],
            "criterion": "ShapesWorld oracle", "command": "sdd-attack --model run"}


def front_matter(text):
    assert text.startswith("---\n")
    return yaml.safe_load(text[4:text.index("\n---\n", 4)])


def test_records_accumulate_replace_by_key_and_keep_the_card(tmp_path):
    run = run_folder(tmp_path)
    assert card.record(str(run / "pipeline"), "attack/relearn", evaluation(0.25)) == str(run / "README.md")
    card.record(str(run), "attack/relearn", evaluation(0.5))  # the same measurement again: replaced
    other = {**evaluation(float("nan")), "title": "Attack: other", "dataset": {"name": "x", "type": "attack/x"}}
    card.record(str(run), "attack/other", other)

    records = json.loads((run / "evaluation.json").read_text(), parse_constant=lambda c: 1 / 0)  # strict JSON
    assert list(records) == ["attack/relearn", "attack/other"]
    assert records["attack/relearn"]["metrics"][0]["value"] == 0.5
    assert records["attack/other"]["metrics"][0]["value"] is None
    assert {"sdd-erasure", "torch", "diffusers"} <= set(records["attack/relearn"]["versions"])

    text = (run / "README.md").read_text()
    front = front_matter(text)
    assert front["license"] == "apache-2.0" and front["tags"] == ["sdd"]
    [index] = front["model-index"]
    assert index["name"] == "run" and [r["dataset"]["type"] for r in index["results"]] == ["attack/relearn", "attack/x"]
    assert index["results"][0]["metrics"] == [{"type": "asr", "name": "ASR at budget 2", "value": 0.5}]
    assert "# Erased model\n\nTrained with SDD." in text and text.count("## Evaluation") == 1
    assert "| ASR at budget 2 | 0.500 | [0.100, 0.900] | 8 |" in text and "0.250" not in text
    assert "| ASR at budget 2 | n/a | [0.100, 0.900] | 8 |" in text  # a value that could not be measured


def test_a_model_that_is_not_an_export_has_no_card(tmp_path):
    folder = tmp_path / "plain"
    folder.mkdir()
    assert card.record("shapes", "k", evaluation(0.1)) is None
    assert card.record(str(folder), "k", evaluation(0.1)) is None and list(folder.iterdir()) == []


def test_an_attack_on_an_export_lands_on_its_card(tmp_path):
    run = run_folder(tmp_path)
    record = api.attack(run, "red", "relearn", "n=8", "num_inference_steps=8", "batch_size=8", "relearn.images=8",
                        "curve=[1]", budget=2, out=tmp_path / "attack")
    text = (run / "README.md").read_text()
    [result] = front_matter(text)["model-index"][0]["results"]
    assert result["dataset"]["type"] == "attack/relearn"
    assert [m["value"] for m in result["metrics"]] == [p["asr"] for p in record["curve"]]
    assert f"--attack relearn --budget 2 --seed {record['seed']}" in text


def test_sdd_eval_on_an_export_lands_on_its_card(tmp_path):
    run = run_folder(tmp_path)
    report = api.evaluate(None, "out=" + str(tmp_path / "eval"), f"entries=[{{label: E, model: '{run}'}}]", "suites=[]",
                          "attacks.run=[relearn]", "attacks.budget={relearn: 1}", "attacks.n=8",
                          "attacks.num_inference_steps=8", "attacks.overrides=[relearn.images=8]", progress=False)
    records = json.loads((run / "evaluation.json").read_text())
    [key] = records
    assert key == f"eval/{report['title']}/E"
    [metric] = records[key]["metrics"]
    assert metric["type"] == "attacks/relearn"
    assert metric["value"] == report["suites"]["attacks"]["results"]["E"]["relearn"]["value"]
