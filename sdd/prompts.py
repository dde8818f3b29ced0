"""Prompt suites: the CSVs shipped in ``sdd/assets/prompts`` (see its README) or any CSV with a ``prompt`` column.

Read with the csv module, never pandas: pandas turns I2P's prompt ``Null`` (row 2260) into NaN. Every value stays
text except the columns the generator needs, which are parsed and checked:

| field | columns, first present wins | parsed as |
|---|---|---|
| seed | ``evaluation_seed``, ``sd_seed``, ``seed`` | int (``"42.0"`` accepted, as pandas writes it) |
| guidance | ``evaluation_guidance``, ``sd_guidance_scale`` | float |
| width / height | ``sd_image_width`` / ``sd_image_height``, ``width`` / ``height`` | int |
| categories | ``categories`` (I2P) | comma-separated, stripped |

Every other column is kept, as text, in ``PromptRow.extra``. A bad file raises ``UserError`` with one line naming
the file, the line number and the problem.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass, field
from typing import Optional, Sequence

from sdd.errors import UserError

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "prompts")

SEED_COLUMNS = ("evaluation_seed", "sd_seed", "seed")
GUIDANCE_COLUMNS = ("evaluation_guidance", "sd_guidance_scale")
SIZE_COLUMNS = (("sd_image_width", "sd_image_height"), ("width", "height"))
INDEX_COLUMN = "index"  # the name given to a pandas index column written with an empty header


@dataclass(frozen=True)
class PromptRow:
    prompt: str
    seed: Optional[int] = None
    guidance: Optional[float] = None
    width: Optional[int] = None
    height: Optional[int] = None
    categories: tuple[str, ...] = ()
    extra: dict[str, str] = field(default_factory=dict)  # every other column, as text
    line: int = 0  # line of the file the row starts on (1 = header)


def available_suites() -> list[str]:
    """Names of the shipped suites (file names without ``.csv``)."""
    return sorted(f[:-4] for f in os.listdir(ASSETS) if f.endswith(".csv"))


def suite_path(name_or_path: str) -> str:
    """The CSV file of a shipped suite name, or ``name_or_path`` itself when it is an existing file."""
    if os.path.isfile(name_or_path):
        return name_or_path
    shipped = os.path.join(ASSETS, f"{name_or_path}.csv")
    if os.sep not in name_or_path and not name_or_path.endswith(".csv") and os.path.isfile(shipped):
        return shipped
    raise UserError(
        f"prompt suite '{name_or_path}': no such file and not a shipped suite "
        f"(shipped: {', '.join(available_suites())})"
    )


def load_suite(name_or_path: str, limit: Optional[int] = None) -> list[PromptRow]:
    """The rows of a suite (a shipped name such as ``i2p``, ``coco_1k``, ``country_body``, or a CSV path)."""
    return read_prompts_csv(suite_path(name_or_path), limit=limit)


def _int(value: str, column: str, where: str) -> int:
    text = value.strip()
    try:
        return int(text)
    except ValueError:
        pass
    try:
        number = float(text)
    except ValueError:
        number = math.nan
    if math.isfinite(number) and number == int(number):
        return int(number)
    raise UserError(f"{where}: column '{column}' must be an integer, got {value!r}")


def _float(value: str, column: str, where: str) -> float:
    try:
        number = float(value.strip())
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise UserError(f"{where}: column '{column}' must be a number, got {value!r}")
    return number


def _first(columns: Sequence[str], header: Sequence[str]) -> Optional[str]:
    return next((c for c in columns if c in header), None)


def _decode_error_line(path: str, err: UnicodeDecodeError) -> int:
    with open(path, "rb") as f:
        head = f.read()
    # err.start is relative to the chunk the decoder was fed; the first bad byte in the file is what it met
    try:
        head.decode("utf-8-sig")
    except UnicodeDecodeError as whole:
        return head[: whole.start].count(b"\n") + 1
    return 0


def read_prompts_csv(path: str, limit: Optional[int] = None) -> list[PromptRow]:
    """Parse one prompt CSV (UTF-8, a header line, one row per prompt; quoted fields may span lines)."""
    rows: list[PromptRow] = []
    line = 0  # last line of the previous record: the record being read starts at line + 1
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, strict=True)
            try:
                header = next(reader)
            except StopIteration:
                raise UserError(f"{path}: empty file, expected a header line with a 'prompt' column") from None
            header = [h.strip() for h in header]
            if header and not header[0]:
                header[0] = INDEX_COLUMN
            if "" in header:
                raise UserError(f"{path}:1: column {header.index('') + 1} has no name")
            dup = sorted({h for h in header if header.count(h) > 1})
            if dup:
                raise UserError(f"{path}:1: duplicate column name(s) {', '.join(repr(d) for d in dup)}")
            if "prompt" not in header:
                raise UserError(f"{path}:1: no 'prompt' column (columns: {', '.join(header)})")
            seed_col = _first(SEED_COLUMNS, header)
            guidance_col = _first(GUIDANCE_COLUMNS, header)
            size_cols = next((pair for pair in SIZE_COLUMNS if pair[0] in header and pair[1] in header), None)
            parsed = {"prompt", seed_col, guidance_col, "categories", *(size_cols or ())} - {None}
            line = 1
            for values in reader:
                start, line = line + 1, reader.line_num
                where = f"{path}:{start}"
                if not values:  # a blank line between records
                    continue
                if len(values) != len(header):
                    raise UserError(f"{where}: {len(values)} fields, the header has {len(header)}")
                cells = dict(zip(header, values))
                rows.append(
                    PromptRow(
                        prompt=cells["prompt"],
                        seed=_int(cells[seed_col], seed_col, where) if seed_col else None,
                        guidance=_float(cells[guidance_col], guidance_col, where) if guidance_col else None,
                        width=_int(cells[size_cols[0]], size_cols[0], where) if size_cols else None,
                        height=_int(cells[size_cols[1]], size_cols[1], where) if size_cols else None,
                        categories=tuple(c.strip() for c in cells.get("categories", "").split(",") if c.strip()),
                        extra={k: v for k, v in cells.items() if k not in parsed},
                        line=start,
                    )
                )
                if limit is not None and len(rows) >= limit:
                    break
    except FileNotFoundError:
        raise UserError(f"{path}: no such prompt file") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder, expected a CSV file") from None
    except UnicodeDecodeError as err:
        raise UserError(f"{path}:{_decode_error_line(path, err)}: not UTF-8 text ({err.reason})") from None
    except csv.Error as err:
        raise UserError(f"{path}:{line + 1}: malformed CSV record starting on this line ({err})") from None
    if not rows:
        raise UserError(f"{path}: no prompt rows after the header")
    return rows
