"""The attacks: the math by hand, each attack recovers the concept on a model that was never erased, seeds
reproduce what is found, an interrupted attack continues, and bad input is one line."""

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sdd import api
from sdd.attacks.prompt_search import project_simplex
from sdd.attacks.ring_a_bell import RingABellSettings, candidate_ids, encode_ids, search
from sdd.cli.attack import main as attack_main
from sdd.errors import run_main

FAST = ["n=16", "num_inference_steps=8", "batch_size=16"]


# --- the math ------------------------------------------------------------------------------------------------


def test_simplex_projection_by_hand():
    # (0.5, 0.5, 0.5) - 1/6 each: (1/3, 1/3, 1/3); (2, 0, 0) -> (1, 0, 0); (0.6, 0.6, -1) -> (0.5, 0.5, 0)
    u = torch.tensor([[0.5, 0.5, 0.5], [2.0, 0.0, 0.0], [0.6, 0.6, -1.0]])
    out = project_simplex(u)
    expected = torch.tensor([[1 / 3, 1 / 3, 1 / 3], [1.0, 0.0, 0.0], [0.5, 0.5, 0.0]])
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    assert torch.allclose(out.sum(1), torch.ones(3)) and (out >= 0).all() and (out <= 1).all()


def test_the_genetic_search_finds_the_tokens_of_an_exact_target():
    from sdd.attacks.common import distinct_vocabulary
    from sdd.models import load_components

    c = load_components("shapes")
    red = c.tokenizer("red", add_special_tokens=False).input_ids[0]
    cfg = c.text_encoder.config
    target = encode_ids(c.text_encoder, candidate_ids(torch.tensor([[red]]), cfg.bos_token_id, cfg.eos_token_id,
                                                      77))[0]
    vocab, _ = distinct_vocabulary(c.text_encoder)
    assert red in vocab and len(vocab) < 100  # the world's words, and one id for all the words it never uses
    best, kept = search(c.text_encoder, target, vocab, RingABellSettings(tokens=1, population=8), 40,
                        np.random.default_rng(0), keep_at={40})
    assert best == [red] and kept[40] == [red]


# --- whole attacks on ShapesWorld --------------------------------------------------------------------------------


def test_concept_inversion_recovers_red_on_the_base_model_and_seeds_reproduce_the_token(tmp_path):
    record = api.attack("shapes", "red", "concept-inversion", *FAST, "inversion.images=16", "inversion.batch_size=8",
                        "curve=[10]", budget=30, out=tmp_path / "a")
    assert record["attack"] == "concept-inversion" and record["budget"] == 30 and record["n"] == 16
    assert [p["budget"] for p in record["curve"]] == [10, 30]
    assert record["asr"] >= 0.9  # the base model draws red for the prompts the token goes into
    assert record["detector"] == "shapes:red" and "oracle" in record["criterion"]
    on_disk = json.loads((tmp_path / "a" / "attack.json").read_text())
    assert on_disk["asr"] == record["asr"] and len(os.listdir(tmp_path / "a" / "images" / "step-000030")) > 16

    token = load_file(tmp_path / "a" / "tokens" / "step-000030.safetensors")["<attack>"]
    again = api.attack("shapes", "red", "concept-inversion", *FAST, "inversion.images=16", "inversion.batch_size=8",
                       "curve=[10]", budget=30, out=tmp_path / "b")
    assert torch.equal(load_file(tmp_path / "b" / "tokens" / "step-000030.safetensors")["<attack>"], token)
    assert again["asr"] == record["asr"]
    other = api.attack("shapes", "red", "concept-inversion", *FAST, "inversion.images=16", "inversion.batch_size=8",
                       "curve=[10]", budget=30, seed=1, out=tmp_path / "c")
    assert not torch.equal(load_file(tmp_path / "c" / "tokens" / "step-000030.safetensors")["<attack>"], token)
    assert other["seed"] == 1


def test_prompt_search_counts_the_plain_prompt_on_the_base_model(tmp_path):
    record = api.attack("shapes", "red", "prompt-search", *FAST, "prompt_search.cases=4", budget=40,
                        out=tmp_path / "ps")
    assert record["pre_asr"]["asr"] >= 0.75  # the base model draws red for "a red circle": broken at step 0
    assert record["asr"] >= 0.75 and record["curve"][0]["budget"] == 40


def test_prompt_search_continues_an_interrupted_run(tmp_path, capsys):
    """Each attacked prompt is recorded when done; a rerun with the same --out attacks only the rest."""
    args = ["shapes", "red", "prompt-search", *FAST, "prompt_search.cases=2"]
    straight = api.attack(*args, budget=40, out=tmp_path / "run", progress=True)
    assert "case 1/2" in capsys.readouterr().out
    records = tmp_path / "run" / "cases.jsonl"
    records.write_text(records.read_text().splitlines()[0] + "\n")  # killed after the first prompt
    os.remove(tmp_path / "run" / "attack.json")
    resumed = api.attack(*args, budget=40, out=tmp_path / "run", progress=True)
    printed = capsys.readouterr().out
    assert "case 1/2" not in printed and "case 2/2" in printed
    assert resumed["found"]["cases"] == straight["found"]["cases"] and resumed["asr"] == straight["asr"]


def test_ring_a_bell_finds_red_words_on_the_base_model(tmp_path):
    record = api.attack("shapes", "red", "ring-a-bell", *FAST, "ring_a_bell.population=16", "curve=[5]", budget=30,
                        out=tmp_path / "rab")
    assert record["asr"] >= 0.9
    assert all("red" in prompt.split() for prompt in record["found"]["prompts"].values())


def test_relearn_and_static_write_their_records(tmp_path):
    record = api.attack("shapes", "red", "relearn", *FAST, "relearn.images=8", "curve=[1]", budget=2,
                        out=tmp_path / "rl")
    assert [p["budget"] for p in record["curve"]] == [1, 2] and record["steps_to_half"] == 1  # red from the start
    static = api.attack("tiny", "nudity", "static", *FAST, budget=3, out=tmp_path / "st")
    assert static["n"] == 3 and static["detector"] == "nudenet" and 0 <= static["asr"] <= 1


# --- bad input ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, message", [
    (["--detector", "vision:red"], "--detector vision:red: expected shapes:CONCEPT"),
    (["--concept", "purple"], "concept 'purple': no default detector judges it"),
    (["--detector", "shapes:red", "--concept", "circle"], "judges 'red', not the concept 'circle'"),
    (["--attack", "static"], "no shipped adversarial suite for 'red'"),
    (["--attack", "sweep"], "attack: Invalid value 'sweep'"),
    (["--images", "EMPTY"], "lists no images"),
])
def test_bad_input_is_one_line(tmp_path, capsys, argv, message):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metadata.jsonl").write_text("")
    base = {"--model": "shapes", "--concept": "red", "--attack": "concept-inversion", "--out": str(tmp_path / "o")}
    given = dict(zip(argv[::2], argv[1::2]))
    images = given.pop("--images", None)
    args = [x for k, v in {**base, **given}.items() for x in (k, v)]
    if images:
        args.append(f"images={empty}")
    with pytest.raises(SystemExit) as exit_info:
        run_main(attack_main, args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    [line] = [x for x in err.splitlines() if x.startswith("error:")]
    assert message in line


def test_sdd_eval_runs_the_attacks_on_every_entry_into_a_table(tmp_path):
    from sdd.cli.eval import main as eval_main

    report = eval_main([
        "out=" + str(tmp_path / "eval"),
        "entries=[{label: SD, model: shapes}, {label: NEG, model: shapes, method: neg, concept: red}]", "suites=[]",
        "attacks.run=[concept-inversion]", "attacks.budget={concept-inversion: 10}", "attacks.n=8",
        "attacks.num_inference_steps=8", "attacks.overrides=[inversion.images=8, inversion.batch_size=4]",
        "tables=[{name: t, columns: [{suite: attacks, metric: concept-inversion}, {suite: attacks, metric: relearn}]}]",
    ])
    section = report["suites"]["attacks"]
    assert set(section["results"]) == {"SD", "NEG"}
    cell = section["results"]["SD"]["concept-inversion"]
    assert cell["n"] == 8 and cell["budget"] == 10 and cell["curve"][-1]["budget"] == 10
    written = json.loads((tmp_path / "eval/attacks/NEG/concept-inversion/attack.json").read_text())
    assert written["method"] == "neg" and written["asr"] == section["results"]["NEG"]["concept-inversion"]["value"]
    [table] = report["tables"]
    assert "not run: relearn is not in attacks.run" in json.dumps(table)
    [figure] = section["figures"]  # the ASR curves, one line per entry
    assert figure["key"] == "curves" and (tmp_path / "eval" / figure["path"]).stat().st_size > 0


def test_the_curves_figure_has_one_panel_per_attack_and_a_line_per_entry():
    from sdd.eval.plots import curves

    def cell(*points):
        return {"curve": [{"budget": b, "asr": a, "ci95": [lo, hi], "n": 8} for b, a, lo, hi in points]}

    section = {"columns": {"relearn": "relearn ASR", "ring-a-bell": "RAB ASR"},
               "results": {"A": {"relearn": cell((10, 0.25, 0.1, 0.5), (100, 0.5, 0.25, 0.75))},
                           "B": {"relearn": cell((10, 1.0, 0.7, 1.0))}}}
    [panel] = curves(section, ["A", "B", "C"])  # no entry has a ring-a-bell curve: no panel
    assert panel["attack"] == "relearn" and [label for label, _ in panel["lines"]] == ["A", "B"]
    assert panel["lines"][0][1] == [(10, 25.0, 15.0, 25.0), (100, 50.0, 25.0, 25.0)]
    assert panel["lines"][1][1] == [(10, 100.0, pytest.approx(30.0), 0.0)]
