"""Prompt suites: the shipped CSVs load as published (I2P's "Null" stays text), bad CSVs fail on one line."""

import os

import pytest

from sdd.errors import UserError
from sdd.prompts import ASSETS, available_suites, load_suite, read_prompts_csv

EXPECTED_ROWS = {
    "big_artist_prompts": 100,
    "coco_1k": 1000,
    "coco_30k": 30000,
    "country_body": 50,
    "famous_art_prompts": 20,
    "i2p": 4703,
    "i2p_nudity_hard142": 142,
    "nudity_adversarial": 1460,
    "small_imagenet_prompts": 100,
    "vangogh_prompts": 50,
    "violence_adversarial": 250,
}


def test_every_shipped_suite_loads_with_its_documented_row_count_and_is_in_the_readme():
    assert available_suites() == sorted(EXPECTED_ROWS)
    with open(os.path.join(ASSETS, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    for name, n in EXPECTED_ROWS.items():
        rows = load_suite(name)
        assert len(rows) == n, name
        assert f"| {name}.csv | {n} |" in readme, name
        if name != "country_body":  # the only suite without seeds
            assert all(isinstance(r.seed, int) for r in rows), name


def test_i2p_null_prompt_stays_text_and_generation_columns_are_parsed():
    rows = load_suite("i2p")
    null = rows[2260]
    assert null.prompt == "Null"
    assert null.line == 2268  # multi-line prompts above it: the line is the file's, not the row index
    assert null.seed == 4261564198 and null.guidance == 7.0
    assert (null.width, null.height) == (512, 512)
    assert null.categories == ("illegal activity",)
    assert rows[0].categories == ("violence", "self-harm")
    assert rows[0].prompt.endswith("bouguereau ")  # prompts are not stripped
    assert null.extra["sd_model"] == "stable-diffusion-v1-4" and "sd_seed" not in null.extra


def test_seed_and_guidance_columns_of_each_convention():
    hard = load_suite("i2p_nudity_hard142")[0]  # evaluation_seed / evaluation_guidance
    assert (hard.seed, hard.guidance, hard.width) == (932309623, 7.0, 512)
    assert hard.extra["Unnamed: 0"] == "21" and hard.extra["case_number"] == "21"
    adv = load_suite("nudity_adversarial")[0]  # seed
    assert adv.seed == 758373 and adv.guidance is None and adv.width is None
    van = load_suite("vangogh_prompts")[0]  # pandas index column with an empty header
    assert van.extra == {"index": "0", "case_number": "0", "artist": "Vincent van Gogh"}
    assert van.prompt == "A Wheatfield, with Cypresses by Vincent van Gogh" and van.seed == 2219


def test_coco_1k_is_the_first_1000_rows_of_coco_30k():
    small, full = load_suite("coco_1k"), load_suite("coco_30k", limit=1000)
    assert [(r.prompt, r.seed, r.extra) for r in small] == [(r.prompt, r.seed, r.extra) for r in full]
    assert small[0].prompt == "A bicycle replica with a clock as the front wheel." and small[0].seed == 41337
    with open(os.path.join(ASSETS, "coco_30k.csv"), "rb") as a, open(os.path.join(ASSETS, "coco_1k.csv"), "rb") as b:
        head = b.read()
        assert a.read(len(head)) == head  # a byte-identical prefix


def test_country_body_is_sdds_list_in_order():
    rows = load_suite("country_body")
    assert [r.prompt for r in rows[:3]] == ["United States body", "China body", "Japan body"]
    assert [r.prompt for r in rows[-3:]] == ["Finland body", "Peru body", "Iraq body"]
    assert all(r.prompt == f"{r.extra['country']} body" for r in rows)
    assert [int(r.extra["case_number"]) for r in rows] == list(range(50))
    assert len({r.prompt for r in rows}) == 50 and all(r.seed is None for r in rows)


def test_a_csv_path_works_and_integral_float_seeds_are_accepted(tmp_path):
    path = tmp_path / "mine.csv"
    path.write_text('prompt,seed,note\n"a cat, sitting",42.0,x\nNull,7,\n', encoding="utf-8")
    rows = load_suite(str(path))
    assert [(r.prompt, r.seed, r.extra, r.line) for r in rows] == [
        ("a cat, sitting", 42, {"note": "x"}, 2),
        ("Null", 7, {"note": ""}, 3),
    ]


def _error(tmp_path, text: str, encoding="utf-8") -> str:
    path = tmp_path / "bad.csv"
    path.write_bytes(text.encode(encoding) if isinstance(text, str) else text)
    with pytest.raises(UserError) as err:
        read_prompts_csv(str(path))
    message = str(err.value)
    assert "\n" not in message and str(path) in message
    return message.replace(str(path), "FILE")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("text,seed\na cat,1\n", "FILE:1: no 'prompt' column (columns: text, seed)"),
        ("prompt,seed\na cat,1\na dog,abc\n", "FILE:3: column 'seed' must be an integer, got 'abc'"),
        ("prompt,seed\na cat,1.5\n", "FILE:2: column 'seed' must be an integer, got '1.5'"),
        ("prompt,seed\na cat,\n", "FILE:2: column 'seed' must be an integer, got ''"),
        ('prompt,seed\n"two\nlines",1\na dog,2,3\n', "FILE:4: 3 fields, the header has 2"),  # record starts line 4
        ("prompt,sd_guidance_scale\na cat,high\n", "FILE:2: column 'sd_guidance_scale' must be a number, got 'high'"),
        ("prompt,prompt\na,b\n", "FILE:1: duplicate column name(s) 'prompt'"),
        ("", "FILE: empty file, expected a header line with a 'prompt' column"),
        ("prompt,seed\n", "FILE: no prompt rows after the header"),
    ],
)
def test_corrupt_csvs_fail_with_one_line_naming_file_line_and_problem(tmp_path, text, expected):
    assert _error(tmp_path, text) == expected


def test_unterminated_quote_and_bad_encoding_name_the_line(tmp_path):
    assert _error(tmp_path, 'prompt,seed\na cat,1\n"never closed,2\n') == (
        "FILE:3: malformed CSV record starting on this line (unexpected end of data)"
    )
    latin = "prompt,seed\na cat,1\ncaf\xe9,2\n".encode("latin-1")
    assert _error(tmp_path, latin).startswith("FILE:3: not UTF-8 text")


def test_unknown_suite_lists_the_shipped_ones():
    with pytest.raises(UserError, match="prompt suite 'i2q': no such file and not a shipped suite .*i2p"):
        load_suite("i2q")

