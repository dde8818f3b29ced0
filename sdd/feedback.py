"""The human-feedback store of HFI: images to judge, answers appended to one JSON-lines file, a dataset out.

Input is a folder of generated images in the `datasets` "imagefolder" layout: ``IMAGE_DIR/metadata.jsonl``
with one JSON object per image (at least ``file_name`` relative to IMAGE_DIR, ``prompt``, ``seed``) and the
images beside it. Two kinds of feedback (docs/METHODS.md §2):

- **binary**: one image, "Does this image show <concept>?" -> ``label`` yes / no / skip;
- **ranking**: a set of M images (from one prompt when possible) -> ``ranking``, one entry per image: a rank
  1..M (1 = shows the concept most) or ``"X"`` (excluded from the ranking); no two ranked images share a rank.

Every answer is one line appended at once to ``FEEDBACK_DIR/feedback.jsonl``, under an exclusive ``flock``,
written with one ``write`` and fsynced, so several annotators (threads or processes) never lose or interleave
records. A crash can leave a torn last line; readers skip it (and say so) and the next writer starts a fresh
line, so no complete record is ever lost. Answers are keyed by annotator, mode and concept: an annotator who
comes back continues where they stopped.

No UI here: ``hfi/label_app.py`` is a thin Gradio front end over `FeedbackStore`.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import posixpath
import re
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterable, Literal, Optional, Sequence

from sdd.errors import UserError
from sdd.files import atomic_path, to_json

logger = logging.getLogger(__name__)

Mode = Literal["binary", "ranking"]
MODES: tuple[str, ...] = ("binary", "ranking")
LABELS: tuple[str, ...] = ("yes", "no", "skip")
EXCLUDED = "X"
METADATA = "metadata.jsonl"
FEEDBACK = "feedback.jsonl"

# Letters, digits, space and a few marks: an annotator name may end up in file names and URLs later.
_ANNOTATOR_RE = re.compile(r"^[\w][\w .@+-]{0,63}$")


@dataclass(frozen=True)
class Item:
    """One image of IMAGE_DIR, as its metadata row describes it."""

    file_name: str  # relative to IMAGE_DIR, normalised, "/"-separated
    path: str  # absolute and resolved; always inside IMAGE_DIR
    prompt: str
    seed: int
    extra: dict = field(default_factory=dict, compare=False, hash=False)  # other columns (method, model, ...)


# ---------------------------------------------------------------------------------------------------- validation


def validate_annotator(name: Any) -> str:
    """The annotator's name, stripped; refuses empty names and names with path or control characters."""
    if not isinstance(name, str) or not name.strip():
        raise UserError("annotator: a name is required")
    name = name.strip()
    if not _ANNOTATOR_RE.match(name):
        raise UserError(
            f"annotator {name!r}: use at most 64 letters, digits, spaces or . _ @ + - (no / or \\), "
            "starting with a letter or digit"
        )
    return name


def resolve_image(image_dir: str, file_name: Any) -> tuple[str, str]:
    """(normalised relative name, resolved absolute path) of an image, refusing anything outside IMAGE_DIR.

    Refused: absolute paths, ``..`` escapes, and symlinks (of the file or of a folder on its way) that point out
    of the folder. The path must exist and be a file.
    """
    if not isinstance(file_name, str) or not file_name.strip():
        raise UserError(f"image path {file_name!r}: expected a file name relative to {image_dir}")
    if "\\" in file_name or "\x00" in file_name:
        raise UserError(f"image path {file_name!r}: backslashes and NUL are not allowed in file names")
    if os.path.isabs(file_name):
        raise UserError(f"image path {file_name!r} is absolute: file names must be relative to {image_dir}")
    rel = posixpath.normpath(file_name)
    if rel == ".." or rel.startswith("../") or rel == ".":
        raise UserError(f"image path {file_name!r} is outside the image folder {image_dir}")
    root = os.path.realpath(image_dir)
    path = os.path.realpath(os.path.join(root, rel))
    # realpath follows every symlink, so a link inside the folder that points out lands outside `root` here.
    if os.path.commonpath([root, path]) != root or path == root:
        raise UserError(f"image path {file_name!r} resolves outside the image folder {image_dir} (symlink?)")
    if not os.path.isfile(path):
        raise UserError(f"image {file_name!r} listed in {os.path.join(image_dir, METADATA)} does not exist")
    return rel, path


def load_items(image_dir: str) -> list[Item]:
    """The images of an imagefolder, in metadata order; every row checked (fields, path, file present)."""
    if not os.path.isdir(image_dir):
        raise UserError(f"image folder {image_dir}: no such folder")
    meta = os.path.join(image_dir, METADATA)
    if not os.path.isfile(meta):
        raise UserError(f"image folder {image_dir} has no {METADATA} (expected the imagefolder layout)")
    items: list[Item] = []
    seen: dict[str, int] = {}
    with open(meta, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{meta} line {line_no}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{where}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise UserError(f"{where}: expected a JSON object")
            for key in ("file_name", "prompt", "seed"):
                if key not in row:
                    raise UserError(f"{where}: missing {key!r}")
            if not isinstance(row["prompt"], str):
                raise UserError(f"{where}: 'prompt' must be a string")
            seed = row["seed"]
            if isinstance(seed, bool) or not isinstance(seed, int):
                raise UserError(f"{where}: 'seed' must be an integer, got {seed!r}")
            try:
                rel, path = resolve_image(image_dir, row["file_name"])
            except UserError as err:
                raise UserError(f"{where}: {err}") from None
            if rel in seen:
                raise UserError(f"{where}: {rel!r} is listed twice (also line {seen[rel]})")
            seen[rel] = line_no
            extra = {k: v for k, v in row.items() if k not in ("file_name", "prompt", "seed")}
            items.append(Item(rel, path, row["prompt"], seed, extra))
    if not items:
        raise UserError(f"{meta} lists no images")
    return items


def check_label(label: Any) -> str:
    if label not in LABELS:
        raise UserError(f"label {label!r}: expected one of {list(LABELS)}")
    return label


def check_ranking(ranking: Sequence[Any], n: int) -> list[int | str]:
    """A ranking of n images: each entry a rank 1..n or "X" (excluded); no ties; at least one image ranked.

    Ranks may arrive as ints or digit strings (a UI's radio values); they come back as ints. Gaps are allowed
    (1, 2, 4 with one image excluded): only the order matters.
    """
    if isinstance(ranking, (str, bytes)) or not isinstance(ranking, Sequence):
        raise UserError(f"ranking {ranking!r}: expected a list with one rank or 'X' per image")
    if len(ranking) != n:
        raise UserError(f"ranking has {len(ranking)} entries for {n} images: give one rank or 'X' per image")
    out: list[int | str] = []
    for i, r in enumerate(ranking, 1):
        if r is None or r == "":
            raise UserError(f"image {i} has no rank: choose 1..{n} or X")
        if isinstance(r, str) and r.strip().upper() == EXCLUDED:
            out.append(EXCLUDED)
            continue
        if isinstance(r, str) and r.strip().isdigit():
            r = int(r.strip())
        if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= n:
            raise UserError(f"image {i}: rank {r!r} is out of range (1..{n} or X)")
        out.append(r)
    ranks = [r for r in out if r != EXCLUDED]
    if not ranks:
        raise UserError("every image is excluded (X): rank at least one")
    ties = sorted({r for r in ranks if ranks.count(r) > 1})
    if ties:
        raise UserError(f"ties are not allowed: rank {', '.join(map(str, ties))} is given to several images")
    return out


def ranking_sets(items: Sequence[Item], m: int) -> list[tuple[Item, ...]]:
    """Split the images into sets of m to rank, each from one prompt when possible; deterministic.

    Per prompt (in order of first appearance) consecutive chunks of m; what is left of every prompt is pooled and
    chunked the same way; a last short chunk is filled up with the first images not in it, so every set has m
    images (an image may then appear in two sets). With fewer than m images in all, one set of all of them.
    """
    if m < 2:
        raise UserError(f"--m {m}: a ranking needs at least 2 images per set")
    if len(items) < 2:
        raise UserError("ranking needs at least 2 images in the folder")
    m = min(m, len(items))
    by_prompt: OrderedDict[str, list[Item]] = OrderedDict()
    for item in items:
        by_prompt.setdefault(item.prompt, []).append(item)
    sets: list[tuple[Item, ...]] = []
    rest: list[Item] = []
    for group in by_prompt.values():
        full = len(group) // m * m
        sets += [tuple(group[i : i + m]) for i in range(0, full, m)]
        rest += group[full:]
    for i in range(0, len(rest), m):
        chunk = list(rest[i : i + m])
        for item in items:
            if len(chunk) == m:
                break
            if item not in chunk:
                chunk.append(item)
        sets.append(tuple(chunk))
    return sets


def unit_key(unit: Sequence[Item]) -> tuple[str, ...]:
    """What identifies a shown unit (one image, or one set to rank) in the records: its file names, in order."""
    return tuple(item.file_name for item in unit)


# ----------------------------------------------------------------------------------------------- the JSONL file


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:  # a regular file takes the whole buffer in one write; loop only for the rare short write
        written = os.write(fd, view)
        view = view[written:]


def append_record(path: str, record: dict) -> None:
    """Append one record as one line: exclusive flock, one write, fsync. Safe across threads and processes.

    flock locks belong to an open file description, so each call opens its own: two threads of one process
    exclude each other as two processes do.
    """
    line = (to_json(record, ensure_ascii=False) + "\n").encode("utf-8")
    created = not os.path.exists(path)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            size = os.fstat(fd).st_size
            # A crash mid-write leaves a last line without its newline. End it first, or this record would be
            # glued onto the torn one and lost with it.
            if size and os.pread(fd, 1, size - 1) != b"\n":
                line = b"\n" + line
            _write_all(fd, line)
            os.fsync(fd)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
    if created:  # make the new file's directory entry durable too
        dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def read_records(path: str) -> tuple[list[dict], list[str]]:
    """(records, problems): every complete record in file order, and one message per line that was skipped.

    Read under a shared lock so a record being appended is never seen half-written. A torn line (a crash during a
    write) does not parse and is skipped; complete records before and after it are kept.
    """
    if not os.path.exists(path):
        return [], []
    with open(path, "rb") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_SH)
        try:
            data = f.read()
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
    records: list[dict] = []
    problems: list[str] = []
    for line_no, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            problems.append(f"{path} line {line_no}: not a complete record (torn write?), skipped")
            continue
        if not isinstance(record, dict) or record.get("mode") not in MODES or not record.get("annotator"):
            problems.append(f"{path} line {line_no}: not a feedback record, skipped")
            continue
        records.append(record)
    return records, problems


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


# ---------------------------------------------------------------------------------------------------- the store


class FeedbackStore:
    """Images of one IMAGE_DIR, answers in one FEEDBACK_DIR, for one mode and concept.

    ``next_item(annotator)`` gives what to show (a 1-tuple in binary mode, a set of M in ranking mode) or None
    when the annotator has answered everything; ``answer_binary`` / ``answer_ranking`` validate and append;
    ``progress`` is (answered, total) for that annotator; ``to_dataset`` / ``export`` give the answers as a
    `datasets.Dataset`. Several stores (threads, processes) may share one FEEDBACK_DIR on a local file system;
    on a network file system it depends on the server honouring flock.
    """

    def __init__(
        self,
        image_dir: str,
        feedback_dir: str,
        *,
        mode: Mode = "binary",
        concept: Optional[str] = None,
        m: int = 5,
    ):
        if mode not in MODES:
            raise UserError(f"mode {mode!r}: expected one of {list(MODES)}")
        self.image_dir = os.path.abspath(image_dir)
        self.items = load_items(self.image_dir)
        self._by_name = {item.file_name: item for item in self.items}
        self.mode: str = mode
        self.concept = concept.strip() if concept and concept.strip() else None
        self.units: list[tuple[Item, ...]] = (
            [(item,) for item in self.items] if mode == "binary" else ranking_sets(self.items, m)
        )
        self.m = len(self.units[0])
        self.feedback_dir = os.path.abspath(feedback_dir)
        if os.path.exists(self.feedback_dir) and not os.path.isdir(self.feedback_dir):
            raise UserError(f"feedback folder {feedback_dir} exists and is not a folder")
        try:
            os.makedirs(self.feedback_dir, exist_ok=True)
        except OSError as err:
            raise UserError(f"feedback folder {feedback_dir}: cannot create it ({err.strerror})") from None
        self.path = os.path.join(self.feedback_dir, FEEDBACK)
        self._reported: set[str] = set()

    # -- what the annotator sees

    @property
    def question(self) -> str:
        concept = self.concept or "the target concept"
        if self.mode == "binary":
            return f"Does this image show {concept}?"
        return f"Rank the images by how clearly they show {concept} (1 = most; X = leave out)"

    def item(self, file_name: str) -> Item:
        """The item of a file name given by a caller, refusing paths outside IMAGE_DIR and unknown images."""
        rel, _ = resolve_image(self.image_dir, file_name)
        if rel not in self._by_name:
            raise UserError(f"image {file_name!r} is not listed in {os.path.join(self.image_dir, METADATA)}")
        return self._by_name[rel]

    # -- reading

    def records(self) -> list[dict]:
        """Every complete record in feedback.jsonl (all annotators, modes and concepts); skipped lines logged."""
        records, problems = read_records(self.path)
        for problem in problems:
            if problem not in self._reported:  # say it once, not on every click
                logger.warning(problem)
                self._reported.add(problem)
        return records

    def _mine(self, record: dict, annotator: str) -> bool:
        return (
            record.get("annotator") == annotator
            and record.get("mode") == self.mode
            and record.get("concept") == self.concept
        )

    def answered(self, annotator: str) -> set[tuple[str, ...]]:
        """The units (tuples of file names) this annotator has answered, in this mode and for this concept."""
        annotator = validate_annotator(annotator)
        done: set[tuple[str, ...]] = set()
        for record in self.records():
            if self._mine(record, annotator):
                files = [record.get("image")] if self.mode == "binary" else record.get("images") or []
                done.add(tuple(files))
        return done

    def status(self, annotator: str) -> tuple[Optional[tuple[Item, ...]], int, int]:
        """(next unit to show or None when all are answered, answered, total) from one read of the file."""
        done = self.answered(annotator)
        keys = [unit_key(unit) for unit in self.units]
        todo = [unit for unit, key in zip(self.units, keys) if key not in done]
        return (todo[0] if todo else None), len(self.units) - len(todo), len(self.units)

    def next_item(self, annotator: str) -> Optional[tuple[Item, ...]]:
        return self.status(annotator)[0]

    def progress(self, annotator: str) -> tuple[int, int]:
        _, done, total = self.status(annotator)
        return done, total

    # -- writing

    def _base(self, annotator: str) -> dict:
        return {
            "id": uuid.uuid4().hex,
            "mode": self.mode,
            "annotator": validate_annotator(annotator),
            "time": _now(),
            "concept": self.concept,
            "question": self.question,
        }

    def answer_binary(self, annotator: str, file_name: str, label: str) -> dict:
        """Validate and store one yes / no / skip answer; returns the stored record."""
        if self.mode != "binary":
            raise UserError(f"this store collects {self.mode} feedback, not binary labels")
        record = self._base(annotator)
        item = self.item(file_name)
        record.update(image=item.file_name, prompt=item.prompt, seed=item.seed, label=check_label(label))
        append_record(self.path, record)
        return record

    def answer_ranking(self, annotator: str, file_names: Sequence[str], ranking: Sequence[Any]) -> dict:
        """Validate and store the ranking of a set of images (see `check_ranking`); returns the stored record."""
        if self.mode != "ranking":
            raise UserError(f"this store collects {self.mode} feedback, not rankings")
        record = self._base(annotator)
        if isinstance(file_names, str) or not 2 <= len(file_names) <= self.m:
            raise UserError(f"a ranking covers 2..{self.m} images, got {file_names!r}")
        items = [self.item(name) for name in file_names]
        if len({item.file_name for item in items}) != len(items):
            raise UserError("the same image appears twice in one ranking")
        record.update(
            images=[item.file_name for item in items],
            prompts=[item.prompt for item in items],
            seeds=[item.seed for item in items],
            ranking=check_ranking(ranking, len(items)),
        )
        append_record(self.path, record)
        return record

    # -- export

    def to_dataset(self, mode: Optional[str] = None, annotators: Optional[Iterable[str]] = None):
        """The answers of one mode (default: the store's) as a `datasets.Dataset`, in file order.

        binary: id, annotator, time, concept, question, image (absolute path), file_name, prompt, seed, label.
        ranking: the same with images, file_names, prompts, seeds (lists) and ranking (list of int; None = "X").
        """
        import datasets  # lazy: the store itself, and the processes that append, do not need it

        mode = mode or self.mode
        if mode not in MODES:
            raise UserError(f"mode {mode!r}: expected one of {list(MODES)}")
        wanted = None if annotators is None else {validate_annotator(a) for a in annotators}
        list_of = getattr(datasets, "List", None) or datasets.Sequence  # datasets < 4 has only Sequence
        string, int64 = datasets.Value("string"), datasets.Value("int64")
        common = ["id", "annotator", "time", "concept", "question"]
        if mode == "binary":
            features = {"image": string, "file_name": string, "prompt": string, "seed": int64, "label": string}
        else:
            features = {
                "images": list_of(string),
                "file_names": list_of(string),
                "prompts": list_of(string),
                "seeds": list_of(int64),
                "ranking": list_of(int64),
            }
        features = datasets.Features({**{k: string for k in common}, **features})
        columns: dict[str, list] = {name: [] for name in features}
        for record in self.records():
            if record["mode"] != mode or (wanted is not None and record["annotator"] not in wanted):
                continue
            for key in common:
                columns[key].append(record.get(key))
            where = f"{self.path}: record {record.get('id')}"
            try:
                if mode == "binary":
                    columns["image"].append(resolve_image(self.image_dir, record["image"])[1])
                    columns["file_name"].append(record["image"])
                    columns["prompt"].append(record["prompt"])
                    columns["seed"].append(record["seed"])
                    columns["label"].append(record["label"])
                else:
                    columns["images"].append([resolve_image(self.image_dir, f)[1] for f in record["images"]])
                    columns["file_names"].append(list(record["images"]))
                    columns["prompts"].append(list(record["prompts"]))
                    columns["seeds"].append(list(record["seeds"]))
                    columns["ranking"].append([None if r == EXCLUDED else r for r in record["ranking"]])
            except KeyError as err:
                raise UserError(f"{where}: missing {err}") from None
            except UserError as err:
                raise UserError(f"{where}: {err}") from None
        return datasets.Dataset.from_dict(columns, features=features)

    def export(self, out_dir: str, mode: Optional[str] = None):
        """`to_dataset` saved with ``save_to_disk`` (built beside ``out_dir``, renamed into place); returns it."""
        dataset = self.to_dataset(mode)
        with atomic_path(out_dir) as tmp:
            dataset.save_to_disk(tmp)
        return dataset
