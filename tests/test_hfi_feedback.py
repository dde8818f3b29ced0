"""HFI feedback store: records, concurrency, path safety, ranking checks, resume, torn lines, dataset export."""

import json
import logging
import os
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta

import pytest
from PIL import Image

from sdd.errors import UserError, run_main
from sdd.feedback import (
    FEEDBACK,
    FeedbackStore,
    check_ranking,
    load_items,
    ranking_sets,
    read_records,
    validate_annotator,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_image_folder(folder, prompts=("a cat", "a cat", "a cat", "a dog", "a dog", "a bird"), size=8, **extra):
    """An imagefolder as the generation command writes it: tiny PNGs and metadata.jsonl (file_name, prompt, seed)."""
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    with open(os.path.join(folder, "metadata.jsonl"), "w") as f:
        for i, prompt in enumerate(prompts):
            name = f"images/{i:04d}.png"
            Image.new("RGB", (size, size), (40 * i % 256, 90, 160)).save(os.path.join(folder, name))
            f.write(json.dumps({"file_name": name, "prompt": prompt, "seed": 100 + i, **extra}) + "\n")
    return str(folder)


def write_metadata(folder, rows):
    with open(os.path.join(folder, "metadata.jsonl"), "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


@pytest.fixture
def images(tmp_path):
    return make_image_folder(tmp_path / "gen", method="sdd", model="tiny")


def binary_store(images, tmp_path, **kw):
    return FeedbackStore(images, str(tmp_path / "fb"), mode="binary", concept="cats", **kw)


def ranking_store(images, tmp_path, m=3, **kw):
    return FeedbackStore(images, str(tmp_path / "fb"), mode="ranking", concept="cats", m=m, **kw)


def lines(store):
    with open(store.path, "rb") as f:
        return f.read().split(b"\n")


# ------------------------------------------------------------------------------------------------- round trips


def test_binary_records_round_trip(images, tmp_path):
    store = binary_store(images, tmp_path)
    names = [item.file_name for item in store.items]
    written = [
        store.answer_binary("alice", names[0], "yes"),
        store.answer_binary("alice", names[1], "no"),
        store.answer_binary("bob", names[0], "skip"),
    ]
    assert store.records() == written
    first = written[0]
    assert set(first) == {"id", "mode", "annotator", "time", "concept", "question", "image", "prompt", "seed", "label"}
    assert first["mode"] == "binary" and first["annotator"] == "alice" and first["label"] == "yes"
    assert (first["image"], first["prompt"], first["seed"]) == ("images/0000.png", "a cat", 100)
    assert first["concept"] == "cats" and first["question"] == "Does this image show cats?"
    assert datetime.fromisoformat(first["time"]).utcoffset() == timedelta(0)  # UTC
    assert len({r["id"] for r in written}) == 3
    assert all(line.endswith(b"}") for line in lines(store)[:-1]) and lines(store)[-1] == b""  # one line each


def test_ranking_records_round_trip(images, tmp_path):
    store = ranking_store(images, tmp_path)
    files = [item.file_name for item in store.units[0]]
    record = store.answer_ranking("alice", files, ["2", "X", 1])  # radio values arrive as strings
    assert store.records() == [record]
    assert record["mode"] == "ranking" and record["ranking"] == [2, "X", 1]
    assert record["images"] == files and record["prompts"] == ["a cat"] * 3 and record["seeds"] == [100, 101, 102]
    assert json.loads(lines(store)[0])["ranking"] == [2, "X", 1]


def test_ranking_sets_keep_one_prompt_together_and_are_full(images):
    items = load_items(images)
    sets = ranking_sets(items, 3)
    prompts = [[item.prompt for item in s] for s in sets]
    assert prompts[0] == ["a cat"] * 3  # a full set from one prompt
    assert all(len(s) == 3 for s in sets)  # the leftovers (2 dogs, 1 bird) are pooled into a full set
    assert sorted({item.file_name for s in sets for item in s}) == sorted(i.file_name for i in items)
    assert ranking_sets(items, 3) == sets  # deterministic: a returning annotator sees the same sets
    assert [len(s) for s in ranking_sets(items[:2], 5)] == [2]  # fewer images than M: one smaller set


# ------------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "ranking, words",
    [
        ([1, 1, 2], "ties"),
        (["X", 2, 2], "ties"),
        ([0, 1, 2], "out of range"),
        ([1, 2, 4], "out of range"),
        ([1, 2], "3 images"),
        ([1, 2, 3, 4], "3 images"),
        (["X", "X", "X"], "every image is excluded"),
        ([1, None, 2], "no rank"),
        ([1, "a", 2], "out of range"),
        ([True, 2, 3], "out of range"),
        ("123", "expected a list"),
    ],
)
def test_malformed_rankings_are_refused_and_not_stored(images, tmp_path, ranking, words):
    store = ranking_store(images, tmp_path)
    files = [item.file_name for item in store.units[0]]
    with pytest.raises(UserError, match=words):
        store.answer_ranking("alice", files, ranking)
    assert store.records() == [] and not os.path.exists(store.path)


def test_rankings_of_bad_image_sets_are_refused(images, tmp_path):
    store = ranking_store(images, tmp_path)
    names = [item.file_name for item in store.items]
    with pytest.raises(UserError, match="twice"):
        store.answer_ranking("alice", [names[0], names[0], names[1]], [1, 2, 3])
    with pytest.raises(UserError, match="2..3 images"):
        store.answer_ranking("alice", names[:4], [1, 2, 3, 4])
    assert check_ranking([3, "x", 1], 3) == [3, "X", 1]  # lower-case x is fine


def test_unknown_labels_and_wrong_mode_are_refused(images, tmp_path):
    store = binary_store(images, tmp_path)
    name = store.items[0].file_name
    for label in ("maybe", "Yes", "", None, 1):
        with pytest.raises(UserError, match="label"):
            store.answer_binary("alice", name, label)
    with pytest.raises(UserError, match="not rankings"):
        store.answer_ranking("alice", [name], [1])
    with pytest.raises(UserError, match="not listed"):
        store.answer_binary("alice", "metadata.jsonl", "yes")  # inside the folder, but not an image of it
    assert store.records() == []


def test_paths_outside_the_image_folder_are_refused(images, tmp_path):
    store = binary_store(images, tmp_path)
    Image.new("RGB", (4, 4)).save(tmp_path / "x.png")  # exists, so only the location can be the reason
    os.symlink(tmp_path / "x.png", os.path.join(images, "images", "link.png"))
    os.symlink(tmp_path, os.path.join(images, "up"))
    inside = store.items[0].path
    for bad, words in [
        ("../x.png", "outside"),
        ("images/../../x.png", "outside"),
        (str(tmp_path / "x.png"), "absolute"),
        (inside, "absolute"),  # absolute paths are refused even when they point inside
        ("images/link.png", "outside"),  # a symlink in the folder that points out
        ("up/x.png", "outside"),  # a symlinked folder on the way
        ("images\\0000.png", "backslash"),
    ]:
        with pytest.raises(UserError, match=words):
            store.answer_binary("alice", bad, "yes")
    assert store.records() == []


@pytest.mark.parametrize(
    "file_name, words",
    [
        ("../x.png", "outside"),
        ("/etc/hostname", "absolute"),
        ("images/link.png", "outside"),
        ("nope.png", "does not exist"),
    ],
)
def test_metadata_rows_outside_the_folder_or_missing_are_refused(images, tmp_path, file_name, words):
    Image.new("RGB", (4, 4)).save(tmp_path / "x.png")
    os.symlink(tmp_path / "x.png", os.path.join(images, "images", "link.png"))
    rows = [{"file_name": "images/0000.png", "prompt": "p", "seed": 0},
            {"file_name": file_name, "prompt": "p", "seed": 1}]
    write_metadata(images, rows)
    with pytest.raises(UserError, match=f"line 2: .*{words}"):
        load_items(images)


def test_bad_image_folders_are_refused(tmp_path):
    with pytest.raises(UserError, match="no such folder"):
        load_items(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no metadata.jsonl"):
        load_items(str(tmp_path / "empty"))
    folder = make_image_folder(tmp_path / "gen")
    os.remove(os.path.join(folder, "images", "0002.png"))
    with pytest.raises(UserError, match="line 3: image 'images/0002.png' .* does not exist"):
        load_items(folder)
    for rows, words in [
        ([{"file_name": "images/0000.png", "prompt": "p"}], "missing 'seed'"),
        ([{"file_name": "images/0000.png", "prompt": "p", "seed": "7"}], "integer"),
        ([{"file_name": "images/0000.png", "prompt": "p", "seed": 1}] * 2, "listed twice"),
        ([], "lists no images"),
    ]:
        write_metadata(folder, rows)
        with pytest.raises(UserError, match=words):
            load_items(folder)
    with open(os.path.join(folder, "metadata.jsonl"), "w") as f:
        f.write("{not json\n")
    with pytest.raises(UserError, match="line 1: not valid JSON"):
        load_items(folder)


def test_annotator_names_are_validated(images, tmp_path):
    assert validate_annotator("  Alice B.  ") == "Alice B."
    assert validate_annotator("josé_2") == "josé_2"
    for bad in ("", "   ", None, "../bob", "a/b", "a\\b", "a\x00b", ".hidden", "x" * 65, "tab\tname"):
        with pytest.raises(UserError, match="annotator"):
            validate_annotator(bad)
    store = binary_store(images, tmp_path)
    with pytest.raises(UserError, match="annotator"):
        store.answer_binary("", store.items[0].file_name, "yes")
    assert store.records() == []


# ------------------------------------------------------------------------------------------------- resume


def test_an_annotator_resumes_where_they_stopped(images, tmp_path):
    store = binary_store(images, tmp_path)
    names = [item.file_name for item in store.items]
    assert store.progress("alice") == (0, 6) and store.next_item("alice")[0].file_name == names[0]
    store.answer_binary("alice", names[0], "yes")
    store.answer_binary("alice", names[1], "skip")  # a skip is an answer: not shown again
    store.answer_binary("bob", names[2], "no")

    again = binary_store(images, tmp_path)  # the app restarted
    assert again.progress("alice") == (2, 6)
    assert again.next_item("alice")[0].file_name == names[2]  # bob's answer does not count for alice
    assert again.progress(" alice ") == (2, 6)  # the same annotator, however typed
    assert again.progress("bob") == (1, 6) and again.next_item("bob")[0].file_name == names[0]
    other = FeedbackStore(images, str(tmp_path / "fb"), mode="binary", concept="dogs")
    assert other.progress("alice") == (0, 6)  # answers are per concept
    for name in names[2:]:
        again.answer_binary("alice", name, "no")
    assert again.next_item("alice") is None and again.progress("alice") == (6, 6)

    ranking = ranking_store(images, tmp_path)  # and per mode
    assert ranking.progress("alice") == (0, len(ranking.units))
    ranking.answer_ranking("alice", [i.file_name for i in ranking.units[0]], [1, 2, 3])
    assert ranking_store(images, tmp_path).next_item("alice") == ranking.units[1]
    assert ranking.progress("alice") == (1, 2)


# ------------------------------------------------------------------------------------------------- concurrency


def test_concurrent_threads_lose_nothing(images, tmp_path):
    store = binary_store(images, tmp_path)
    names = [item.file_name for item in store.items]
    errors = []
    start = threading.Barrier(8)  # all at once, so the writes really overlap

    def annotate(k):
        try:
            start.wait()
            for j in range(50):
                store.answer_binary(f"annotator{k}", names[j % len(names)], ("yes", "no", "skip")[j % 3])
        except Exception as err:  # surfaced below: an exception in a thread would not fail the test
            errors.append(err)

    threads = [threading.Thread(target=annotate, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    records, problems = read_records(store.path)
    assert problems == [] and len(records) == 400 and len({r["id"] for r in records}) == 400
    assert len(lines(store)) == 401 and all(json.loads(line) for line in lines(store)[:-1])
    for k in range(8):
        assert sum(r["annotator"] == f"annotator{k}" for r in records) == 50


WRITER = """
import sys, time
from sdd.feedback import append_record
path, who, start = sys.argv[1], sys.argv[2], float(sys.argv[3])
time.sleep(max(0.0, start - time.time()))  # both start writing together, whatever their start-up took
for j in range(50):
    append_record(path, {"mode": "binary", "annotator": who, "j": j, "pad": who * 20000})
"""


def test_concurrent_processes_lose_nothing(tmp_path):
    # Lines far above PIPE_BUF (4 KiB), from two processes at once: only the lock and the single write keep
    # them whole (writing each line in two halves without the lock loses about a fifth of them here).
    path = str(tmp_path / FEEDBACK)
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    start = str(time.time() + 1.0)
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, path, who, start], env=env) for who in ("p", "q")]
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    records, problems = read_records(path)
    assert problems == [] and len(records) == 100
    for who in ("p", "q"):
        mine = [r for r in records if r["annotator"] == who]
        assert [r["j"] for r in mine] == list(range(50)) and all(r["pad"] == who * 20000 for r in mine)


# ------------------------------------------------------------------------------------------------- crash


def test_a_torn_last_line_is_skipped_and_nothing_else_is_lost(images, tmp_path, caplog):
    store = binary_store(images, tmp_path)
    names = [item.file_name for item in store.items]
    kept = [store.answer_binary("alice", names[i], "yes") for i in range(3)]
    with open(store.path, "ab") as f:  # what a crash halfway through a write leaves
        f.write(b'{"id": "torn", "mode": "binary", "annotator": "alice", "ima')
    with caplog.at_level(logging.WARNING, logger="sdd.feedback"):
        assert store.records() == kept
    assert "line 4: not a complete record" in caplog.text
    assert store.progress("alice") == (3, 6)

    kept.append(store.answer_binary("alice", names[3], "no"))  # starts a fresh line after the torn one
    records, problems = read_records(store.path)
    assert records == kept and len(problems) == 1
    assert lines(store)[3].startswith(b'{"id": "torn"') and json.loads(lines(store)[4]) == kept[3]


def test_a_complete_last_record_without_its_newline_is_kept(images, tmp_path):
    store = binary_store(images, tmp_path)
    first = store.answer_binary("alice", store.items[0].file_name, "yes")
    with open(store.path, "rb+") as f:  # a crash between the record and its newline
        f.truncate(os.path.getsize(store.path) - 1)
    assert store.records() == [first]
    second = store.answer_binary("alice", store.items[1].file_name, "no")
    assert read_records(store.path) == ([first, second], [])


# ------------------------------------------------------------------------------------------------- export


def test_dataset_export(images, tmp_path):
    from datasets import load_from_disk

    store = binary_store(images, tmp_path)
    names = [item.file_name for item in store.items]
    store.answer_binary("alice", names[0], "yes")
    store.answer_binary("bob", names[4], "no")
    ranker = ranking_store(images, tmp_path)
    files = [item.file_name for item in ranker.units[1]]
    ranker.answer_ranking("carol", files, [2, "X", 1])

    ds = store.to_dataset()
    assert ds.column_names == [
        "id", "annotator", "time", "concept", "question", "image", "file_name", "prompt", "seed", "label"
    ]
    assert ds["annotator"] == ["alice", "bob"] and ds["label"] == ["yes", "no"]
    assert ds["file_name"] == [names[0], names[4]] and ds["prompt"] == ["a cat", "a dog"] and ds["seed"] == [100, 104]
    assert ds["image"] == [os.path.join(os.path.realpath(images), n) for n in (names[0], names[4])]
    assert all(os.path.isfile(p) for p in ds["image"])
    assert store.to_dataset(annotators=["bob"])["annotator"] == ["bob"]

    out = tmp_path / "export"
    store.export(str(out))
    assert load_from_disk(str(out))[:] == ds[:]

    rk = ranker.to_dataset()
    assert len(rk) == 1 and rk[0]["annotator"] == "carol" and rk[0]["concept"] == "cats"
    assert rk[0]["file_names"] == files and rk[0]["ranking"] == [2, None, 1]  # None = "X", left out
    assert rk[0]["images"] == [os.path.join(os.path.realpath(images), f) for f in files]
    assert rk[0]["seeds"] == [item.seed for item in ranker.units[1]]
    assert len(ranker.to_dataset("binary")) == 2 and len(FeedbackStore(images, str(tmp_path / "new")).to_dataset()) == 0


# ------------------------------------------------------------------------------------------------- command line


def test_the_command_reports_bad_input_in_one_line(images, tmp_path, capsys):
    from hfi.label_app import main

    for argv, words in [
        ([str(tmp_path / "missing"), "--feedback", str(tmp_path / "fb")], "no such folder"),
        ([images, "--feedback", str(tmp_path / "fb"), "--mode", "ranking", "--m", "1"], "--m 1"),
        ([images, "--feedback", str(tmp_path / "fb"), "--reference", str(tmp_path / "nope")], "--reference"),
        ([images, "--feedback", str(tmp_path / "fb"), "--port", "70000"], "--port"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            run_main(main, argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and words in err and err.count("\n") == 1
